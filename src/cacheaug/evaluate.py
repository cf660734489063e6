"""Evaluation: ahead-token loss and perplexity by offset, with and without augmentation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .coprocessor import AugmentedLM

EVAL_POINTS_SEED = 1234  # validation points are fixed, so every evaluation scores the same tokens


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
        """Perplexity of the k-th token after the latents, with vs without augmentation."""
        lines = ["offset | ppl augmented | ppl base | change", "------ | ------------- | -------- | ------"]
        for offset, (aug, base) in enumerate(zip(self.nll_by_offset_augmented, self.nll_by_offset_base), 1):
            change = 100 * (math.exp(aug - base) - 1)
            lines.append(f"{offset:6d} | {math.exp(aug):13.3f} | {math.exp(base):8.3f} | {change:+5.1f}%")
        overall = 100 * (math.exp(self.loss_augmented - self.loss_base) - 1)
        lines.append(
            f"   all | {math.exp(self.loss_augmented):13.3f} | {math.exp(self.loss_base):8.3f} | {overall:+5.1f}%"
        )
        return "\n".join(lines)


@torch.no_grad()
def evaluate_ahead(lm: AugmentedLM, batches: list[torch.Tensor], seed: int = EVAL_POINTS_SEED) -> AheadEval:
    """Score every batch (B, T) at fixed seeded points, augmented (one pass) and with the plain base."""
    if not batches:
        raise ValueError("evaluation needs at least one validation batch")
    was_training = lm.training
    lm.eval()
    generator = torch.Generator().manual_seed(seed)
    num_ahead = lm.config.num_ahead
    sums = {"aug": torch.zeros(num_ahead), "base": torch.zeros(num_ahead)}
    counts = torch.zeros(num_ahead)
    for batch in batches:
        batch = batch.to(lm.device)
        points = lm.sample_points(batch.shape[0], batch.shape[1], generator)
        for key, out in (("aug", lm.training_loss(batch, points)), ("base", lm.unaugmented_loss(batch, points))):
            per_offset_count = _offset_counts(points, batch.shape[1], num_ahead)
            sums[key] += out.nll_by_offset.cpu() * per_offset_count
        counts += per_offset_count
    lm.train(was_training)
    by_offset = {key: (value / counts.clamp(min=1)) for key, value in sums.items()}
    total = counts.sum().clamp(min=1)
    return AheadEval(
        loss_augmented=float(sums["aug"].sum() / total),
        loss_base=float(sums["base"].sum() / total),
        nll_by_offset_augmented=by_offset["aug"].tolist(),
        nll_by_offset_base=by_offset["base"].tolist(),
        num_tokens=int(counts.sum()),
    )


def _offset_counts(points: torch.Tensor, length: int, num_ahead: int) -> torch.Tensor:
    """(N_A,) how many points have a target at each offset (targets past the sequence end are not scored)."""
    offsets = torch.arange(num_ahead)
    return (points.cpu()[:, :, None] + 1 + offsets < length).sum(dim=(0, 1)).float()
