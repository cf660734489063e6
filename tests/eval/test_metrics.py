"""Perplexity by position: the chunked one-pass evaluation equals augmenting each prefix and scoring token by token."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cacheaug import AugmentedLM
from cacheaug.cli import main
from cacheaug.eval.metrics import PositionEval, evaluate_positions, position_points
from helpers import PAPER, ROOT, VOCAB, perturbed_lm, trained_checkpoint


def _lm(arch: str, num_latents: int = 3, method: str = "coprocessor") -> AugmentedLM:
    """The point-by-point reference feeds the latents as the paper does."""
    return perturbed_lm(arch, seed=3, num_latents=num_latents, num_ahead=2, method=method, **PAPER).eval()

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "test.txt"  # ../shared/data, as in configs/


@torch.no_grad()
def _point_by_point(lm: AugmentedLM, batch: torch.Tensor, num_offsets: int, every: int):
    """Per offset k: mean NLL of x_{t+k} after augmenting x_0..x_t, feeding x_{t+1..t+k-1} one at a time."""
    rows, length = batch.shape
    sums = {"aug": torch.zeros(num_offsets, dtype=torch.float64), "base": torch.zeros(num_offsets, dtype=torch.float64)}
    counts = torch.zeros(num_offsets)
    base_logits = lm.base(input_ids=batch).logits
    for row in range(rows):
        for point in position_points(length, num_offsets, every).tolist():
            state = lm.augment(batch[row : row + 1, : point + 1])
            logits = state.logits
            for k in range(1, num_offsets + 1):
                target = point + k
                if target >= length:
                    break
                sums["aug"][k - 1] += F.cross_entropy(logits.float(), batch[row, target : target + 1]).item()
                sums["base"][k - 1] += F.cross_entropy(base_logits[row, target - 1 : target].float(), batch[row, target : target + 1]).item()
                counts[k - 1] += 1
                out = lm.base(
                    input_ids=batch[row : row + 1, target : target + 1], cache=state.cache,
                    position_ids=torch.tensor([[state.next_position]]), use_cache=True,
                )
                state.next_position += 1
                logits = out.logits[:, -1]
    return (sums["aug"] / counts).tolist(), (sums["base"] / counts).tolist(), counts.tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_perplexity_by_position_equals_point_by_point(arch):
    lm = _lm(arch)
    batch = torch.randint(2, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    num_offsets, every = 5, 2
    # max_queries fits two points per pass, so the points are split into several chunks
    result = evaluate_positions(lm, [batch], num_offsets=num_offsets, every=every, max_queries=2 * (3 + 4))
    aug, base, counts = _point_by_point(lm, batch, num_offsets, every)
    assert result.tokens_by_offset == counts
    torch.testing.assert_close(torch.tensor(result.nll_augmented), torch.tensor(aug), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(result.nll_base), torch.tensor(base), rtol=1e-4, atol=1e-4)
    assert result.nll_augmented != result.nll_base
    assert result.num_points == 2 * len(position_points(17, num_offsets, every))


def test_chunking_and_batching_do_not_change_the_numbers():
    lm = _lm("llama")
    batch = torch.randint(2, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    whole = evaluate_positions(lm, [batch], num_offsets=6, every=1, max_queries=10_000)
    chunked = evaluate_positions(lm, [batch], num_offsets=6, every=1, max_queries=8)  # one point per pass
    rows = evaluate_positions(lm, [batch[:1], batch[1:]], num_offsets=6, every=1)
    for other in (chunked, rows):
        torch.testing.assert_close(torch.tensor(other.nll_augmented), torch.tensor(whole.nll_augmented), rtol=1e-5, atol=1e-5)
        assert other.tokens_by_offset == whole.tokens_by_offset


def test_points_leave_full_windows_and_pause_tokens_evaluate():
    assert position_points(20, 4, 1).tolist() == list(range(16))  # t + 4 <= 19
    assert position_points(20, 4, 5).tolist() == [0, 5, 10, 15]
    assert position_points(4, 8, 1).tolist() == [0, 1, 2]  # too short: partial windows
    lm = _lm("llama", method="pause")
    batch = torch.randint(2, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    result = evaluate_positions(lm, [batch], num_offsets=4, every=3)
    assert all(count == len(position_points(16, 4, 3)) for count in result.tokens_by_offset)
    assert result.relative_change[0] == pytest.approx(100 * (math.exp(result.nll_augmented[0] - result.nll_base[0]) - 1))
    assert PositionEval.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert "| 1 |" in result.table() and "| 8 |" not in result.table()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def test_cli_perplexity_writes_json_table_and_plot(checkpoint, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "eval"
    assert main(["eval", "perplexity", "--ckpt", str(checkpoint), "--data", str(text), "--seq-len", "64",
                 "--offsets", "8", "--every", "4", "--max-tokens", "256", "--out", str(out)]) == 0
    record = json.loads(next(out.glob("perplexity-*.json")).read_text())
    assert record["kind"] == "perplexity" and record["run"]["num_latents"] == 2 and record["run"]["step"] == 4
    result = record["result"]
    assert len(result["perplexity_augmented"]) == 8 and record["settings"]["sequences"] == 4
    assert all(math.isfinite(v) for v in result["perplexity_augmented"] + result["perplexity_base"])
    assert next(out.glob("perplexity-*.png")).stat().st_size > 1000
    assert "| offset |" in next(out.glob("perplexity-*.md")).read_text()
    assert "ppl augmented" in capsys.readouterr().out

    # a folder of text files works too, named after the folder
    folder = tmp_path / "prose"
    folder.mkdir()
    (folder / "a.txt").write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 8)
    assert main(["eval", "perplexity", "--ckpt", str(checkpoint), "--data", str(folder), "--seq-len", "64",
                 "--offsets", "4", "--every", "8", "--out", str(out)]) == 0
    assert json.loads((out / "perplexity-prose.json").read_text())["settings"]["sequences"] == 9

    # the ahead-token evaluation without a task keeps working, and a task without --ckpt is refused
    assert main(["eval", "--ckpt", str(checkpoint), "--batches", "1", "--batch-size", "1"]) == 0
    assert main(["eval", "perplexity", "--data", str(text), "--out", str(out)]) == 2


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="shared data (wikitext2) not present")
def test_cli_perplexity_on_wikitext(checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "perplexity", "--ckpt", str(checkpoint), "--data", str(WIKITEXT), "--seq-len", "96",
                 "--offsets", "4", "--every", "8", "--max-tokens", "192", "--out", str(out)]) == 0
    record = json.loads((out / "perplexity-wikitext2-test.json").read_text())
    assert record["settings"]["sequences"] == 2 and record["result"]["tokens_by_offset"][0] == 2 * 12


def _sequences(shift: float, seed: int = 0) -> PositionEval:
    """3 sequences x 4 offsets of NLL sums; the augmented ones ``shift`` nats per target below a common draw."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(5, 9, (3, 4), generator=torch.Generator().manual_seed(1)).double()
    base = 3.0 * counts
    augmented = base - 0.2 * counts + torch.randn(3, 4, generator=generator, dtype=torch.float64) - shift * counts
    return PositionEval(
        nll_augmented=(augmented.sum(0) / counts.sum(0)).tolist(), nll_base=(base.sum(0) / counts.sum(0)).tolist(),
        tokens_by_offset=counts.sum(0).long().tolist(), num_sequences=3, seq_len=64, every=8, num_points=24,
        sequence_nll_augmented=augmented.tolist(), sequence_nll_base=base.tolist(), sequence_counts=counts.long().tolist(),
    )


def test_paired_change_is_exact_for_a_known_shift_and_zero_against_itself():
    import math

    from cacheaug.errors import InputError

    first, second = _sequences(0.1), _sequences(0.0)
    itself = first.paired_change(first)
    assert itself["overall"] == 0 and all(lo == hi == 0 for lo, hi in itself["by_offset_ci"])
    # the same noise in both runs: every sequence, every offset is 0.1 nats per target apart, so is every resample
    paired = first.paired_change(second)
    expected = 100 * (math.exp(-0.1) - 1)
    assert all(abs(change - expected) < 1e-9 for change in paired["by_offset"])
    assert all(abs(lo - expected) < 1e-9 and abs(hi - expected) < 1e-9 for lo, hi in paired["by_offset_ci"])
    assert abs(paired["overall"] - expected) < 1e-9
    # against a run with other noise the interval is no longer a point
    noisy = first.paired_change(_sequences(0.0, seed=5))
    assert noisy["overall_ci"][0] < noisy["overall"] < noisy["overall_ci"][1]
    other_targets = _sequences(0.0)
    other_targets.sequence_counts = [[c + 1 for c in row] for row in other_targets.sequence_counts]
    with pytest.raises(InputError, match="same targets"):
        first.paired_change(other_targets)
