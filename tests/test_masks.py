"""Block masks and the block-sparse attention that relies on them."""

from __future__ import annotations

import pytest
import torch

from cacheaug.masks import additive_mask, block_attention, block_visibility, group_layout


def _dense(query, key, value, mask, scaling, softcap=None):
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return (torch.softmax(scores + mask, dim=-1) @ value).transpose(1, 2)


@pytest.mark.parametrize("window, softcap, kv_heads", [(None, None, 4), (5, None, 2), (None, 7.0, 1)])
def test_block_attention_equals_dense_attention_under_the_block_mask(window, softcap, kv_heads):
    generator = torch.Generator().manual_seed(0)
    points = torch.tensor([[0, 4, 9], [2, 3, 10]])
    prefix, group_size, heads, dim = 12, 4, 4, 8
    layout = group_layout(points, group_size)
    mask = additive_mask(block_visibility(layout, prefix, window), torch.float32)  # (B, 1, Q, T+Q)
    queries = points.shape[1] * group_size
    query = torch.randn(2, heads, queries, dim, generator=generator)
    key = torch.randn(2, kv_heads, prefix + queries, dim, generator=generator)
    value = torch.randn(2, kv_heads, prefix + queries, dim, generator=generator)
    module = torch.nn.Module().eval()
    got, _ = block_attention(module, query, key, value, mask, scaling=0.3, softcap=softcap, cacheaug_group_size=group_size)
    want = _dense(query, key, value, mask, 0.3, softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_groups_see_their_prefix_and_themselves_only():
    layout = group_layout(torch.tensor([[1, 3]]), 2)
    visible = block_visibility(layout, 5)[0].int()  # (Q=4, T+Q=9)
    assert visible.tolist() == [
        [1, 1, 0, 0, 0, 1, 0, 0, 0],  # group of point 1: prefix 0..1, then itself causally
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 1, 0],  # group of point 3: prefix 0..3
        [1, 1, 1, 1, 0, 0, 0, 1, 1],
    ]
    assert layout.position_ids.tolist() == [[2, 3, 4, 5]]
