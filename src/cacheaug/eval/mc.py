"""Multiple choice by log-likelihood (arXiv 2412.17747, section 3.2): the coprocessor called once at the end of
each context, every choice scored from a copy of that state; accuracy and lm-eval's length-normalised acc_norm."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..data.documents import read_mc_items
from ..errors import DataError
from .likelihood import context_state, continuation_logprobs, encode_pair
from .metrics import evaluating, progress_bar

__all__ = ["McEval", "evaluate_mc", "read_mc_items"]


@dataclass
class McEval:
    """Accuracy by summed log-likelihood, and by log-likelihood per character of the choice (lm-eval's acc_norm)."""

    acc_augmented: float | None
    acc_norm_augmented: float | None
    acc_base: float | None
    acc_norm_base: float | None
    num_items: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        def cell(value):
            return "-" if value is None else f"{100 * value:.2f}"

        return "\n".join([
            "| condition | acc | acc_norm |", "|---|---:|---:|",
            f"| augmented | {cell(self.acc_augmented)} | {cell(self.acc_norm_augmented)} |",
            f"| base | {cell(self.acc_base)} | {cell(self.acc_norm_base)} |",
        ])


@torch.no_grad()
def evaluate_mc(
    lm,
    tokenizer,
    items: list[dict],
    delimiter: str = " ",
    conditions: tuple[bool, ...] = (True, False),
    progress: bool = False,
) -> tuple[McEval, list[dict]]:
    """Score ``delimiter + choice`` after each context; augmented = latents once at the end of the context.

    Returns the accuracies and one record per item and condition (log-likelihoods, predictions).
    """
    records = []
    correct = {(augment, norm): 0 for augment in conditions for norm in (False, True)}
    with evaluating(lm):
        for index, item in enumerate(progress_bar(items, progress, desc="multiple choice", unit="item")):
            _score_item(lm, tokenizer, index, item, delimiter, conditions, correct, records)

    def accuracy(augment: bool, norm: bool) -> float | None:
        return correct[(augment, norm)] / len(items) if augment in conditions and items else None

    result = McEval(
        accuracy(True, False), accuracy(True, True), accuracy(False, False), accuracy(False, True), len(items)
    )
    return result, records


def _score_item(lm, tokenizer, index: int, item: dict, delimiter: str, conditions, correct: dict,
                records: list) -> None:
    """Score every choice of one item in every condition; counts into ``correct``, one record per condition."""
    pairs = [encode_pair(tokenizer, item["context"], delimiter + choice) for choice in item["choices"]]
    context_ids = pairs[0][0]
    if any(pair[0] != context_ids for pair in pairs):
        raise DataError(f"item {index}: the choices change how the context is tokenised")
    for augment in conditions:
        state = context_state(lm, context_ids, augment)
        scores = [logprob for logprob, _ in continuation_logprobs(lm, state, [pair[1] for pair in pairs])]
        per_char = [score / max(1, len(choice)) for score, choice in zip(scores, item["choices"])]
        prediction = max(range(len(scores)), key=scores.__getitem__)
        prediction_norm = max(range(len(per_char)), key=per_char.__getitem__)
        correct[(augment, False)] += prediction == item["gold"]
        correct[(augment, True)] += prediction_norm == item["gold"]
        records.append({
            "index": index, "augmented": augment, "gold": item["gold"], "loglikelihoods": scores,
            "prediction": prediction, "prediction_norm": prediction_norm,
        })
