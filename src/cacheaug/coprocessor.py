"""The coprocessor and AugmentedLM: a frozen base whose kv-cache a trainable coprocessor augments.

Implements Liu et al., "Deliberation in Latent Space via Differentiable Cache Augmentation"
(arXiv 2412.17747): section 2.2 (kv-cache -> coprocessor -> latent embeddings -> base) and section 2.3
(training many augmentation points of a sequence in one forward pass with block attention masks).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import cache as kv
from . import checkpoint as ckpt
from . import state as steps
from .config import CoprocessorConfig
from .errors import require_extra
from .flex import resolve_attention, training_attention
from .masks import block_attention_for, group_layout, readout_layout
from .latents import Coprocessor
from .models import head_logits, load_base
from .loss import LossOutput, check_kl_weight, loss_output, token_kl
from .state import AugmentedCache

__all__ = ["AugmentedCache", "AugmentedLM", "Coprocessor", "LossOutput"]


class AugmentedLM(nn.Module):
    """A frozen causal LM whose kv-cache a trainable coprocessor augments with latent embeddings."""

    def __init__(self, base: nn.Module, config: CoprocessorConfig | None = None):
        super().__init__()
        config = config or CoprocessorConfig()
        base.requires_grad_(False)
        base.eval()
        self.base = base
        self.config = config.resolve(base.config, getattr(base, "name_or_path", None) or None)
        self.coprocessor = Coprocessor(base, self.config)

    # ------------------------------------------------------------------ bookkeeping
    def train(self, mode: bool = True) -> "AugmentedLM":
        super().train(mode)
        self.base.eval()  # the base stays frozen: no dropout, whatever the coprocessor does
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.coprocessor.parameters() if p.requires_grad]

    def interface_parameters(self) -> list[nn.Parameter]:
        """The few parameters where the coprocessor meets the base: soft tokens, latent gates, scale, residual.

        A residual matrix (latent_residual_matrix) is not among them: H x H entries at the interface's larger lr
        would move its output by about H times that lr each step, so it trains with the body.
        """
        c = self.coprocessor
        residual = c.residual if c.residual is not None and c.residual.dim() == 1 else None
        interface = (c.soft_tokens, c.gate, c.latent_scale, residual)
        return [p for p in interface if p is not None and p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.coprocessor.named_parameters() if p.requires_grad}

    def trainable_summary(self) -> str:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.base.parameters()) + sum(p.numel() for p in self.coprocessor.parameters())
        return f"trainable {trainable / 1e6:.1f}M / {total / 1e6:.1f}M ({100 * trainable / total:.1f}%)"

    @property
    def device(self) -> torch.device:
        return self.coprocessor.soft_tokens.device

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache=None) -> AugmentedCache:
        """Run the frozen base over ``input_ids`` (B, T), after a copy of ``cache`` when given: a plain cache,
        or an AugmentedCache to continue (an augmented one must be: it carries the hidden and latent slots)."""
        if isinstance(cache, AugmentedCache):
            return steps.prefill(self.base, input_ids, cache)
        return steps.prefill(self.base, input_ids, cache=cache)

    def augment(self, input_ids: torch.Tensor | None = None, cache=None) -> AugmentedCache:
        """Prefill ``input_ids`` (onto a copy of ``cache`` if given), then write N_L latents after it.

        ``cache``: a plain cache, or an AugmentedCache to continue. Differentiable with respect to the
        coprocessor; the caller's cache is never mutated.
        """
        if input_ids is None and cache is None:
            raise ValueError("augment needs input_ids, a cache, or both")
        context = cache if isinstance(cache, AugmentedCache) else None
        if input_ids is not None:
            if input_ids.ndim != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be (batch, length>0), got shape {tuple(input_ids.shape)}")
            state = steps.prefill(self.base, input_ids, context, None if context is not None else cache)
        elif context is not None:
            state = steps.copy_state(context)
        else:
            state = AugmentedCache(kv.copy_cache(cache), kv.cache_length(cache), None)
        return steps.insert_latents(self, state, steps.compute_latents(self, state))

    @property
    def num_coprocessor_layers(self) -> int:
        return self.coprocessor.num_layers

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, augment: bool = True, **sampling) -> torch.Tensor:
        """Prompt + generated tokens (B, T + n); ``augment=False`` decodes with the plain base. ``sampling``:
        generate.decode's do_sample, temperature, top_p, seed, eos_token_id."""
        from .generate import decode  # generate builds on this module

        state = self.augment(input_ids) if augment else self.prefill(input_ids)
        return torch.cat([input_ids, decode(self.base, state, max_new_tokens, **sampling).tokens], dim=1)

    # ------------------------------------------------------------------ training
    def sample_points(self, batch: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, P) distinct sorted points, uniform over 0..T-1-N_A, so every point scores all N_A tokens.

        Full windows give every sequence the same token count, which keeps the mean loss of a batch equal to
        the mean of its parts (gradient accumulation, data parallelism). Sequences shorter than N_A+2 fall
        back to 0..T-2. ``training_loss`` accepts any point in 0..T-2 when points are given.
        """
        candidates = length - self.config.num_ahead if length > self.config.num_ahead + 1 else length - 1
        num_points = min(self.config.num_points, candidates)
        scores = torch.rand(batch, candidates, generator=generator)
        points = scores.topk(num_points, dim=1).indices.sort(dim=1).values
        return points.to(self.device)

    def _check_points(self, input_ids: torch.Tensor, points: torch.Tensor) -> None:
        if input_ids.ndim != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be (batch, length>=2), got shape {tuple(input_ids.shape)}")
        if points.ndim != 2 or points.shape[0] != input_ids.shape[0]:
            raise ValueError(f"points must be (batch={input_ids.shape[0]}, P), got shape {tuple(points.shape)}")
        length = input_ids.shape[1]
        if points.numel() and (points.min() < 0 or points.max() > length - 2):
            raise ValueError(f"augmentation points must lie in 0..{length - 2} (sequence length {length})")

    def forward(
        self, input_ids: torch.Tensor, points: torch.Tensor | None = None, attention: str = "block", kl_weight: float = 0.0
    ) -> LossOutput:
        """``training_loss``; being ``forward`` lets DistributedDataParallel wrap the model."""
        return self.training_loss(input_ids, points, attention=attention, kl_weight=kl_weight)

    @torch.no_grad()
    def unaugmented_loss(
        self, input_ids: torch.Tensor, points: torch.Tensor, *, num_ahead: int | None = None
    ) -> LossOutput:
        """The plain base's NLL on exactly the targets training_loss scores: x_{t+1..t+N_A} given x_0..x_{t+k-1}.

        ``num_ahead`` overrides the config's N_A (evaluation scores e.g. 32 tokens after the latents).
        """
        num_ahead = num_ahead or self.config.num_ahead
        points = points.to(self.device)
        self._check_points(input_ids, points)
        length = input_ids.shape[1]
        log_probs = torch.log_softmax(self.base(input_ids=input_ids).logits.float(), dim=-1)  # (B, T, V)
        token_nll = -log_probs[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]  # (B, T-1): NLL of x_{i+1}
        index = points[:, :, None] + torch.arange(num_ahead, device=self.device)  # predicts x_{index+1}
        scored = index < length - 1
        nll = token_nll.gather(1, index.clamp(max=length - 2).flatten(1)).view_as(index)
        return loss_output(nll, scored)

    def training_loss(
        self,
        input_ids: torch.Tensor,
        points: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        num_ahead: int | None = None,
        attention: str = "block",
        kl_weight: float = 0.0,
    ) -> LossOutput:
        """The paper's loss for every augmentation point of every sequence, in one pass (section 2.3).

        input_ids (B, T); points (B, P), point t = augment after reading x_0..x_t. Each point's latents and
        its N_A-1 ahead input tokens form one group; targets are x_{t+1..t+N_A}, cut at the sequence end.
        ``num_ahead`` overrides the config's N_A (evaluation scores e.g. 32 tokens after the latents).
        ``attention``: "block" (masks.block_attention), "flex" (FlexAttention, CUDA), "sdpa" (dense) or "auto".
        ``kl_weight`` > 0 adds kl_weight * mean KL(p_aug || p_base) over the same targets, p_base being the
        frozen base's prediction of each target from the plain x_0..x_{target-1} (no latents).
        """
        check_kl_weight(kl_weight)
        attention = resolve_attention(attention, self.device, training=torch.is_grad_enabled())
        num_latents, num_ahead = self.config.num_latents, num_ahead or self.config.num_ahead
        batch, length = input_ids.shape if input_ids.ndim == 2 else (0, 0)
        if points is None:
            points = self.sample_points(batch, length, generator)
        points = points.to(self.device)
        self._check_points(input_ids, points)
        num_points = points.shape[1]

        # 1. The prefix never depends on trainable weights: read it once, keep K/V of every layer in full.
        prefix = kv.full_length_cache()
        with torch.no_grad():
            plain = self.base.get_decoder()(input_ids=input_ids, cache=prefix, use_cache=True)
        plain_hidden = plain.last_hidden_state if kl_weight > 0 else None  # (B, T, H): the KL's p_base, same pass
        del plain
        dtype = kv.cache_tensors(prefix)[0][0].dtype

        # 2. Coprocessor: P groups of N_L soft tokens, group p sees prefix 0..t_p and itself (causally).
        soft_layout = group_layout(points, num_latents)
        stack = self.coprocessor.stack
        soft = training_attention(attention, None if stack is None else stack.config, soft_layout, length, dtype)
        with block_attention_for(stack, implementation=soft.implementation):
            latents = self.coprocessor(
                kv.first_layers(prefix, self.num_coprocessor_layers),
                soft_layout.position_ids,
                soft.mask,
                num_points,
                cacheaug_group_size=num_latents,
                **soft.kwargs,
            )  # (B, P*N_L, H)

        # 3. Base: P groups of latents and ahead inputs, each seeing the prefix and itself (causally).
        #    readout="latent": [N_L latents ; x_{t+1..t+N_A-1}], the last latent predicts x_{t+1};
        #    readout="token":  [N_L latents ; x_t..x_{t+N_A-1}], x_t read again predicts x_{t+1}.
        token_readout = self.config.readout == "token"
        target_index = points[:, :, None] + 1 + torch.arange(num_ahead, device=self.device)  # (B, P, N_A)
        in_sequence = target_index < length
        tokens = input_ids.gather(1, target_index.clamp(max=length - 1).flatten(1)).view_as(target_index)
        inputs = torch.cat([input_ids.gather(1, points)[:, :, None], tokens[:, :, :-1]], dim=2) if token_readout else tokens[:, :, :-1]
        ahead_embeds = self.base.get_input_embeddings()(inputs)  # (B, P, N_A or N_A-1, H)
        group_embeds = torch.cat([latents.view(batch, num_points, num_latents, -1), ahead_embeds], dim=2)
        group_size = group_embeds.shape[2]
        if token_readout:
            base_layout = readout_layout(points, num_latents, num_ahead)
        else:
            base_layout = group_layout(points, group_size)
        gated = self.coprocessor.gate is not None
        base_attention = training_attention(
            attention, self.base.config, base_layout, length, dtype, num_latents if gated else None
        )
        # Score the N_A positions per group that predict x_{t+1..t+N_A}: the last latent (or x_t) onwards.
        first_scored = num_latents if token_readout else num_latents - 1
        scored = (
            torch.arange(num_points, device=self.device)[:, None] * group_size
            + first_scored
            + torch.arange(num_ahead, device=self.device)
        ).flatten()
        gates = {}
        if self.coprocessor.gate is not None:
            gates = {"cacheaug_gates": self.coprocessor.gate, "cacheaug_num_latents": num_latents}
        with block_attention_for(self.base, implementation=base_attention.implementation):
            out = self.base(
                inputs_embeds=group_embeds.flatten(1, 2),
                cache=kv.copy_cache(prefix),
                position_ids=base_layout.position_ids,
                attention_mask=base_attention.mask,
                use_cache=True,
                logits_to_keep=scored,
                cacheaug_group_size=group_size,
                **gates,
                **base_attention.kwargs,
            )
        logits = out.logits.view(batch, num_points, num_ahead, -1)
        targets = tokens.masked_fill(~in_sequence, -100)
        nll = F.cross_entropy(logits.flatten(0, 2).float(), targets.flatten(), reduction="none", ignore_index=-100)
        kl = None
        if plain_hidden is not None:
            with torch.no_grad():
                # x_j is predicted from x_0..x_{j-1}: the plain hidden state at j-1; gathered before the head, so
                # only (B, P, N_A) positions pay for the vocabulary projection.
                before = (target_index - 1).clamp(max=length - 2).flatten(1)  # (B, P*N_A)
                hidden = plain_hidden.gather(1, before[..., None].expand(-1, -1, plain_hidden.shape[-1]))
                base_logits = head_logits(self.base, hidden).view_as(logits)  # (B, P, N_A, V)
            kl = token_kl(logits, base_logits)
        return loss_output(nll.view(batch, num_points, num_ahead), in_sequence, kl, kl_weight)

    def reference_loss(self, input_ids: torch.Tensor, points: torch.Tensor, kl_weight: float = 0.0) -> LossOutput:
        """The same loss by its definition, point by point: prefill, augment, score the next N_A tokens; with
        ``kl_weight`` > 0, their KL to the plain base's logits from a separate plain forward over ``input_ids``."""
        check_kl_weight(kl_weight)
        points = points.to(self.device)
        self._check_points(input_ids, points)
        num_ahead = self.config.num_ahead
        batch, length = input_ids.shape
        nll = torch.zeros(batch, points.shape[1], num_ahead, device=self.device)
        kl = torch.zeros(batch, points.shape[1], num_ahead, device=self.device) if kl_weight > 0 else None
        scored = torch.zeros(batch, points.shape[1], num_ahead, dtype=torch.bool, device=self.device)
        if kl is not None:
            with torch.no_grad():
                plain_logits = self.base(input_ids=input_ids).logits  # (B, T, V): position i predicts x_{i+1}
        for row in range(batch):
            for column, point in enumerate(points[row].tolist()):
                state = self.augment(input_ids[row : row + 1, : point + 1])
                targets = input_ids[row, point + 1 : point + 1 + num_ahead]  # (n,)
                logits = [state.logits]
                if len(targets) > 1:
                    logits.append(steps.feed(self.base, state, targets[None, :-1], logits_to_keep=0)[0])
                token_nll = F.cross_entropy(torch.cat(logits).float(), targets, reduction="none")
                where = (torch.tensor(row), torch.tensor(column), torch.arange(len(targets)))
                nll = nll.index_put(where, token_nll)
                if kl is not None:
                    kl = kl.index_put(where, token_kl(torch.cat(logits), plain_logits[row, point : point + len(targets)]))
                scored[row, column, : len(targets)] = True
        return loss_output(nll, scored, kl, kl_weight)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory) -> None:
        ckpt.save_adapter(self, directory)

    @classmethod
    def from_pretrained(cls, directory, base: nn.Module | None = None) -> "AugmentedLM":
        return load_checkpoint(directory, base=base)[0]


def load_checkpoint(directory: str | os.PathLike, dtype: str = "float32", base=None):
    """(AugmentedLM, tokenizer) from a checkpoint folder, on ``base`` (tokenizer None) or the base model it names.

    The base's dimensions are checked against the ones the checkpoint records; the message says what differs.
    """
    info = ckpt.describe(directory)
    if info.config.lora_rank is not None:
        require_extra("peft", "lora", "a LoRA coprocessor (lora_rank)")
    tokenizer = None
    if base is None:
        base, tokenizer = load_base(info.base_model, dtype)
    ckpt.check_base_identity(info.config, base, directory)
    lm = AugmentedLM(base, info.config)
    ckpt.load_trainable_weights(lm, Path(directory) / ckpt.WEIGHTS_NAME)
    return lm, tokenizer
