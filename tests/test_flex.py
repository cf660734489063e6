"""The GPU training path (flex.py): FlexAttention masks equal block_visibility element by element and tile by
tile, the flex and sdpa kernels give block_attention's loss and gradients, and flex refuses to train on CPU.
The `gpu` tests repeat the equivalences with backward on CUDA, in fp32 and bf16, and compare peak memory."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from cacheaug import AugmentedLM, CoprocessorConfig
from cacheaug import flex
from cacheaug.config import ConfigError, TrainArgs
from cacheaug.flex import (
    FlexAttentionError,
    flex_block_attention,
    flex_masks,
    group_block_mask,
    group_mask_mod,
    resolve_attention,
    run_compiled,
)
from cacheaug.masks import additive_mask, block_attention, block_visibility, group_layout, readout_layout
from helpers import VOCAB, make_base
from helpers import POINT_SETS

FLEX_ARCHITECTURES = ["llama", "gemma2", "gemma3", "qwen2", "mistral", "gpt2"]
RECIPES = {"paper": {"readout": "latent", "latent_gate": False}, "gate": {"readout": "token", "latent_gate": True}}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _quiet_unfused_warning():
    with warnings.catch_warnings():  # eager flex on CPU warns that it is unfused: expected in these checks
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def _layouts():
    """Random layouts: points at 0 and at T-2, groups not a multiple of the tile, both readouts."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for prefix, num_points, num_latents, num_ahead in [(37, 5, 3, 4), (50, 7, 2, 3), (29, 4, 5, 1)]:
        points = torch.stack([
            torch.cat([torch.tensor([0, prefix - 2]), torch.randperm(prefix - 3, generator=generator)[: num_points - 2] + 1])
            .sort().values for _ in range(2)
        ])
        cases.append((f"group-T{prefix}", group_layout(points, num_latents + num_ahead - 1), prefix, 0))
        cases.append((f"readout-T{prefix}", readout_layout(points, num_latents, num_ahead), prefix, num_latents))
    return cases


LAYOUTS = _layouts()
WINDOWS = [None, 2, 4, 20]  # shorter than a group, about a group, longer than a group


def _key_filter(layout, prefix: int, keys: str, num_latents: int) -> torch.Tensor:
    """(B, 1, T+Q) which keys a mask of ``keys`` may keep."""
    new_is_latent = layout.index_in_group < num_latents  # (B, Q)
    prefix_keys = torch.full((layout.points.shape[0], prefix), keys != "latent")
    kept = {"all": torch.ones_like(new_is_latent), "text": ~new_is_latent, "latent": new_is_latent}[keys]
    return torch.cat([prefix_keys, kept], dim=1)[:, None, :]


@pytest.mark.parametrize("case", range(len(LAYOUTS)), ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize("window", WINDOWS)
def test_mask_mod_equals_block_visibility(case, window):
    _, layout, prefix, num_latents = LAYOUTS[case]
    batch, queries = layout.group_of.shape
    want = block_visibility(layout, prefix, window)  # (B, Q, T+Q)
    for keys in ("all", "text", "latent") if num_latents else ("all",):
        mod = group_mask_mod(layout, prefix, window, keys, num_latents)
        got = create_mask(mod, batch, 1, queries, prefix + queries, device="cpu")[:, 0]
        assert torch.equal(got, want & _key_filter(layout, prefix, keys, num_latents)), keys


def _tiles(num_blocks: torch.Tensor, indices: torch.Tensor, kv_tiles: int) -> torch.Tensor:
    """(B, 1, nq) counts + (B, 1, nq, nkv) indices -> (B, nq, nkv) bool of the listed tiles."""
    listed = torch.arange(indices.shape[-1]) < num_blocks[..., None]
    dense = torch.zeros(*indices.shape[:-1], kv_tiles + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(listed, indices.long(), kv_tiles), True)
    return dense[..., :kv_tiles][:, 0]


@pytest.mark.parametrize("case", range(len(LAYOUTS)), ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("block_size", [8, 16])
def test_block_mask_tiles_cover_every_visible_tile(case, window, block_size):
    _, layout, prefix, num_latents = LAYOUTS[case]
    batch, queries = layout.group_of.shape
    keys_length = prefix + queries
    q_tiles, kv_tiles = -(-queries // block_size), -(-keys_length // block_size)
    for keys in ("all", "text", "latent") if num_latents else ("all",):
        visible = block_visibility(layout, prefix, window) & _key_filter(layout, prefix, keys, num_latents)
        padded = torch.zeros(batch, q_tiles * block_size, kv_tiles * block_size, dtype=torch.bool)
        padded[:, :queries, :keys_length] = visible
        per_tile = padded.view(batch, q_tiles, block_size, kv_tiles, block_size).sum(dim=(2, 4))
        mask = group_block_mask(layout, prefix, window, keys, num_latents, block_size)
        assert mask.shape == (batch, 1, queries, keys_length)
        partial = _tiles(mask.kv_num_blocks, mask.kv_indices, kv_tiles)
        full = _tiles(mask.full_kv_num_blocks, mask.full_kv_indices, kv_tiles)
        assert torch.equal(partial | full, per_tile > 0), "a visible tile is missing, or an empty one listed"
        assert not (partial & full).any()
        assert torch.equal(full, per_tile == block_size * block_size), "a full block must be all visible"
        # and exactly the tiles torch's own (dense) builder finds
        reference = create_block_mask(
            group_mask_mod(layout, prefix, window, keys, num_latents), batch, None, queries, keys_length,
            device="cpu", BLOCK_SIZE=block_size,
        )
        assert torch.equal(mask.to_dense(), reference.to_dense())
        assert torch.equal(mask.full_kv_num_blocks, reference.full_kv_num_blocks)


class _Layer(torch.nn.Module):
    def __init__(self, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.eval()


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_flex_kernel_equals_block_attention(softcap, window, gated):
    """One attention call (GQA 4/2 heads, scores large enough for the soft-cap to bind)."""
    _, layout, prefix, num_latents = LAYOUTS[1]
    batch, queries = layout.group_of.shape
    group_size = queries // layout.points.shape[1]
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(batch, 4, queries, 8, generator=generator) * 2
    key = torch.randn(batch, 2, prefix + queries, 8, generator=generator) * 2
    value = torch.randn(batch, 2, prefix + queries, 8, generator=generator)
    kwargs = {"cacheaug_group_size": group_size}
    if gated:
        kwargs |= {"cacheaug_gates": torch.randn(1, 4, generator=generator), "cacheaug_num_latents": num_latents}
    mask = additive_mask(block_visibility(layout, prefix, window), torch.float32)
    want, _ = block_attention(_Layer(), query, key, value, mask, scaling=0.5, softcap=softcap, **kwargs)
    masks = flex_masks(_window_config(window), layout, prefix, num_latents if gated else None, block_size=16)
    with torch.no_grad():
        got, _ = flex_block_attention(_Layer(), query, key, value, masks.model_mask(), scaling=0.5, softcap=softcap,
                                      cacheaug_flex=masks, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _window_config(window):
    """A one-layer HF config whose layer is full (window None) or sliding."""
    from transformers import LlamaConfig, MistralConfig

    if window is None:
        return LlamaConfig(num_hidden_layers=1)
    return MistralConfig(num_hidden_layers=1, sliding_window=window)


def _lm(arch: str, recipe: str) -> AugmentedLM:
    lm = AugmentedLM(make_base(arch), CoprocessorConfig(num_latents=3, num_ahead=4, num_points=5, **RECIPES[recipe]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gates open, coprocessor no longer the base's copy
        for parameter in lm.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return lm


def _inputs(point_set: int):
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(point_set))
    return input_ids, torch.tensor(POINT_SETS[point_set])


@pytest.mark.parametrize("arch", FLEX_ARCHITECTURES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_flex_forward_equals_block(arch, recipe):
    lm = _lm(arch, recipe)
    input_ids, points = _inputs(1 if recipe == "gate" else 0)  # set 1: points at 0..4, hiding x_t from t=0
    with torch.no_grad():
        want = lm.training_loss(input_ids, points, attention="block")
        got = lm.training_loss(input_ids, points, attention="flex")
    torch.testing.assert_close(got.nll_by_offset, want.nll_by_offset, rtol=1e-5, atol=1e-5)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())


def _relative_errors(got, want) -> float:
    got_all = torch.cat([g.flatten() for g in got])
    want_all = torch.cat([g.flatten() for g in want])
    return ((got_all - want_all).norm() / want_all.norm()).item()


@pytest.mark.parametrize("arch", FLEX_ARCHITECTURES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sdpa_gradients_equal_block(arch, recipe):
    lm = _lm(arch, recipe)
    input_ids, points = _inputs(0)
    losses, grads = {}, {}
    for attention in ("block", "sdpa"):
        losses[attention] = lm.training_loss(input_ids, points, attention=attention).loss
        grads[attention] = torch.autograd.grad(losses[attention], lm.trainable_parameters())
    assert abs(losses["sdpa"].item() - losses["block"].item()) <= 1e-5 * abs(losses["block"].item())
    for got, want in zip(grads["sdpa"], grads["block"]):
        if want.numel() > 1:
            assert (got - want).norm() <= 1e-4 * want.norm().clamp(min=1e-12)
    assert _relative_errors(grads["sdpa"], grads["block"]) <= 1e-4


def test_flex_refuses_to_train_on_cpu():
    lm = _lm("llama", "gate")
    input_ids, points = _inputs(0)
    with pytest.raises(FlexAttentionError, match="needs a CUDA device"):
        lm.training_loss(input_ids, points, attention="flex")
    assert resolve_attention("auto", "cpu") == "block"
    assert resolve_attention("auto", "cuda") == "flex"
    assert resolve_attention("flex", "cpu", training=False) == "flex"
    with pytest.raises(FlexAttentionError, match="auto"):
        resolve_attention("flex", "cpu")
    with pytest.raises(ConfigError, match="attention"):
        TrainArgs(attention="dense")
    with pytest.raises(ConfigError, match="compile_coprocessor"):
        TrainArgs(compile_coprocessor="yes")


def test_train_with_flex_on_cpu_fails_before_loading_anything(tmp_path):
    from cacheaug.config import RunConfig
    from cacheaug.train import train

    config = RunConfig(model="tiny-random", train=TrainArgs(output_dir=str(tmp_path / "run"), attention="flex"))
    with pytest.raises(FlexAttentionError, match="needs a CUDA device"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_one_compiled_kernel_serves_every_mask_of_a_shape():
    """Fresh layouts, text and latent keys, full and sliding windows: the same compiled graph, no recompile."""
    torch._dynamo.reset()
    kernel = torch.compile(flex_attention, backend="aot_eager", dynamic=False)
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(1, 2, 5 * 6, 8, generator=generator)
    key = value = torch.randn(1, 2, 20 + 5 * 6, 8, generator=generator)

    def call(seed: int, window, keys: str):
        points = (torch.randperm(17, generator=torch.Generator().manual_seed(seed))[:5] + 1).sort().values[None]
        mask = group_block_mask(readout_layout(points, 3, 3), 20, window, keys, 3, block_size=16)
        with torch.no_grad():
            return run_compiled(kernel, query, key, value, block_mask=mask)

    call(0, None, "text")
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed, window, keys in [(1, None, "text"), (2, 4, "text"), (3, 4, "latent"), (4, None, "all")]:
            call(seed, window, keys)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- CUDA
@pytest.fixture
def fresh_kernel():
    """Each test compiles its own graphs, so the per-function recompile limit is never reached across tests."""
    torch._dynamo.reset()
    flex._compiled = None
    yield
    torch._dynamo.reset()
    flex._compiled = None


def _loss_and_grads(lm, input_ids, points, attention, autocast: bool = False):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = lm.training_loss(input_ids, points, attention=attention).loss
    return loss.float(), torch.autograd.grad(loss, lm.trainable_parameters())


# Few cases, as every new shape compiles (seconds each): GQA (llama), soft-cap + sliding (gemma2), mixed
# layer kinds with one kv head (gemma3), with and without the gate. The CPU tests above cover the rest.
CUDA_CASES = [("llama", "paper"), ("gemma2", "gate"), ("gemma3", "gate")]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("arch", "recipe"), CUDA_CASES)
def test_cuda_flex_equals_block_fp32_and_bf16(arch, recipe, fresh_kernel):
    lm = _lm(arch, recipe).cuda()
    input_ids, points = (t.cuda() for t in _inputs(0))
    want_loss, want = _loss_and_grads(lm, input_ids, points, "block")
    got_loss, got = _loss_and_grads(lm, input_ids, points, "flex")
    assert abs(got_loss.item() - want_loss.item()) <= 1e-4 * abs(want_loss.item())
    assert _relative_errors(got, want) <= 1e-4
    bf16_loss, bf16 = _loss_and_grads(lm, input_ids, points, "flex", autocast=True)
    assert abs(bf16_loss.item() - want_loss.item()) <= 2e-2 * abs(want_loss.item())
    assert _relative_errors(bf16, want) <= 2e-2


@pytest.mark.gpu
@needs_cuda
def test_cuda_no_recompile_after_the_first_step(fresh_kernel):
    lm = _lm("gemma3", "gate").cuda()  # mixed full/sliding layers, gated: four masks per forward
    input_ids = torch.randint(0, VOCAB, (2, 20), device="cuda")
    lm.training_loss(input_ids, lm.sample_points(2, 20), attention="flex").loss.backward()
    with torch.compiler.set_stance("fail_on_recompile"):  # new points, same shapes: the same graphs
        for _ in range(2):
            lm.training_loss(input_ids, lm.sample_points(2, 20), attention="flex").loss.backward()


@pytest.mark.gpu
@needs_cuda
def test_cuda_flex_peak_memory_below_block(fresh_kernel):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    lm = AugmentedLM(LlamaForCausalLM(config), CoprocessorConfig(num_latents=8, num_ahead=8, num_points=64)).cuda()
    input_ids = torch.randint(0, VOCAB, (2, 1024), device="cuda")
    points = lm.sample_points(2, 1024, torch.Generator().manual_seed(0))
    peaks = {}
    for attention in ("flex", "block", "flex"):  # flex twice: the second is measured after its compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lm.training_loss(input_ids, points, attention=attention).loss.backward()
        torch.cuda.synchronize()
        peaks[attention] = torch.cuda.max_memory_allocated()
        lm.zero_grad(set_to_none=True)
    assert peaks["flex"] < peaks["block"], peaks
