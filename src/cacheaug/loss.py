"""What a training loss returns, and its reductions: mean NLL over the scored ahead tokens, per-offset NLL, and
the optional KL to the frozen base. The losses themselves (one pass, point by point) are AugmentedLM's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LossOutput", "check_kl_weight", "loss_output", "token_kl"]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: mean NLL over every scored ahead token, + kl_weight * kl when kl_weight > 0
    nll_by_offset: torch.Tensor  # (N_A,) mean NLL of the k-th token after the latents (detached)
    num_tokens: int  # ahead tokens scored
    kl: torch.Tensor | None = None  # scalar: mean KL(p_aug || p_base) over the scored tokens (detached); None: not computed


def check_kl_weight(kl_weight: float) -> None:
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not 0 <= kl_weight < float("inf"):
        raise ValueError(f"kl_weight must be a non-negative number, got {kl_weight!r}")


def token_kl(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_aug || p_base) = sum_v p_aug (log p_aug - log p_base), in float32: (..., V), (..., V) -> (...)."""
    log_aug = torch.log_softmax(logits.float(), dim=-1)
    log_base = torch.log_softmax(base_logits.float(), dim=-1)
    return (log_aug.exp() * (log_aug - log_base)).sum(dim=-1)


def loss_output(
    nll: torch.Tensor, scored: torch.Tensor, kl: torch.Tensor | None = None, kl_weight: float = 0.0
) -> LossOutput:
    """nll, scored, kl: (B, P, N_A); unscored entries are ignored. The KL is averaged like the NLL."""
    nll = nll * scored
    count = int(scored.sum())
    per_offset = nll.detach().sum(dim=(0, 1)) / scored.sum(dim=(0, 1)).clamp(min=1)
    loss = nll.sum() / max(count, 1)
    mean_kl = None
    if kl is not None:
        mean_kl = (kl * scored).sum() / max(count, 1)
        loss = loss + kl_weight * mean_kl
        mean_kl = mean_kl.detach()
    return LossOutput(loss=loss, nll_by_offset=per_offset, num_tokens=count, kl=mean_kl)
