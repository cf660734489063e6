"""The coprocessor's network: a trainable copy of the base's decoder stack plus N_L soft tokens, mapping the
base's kv-cache to N_L latent embeddings (arXiv 2412.17747, section 2.2). AugmentedLM (coprocessor.py) uses it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import CoprocessorConfig
from .models import decoder_layers_name, embedding_output_std, final_norm_name


class Coprocessor(nn.Module):
    """A copy of the base's decoder stack (no token embedding, no LM head) plus N_L soft tokens.

    It reads the base's kv-cache layer by layer as its past and maps the soft tokens to N_L latent
    embeddings in one forward pass.
    """

    def __init__(self, base: nn.Module, config: CoprocessorConfig):
        super().__init__()
        embeddings = base.get_input_embeddings()
        hidden_size = base.config.get_text_config().hidden_size
        if config.soft_token_init == "vocab":
            # Embeddings of random vocabulary tokens, as the base's first layer sees them (Lester et al. 2021).
            ids = torch.randint(embeddings.num_embeddings, (config.num_latents,), device=embeddings.weight.device)
            with torch.no_grad():
                initial = embeddings(ids).detach().clone()
        else:
            # Gaussian at the scale the base's first layer sees (Gemma multiplies by sqrt(hidden)).
            initial = torch.randn(config.num_latents, hidden_size, dtype=embeddings.weight.dtype) * embedding_output_std(base)
        self.soft_tokens = nn.Parameter(initial)
        self.gate = None
        if config.latent_gate:
            text_config = base.config.get_text_config()
            # (num_layers, H) zeros: tanh(0) = 0 hides the latents from the base until training opens the gates
            self.gate = nn.Parameter(
                torch.zeros(text_config.num_hidden_layers, text_config.num_attention_heads, dtype=initial.dtype)
            )
        self.num_layers = config.num_layers
        self.stack = None if config.method == "pause" else self._copy_stack(base, config)
        self.latent_scale = None
        if self.stack is not None and config.scale_latents:
            # shape (1,), not a scalar: FSDP shards parameters along their first dimension
            self.latent_scale = nn.Parameter(torch.tensor([self._calibrated_scale(base)], dtype=self.soft_tokens.dtype))
        self.residual = None
        if self.stack is not None and config.latent_residual:
            # shape (1,), or (H, H) with latent_residual_matrix; at r = 0 (the default) the latents start as the
            # soft tokens themselves (the pause baseline)
            r = float(config.latent_residual_init)
            if config.latent_residual_matrix:
                initial_r = r * torch.eye(hidden_size, dtype=self.soft_tokens.dtype, device=self.soft_tokens.device)
            else:
                initial_r = torch.full((1,), r, dtype=self.soft_tokens.dtype, device=self.soft_tokens.device)
            self.residual = nn.Parameter(initial_r)
            # a float from the base's weights, so a loaded checkpoint rebuilds it exactly
            self.embedding_std = embedding_output_std(base)

    @torch.no_grad()
    def _calibrated_scale(self, base: nn.Module) -> float:
        """Embedding std / std of the stack's output on the soft tokens alone (no cache, positions 0..N_L-1)."""
        positions = torch.arange(self.soft_tokens.shape[0], device=self.soft_tokens.device)[None]
        raw = self.stack(inputs_embeds=self.soft_tokens[None], position_ids=positions).last_hidden_state
        return embedding_output_std(base) / raw.float().std().clamp(min=1e-6).item()

    @staticmethod
    def _copy_stack(base: nn.Module, config: CoprocessorConfig) -> nn.Module:
        decoder = base.get_decoder()
        embeddings = base.get_input_embeddings()
        # memo maps the embedding table to None, so the copy shares nothing and holds no second table.
        stack = copy.deepcopy(decoder, memo={id(embeddings): None})
        layers_name = decoder_layers_name(stack)
        total_layers = len(getattr(stack, layers_name))
        if config.num_layers < total_layers:
            setattr(stack, layers_name, getattr(stack, layers_name)[: config.num_layers])
            stack.config.num_hidden_layers = config.num_layers
            if hasattr(stack.config, "n_layer"):
                stack.config.n_layer = config.num_layers
            if getattr(stack.config, "layer_types", None) is not None:
                stack.config.layer_types = stack.config.layer_types[: config.num_layers]
        if not config.latents_after_norm:
            setattr(stack, final_norm_name(stack), nn.Identity())
        if config.init == "scratch":
            stack.apply(stack._init_weights)
        stack.requires_grad_(config.lora_rank is None)
        if config.lora_rank is not None:
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules="all-linear", lora_dropout=0.0
            )
            stack = inject_adapter_in_model(lora, stack)
            for name, parameter in stack.named_parameters():
                parameter.requires_grad_("lora_" in name)
        return stack

    def forward(
        self,
        past,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | dict | None = None,
        repeats: int = 1,
        **attention_kwargs,
    ) -> torch.Tensor:
        """Latents (B, repeats*N_L, H) for soft tokens at ``position_ids`` (B, repeats*N_L) against ``past``.

        ``past`` is consumed: the stack appends the soft tokens' keys to it.
        """
        batch = position_ids.shape[0]
        soft = self.soft_tokens.repeat(repeats, 1).expand(batch, -1, -1)  # (B, repeats*N_L, H)
        if self.stack is None:  # pause tokens: the embeddings themselves are the latents
            return soft
        out = self.stack(
            inputs_embeds=soft,
            cache=past,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **attention_kwargs,
        )
        latents = out.last_hidden_state if self.latent_scale is None else out.last_hidden_state * self.latent_scale
        if self.residual is None:
            return latents
        # each latent brought to the embedding scale (a copied stack's outputs are ~20x larger), then gated by r
        rms = latents.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt().to(latents.dtype)
        scaled = self.embedding_std * latents / rms  # (B, repeats*N_L, H)
        if self.residual.dim() == 2:  # latent_residual_matrix: r (H_out, H_in)
            return soft + scaled @ self.residual.T
        return soft + self.residual * scaled
