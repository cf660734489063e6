"""The training pass's attention on GPU: FlexAttention block masks built from the same group layout as
masks.block_visibility, a dense SDPA fallback, and the choice between them and masks.block_attention.

FlexAttention (torch.nn.attention.flex_attention) computes only the 128x128 tiles that hold a visible
query-key pair and applies ``mask_mod`` element by element inside the tiles that are partly visible. The
tile lists are built here analytically from the layout (no dense B x Q x (T+Q) mask, nothing to compile),
and the element rule is the one of block_visibility: prefix 0..prefix_last of the query's group, its own
group causally, sliding windows counted in slots. The kernel is compiled once per static shape on CUDA and
fails loudly rather than run the unfused fallback (it materialises every score). FlexAttention has no
backward on CPU (torch 2.13): there it serves only no-grad forwards (tests), and training uses block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .config import ATTENTIONS, ConfigError
from .masks import (
    BLOCK_ATTENTION,
    FULL,
    GroupLayout,
    attention_layer_kinds,
    block_attention_mask,
    masked_softmax,
    register_block_attention,
)

FLEX_ATTENTION = "cacheaug_flex"
SDPA_ATTENTION = "cacheaug_sdpa"
TILE = 128  # FlexAttention's default sparse block size
KEYS = ("all", "text", "latent")  # which new keys a mask keeps: all, the non-latent ones, the latents
_NO_WINDOW = 2**40  # a window no slot distance reaches
RECOMPILE_LIMIT = 8  # dynamo's default; beyond it flex would silently fall back to the unfused kernel

CPU_FLEX_MESSAGE = (
    "train.attention='flex' needs a CUDA device: FlexAttention has no backward pass on CPU (torch {version}). "
    "Use train.attention='auto' (which picks 'block' on CPU), 'block' or 'sdpa'."
)


class FlexAttentionError(RuntimeError):
    """FlexAttention cannot run as asked: no CUDA for a backward, no compilation, or too many recompiles."""


def resolve_attention(choice: str, device, training: bool = True) -> str:
    """The attention a training pass uses: 'auto' is 'flex' on CUDA and 'block' elsewhere."""
    if choice not in ATTENTIONS:
        raise ConfigError(f"attention must be one of {ATTENTIONS}, got {choice!r}")
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        return "flex" if on_cuda else "block"
    if choice == "flex" and training and not on_cuda:
        raise FlexAttentionError(CPU_FLEX_MESSAGE.format(version=torch.__version__))
    return choice


# ---------------------------------------------------------------------------- masks
def _key_range(keys: str, num_latents: int, group_size: int) -> tuple[int, int]:
    """[lo, hi) of the index in group of the new keys kept; the first num_latents keys are latents."""
    if keys not in KEYS:
        raise ValueError(f"keys must be one of {KEYS}, got {keys!r}")
    return {"all": (0, group_size), "text": (num_latents, group_size), "latent": (0, num_latents)}[keys]


def _query_tensors(layout: GroupLayout):
    slots = layout.position_ids if layout.slots is None else layout.slots  # (B, Q)
    prefix_last = layout.points if layout.prefix_last is None else layout.prefix_last  # (B, P)
    return slots, torch.gather(prefix_last, 1, layout.group_of)  # (B, Q), (B, Q)


def group_mask_mod(layout: GroupLayout, prefix_length: int, window: int | None = None, keys: str = "all",
                   num_latents: int = 0):
    """FlexAttention mask_mod(b, h, q, kv) equal to block_visibility(layout, prefix_length, window), keys
    restricted as ``keys`` says. Every setting is a captured tensor, so all masks of one shape share a
    compiled kernel (full and sliding layers, text and latent keys): no recompile between them."""
    device = layout.points.device
    queries = layout.group_of.shape[1]
    group_size = queries // layout.points.shape[1]
    group_of, index = layout.group_of, layout.index_in_group  # (B, Q); new key n has the group and index of query n
    slots, query_last = _query_tensors(layout)
    lo, hi = _key_range(keys, num_latents, group_size)
    scalar = functools.partial(torch.tensor, device=device)
    prefix, last_new = scalar(prefix_length), scalar(queries - 1)
    limit, key_lo, key_hi = scalar(window or _NO_WINDOW), scalar(lo), scalar(hi)
    use_prefix = scalar(keys != "latent")

    def mask_mod(b, h, q_idx, kv_idx):
        new = torch.minimum(torch.clamp(kv_idx - prefix, min=0), last_new)  # index of the new key, if any
        query_slot = slots[b, q_idx]
        sees_prefix = use_prefix & (kv_idx <= query_last[b, q_idx]) & (query_slot - kv_idx < limit)
        key_index = index[b, new]
        sees_new = (
            (group_of[b, new] == group_of[b, q_idx]) & (key_index <= index[b, q_idx])
            & (key_index >= key_lo) & (key_index < key_hi) & (query_slot - slots[b, new] < limit)
        )
        return torch.where(kv_idx < prefix, sees_prefix, sees_new)

    return mask_mod


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nq, nkv) bool -> per row tile the count and the column indices listed first (B, 1, ...)."""
    tiles = tiles.to(torch.int32)
    order = torch.argsort(tiles, dim=-1, descending=True, stable=True)
    return tiles.sum(-1).to(torch.int32)[:, None].contiguous(), order.to(torch.int32)[:, None].contiguous()


def group_block_mask(layout: GroupLayout, prefix_length: int, window: int | None = None, keys: str = "all",
                     num_latents: int = 0, block_size: int = TILE) -> BlockMask:
    """The BlockMask of group_mask_mod, its tiles counted analytically in O(B * Q * (T+Q) / block_size).

    Each query sees one interval of prefix keys and, in its own group, keys of index <= its own: the
    visible pairs of every (query, key tile) are summed, then per tile: all visible -> a full block (the
    kernel skips mask_mod), some -> a partial block, none -> skipped. The same tiles as create_block_mask,
    without its dense B x Q x (T+Q) mask. Layouts come from masks.group_layout / readout_layout
    (P contiguous groups of G queries).
    """
    batch, queries = layout.group_of.shape
    num_points = layout.points.shape[1]
    group_size = queries // num_points
    key_length = prefix_length + queries
    device = layout.points.device
    slots, query_last = _query_tensors(layout)
    lo, hi = _key_range(keys, num_latents, group_size)
    q_tiles, kv_tiles = math.ceil(queries / block_size), math.ceil(key_length / block_size)
    tile_start = torch.arange(kv_tiles, device=device) * block_size  # (nkv,)

    # prefix keys: the interval [low, high] of each query, clipped to each key tile
    if keys == "latent":
        counts = torch.zeros(batch, queries, kv_tiles, dtype=torch.int64, device=device)
    else:
        high = query_last.clamp(max=prefix_length - 1)[..., None]  # (B, Q, 1)
        low = (slots - window + 1).clamp(min=0)[..., None] if window else torch.zeros_like(high)
        tile_end = (tile_start + block_size - 1).clamp(max=prefix_length - 1)
        counts = (torch.minimum(high, tile_end) - torch.maximum(low, tile_start) + 1).clamp(min=0)  # (B, Q, nkv)

    # new keys: G x G causal blocks per group, restricted to [lo, hi) and to the window in slots
    in_group = torch.arange(group_size, device=device)
    sees = (in_group[None, :] <= in_group[:, None]) & (in_group[None, :] >= lo) & (in_group[None, :] < hi)
    sees = sees.expand(batch, num_points, group_size, group_size)  # (B, P, G_query, G_key)
    if window:
        grouped = slots.view(batch, num_points, group_size)
        sees = sees & (grouped[:, :, :, None] - grouped[:, :, None, :] < window)
    key_tile = ((prefix_length + torch.arange(queries, device=device)) // block_size).view(num_points, group_size)
    counts = counts.view(batch, num_points, group_size, kv_tiles).scatter_add(
        3, key_tile[None, :, None, :].expand(batch, -1, group_size, -1), sees.to(counts.dtype)
    ).view(batch, queries, kv_tiles)

    # rows past Q pad the last query tile: those tiles are never full, exactly as in create_block_mask
    counts = F.pad(counts, (0, 0, 0, q_tiles * block_size - queries))
    visible = counts.view(batch, q_tiles, block_size, kv_tiles).sum(2)  # (B, nq, nkv) visible pairs per tile
    full = visible == block_size * block_size
    partial = (visible > 0) & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=block_size,
        mask_mod=group_mask_mod(layout, prefix_length, window, keys, num_latents), seq_lengths=(queries, key_length),
    )


@dataclass
class FlexMasks:
    """The BlockMasks of one forward: per layer kind, over the text keys and (with gates) the latent keys."""

    layer_kinds: list[str]  # kind of each decoder layer, by layer_idx
    text: dict[str, BlockMask]  # every visible key, or only the non-latent ones when latent is set
    latent: dict[str, BlockMask] | None = field(default=None)

    def model_mask(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the model takes as ``attention_mask``: a zero-stride (B, 1, Q, T+Q) stand-in (no memory), which
        every model's mask creation passes through as a prepared 4D mask; flex_block_attention reads the
        BlockMasks from its ``cacheaug_flex`` kwarg instead (GPT-2 cannot take a BlockMask here)."""
        mask = next(iter(self.text.values()))
        stand_in = torch.zeros((), device=mask.kv_num_blocks.device).expand(*mask.shape)
        return stand_in if len(self.text) == 1 else {kind: stand_in for kind in self.text}


def flex_masks(config, layout: GroupLayout, prefix_length: int, num_latents: int | None = None,
               block_size: int = TILE) -> FlexMasks:
    """BlockMasks for every layer kind of ``config``; ``num_latents`` splits latent keys off (gated base)."""
    kinds = attention_layer_kinds(config)
    windows = dict(kinds)
    if len(windows) != len(set(kinds)):
        raise NotImplementedError("layers of one kind with different sliding windows are not supported")
    text_keys = "text" if num_latents else "all"
    text = {kind: group_block_mask(layout, prefix_length, w, text_keys, num_latents or 0, block_size)
            for kind, w in windows.items()}
    latent = None
    if num_latents:
        latent = {kind: group_block_mask(layout, prefix_length, w, "latent", num_latents, block_size)
                  for kind, w in windows.items()}
    return FlexMasks([kind for kind, _ in kinds], text, latent)


# ---------------------------------------------------------------------------- the flex kernel
_compiled = None


def compiled_flex_attention():
    """One module-level torch.compile of flex_attention, static shapes: a graph per (Q, T+Q, dtype)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def run_compiled(kernel, *args, **kwargs) -> torch.Tensor:
    """Call a compiled flex kernel; a failed compile or a recompile past the limit raises, never falls back."""
    try:
        with torch._dynamo.config.patch(
            fail_on_recompile_limit_hit=True, suppress_errors=False, recompile_limit=RECOMPILE_LIMIT
        ):
            return kernel(*args, **kwargs)
    except torch._dynamo.exc.FailOnRecompileLimitHit as error:
        raise FlexAttentionError(
            f"FlexAttention recompiled more than {RECOMPILE_LIMIT} times: shapes must stay static "
            "(batch, sequence length, points, N_L, N_A); refusing the unfused fallback"
        ) from error
    except torch._dynamo.exc.TorchDynamoException as error:
        raise FlexAttentionError(
            f"FlexAttention could not be compiled on {args[0].device} ({type(error).__name__}: {error}); "
            "train.attention='block' or 'sdpa' run without it"
        ) from error


@functools.lru_cache(maxsize=None)
def softcap_score_mod(cap: float):
    """score_mod of soft-capping, cap * tanh(score / cap): one function object per cap (no recompiles)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return score_mod


def _flex(query, key, value, block_mask: BlockMask, score_mod, scale, rows_safe: bool) -> torch.Tensor:
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1])
    if rows_safe:  # every query sees at least one key (itself): the kernel may skip the empty-row guard
        kwargs["kernel_options"] = {"ROWS_GUARANTEED_SAFE": True}
    if torch.compiler.is_compiling():  # inside a compiled coprocessor: dynamo traces flex_attention itself
        return flex_attention(query, key, value, **kwargs)
    if query.device.type == "cuda":
        return run_compiled(compiled_flex_attention(), query, key, value, **kwargs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise FlexAttentionError(CPU_FLEX_MESSAGE.format(version=torch.__version__))
    return flex_attention(query, key, value, **kwargs)  # unfused, for no-grad checks on CPU only


def flex_block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         **kwargs):
    """block_attention's result through FlexAttention. query (B, H, Q, D); key/value (B, H_kv, T+Q, D);
    kwarg ``cacheaug_flex`` (FlexMasks) gives the masks (``attention_mask`` is FlexMasks.model_mask's
    stand-in, unused). With ``cacheaug_gates`` (num_layers, H): two calls, one over the non-latent
    keys and one over the latent keys, out = out_text + tanh(gate) * out_latent; a query that sees no
    latent key gets 0 from the second (FlexAttention returns 0 for a fully masked row).
    Returns (B, Q, H, D)."""
    masks: FlexMasks = kwargs["cacheaug_flex"]
    if dropout and module.training:
        raise FlexAttentionError("FlexAttention applies no attention dropout; set the model's attention_dropout to 0")
    kind = masks.layer_kinds[module.layer_idx] if masks.layer_kinds else FULL
    score_mod = softcap_score_mod(float(softcap)) if softcap else None
    gates = kwargs.get("cacheaug_gates")
    if gates is None:
        out = _flex(query, key, value, masks.text[kind], score_mod, scaling, rows_safe=masks.latent is None)
    else:
        if masks.latent is None:
            raise ValueError("cacheaug_gates needs FlexMasks built with num_latents (flex_masks(..., num_latents=N_L))")
        gate = torch.tanh(gates[module.layer_idx])[None, :, None, None]  # (1, H, 1, 1)
        text = _flex(query, key, value, masks.text[kind], score_mod, scaling, rows_safe=False)
        latent = _flex(query, key, value, masks.latent[kind], score_mod, scaling, rows_safe=False)
        out = (text + gate * latent).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------- the dense fallback
def _safe_sdpa(query, key, value, visible, scale, dropout) -> torch.Tensor:
    """SDPA over a bool mask (B, 1, Q, K); rows that see no key give 0 (SDPA alone would give NaN)."""
    any_visible = visible.any(-1, keepdim=True)  # (B, 1, Q, 1)
    first_key = torch.arange(visible.shape[-1], device=visible.device) == 0
    visible = visible | (~any_visible & first_key)
    if key.shape[1] != query.shape[1]:  # repeated kv heads, not enable_gqa: the memory-efficient CUDA kernel
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # takes masks but not GQA
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, dropout_p=dropout, scale=scale)
    return out * any_visible


def sdpa_block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         **kwargs):
    """block_attention's result by a dense kernel over the whole (Q, T+Q) mask: the correctness fallback.

    torch SDPA where it can express the layer; soft-capped layers (Gemma 2) go through the same math
    densely, as SDPA has no score hook. Same arguments as masks.block_attention. Returns (B, Q, H, D)."""
    batch, heads, queries, dim = query.shape
    prefix = key.shape[2] - queries
    dropout = dropout if module.training else 0.0
    scale = dim**-0.5 if scaling is None else scaling
    visible = attention_mask > torch.finfo(attention_mask.dtype).min / 2  # (B, 1, Q, T+Q)
    gates = kwargs.get("cacheaug_gates")
    is_latent = None
    if gates is not None:
        new_index = torch.arange(key.shape[2], device=query.device) - prefix
        is_latent = (new_index >= 0) & (new_index % kwargs["cacheaug_group_size"] < kwargs["cacheaug_num_latents"])
        gate = torch.tanh(gates[module.layer_idx])[None, :, None, None]  # (1, H, 1, 1)
    if softcap is None:
        if is_latent is None:
            out = _safe_sdpa(query, key, value, visible, scale, dropout)
        else:
            text = _safe_sdpa(query, key, value, visible & ~is_latent, scale, dropout)
            out = (text + gate * _safe_sdpa(query, key, value, visible & is_latent, scale, dropout)).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None
    if key.shape[1] != heads:  # grouped-query attention
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, Q, T+Q)
    scores = torch.tanh(scores / softcap) * softcap
    dtype = torch.promote_types(scores.dtype, torch.float32)
    if is_latent is None:
        probs = masked_softmax(scores, visible, dtype)
    else:
        probs = masked_softmax(scores, visible & ~is_latent, dtype) + gate.to(dtype) * masked_softmax(
            scores, visible & is_latent, dtype
        )
    probs = F.dropout(probs.to(query.dtype), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------- the seam for training_loss
@dataclass
class TrainingAttention:
    """What one training forward needs: the attention implementation, its mask, its extra kwargs."""

    implementation: str
    mask: object  # additive 4D tensor or dict of them by layer kind; for flex a stand-in (FlexMasks.model_mask)
    kwargs: dict


def register_training_attention() -> None:
    from transformers import AttentionInterface

    register_block_attention()
    AttentionInterface.register(FLEX_ATTENTION, flex_block_attention)
    AttentionInterface.register(SDPA_ATTENTION, sdpa_block_attention)


def training_attention(attention: str, config, layout: GroupLayout, prefix_length: int, dtype: torch.dtype,
                       num_latents: int | None = None) -> TrainingAttention:
    """The attention of a block-masked training forward over ``layout``, for attention in block|flex|sdpa.

    ``config`` None (no stack to run) gives block with no mask; ``num_latents`` marks a gated base (flex
    then builds separate latent masks)."""
    register_training_attention()
    if config is None:
        return TrainingAttention(BLOCK_ATTENTION, None, {})
    if attention == "flex":
        masks = flex_masks(config, layout, prefix_length, num_latents)
        return TrainingAttention(FLEX_ATTENTION, masks.model_mask(), {"cacheaug_flex": masks})
    implementation = {"block": BLOCK_ATTENTION, "sdpa": SDPA_ATTENTION}.get(attention)
    if implementation is None:
        raise ConfigError(f"attention must be one of block, flex, sdpa here (resolve 'auto' first), got {attention!r}")
    return TrainingAttention(implementation, block_attention_mask(config, layout, prefix_length, dtype), {})
