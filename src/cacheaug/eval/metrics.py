"""The loss metrics, with and without augmentation: ahead-token loss by offset (train and `eval ahead`) and
perplexity by position (`eval perplexity`, arXiv 2412.17747 section 3.1)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch

from ..coprocessor import AugmentedLM
from ..errors import InputError
from . import TABLE_OFFSETS

EVAL_POINTS_SEED = 1234  # validation points are fixed, so every evaluation scores the same tokens


@contextlib.contextmanager
def evaluating(lm) -> Iterator[None]:
    """``lm`` in eval mode inside the block; its training flag restored on the way out, exceptions included."""
    was_training = lm.training
    lm.eval()
    try:
        yield
    finally:
        lm.train(was_training)


def progress_bar(items, enabled: bool, **options):
    """``items`` under a tqdm bar when ``enabled`` (the human channel), else as they are."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, dynamic_ncols=True, **options)


@dataclass
class AheadEval:
    """Mean NLL of the N_A tokens after each augmentation point, by offset, with and without latents."""

    loss_augmented: float
    loss_base: float
    nll_by_offset_augmented: list[float]  # (N_A,)
    nll_by_offset_base: list[float]
    num_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Markdown: perplexity of the k-th token after the latents, with vs without augmentation."""
        lines = ["| offset | ppl augmented | ppl base | change |", "|---:|---:|---:|---:|"]
        for offset, (aug, base) in enumerate(zip(self.nll_by_offset_augmented, self.nll_by_offset_base), 1):
            change = 100 * (math.exp(aug - base) - 1)
            lines.append(f"| {offset} | {math.exp(aug):.3f} | {math.exp(base):.3f} | {change:+.1f}% |")
        overall = 100 * (math.exp(self.loss_augmented - self.loss_base) - 1)
        lines.append(f"| all | {math.exp(self.loss_augmented):.3f} | {math.exp(self.loss_base):.3f} | {overall:+.1f}% |")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_ahead(
    lm: AugmentedLM, batches: list[torch.Tensor], seed: int = EVAL_POINTS_SEED, progress: bool = False
) -> AheadEval:
    """Score every batch (B, T) at fixed seeded points, augmented (one pass) and with the plain base."""
    if not batches:
        raise ValueError("evaluation needs at least one validation batch")
    with evaluating(lm):
        return _evaluate_ahead(lm, batches, seed, progress)


def _evaluate_ahead(lm: AugmentedLM, batches: list[torch.Tensor], seed: int, progress: bool) -> AheadEval:
    generator = torch.Generator().manual_seed(seed)
    num_ahead = lm.config.num_ahead
    sums = {"aug": torch.zeros(num_ahead), "base": torch.zeros(num_ahead)}
    counts = torch.zeros(num_ahead)
    for batch in progress_bar(batches, progress, desc="ahead-token loss", unit="batch"):
        batch = batch.to(lm.device)
        points = lm.sample_points(batch.shape[0], batch.shape[1], generator)
        per_offset_count = _offset_counts(points, batch.shape[1], num_ahead)
        for key, out in (("aug", lm.training_loss(batch, points)), ("base", lm.unaugmented_loss(batch, points))):
            sums[key] += out.nll_by_offset.cpu() * per_offset_count
        counts += per_offset_count
    by_offset = {key: (value / counts.clamp(min=1)) for key, value in sums.items()}
    total = counts.sum().clamp(min=1)
    return AheadEval(
        loss_augmented=float(sums["aug"].sum() / total),
        loss_base=float(sums["base"].sum() / total),
        nll_by_offset_augmented=by_offset["aug"].tolist(),
        nll_by_offset_base=by_offset["base"].tolist(),
        num_tokens=int(counts.sum()),
    )


def _interval(intervals: dict, index: int) -> str:
    if not intervals:
        return ""
    low, high = intervals["by_offset"][index]
    return f" [{low:+.2f}, {high:+.2f}]"


def _offset_counts(points: torch.Tensor, length: int, num_ahead: int) -> torch.Tensor:
    """(N_A,) how many points have a target at each offset (targets past the sequence end are not scored)."""
    offsets = torch.arange(num_ahead)
    return (points.cpu()[:, :, None] + 1 + offsets < length).sum(dim=(0, 1)).float()


# ---------------------------------------------------------------------------- perplexity by position (Table 1)


@dataclass
class PositionEval:
    """NLL of the k-th token after the latents (k = 1..K), latents inserted every ``every`` tokens.

    The base numbers score exactly the same targets with no latents: x_{t+k} given x_0..x_{t+k-1}.
    """

    nll_augmented: list[float]  # (K,) mean NLL (nats) of the k-th token after the latents
    nll_base: list[float]  # (K,)
    tokens_by_offset: list[int]  # (K,) targets scored at each offset
    num_sequences: int
    seq_len: int
    every: int
    num_points: int  # augmentation points, all sequences together
    # Per sequence, per offset: NLL sums with and without latents and target counts, (S, K) each; the
    # bootstrap intervals resample sequences (tokens of one sequence are not independent).
    sequence_nll_augmented: list[list[float]] = field(default_factory=list)
    sequence_nll_base: list[list[float]] = field(default_factory=list)
    sequence_counts: list[list[int]] = field(default_factory=list)

    @property
    def num_offsets(self) -> int:
        return len(self.nll_augmented)

    def bootstrap(self, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
        """Percentile intervals of the relative perplexity change (percent), resampling whole sequences:
        {"by_offset": [(lo, hi)] * K, "overall": (lo, hi), "overall_change": value} for offsets 1..K together."""
        if not self.sequence_counts:
            return {}
        aug = torch.tensor(self.sequence_nll_augmented, dtype=torch.float64)  # (S, K)
        base = torch.tensor(self.sequence_nll_base, dtype=torch.float64)
        counts = torch.tensor(self.sequence_counts, dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(counts), (samples, len(counts)), generator=generator)  # (samples, S)

        def change(a, b, c):  # sums over the sequence axis -> percent change
            return 100 * (torch.exp((a.sum(-2) - b.sum(-2)) / c.sum(-2).clamp(min=1)) - 1)

        by_offset = change(aug[picks], base[picks], counts[picks])  # (samples, K)
        overall = change(aug[picks].sum(-1, keepdim=True), base[picks].sum(-1, keepdim=True), counts[picks].sum(-1, keepdim=True))
        low, high = (1 - level) / 2, 1 - (1 - level) / 2
        quantiles = torch.tensor([low, high], dtype=torch.float64)
        offset_ci = torch.quantile(by_offset, quantiles, dim=0).T.tolist()  # (K, 2)
        overall_ci = torch.quantile(overall[:, 0], quantiles).tolist()
        point = change(aug.sum(-1, keepdim=True), base.sum(-1, keepdim=True), counts.sum(-1, keepdim=True))
        return {"by_offset": offset_ci, "overall": overall_ci, "overall_change": float(point[0]), "level": level,
                "samples": samples}

    def paired_change(self, other: PositionEval, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
        """Perplexity with this run's latents relative to ``other``'s (percent; negative = this run better), on
        the same targets, with percentile intervals from one resampling of sequences for both (paired: the
        sequence-to-sequence spread that two separate intervals each carry cancels out).

        {"by_offset": [change] * K, "by_offset_ci": [(lo, hi)] * K, "overall": change, "overall_ci": (lo, hi)}.
        """
        same = self.sequence_counts and self.sequence_counts == other.sequence_counts and torch.allclose(
            torch.tensor(self.sequence_nll_base), torch.tensor(other.sequence_nll_base), rtol=1e-4, atol=1e-3)
        if not same:  # the base's NLL of the same targets is the same whatever the latents
            raise InputError("a paired comparison needs two evaluations of the same targets (same data, seq_len, "
                             "every, offsets and max tokens), with per-sequence sums")
        first = torch.tensor(self.sequence_nll_augmented, dtype=torch.float64)  # (S, K)
        second = torch.tensor(other.sequence_nll_augmented, dtype=torch.float64)
        counts = torch.tensor(self.sequence_counts, dtype=torch.float64)
        picks = torch.randint(len(counts), (samples, len(counts)), generator=torch.Generator().manual_seed(seed))

        def change(a, b, c):  # (..., S, K) sums over sequences -> percent
            return 100 * (torch.exp((a.sum(-2) - b.sum(-2)) / c.sum(-2).clamp(min=1)) - 1)

        def both(a, b, c):  # by offset (..., K) and over every offset (...,)
            return change(a, b, c), change(a.sum(-1, keepdim=True), b.sum(-1, keepdim=True), c.sum(-1, keepdim=True))[..., 0]

        quantiles = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
        by_offset, overall = both(first, second, counts)
        sampled_offsets, sampled_overall = both(first[picks], second[picks], counts[picks])
        return {"by_offset": by_offset.tolist(), "by_offset_ci": torch.quantile(sampled_offsets, quantiles, dim=0).T.tolist(),
                "overall": float(overall), "overall_ci": torch.quantile(sampled_overall, quantiles).tolist(),
                "level": level, "samples": samples}

    @property
    def perplexity_augmented(self) -> list[float]:
        return [math.exp(nll) for nll in self.nll_augmented]

    @property
    def perplexity_base(self) -> list[float]:
        return [math.exp(nll) for nll in self.nll_base]

    @property
    def relative_change(self) -> list[float]:
        """(K,) percent change of perplexity with latents vs without (negative = better), as in Table 1."""
        return [100 * (math.exp(aug - base) - 1) for aug, base in zip(self.nll_augmented, self.nll_base)]

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "perplexity_augmented": self.perplexity_augmented,
            "perplexity_base": self.perplexity_base,
            "relative_change_percent": self.relative_change,
            "relative_change_ci95": self.bootstrap(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PositionEval":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def table(self, offsets: tuple[int, ...] = TABLE_OFFSETS) -> str:
        """Markdown: perplexity of the k-th token after the latents, with vs without, and the change."""
        intervals = self.bootstrap()
        header = "change [95% interval]" if intervals else "change"
        lines = [f"| offset | ppl augmented | ppl base | {header} |", "|---:|---:|---:|---:|"]
        for offset in [k for k in offsets if k <= self.num_offsets]:
            index = offset - 1
            lines.append(
                f"| {offset} | {self.perplexity_augmented[index]:.3f} | {self.perplexity_base[index]:.3f} "
                f"| {self.relative_change[index]:+.2f}%{_interval(intervals, index)} |"
            )
        if intervals:
            low, high = intervals["overall"]
            lines.append(f"| 1..{self.num_offsets} | | | {intervals['overall_change']:+.2f}% [{low:+.2f}, {high:+.2f}] |")
        return "\n".join(lines)


def position_points(length: int, num_offsets: int, every: int = 1) -> torch.Tensor:
    """(P,) points 0, every, 2*every, ... that leave all ``num_offsets`` targets inside a sequence of ``length``.

    A sequence too short for one full window falls back to every point in 0..length-2 (partial windows).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    last = length - 1 - num_offsets
    return torch.arange(0, (last if last >= 0 else length - 2) + 1, every)


@torch.no_grad()
def evaluate_positions(
    lm: AugmentedLM,
    batches: list[torch.Tensor],
    num_offsets: int = 32,
    every: int = 1,
    max_queries: int = 2048,
    progress: bool = False,
) -> PositionEval:
    """Perplexity by position (arXiv 2412.17747, section 3.1) over (B, T) batches, with and without latents.

    Augmented: the one-pass block-masked loss with N_A = ``num_offsets``, the points of a sequence split into
    chunks of at most ``max_queries`` new base tokens per row (memory and attention cost stay bounded).
    Base: one plain forward per batch.
    """
    if not batches:
        raise ValueError("perplexity by position needs at least one batch")
    with evaluating(lm):
        return _evaluate_positions(lm, batches, num_offsets, every, max_queries, progress)


def _evaluate_positions(lm, batches, num_offsets: int, every: int, max_queries: int, progress: bool) -> PositionEval:
    group_size = lm.config.num_latents + num_offsets - 1  # new base tokens per point
    points_per_chunk = max(1, max_queries // group_size)
    sums = {"aug": torch.zeros(num_offsets, dtype=torch.float64), "base": torch.zeros(num_offsets, dtype=torch.float64)}
    counts = torch.zeros(num_offsets, dtype=torch.float64)
    sequence_nll: dict[str, list] = {"aug": [], "base": []}
    sequence_counts: list[list[int]] = []
    num_points = num_sequences = 0
    for batch in progress_bar(batches, progress, desc="perplexity by position", unit="batch"):
        batch = batch.to(lm.device)
        rows, length = batch.shape
        points = position_points(length, num_offsets, every).to(lm.device)
        all_points = points.expand(rows, -1)
        per_offset = _offset_counts(all_points, length, num_offsets).double()
        for row in range(rows):  # one sequence at a time: its sums feed the bootstrap over sequences
            sequence = batch[row : row + 1]
            base = lm.unaugmented_loss(sequence, points[None], num_ahead=num_offsets)
            sequence_sums = {"base": base.nll_by_offset.cpu().double() * per_offset / rows, "aug": 0.0}
            for chunk in points.split(points_per_chunk):
                # Targets of this chunk end at t_max + num_offsets: the rest of the sequence is not needed.
                end = min(length, int(chunk[-1]) + num_offsets + 1)
                out = lm.training_loss(sequence[:, :end], chunk[None], num_ahead=num_offsets)
                sequence_sums["aug"] = sequence_sums["aug"] + (
                    out.nll_by_offset.cpu().double() * _offset_counts(chunk[None], end, num_offsets).double()
                )
            for key in ("aug", "base"):
                sums[key] += sequence_sums[key]
            sequence_nll["aug"].append(sequence_sums["aug"].tolist())
            sequence_nll["base"].append(sequence_sums["base"].tolist())
            sequence_counts.append([int(c) for c in per_offset / rows])
        counts += per_offset
        num_points += rows * len(points)
        num_sequences += rows
    safe = counts.clamp(min=1)
    return PositionEval(
        nll_augmented=(sums["aug"] / safe).tolist(),
        nll_base=(sums["base"] / safe).tolist(),
        tokens_by_offset=[int(c) for c in counts],
        num_sequences=num_sequences,
        seq_len=max(int(b.shape[1]) for b in batches),
        every=every,
        num_points=num_points,
        sequence_nll_augmented=sequence_nll["aug"],
        sequence_nll_base=sequence_nll["base"],
        sequence_counts=sequence_counts,
    )
