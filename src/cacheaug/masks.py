"""Block attention masks and position ids for training every augmentation point in one pass.

Layout (arXiv 2412.17747, section 2.3). A packed sequence x_0..x_{T-1} is read once by the frozen base;
its kv-cache (T positions, position ids 0..T-1) is the shared past. For P augmentation points t_1..t_P
(point t means "after reading x_0..x_t") the new queries are P groups laid side by side, each of length G:

    coprocessor: group p = N_L soft tokens                     at positions t_p+1 .. t_p+N_L
    base:        group p = N_L latents ; x_{t_p+1..t_p+N_A-1}  at positions t_p+1 .. t_p+N_L+N_A-1

A query of group p sees past keys 0..t_p and, causally, its own group; never another group. Positions
continue from t_p+1 exactly as in inference, so a model with sliding windows or absolute positions sees
the same geometry in training as when one point is augmented and decoded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass
class GroupLayout:
    """Where each new query sits: its group, its index inside the group, its position id."""

    position_ids: torch.Tensor  # (B, P*G) position of each new query (its rotary / absolute position)
    group_of: torch.Tensor  # (B, P*G) index p of the group the query belongs to
    index_in_group: torch.Tensor  # (B, P*G) 0..G-1
    points: torch.Tensor  # (B, P) the augmentation point t of each group
    # (B, P*G) cache slot each query occupies at inference: sliding windows count slots, not positions
    slots: torch.Tensor | None = None
    # (B, P) last prefix index a group sees; None = its point (readout="token" hides x_t: point - 1)
    prefix_last: torch.Tensor | None = None


def group_layout(points: torch.Tensor, group_size: int) -> GroupLayout:
    """Positions of P groups of ``group_size`` new tokens placed after points (B, P)."""
    batch, num_points = points.shape
    offsets = torch.arange(group_size, device=points.device)  # (G,)
    position_ids = (points[:, :, None] + 1 + offsets).reshape(batch, num_points * group_size)
    group_of = torch.arange(num_points, device=points.device).repeat_interleave(group_size).expand(batch, -1)
    index_in_group = offsets.repeat(num_points).expand(batch, -1)
    return GroupLayout(position_ids, group_of, index_in_group, points)


def readout_layout(points: torch.Tensor, num_latents: int, num_ahead: int) -> GroupLayout:
    """Base groups [N_L latents ; x_t .. x_{t+N_A-1}] for readout="token" (x_t read again after the latents).

    At inference the prefix x_0..x_t fills slots 0..t, slot t is then hidden, the latents take slots
    t+1..t+N_L and x_t again slot t+N_L+1. Positions: every latent shares x_t's position t (as latent tokens
    share their following token's, Sun et al. arXiv 2505.12629) and x_{t+j} keeps t+j, so the base sees the
    same rotary distances as without latents. The group sees the prefix up to x_{t-1}.
    """
    layout = group_layout(points, num_latents + num_ahead)
    batch, num_points = points.shape
    offsets = torch.cat([points.new_zeros(num_latents), torch.arange(num_ahead, device=points.device)])  # (G,)
    position_ids = (points[:, :, None] + offsets).reshape(batch, -1)
    return GroupLayout(position_ids, layout.group_of, layout.index_in_group, points, layout.position_ids, points - 1)


def attention_layer_kinds(config) -> list[tuple[str, int | None]]:
    """Per decoder layer: (mask kind, sliding window or None), as the model's own cache sees it."""
    text_config = config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    kinds = []
    for layer_type, kwargs in zip(layer_types, layer_kwargs):
        if layer_type == FULL:
            kinds.append((FULL, None))
        elif layer_type == SLIDING:
            kinds.append((SLIDING, int(kwargs["sliding_window"])))
        else:
            raise NotImplementedError(f"attention layer type {layer_type!r} is not supported by cacheaug masks")
    return kinds


def block_visibility(layout: GroupLayout, prefix_length: int, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean (B, Q, T+Q): may new query q attend to key k (T prefix keys, then the Q new keys)?"""
    query_group = layout.group_of[:, :, None]  # (B, Q, 1)
    query_index = layout.index_in_group[:, :, None]
    slots = layout.position_ids if layout.slots is None else layout.slots  # (B, Q)
    query_slot = slots[:, :, None]

    prefix_slots = torch.arange(prefix_length, device=layout.points.device)  # (T,)
    prefix_last = layout.points if layout.prefix_last is None else layout.prefix_last
    query_last = torch.gather(prefix_last, 1, layout.group_of)[:, :, None]  # (B, Q, 1)
    sees_prefix = prefix_slots[None, None, :] <= query_last  # (B, Q, T)
    sees_new = (layout.group_of[:, None, :] == query_group) & (layout.index_in_group[:, None, :] <= query_index)
    if sliding_window is not None:
        # Same rule as transformers' sliding_window_overlay: key visible iff q_slot - k_slot < window.
        sees_prefix = sees_prefix & (query_slot - prefix_slots[None, None, :] < sliding_window)
        sees_new = sees_new & (query_slot - slots[:, None, :] < sliding_window)
    return torch.cat([sees_prefix, sees_new], dim=-1)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) bool -> (B, 1, Q, K) additive float mask; eager attention mishandles boolean 4D masks."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def block_attention_mask(
    config, layout: GroupLayout, prefix_length: int, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` argument for a forward over the new queries against the full prefix cache.

    One 4D tensor when all layers share a kind (every model passes a 4D mask through as-is); a dict
    ``{"full_attention": ..., "sliding_attention": ...}`` when layer kinds are mixed (Gemma 2/3, Qwen with
    windowed layers), which those models accept in place of their own mask creation.
    """
    kinds = set(attention_layer_kinds(config))
    masks: dict[str, torch.Tensor] = {}
    for kind, window in kinds:
        masks[kind] = additive_mask(block_visibility(layout, prefix_length, window), dtype)
    if len(masks) == 1:
        return next(iter(masks.values()))
    if len(masks) != len(kinds):
        raise NotImplementedError("layers of one kind with different sliding windows are not supported")
    return masks


# ---------------------------------------------------------------------------- block-sparse attention
BLOCK_ATTENTION = "cacheaug_block"


def block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Attention of P groups of G new queries over [T prefix keys ; the Q=P*G new keys], skipping what
    the block mask hides anyway: a group never sees another group's keys, so only the Q x T prefix scores
    and P diagonal G x G blocks are computed (a dense kernel computes Q x (T+Q)).

    query (B, H, Q, D); key/value (B, H_kv, T+Q, D); attention_mask (B, 1, Q, T+Q) additive, from
    block_attention_mask. Returns (B, Q, H, D) like transformers' attention functions.
    """
    group_size = kwargs["cacheaug_group_size"]
    batch, heads, queries, dim = query.shape
    prefix = key.shape[2] - queries
    groups = queries // group_size
    if key.shape[1] != heads:  # grouped-query attention: share each kv head across its query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    scaling = dim**-0.5 if scaling is None else scaling

    prefix_scores = torch.matmul(query, key[:, :, :prefix].transpose(-1, -2)) * scaling  # (B, H, Q, T)
    local_query = query.view(batch, heads, groups, group_size, dim)
    local_key = key[:, :, prefix:].reshape(batch, heads, groups, group_size, dim)
    local_scores = torch.matmul(local_query, local_key.transpose(-1, -2)) * scaling  # (B, H, P, G, G)
    if softcap is not None:
        prefix_scores = torch.tanh(prefix_scores / softcap) * softcap
        local_scores = torch.tanh(local_scores / softcap) * softcap
    new_mask = attention_mask[:, :, :, prefix:].reshape(batch, 1, groups, group_size, groups, group_size)
    local_mask = torch.diagonal(new_mask, dim1=2, dim2=4).permute(0, 1, 4, 2, 3)  # (B, 1, P, G, G)
    scores = torch.cat(
        [
            (prefix_scores + attention_mask[:, :, :, :prefix]).view(batch, heads, groups, group_size, prefix),
            local_scores + local_mask,
        ],
        dim=-1,
    )  # (B, H, P, G, T+G)
    # softmax in at least fp32 (bf16 scores lose too much), never below the input precision
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    gates = kwargs.get("cacheaug_gates")
    if gates is None:
        probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    else:
        # The first N_L keys of each group are latents: their own softmax, scaled by the layer's gate.
        visible = torch.cat(
            [attention_mask[:, :, :, :prefix].view(batch, 1, groups, group_size, prefix), local_mask], dim=-1
        ) > torch.finfo(attention_mask.dtype).min / 2  # (B, 1, P, G, T+G)
        key_index = torch.arange(prefix + group_size, device=query.device)
        is_latent = (key_index >= prefix) & (key_index < prefix + kwargs["cacheaug_num_latents"])  # (T+G,)
        gate = torch.tanh(gates[module.layer_idx]).to(softmax_dtype)[None, :, None, None, None]  # (1, H, 1, 1, 1)
        probs = (
            masked_softmax(scores, visible & ~is_latent, softmax_dtype)
            + gate * masked_softmax(scores, visible & is_latent, softmax_dtype)
        ).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs[..., :prefix].reshape(batch, heads, queries, prefix), value[:, :, :prefix])
    local_value = value[:, :, prefix:].reshape(batch, heads, groups, group_size, dim)
    out = out + torch.matmul(probs[..., prefix:], local_value).view(batch, heads, queries, dim)
    return out.transpose(1, 2).contiguous(), None


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax over the visible keys only; a query that sees none of them gets all-zero weights (not NaN)."""
    any_visible = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    return torch.softmax(scores, dim=-1, dtype=dtype) * any_visible


# ---------------------------------------------------------------------------- gated attention to latents
GATED_ATTENTION = "cacheaug_gated"


def gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Attention with a zero-initialised gate on the latent keys (LLaMA-Adapter, arXiv 2303.16199): the
    non-latent keys get their own softmax, the latent keys another, scaled by tanh(gate[layer, head]).
    With every gate at 0 the output is exactly that of attention over the non-latent keys alone.

    query (B, H, Q, D); key/value (B, H_kv, K, D); attention_mask (B, 1, Q, K) additive (eager masks);
    kwargs ``cacheaug_latent_keys`` (B, S) bool over every slot the layer has seen plus the new ones (a
    sliding layer holds only its last K), ``cacheaug_gates`` (num_layers, H). Returns (B, Q, H, D).
    """
    batch, heads, queries, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    is_latent = kwargs["cacheaug_latent_keys"][:, -num_keys:][:, None, None, :]  # (B, 1, 1, K)
    # grouped-query attention without repeating the cache: query head h reads kv head h // (H / H_kv), so the
    # queries of one kv head are stacked along Q, (B, H_kv, H/H_kv * Q, D), and each matmul reads K and V once
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * queries, dim)
    scaling = dim**-0.5 if scaling is None else scaling
    scores = (torch.matmul(grouped, key.transpose(-1, -2)) * scaling).reshape(batch, heads, queries, num_keys)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        visible = torch.ones_like(scores, dtype=torch.bool)
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[..., :num_keys]
    else:
        visible = attention_mask[..., :num_keys] > torch.finfo(attention_mask.dtype).min / 2
    dtype = torch.promote_types(scores.dtype, torch.float32)
    gate = torch.tanh(kwargs["cacheaug_gates"][module.layer_idx]).to(dtype)[None, :, None, None]  # (1, H, 1, 1)
    probs = masked_softmax(scores, visible & ~is_latent, dtype) + gate * masked_softmax(scores, visible & is_latent, dtype)
    probs = torch.nn.functional.dropout(probs.to(query.dtype), p=dropout, training=module.training)
    out = torch.matmul(probs.reshape(batch, kv_heads, -1, num_keys), value)  # (B, H_kv, H/H_kv * Q, D)
    return out.reshape(batch, heads, queries, -1).transpose(1, 2).contiguous(), None


@functools.cache  # once per process: decoding enters block_attention_for at every gated step
def register_block_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(BLOCK_ATTENTION, block_attention)
    AttentionInterface.register(GATED_ATTENTION, gated_attention)
    # Without a registered mask function transformers builds no mask at all for a custom attention.
    ALL_MASK_ATTENTION_FUNCTIONS.register(GATED_ATTENTION, eager_mask)


class block_attention_for:
    """Within the block, the given models' attention layers use block_attention (the masks must be the
    block masks above, passed explicitly), or ``implementation``. Restores each config's on exit."""

    def __init__(self, *modules, implementation: str = BLOCK_ATTENTION):
        self.configs = [m.config for m in modules if m is not None]
        self.implementation = implementation

    def __enter__(self):
        if self.configs:
            register_block_attention()
        self.saved = [config._attn_implementation for config in self.configs]
        for config in self.configs:
            config._attn_implementation = self.implementation
        return self

    def __exit__(self, *exc):
        for config, implementation in zip(self.configs, self.saved):
            config._attn_implementation = implementation
        return False
