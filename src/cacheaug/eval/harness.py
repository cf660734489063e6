"""lm-evaluation-harness model ``cacheaug``: any lm-eval task, with the coprocessor called once at the end of
each context (arXiv 2412.17747, section 3.2), for log-likelihood and for generation.

    python -m cacheaug.eval.harness run --model cacheaug --tasks arc_easy --model_args ckpt=DIR,augment=true

is lm-eval's own CLI with the model registered (``cacheaug eval harness`` runs both conditions for you).

(In Python, ``import cacheaug.eval.harness`` registers the model for ``lm_eval.simple_evaluate``.)

A thin ``HFLM`` subclass: tokenisation, request splitting, rolling windows and the task machinery are
lm-eval's; scoring and greedy generation go through cacheaug's own functions (likelihood.py, generate.py), so the numbers
equal ``cacheaug eval mc`` / ``cacheaug eval gsm8k`` on the same strings.
"""

from __future__ import annotations

from collections import defaultdict

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..coprocessor import load_checkpoint
from ..coprocessor import AugmentedLM
from ..errors import ConfigError
from ..generate import generate_until
from .likelihood import context_state, continuation_logprobs


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"augment must be true or false, got {value!r}")
    return bool(value)


@register_model("cacheaug")
class CacheAugLM(HFLM):
    """HFLM over the frozen base of an AugmentedLM; ``augment=False`` evaluates the plain base the same way."""

    def __init__(
        self,
        ckpt: str | None = None,
        augment: bool | str = True,
        lm: AugmentedLM | None = None,
        tokenizer=None,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        **kwargs,
    ) -> None:
        if lm is None:
            if ckpt is None:
                raise ConfigError("the cacheaug model needs ckpt=<checkpoint folder> (or an AugmentedLM as lm=)")
            lm, tokenizer = load_checkpoint(ckpt, dtype)
        elif tokenizer is None:
            raise ConfigError("pass the tokenizer with lm=")
        lm.eval()
        self.augmented_lm = lm
        self.augment = _as_bool(augment)
        self._max_gen_toks = int(max_gen_toks)
        kwargs.pop("device", None)  # the model is already placed; HFLM takes its device from it
        super().__init__(pretrained=lm.base, tokenizer=tokenizer, **kwargs)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """One (augmented) context state per distinct context; each continuation scored from a copy of it."""
        from tqdm.auto import tqdm

        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (_, context_ids, continuation_ids) in enumerate(requests):
            keep = max(1, self.max_length - len(continuation_ids))  # left-truncate over-long contexts
            by_context[tuple(context_ids[-keep:])].append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="cacheaug loglikelihood")
        for context_ids, indices in by_context.items():
            state = context_state(self.augmented_lm, list(context_ids), self.augment)
            scores = continuation_logprobs(self.augmented_lm, state, [requests[i][2] for i in indices])
            for index, score in zip(indices, scores):
                results[index] = score
                request_strings = requests[index][0]
                if request_strings is not None:
                    self.cache_hook.add_partial("loglikelihood", request_strings, score)
            progress.update(len(indices))
        progress.close()
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding after the (augmented) context until a stop sequence, EOS or max_gen_toks."""
        from tqdm.auto import tqdm

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="cacheaug generate_until"):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_new = int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.max_gen_toks)))
            # sampling settings are ignored: cacheaug's harness evaluation is greedy
            context_ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            state = context_state(self.augmented_lm, context_ids, self.augment)
            text = generate_until(self.augmented_lm, self.tokenizer, state, max_new, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
        return outputs


def run_harness(
    lm: AugmentedLM,
    tokenizer,
    tasks: list[str],
    conditions: tuple[bool, ...] = (True, False),
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    max_gen_toks: int = 256,
    include_defaults: bool = True,
) -> dict:
    """``lm_eval.simple_evaluate`` on ``tasks``, augmented and/or not: {"augmented"|"base": {task: metrics}}.

    ``include_defaults=False`` indexes only the tasks under ``include_path`` (much faster to start).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults or not include_path)
    results = {}
    for augment in conditions:
        model = CacheAugLM(lm=lm, tokenizer=tokenizer, augment=augment, max_gen_toks=max_gen_toks)
        out = simple_evaluate(
            model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=False, bootstrap_iters=0,
        )
        results["augmented" if augment else "base"] = _plain(out["results"])
    return results


def table(results: dict) -> str:
    """Markdown: every metric of every task, augmented vs base (the columns of the conditions that ran)."""
    conditions = [c for c in ("augmented", "base") if c in results]
    rows = {}
    for condition in conditions:
        for task, metrics in results[condition].items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample_len":
                    rows.setdefault((task, metric), {})[condition] = value
    lines = ["| task | metric | " + " | ".join(conditions) + " |", "|---|---|" + "---:|" * len(conditions)]
    for (task, metric), values in sorted(rows.items()):
        cells = [f"{values[c]:.4f}" if c in values else "-" for c in conditions]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plain(value):
    """Task results as JSON-safe values (lm-eval mixes in numpy scalars and 'N/A' strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


# python -m cacheaug.eval.harness <lm_eval arguments>: lm-eval's own CLI, with `cacheaug` registered
if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
