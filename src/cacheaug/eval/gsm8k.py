"""GSM8K: few-shot and zero-shot chain-of-thought prompts, answer extraction, and greedy accuracy with and
without augmentation (the coprocessor called once, at the end of the prompt; arXiv 2412.17747, 3.2-3.3).

Prompts use the document format the coprocessor was trained on (data.documents.render_document):

    Question: <question>
    Answer: <worked solution, calculator annotations stripped>
    #### <number>

Exemplars are separated by a blank line; the test question ends with ``Answer:`` (or, for zero-shot CoT,
``Answer: Let's think step by step.``) and the model continues until a stop sequence.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..coprocessor import AugmentedLM
from ..data.documents import gsm8k_document, read_gsm8k  # noqa: F401 (read_gsm8k: part of this task's API)
from ..errors import DataError
from ..generate import generate_until_batch
from ..outputs import JsonlWriter
from ..state import padded_batches_are_exact, padded_context_states
from .likelihood import encode
from .metrics import evaluating, progress_bar

EXEMPLAR_SEPARATOR = "\n\n"
COT_TRIGGER = "Let's think step by step."
STOP_SEQUENCES = ("\n\nQuestion:", "Question:", "\n\n\n")
# -7, 1,234, 3.50, $5 (the sign may sit before or after the dollar sign)
_NUMBER = re.compile(r"(-)?\$?(-)?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?")
_MARKED = re.compile(r"####\s*(.*)")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.*)", re.IGNORECASE)


# ---------------------------------------------------------------------------- answers
def parse_number(text: str) -> float | None:
    """The first number in ``text`` as a float: ``$1,234.50`` -> 1234.5, ``-7`` -> -7.0; None if there is none."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    sign = -1.0 if match.group(1) or match.group(2) else 1.0
    return sign * float(match.group(3).replace(",", "") + (match.group(4) or ""))


def extract_answer(text: str, strict: bool = False) -> float | None:
    """The final answer a solution states, or None.

    In order: the number after the last ``####``; the number after the last "the answer is"; unless
    ``strict``, the last number anywhere in the text (how lm-eval's "flexible-extract" scores GSM8K).
    """
    for pattern in (_MARKED, _ANSWER_IS):
        for found in reversed(list(pattern.finditer(text))):
            value = parse_number(found.group(1))
            if value is not None:
                return value
    if strict:
        return None
    numbers = list(_NUMBER.finditer(text))
    return parse_number(numbers[-1].group(0)) if numbers else None


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def gold_answer(answer: str) -> float:
    """The number after ``####`` in a GSM8K reference solution."""
    value = extract_answer(answer, strict=True)
    if value is None:
        raise DataError(f"GSM8K answer without a '#### <number>' line: {answer[-80:]!r}")
    return value


# ---------------------------------------------------------------------------- prompts
def choose_exemplars(train_rows: list[dict], shots: int, seed: int | None = None) -> list[dict]:
    """The first ``shots`` training rows, or ``shots`` rows drawn with ``seed``; fixed for every test item."""
    if shots > len(train_rows):
        raise DataError(f"{shots} shots asked, the training file has {len(train_rows)} rows")
    if seed is None:
        return train_rows[:shots]
    return random.Random(seed).sample(train_rows, shots)


def exemplar_block(exemplars: list[dict]) -> str:
    """Solved exemplars in the training corpus's format, each followed by a blank line ('' for zero-shot)."""
    return "".join(gsm8k_document(row["question"], row["answer"]) + EXEMPLAR_SEPARATOR for row in exemplars)


def question_prompt(question: str, cot: bool = False) -> str:
    """The test question, ending where the model's solution starts."""
    prompt = f"Question: {question.strip()}\nAnswer:"
    return f"{prompt} {COT_TRIGGER}" if cot else prompt


# ---------------------------------------------------------------------------- evaluation
@dataclass
class Gsm8kEval:
    """Exact-match accuracy of the extracted final answer, greedy decoding, with and without latents."""

    accuracy_augmented: float | None
    accuracy_base: float | None
    strict_accuracy_augmented: float | None  # only '####' / 'the answer is' count
    strict_accuracy_base: float | None
    num_items: int
    shots: int
    cot: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        def cell(value):
            return "-" if value is None else f"{100 * value:.2f}"

        setting = f"{self.shots}-shot" + (" CoT" if self.cot else "")
        return "\n".join([
            f"| GSM8K {setting}, {self.num_items} items | accuracy | strict |", "|---|---:|---:|",
            f"| augmented | {cell(self.accuracy_augmented)} | {cell(self.strict_accuracy_augmented)} |",
            f"| base | {cell(self.accuracy_base)} | {cell(self.strict_accuracy_base)} |",
        ])


class SharedPrefix:
    """The base's cache over the exemplars, read once and copied for every test item.

    Tokenisation may merge across the exemplar/question boundary, so the shared ids stop a few tokens
    early and each prompt checks, by ids, that it starts with them; otherwise it is read in full.
    """

    MARGIN = 4  # tokens left off the end of the exemplar block

    def __init__(self, lm: AugmentedLM, tokenizer, exemplars_text: str):
        self.ids: list[int] = []
        self.cache = None
        if exemplars_text:
            ids = encode(tokenizer, exemplars_text)[: -self.MARGIN]
            if ids:
                self.ids = ids
                self.cache = lm.prefill(torch.tensor([ids], device=lm.device)).cache

    def split(self, prompt_ids: list[int]) -> tuple[list[int], object]:
        """(ids still to read, cache to read them onto or None)."""
        if self.cache is not None and prompt_ids[: len(self.ids)] == self.ids and len(prompt_ids) > len(self.ids):
            return prompt_ids[len(self.ids):], self.cache
        return prompt_ids, None


def generate_batch(
    lm: AugmentedLM,
    tokenizer,
    contexts: list[list[int]],
    augment: bool,
    cache,
    max_new_tokens: int,
    stop: tuple[str, ...],
    async_delay: int | None = None,
) -> list[str]:
    """Greedy solutions for ``contexts`` (read onto ``cache`` when given), decoded together."""
    delay = async_delay if augment else None
    state = padded_context_states(lm, contexts, augment, cache, delay=delay)
    return generate_until_batch(lm, tokenizer, state, max_new_tokens, stop)


@torch.no_grad()
def evaluate_gsm8k(
    lm: AugmentedLM,
    tokenizer,
    rows: list[dict],
    exemplars: list[dict],
    cot: bool = False,
    conditions: tuple[bool, ...] = (True, False),
    max_new_tokens: int = 256,
    stop: tuple[str, ...] = STOP_SEQUENCES,
    on_record: Callable[[dict], None] | None = None,
    progress: bool = False,
    batch_size: int = 8,
    async_delay: int | None = None,
) -> tuple[Gsm8kEval, list[dict]]:
    """Greedy-decode a solution for every row, augmented (latents once after the prompt) and/or not.

    Every (item, condition) gives a record: prompt, output, extracted answers, gold, correct; ``on_record``
    sees each as soon as its batch is done (to stream it to disk). ``batch_size`` items decode together
    (padded; the same texts as one by one, see generate.generate_until_batch); bases with sliding-window
    layers decode one by one, as padding would shift their windows. ``async_delay`` = N: the latents go in
    after N generated tokens instead of before the first (the paper's Table 8).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if async_delay is not None and async_delay < 0:
        raise ValueError(f"async_delay must be >= 0, got {async_delay}")
    if not padded_batches_are_exact(lm.base.config):
        batch_size = 1
    with evaluating(lm):
        records = _generate_records(lm, tokenizer, rows, exemplars, cot, conditions, max_new_tokens, stop, on_record,
                                    progress, batch_size, async_delay)
    return summarize(records, len(rows), len(exemplars), cot), records


def _generate_records(lm, tokenizer, rows, exemplars, cot, conditions, max_new_tokens, stop, on_record, progress,
                      batch_size, async_delay) -> list[dict]:
    prefix_text = exemplar_block(exemplars)
    shared = SharedPrefix(lm, tokenizer, prefix_text)
    records: list[dict] = []
    for begin in progress_bar(range(0, len(rows), batch_size), progress, desc="gsm8k", unit="batch"):
        indices = range(begin, min(begin + batch_size, len(rows)))
        prompts = [prefix_text + question_prompt(rows[index]["question"], cot) for index in indices]
        splits = [shared.split(encode(tokenizer, prompt)) for prompt in prompts]  # (ids to read, cache or None)
        outputs: dict[bool, list[str]] = {}
        for augment in conditions:
            outputs[augment] = [""] * len(splits)
            for on_shared in (True, False):  # prompts read onto the exemplar cache, then any read in full
                members = [j for j, (_, cache) in enumerate(splits) if (cache is not None) == on_shared]
                if members:
                    texts = generate_batch(
                        lm, tokenizer, [splits[j][0] for j in members], augment,
                        shared.cache if on_shared else None, max_new_tokens, stop, async_delay,
                    )
                    for j, text in zip(members, texts):
                        outputs[augment][j] = text
        for j, index in enumerate(indices):
            gold = gold_answer(rows[index]["answer"])
            for augment in conditions:
                output = outputs[augment][j]
                extracted, strict = extract_answer(output), extract_answer(output, strict=True)
                record = {
                    "index": index, "augmented": augment, "prompt": prompts[j], "output": output,
                    "extracted": extracted, "extracted_strict": strict, "gold": gold,
                    "correct": same_number(extracted, gold), "correct_strict": same_number(strict, gold),
                }
                if augment and async_delay is not None:
                    record["async_delay"] = async_delay
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


def summarize(records: list[dict], num_items: int, shots: int, cot: bool) -> Gsm8kEval:
    def accuracy(augment: bool, key: str) -> float | None:
        chosen = [r[key] for r in records if r["augmented"] == augment]
        return sum(chosen) / len(chosen) if chosen else None

    return Gsm8kEval(
        accuracy_augmented=accuracy(True, "correct"),
        accuracy_base=accuracy(False, "correct"),
        strict_accuracy_augmented=accuracy(True, "correct_strict"),
        strict_accuracy_base=accuracy(False, "correct_strict"),
        num_items=num_items,
        shots=shots,
        cot=cot,
    )


def write_records(path: Path) -> Callable[[dict], None]:
    """An ``on_record`` that appends each record to a JSONL file (emptied first)."""
    return JsonlWriter(path)
