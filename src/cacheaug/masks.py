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

from dataclasses import dataclass

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass
class GroupLayout:
    """Where each new query sits: its group, its index inside the group, its position id."""

    position_ids: torch.Tensor  # (B, P*G) position of each new query
    group_of: torch.Tensor  # (B, P*G) index p of the group the query belongs to
    index_in_group: torch.Tensor  # (B, P*G) 0..G-1
    points: torch.Tensor  # (B, P) last visible prefix index of each group


def group_layout(points: torch.Tensor, group_size: int) -> GroupLayout:
    """Positions of P groups of ``group_size`` new tokens placed after points (B, P)."""
    batch, num_points = points.shape
    offsets = torch.arange(group_size, device=points.device)  # (G,)
    position_ids = (points[:, :, None] + 1 + offsets).reshape(batch, num_points * group_size)
    group_of = torch.arange(num_points, device=points.device).repeat_interleave(group_size).expand(batch, -1)
    index_in_group = offsets.repeat(num_points).expand(batch, -1)
    return GroupLayout(position_ids, group_of, index_in_group, points)


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
    query_position = layout.position_ids[:, :, None]

    prefix_positions = torch.arange(prefix_length, device=layout.points.device)  # (T,)
    query_point = torch.gather(layout.points, 1, layout.group_of)[:, :, None]  # (B, Q, 1)
    sees_prefix = prefix_positions[None, None, :] <= query_point  # (B, Q, T)
    sees_new = (layout.group_of[:, None, :] == query_group) & (layout.index_in_group[:, None, :] <= query_index)
    if sliding_window is not None:
        # Same rule as transformers' sliding_window_overlay: key visible iff q_pos - k_pos < window.
        sees_prefix = sees_prefix & (query_position - prefix_positions[None, None, :] < sliding_window)
        sees_new = sees_new & (query_position - layout.position_ids[:, None, :] < sliding_window)
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
