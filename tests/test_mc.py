"""Multiple choice by log-likelihood: the planted answer wins, acc and acc_norm are computed as defined."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cacheaug import AugmentedLM, CoprocessorConfig, load_base
from cacheaug.config import PAPER_RECIPE
from cacheaug import cache as kv
from cacheaug.cli import main
from cacheaug.evaluate import context_state, continuation_logprobs, encode_pair, evaluate_mc, read_mc_items

BIAS = 30.0  # every byte but "z" costs about BIAS nats: one continuation's likelihood dominates by construction


def biased_lm(method: str = "coprocessor") -> tuple[AugmentedLM, object]:
    """tiny-random whose LM head gets a bias of +BIAS on the byte "z"."""
    base, tokenizer = load_base("tiny-random")
    head = base.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[ord("z")] = BIAS
    base.lm_head = biased.requires_grad_(False)
    return AugmentedLM(base, CoprocessorConfig(num_latents=2, num_ahead=3, method=method, **PAPER_RECIPE)).eval(), tokenizer


ITEMS = [
    # " zzz" costs ~BIAS (the space), the others ~BIAS per byte: acc and acc_norm both pick it
    {"context": "Pick one:", "choices": ["abc", "zzz", "bzz"], "gold": 1},
    # " q" costs ~2*BIAS in all; " zzz...zqq" costs ~3*BIAS but spread over 42 characters:
    # acc picks "q" (wrong here), acc_norm (per character of the choice) picks the long one (right)
    {"context": "And now:", "choices": ["q", "z" * 40 + "qq"], "gold": 1},
]


def test_planted_answer_and_acc_norm():
    lm, tokenizer = biased_lm()
    result, records = evaluate_mc(lm, tokenizer, ITEMS)
    assert (result.acc_augmented, result.acc_norm_augmented) == (0.5, 1.0)
    assert (result.acc_base, result.acc_norm_base) == (0.5, 1.0)
    assert result.num_items == 2 and len(records) == 4
    for record in records:
        scores = record["loglikelihoods"]
        choices = ITEMS[record["index"]]["choices"]
        assert record["prediction"] == max(range(len(scores)), key=scores.__getitem__)
        per_char = [s / len(c) for s, c in zip(scores, choices)]
        assert record["prediction_norm"] == max(range(len(per_char)), key=per_char.__getitem__)
    first = [r for r in records if r["index"] == 0 and r["augmented"]][0]["loglikelihoods"]
    assert first[1] > -BIAS - 1 and first[0] < -3 * BIAS  # " zzz": only the space costs; " abc": all 4 bytes


@torch.no_grad()
def test_choice_scores_equal_one_forward_over_context_latents_and_choice():
    """Scoring from a copy of the augmented cache = one pass over [context ; latents ; choice]."""
    lm, tokenizer = biased_lm()
    context_ids, choice_ids = encode_pair(tokenizer, "Pick one: ", "bzz")
    assert tokenizer.decode(choice_ids) == " bzz"  # the context's trailing space moved to the choice
    state = context_state(lm, context_ids, augment=True)
    cache_before = kv.copy_cache(state.cache)
    (score, greedy), = continuation_logprobs(lm, state, [choice_ids])
    assert kv.caches_equal(state.cache, cache_before)  # scored from a copy
    embed = lm.base.get_input_embeddings()
    context = torch.tensor([context_ids])
    sequence = torch.cat([embed(context), state.latents, embed(torch.tensor([choice_ids[:-1]]))], dim=1)
    logits = lm.base(inputs_embeds=sequence).logits[0, len(context_ids) + lm.config.num_latents - 1 :]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(choice_ids)[:, None]).sum()
    assert score == pytest.approx(expected.item(), abs=1e-3)
    assert greedy is False


def test_pause_tokens_and_bad_rows(tmp_path):
    lm, tokenizer = biased_lm(method="pause")
    result, _ = evaluate_mc(lm, tokenizer, ITEMS[:1], conditions=(True,))
    assert result.acc_augmented == 1.0 and result.acc_base is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "choices": ["a"], "gold": 0}) + "\n")
    from cacheaug.data import DataError

    with pytest.raises(DataError, match="line 1"):
        read_mc_items(bad)


def test_cli_mc_end_to_end(tmp_path_factory, tmp_path, capsys):
    from test_evaluate import trained_checkpoint

    checkpoint = trained_checkpoint(tmp_path_factory)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    out = tmp_path / "eval"
    assert main(["eval", "mc", "--ckpt", str(checkpoint), "--data", str(data), "--out", str(out)]) == 0
    summary = json.loads((out / "mc-items.json").read_text())
    assert summary["kind"] == "mc" and summary["result"]["num_items"] == 2
    for key in ("acc_augmented", "acc_norm_augmented", "acc_base", "acc_norm_base"):
        assert 0.0 <= summary["result"][key] <= 1.0
    lines = (out / "mc-items.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["loglikelihoods"]) == 3
    assert "acc_norm" in capsys.readouterr().out
