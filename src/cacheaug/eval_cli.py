"""`cacheaug eval perplexity|gsm8k|mc|harness` and `cacheaug report`: run an evaluator on a checkpoint and
write its results (JSON for `cacheaug report`, plus JSONL records, a Markdown table and plots) into --out.

Each ``run_*`` function is what its verb does, importable and called by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

CONDITIONS = {"both": (True, False), "augmented": (True,), "base": (False,)}


# ---------------------------------------------------------------------------- shared pieces
def load_checkpoint(ckpt, dtype: str = "float32"):
    """(AugmentedLM, tokenizer) from a checkpoint folder, on the base model it names."""
    from .checkpoint import read_config
    from .coprocessor import AugmentedLM
    from .models import load_base

    base, tokenizer = load_base(read_config(ckpt).base_model, dtype)
    return AugmentedLM.from_pretrained(ckpt, base=base), tokenizer


def run_meta(lm, ckpt, conditions=(True, False)) -> dict:
    """What was evaluated, as `cacheaug report` labels it; the plain base alone when nothing was augmented."""
    if tuple(conditions) == (False,):
        return {"checkpoint": None, "base_model": lm.config.base_model, "method": "base", "num_latents": None,
                "num_ahead": None, "step": None}
    description_path = Path(ckpt) / "cacheaug_config.json"
    step = json.loads(description_path.read_text()).get("step") if description_path.is_file() else None
    return {
        "checkpoint": str(ckpt), "base_model": lm.config.base_model, "method": lm.config.method,
        "num_latents": lm.config.num_latents, "num_ahead": lm.config.num_ahead, "step": step,
    }


def data_name(path: str) -> str:
    """A short name for a data path: ``prose/test.txt`` -> ``prose-test``, ``items.jsonl`` -> ``items``."""
    source = Path(path)
    generic = source.stem.lower() in ("test", "valid", "validation", "val", "train", "dev", "data")
    name = (f"{source.parent.name}-{source.stem}" if generic else source.stem) if source.is_file() else source.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "data"


def _write_json(path: Path, data: dict, command: str | None = None) -> None:
    from .outputs import write_json

    write_json(path, data, command)


def _model(ckpt, model):
    return model if model is not None else load_checkpoint(ckpt)


# ---------------------------------------------------------------------------- the evaluations
def run_perplexity(
    ckpt, data: str, out, every: int = 1, max_tokens: int | None = None, seq_len: int = 256, offsets: int = 32,
    batch_size: int = 1, name: str | None = None, data_format: str = "auto", max_queries: int = 2048, model=None, command=None,
) -> Path:
    """Perplexity by position on ``data`` (file, folder or glob): perplexity-<name>.{json,md,png} in ``out``."""
    from .data import DataArgs, DataError, validation_batches
    from .evaluate import evaluate_positions
    from .report import plot_position_eval

    lm, tokenizer = _model(ckpt, model)
    args = DataArgs(source=data, validation_source=data, format=data_format, seq_len=seq_len)
    max_batches = None if max_tokens is None else max(1, math.ceil(max_tokens / (seq_len * batch_size)))
    batches = validation_batches(args, tokenizer, batch_size, max_batches=max_batches)
    if not batches:
        raise DataError(f"no sequences of {seq_len} tokens in {data!r}")
    started = time.perf_counter()
    result = evaluate_positions(lm, batches, num_offsets=offsets, every=every, max_queries=max_queries, progress=True)
    name = name or data_name(data)
    out = Path(out)
    record = {
        "kind": "perplexity", "name": name, "run": run_meta(lm, ckpt),
        "settings": {"data": data, "every": every, "seq_len": seq_len, "offsets": offsets, "max_tokens": max_tokens,
                     "batch_size": batch_size, "sequences": result.num_sequences},
        "result": result.to_dict(), "seconds": time.perf_counter() - started,
    }
    _write_json(out / f"perplexity-{name}.json", record, command)
    (out / f"perplexity-{name}.md").write_text(result.table() + "\n")
    plot_position_eval(record["result"], out / f"perplexity-{name}.png", title=f"{name}: {Path(str(ckpt)).name}")
    print(f"perplexity by position on {name} ({result.num_points} points, every {every}):\n" + result.table())
    return out / f"perplexity-{name}.json"


def run_gsm8k(
    ckpt, data: str, out, shots: int = 8, train_file: str | None = None, cot: bool = False, limit: int | None = None,
    exemplar_seed: int | None = None, max_new_tokens: int = 256, conditions=(True, False), model=None,
    batch_size: int = 8, async_delay: int | None = None, command=None,
) -> Path:
    """GSM8K accuracy: gsm8k-<shots>shot[-cot].json (summary) and .jsonl (every item) in ``out``."""
    from .data import DataError
    from .gsm8k import choose_exemplars, evaluate_gsm8k, read_gsm8k, write_records

    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if async_delay is not None and (async_delay < 0 or True not in conditions):
        raise DataError(f"--async-delay needs a value >= 0 and the augmented condition, got {async_delay}")
    rows = read_gsm8k(data)[:limit] if limit else read_gsm8k(data)
    exemplars = []
    if shots:
        train_file = train_file or str(Path(data).with_name("train.jsonl"))
        if not Path(train_file).is_file():
            raise DataError(f"{shots}-shot prompts need exemplars: no training file {train_file} (pass --train-file)")
        exemplars = choose_exemplars(read_gsm8k(train_file), shots, exemplar_seed)
    lm, tokenizer = _model(ckpt, model)
    name = f"gsm8k-{shots}shot" + ("-cot" if cot else "") + (f"-async{async_delay}" if async_delay is not None else "")
    out = Path(out)
    started = time.perf_counter()
    result, _ = evaluate_gsm8k(
        lm, tokenizer, rows, exemplars, cot=cot, conditions=tuple(conditions), max_new_tokens=max_new_tokens,
        on_record=write_records(out / f"{name}.jsonl"), progress=True, batch_size=batch_size, async_delay=async_delay,
    )
    _write_json(out / f"{name}.json", {
        "kind": "gsm8k", "name": name, "run": run_meta(lm, ckpt, conditions),
        "settings": {"data": data, "train_file": train_file, "shots": shots, "cot": cot, "limit": limit,
                     "exemplar_seed": exemplar_seed, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "async_delay": async_delay},
        "result": result.to_dict(), "seconds": time.perf_counter() - started,
    }, command)
    print(result.table())
    return out / f"{name}.json"


def run_mc(ckpt, data: str, out, delimiter: str = " ", limit: int | None = None, name: str | None = None,
           conditions=(True, False), model=None, command=None) -> Path:
    """Multiple-choice accuracy: mc-<name>.json (summary) and .jsonl (log-likelihoods of every item) in ``out``."""
    from .evaluate import evaluate_mc, read_mc_items

    items = read_mc_items(data)[:limit] if limit else read_mc_items(data)
    lm, tokenizer = _model(ckpt, model)
    name = name or data_name(data)
    out = Path(out)
    result, records = evaluate_mc(lm, tokenizer, items, delimiter, tuple(conditions), progress=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mc-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _write_json(out / f"mc-{name}.json", {
        "kind": "mc", "name": name, "run": run_meta(lm, ckpt, conditions),
        "settings": {"data": data, "delimiter": delimiter, "limit": limit}, "result": result.to_dict(),
    }, command)
    print(result.table())
    return out / f"mc-{name}.json"


def run_harness_tasks(ckpt, tasks: list[str], out, include_path: str | None = None, limit: float | None = None,
                      num_fewshot: int | None = None, conditions=(True, False), local_tasks_only: bool = False,
                      model=None, command=None) -> Path:
    """lm-evaluation-harness tasks through the ``cacheaug`` model: harness.json in ``out``."""
    try:
        from .lm_eval_adapter import run_harness
    except ModuleNotFoundError as error:
        from .config import ConfigError

        raise ConfigError(f"the harness needs lm-eval ({error}); pip install -e '.[eval]'") from None

    lm, tokenizer = _model(ckpt, model)
    results = run_harness(lm, tokenizer, tasks, tuple(conditions), include_path, limit, num_fewshot,
                          include_defaults=not local_tasks_only)
    _write_json(Path(out) / "harness.json", {
        "kind": "harness", "name": "harness", "run": run_meta(lm, ckpt, conditions),
        "settings": {"tasks": tasks, "include_path": include_path, "limit": limit, "num_fewshot": num_fewshot},
        "result": results,
    }, command)
    print(json.dumps(results, indent=2))
    return Path(out) / "harness.json"


# ---------------------------------------------------------------------------- argument parsing
def add_eval_tasks(evaluate: argparse.ArgumentParser) -> None:
    """`cacheaug eval <task> ...`; `cacheaug eval --ckpt DIR` alone stays the ahead-token evaluation."""
    tasks = evaluate.add_subparsers(dest="task", metavar="{perplexity,gsm8k,mc,harness}")

    def task(name: str, help: str, func) -> argparse.ArgumentParser:
        parser = tasks.add_parser(name, help=help)
        parser.add_argument("--ckpt", required=True, help="checkpoint folder (step-NNNNNN/)")
        parser.add_argument("--out", required=True, help="folder for the results")
        parser.set_defaults(func=func)
        return parser

    perplexity = task("perplexity", "perplexity of the k-th token after latents, inserted every few tokens",
                      cmd_perplexity)
    perplexity.add_argument("--data", required=True, help="text file, folder of .txt/.jsonl, or glob")
    perplexity.add_argument("--every", type=int, default=1, help="latents after every k-th token (1: every token)")
    perplexity.add_argument("--max-tokens", type=int, help="read at most this many tokens of text")
    perplexity.add_argument("--seq-len", type=int, default=256)
    perplexity.add_argument("--offsets", type=int, default=32, help="tokens scored after each insertion")
    perplexity.add_argument("--batch-size", type=int, default=1)
    perplexity.add_argument("--max-queries", type=int, default=2048, help="new base tokens per row in one pass")
    perplexity.add_argument("--format", default="auto", help="data format: auto | text | jsonl | gsm8k")
    perplexity.add_argument("--name", help="name in file names and the report (default: from --data)")

    gsm8k = task("gsm8k", "GSM8K accuracy, greedy, latents once at the end of the prompt", cmd_gsm8k)
    gsm8k.add_argument("--data", required=True, help="GSM8K test JSONL")
    gsm8k.add_argument("--shots", type=int, default=8)
    gsm8k.add_argument("--train-file", help="exemplars from here (default: train.jsonl next to --data)")
    gsm8k.add_argument("--exemplar-seed", type=int, help="draw the exemplars with this seed (default: the first k)")
    gsm8k.add_argument("--cot", action="store_true", help="end the prompt with \"Let's think step by step.\"")
    gsm8k.add_argument("--limit", type=int, help="the first N test items")
    gsm8k.add_argument("--max-new-tokens", type=int, default=256)
    gsm8k.add_argument("--conditions", choices=sorted(CONDITIONS), default="both")
    gsm8k.add_argument("--batch-size", type=int, default=8, help="items decoded together (same texts as one by one)")
    gsm8k.add_argument("--async-delay", type=int, metavar="N",
                       help="insert the latents after N generated tokens, as an asynchronous coprocessor would")

    mc = task("mc", 'multiple choice by log-likelihood; JSONL rows {"context", "choices", "gold"}', cmd_mc)
    mc.add_argument("--data", required=True)
    mc.add_argument("--delimiter", default=" ", help="put between context and each choice (default: a space)")
    mc.add_argument("--limit", type=int)
    mc.add_argument("--name")
    mc.add_argument("--conditions", choices=sorted(CONDITIONS), default="both")

    harness = task("harness", "lm-evaluation-harness tasks with the cacheaug model", cmd_harness)
    harness.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    harness.add_argument("--include-path", help="folder of extra task YAMLs (local tasks)")
    harness.add_argument("--local-tasks-only", action="store_true", help="index only --include-path (faster start)")
    harness.add_argument("--limit", type=float)
    harness.add_argument("--num-fewshot", type=int)
    harness.add_argument("--conditions", choices=sorted(CONDITIONS), default="both")


def add_report(verbs) -> None:
    report = verbs.add_parser("report", help="Markdown table and plots comparing evaluated run folders")
    report.add_argument("runs", nargs="+", help="folders written by `cacheaug eval ... --out`")
    report.add_argument("--out", required=True)
    report.set_defaults(func=cmd_report)


def cmd_perplexity(args, extra) -> int:
    run_perplexity(args.ckpt, args.data, args.out, every=args.every, max_tokens=args.max_tokens, seq_len=args.seq_len,
                   offsets=args.offsets, batch_size=args.batch_size, name=args.name, data_format=args.format,
                   max_queries=args.max_queries, command=args.command)
    return 0


def cmd_gsm8k(args, extra) -> int:
    run_gsm8k(args.ckpt, args.data, args.out, shots=args.shots, train_file=args.train_file, cot=args.cot,
              limit=args.limit, exemplar_seed=args.exemplar_seed, max_new_tokens=args.max_new_tokens,
              conditions=CONDITIONS[args.conditions], batch_size=args.batch_size, async_delay=args.async_delay, command=args.command)
    return 0


def cmd_mc(args, extra) -> int:
    run_mc(args.ckpt, args.data, args.out, delimiter=args.delimiter, limit=args.limit, name=args.name,
           conditions=CONDITIONS[args.conditions], command=args.command)
    return 0


def cmd_harness(args, extra) -> int:
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    run_harness_tasks(args.ckpt, [t for t in args.tasks.split(",") if t], args.out, args.include_path, limit,
                      args.num_fewshot, CONDITIONS[args.conditions], local_tasks_only=args.local_tasks_only, command=args.command)
    return 0


def cmd_report(args, extra) -> int:
    from .report import write_report

    path = write_report(args.runs, args.out)
    print(path.read_text())
    print(f"wrote {path}")
    return 0
