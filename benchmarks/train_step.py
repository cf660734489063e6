"""Seconds per training step: one block-masked pass over all points vs the point-by-point reference.

    python benchmarks/train_step.py [--model smollm2-135m] [--points 8 16] [--prefix 256] [--json out.json]
    python benchmarks/train_step.py --device cuda --prefix 2048 --points 128 --batch 4 \
        --attention block flex sdpa [--num-latents 16] [--json out.json]

Each step is forward + backward + AdamW. On CPU, FLOPs are counted by torch's FlopCounterMode on one extra
step (the matmuls and attention that actually ran), so GFLOP/s is what the step achieved, set next to the
best fp32 matmul rate measured in the same process.

On CUDA (bf16 autocast, fp32 weights and optimiser state, the default recipe) each attention of the
training pass (flex.py) is timed against the others: seconds per step, tokens/s, peak memory, recompiles
after the first step, and MFU counting only useful FLOPs (useful_flops below) against the device's dense
bf16 peak. The point-by-point reference is not run there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import time

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from cacheaug import AugmentedLM, CoprocessorConfig, load_base


# FlopCounterMode has no formula for the CPU flash-attention kernels, so attention would count as zero.
# The dense kernel computes every query-key pair (masked or not), halved only when causal.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value) // (2 if is_causal else 1)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                             *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value) // (2 if is_causal else 1)


def matmul_peak_gflops(sizes=(1024, 2048, 4096), trials: int = 3) -> float:
    """Best fp32 GFLOP/s of square matmuls over a few sizes and trials (a peak, not an average)."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        repeats = max(1, int(2e10 / (2 * size**3)))
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def make_step(lm: AugmentedLM, optimizer, input_ids, points, method: str):
    loss_fn = lm.training_loss if method == "one_pass" else lm.reference_loss

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(input_ids, points).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def time_steps(step, repeats: int) -> float:
    step()  # warm-up: allocator, kernels, optimizer state
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------- CUDA
# Dense bf16 tensor-core peaks, no 2:4 sparsity (NVIDIA quotes sparse figures: halve them). First match wins.
DENSE_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1)]


def dense_bf16_peak(device_name: str) -> float | None:
    return next((tflops * 1e12 for name, tflops in DENSE_BF16_TFLOPS if name in device_name), None)


def _linear_parameters(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def _visible_pairs(config, layout, prefix: int) -> list[tuple[int, int]]:
    """Per decoder layer of ``config``: visible (prefix, new) query-key pairs of the block mask."""
    from cacheaug.masks import attention_layer_kinds, block_visibility

    counts = {}
    for kind, window in set(attention_layer_kinds(config)):
        prefix_pairs = new_pairs = 0
        for row in range(layout.points.shape[0]):  # one sequence at a time: the dense mask is (Q, T+Q)
            one = dataclasses.replace(
                layout, **{f.name: getattr(layout, f.name)[row : row + 1] for f in dataclasses.fields(layout)
                           if getattr(layout, f.name) is not None},
            )
            visible = block_visibility(one, prefix, window)
            prefix_pairs += int(visible[..., :prefix].sum())
            new_pairs += int(visible[..., prefix:].sum())
        counts[kind] = (prefix_pairs, new_pairs)
    return [counts[kind] for kind, _ in attention_layer_kinds(config)]


def _causal_pairs(config, batch: int, length: int) -> int:
    from cacheaug.masks import attention_layer_kinds

    positions = torch.arange(length)
    return sum(
        batch * int((positions + 1).clamp(max=window or length).sum()) for _, window in attention_layer_kinds(config)
    )


def useful_flops(lm: AugmentedLM, batch: int, length: int, points: torch.Tensor) -> dict[str, float]:
    """FLOPs one training step must do, by part (2 per multiply-add, matmuls and visible attention only).

    frozen prefill: 2 N_base per token of B x T, causal (windowed) attention pairs forward only;
    coprocessor: 6 N_stack per soft token (forward, activation and weight gradients);
    frozen base over the groups: 4 N_base per group token (forward and activation gradients, no weight
    gradients) plus the LM head on the B x P x N_A scored rows;
    attention, per visible pair and head dim: 4 forward; backward 4 for prefix keys (only dQ is needed:
    the prefix K/V are frozen) and 8 for new keys (dQ, dK, dV). Masked pairs, recomputation in backward and
    the unused half of a dense kernel are not counted.
    """
    from cacheaug.masks import group_layout, readout_layout

    config, text = lm.config, lm.base.config.get_text_config()
    width = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    decoder = lm.base.get_decoder()
    base_linear = _linear_parameters(decoder)
    lm_head = lm.base.get_output_embeddings().weight.numel()
    num_points = points.shape[1]
    group_size = config.num_latents + config.num_ahead - (0 if config.readout == "token" else 1)
    soft_layout = group_layout(points, config.num_latents)
    base_layout = (
        readout_layout(points, config.num_latents, config.num_ahead)
        if config.readout == "token" else group_layout(points, group_size)
    )

    def attention(pairs) -> float:  # forward + useful backward, all layers
        return sum(width * (4 * (p + n) + 4 * p + 8 * n) for p, n in pairs)

    parts = {"prefill": 2 * base_linear * batch * length + 4 * width * _causal_pairs(text, batch, length)}
    stack = lm.coprocessor.stack
    if stack is not None:
        parts["coprocessor"] = 6 * _linear_parameters(stack) * batch * num_points * config.num_latents + attention(
            _visible_pairs(stack.config, soft_layout, length)
        )
    parts["base"] = (
        4 * base_linear * batch * num_points * group_size
        + 4 * lm_head * batch * num_points * config.num_ahead
        + attention(_visible_pairs(lm.base.config, base_layout, length))
    )
    parts["total"] = sum(parts.values())
    return parts


def cuda_rows(args, on_row=None) -> tuple[list[dict], dict]:
    """Time each attention at each point count; ``on_row(rows, device)`` after every row (partial results)."""
    from torch._dynamo.utils import counters

    device = torch.device(args.device)
    torch.manual_seed(0)
    base, _ = load_base(args.model)
    base.to(device)
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else dense_bf16_peak(name)
    print(f"{args.model} | {name} | prefix {args.prefix} | batch {args.batch} | N_L {args.num_latents} | "
          f"N_A {args.num_ahead} | {args.precision} | dense bf16 peak "
          f"{'unknown (--peak-tflops)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    rows, device_info = [], {"device_name": name, "dense_bf16_peak_tflops": None if peak is None else peak / 1e12}
    for num_points in args.points:
        config = CoprocessorConfig(num_latents=args.num_latents, num_ahead=args.num_ahead, num_points=num_points)
        for attention in args.attention:
            lm = AugmentedLM(base, config).to(device).train()
            optimizer = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-5, fused=True)
            input_ids = torch.randint(0, base.config.vocab_size, (args.batch, args.prefix), device=device)
            points = lm.sample_points(args.batch, args.prefix, torch.Generator().manual_seed(num_points))
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16")

            def step() -> float:
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = lm.training_loss(input_ids, points, attention=attention).loss
                loss.backward()
                optimizer.step()
                return loss.item()

            row = {"points": num_points, "attention": attention}
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                step()  # compiles flex's graphs
                row["first_step_seconds"] = time.perf_counter() - start
                graphs = counters["stats"]["unique_graphs"]
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(args.repeats):
                    step()
                torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / args.repeats
                flops = useful_flops(lm, args.batch, args.prefix, points)
                row |= {
                    "seconds_per_step": seconds,
                    "tokens_per_second": args.batch * args.prefix / seconds,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "recompiles_after_first_step": counters["stats"]["unique_graphs"] - graphs,
                    "useful_tflop_per_step": flops["total"] / 1e12,
                    "useful_tflop_by_part": {k: v / 1e12 for k, v in flops.items() if k != "total"},
                    "useful_tflops": flops["total"] / seconds / 1e12,
                    "mfu": None if peak is None else flops["total"] / seconds / peak,
                }
                mfu = "" if peak is None else f" = MFU {100 * row['mfu']:.1f}%"
                print(f"points {num_points:3d} | {attention:5s} | {seconds:.3f} s/step | "
                      f"{row['tokens_per_second']:.0f} tok/s | peak {row['peak_memory_gib']:.1f} GiB | "
                      f"{row['useful_tflops']:.0f} useful TFLOP/s{mfu} | first step {row['first_step_seconds']:.0f} s | "
                      f"recompiles {row['recompiles_after_first_step']}", flush=True)
            except Exception as error:  # out of memory, FlexAttentionError, a kernel's resources: report, go on
                row["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
                print(f"points {num_points:3d} | {attention:5s} | {row['error']}", flush=True)
            rows.append(row)
            del lm, optimizer
            torch.cuda.empty_cache()
            _speedups(rows)
            if on_row is not None:
                on_row(rows, device_info)
    return rows, device_info


def _speedups(rows: list[dict]) -> None:
    for row in rows:
        block = [r for r in rows if r["points"] == row["points"] and r["attention"] == "block" and "seconds_per_step" in r]
        if block and "seconds_per_step" in row:
            row["speedup_over_block"] = block[0]["seconds_per_step"] / row["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--points", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--num-latents", type=int, default=16)
    parser.add_argument("--num-ahead", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--attention", nargs="+", default=["block", "flex", "sdpa"], choices=("block", "flex", "sdpa"),
                        help="cuda: the training-pass attentions to compare (cpu times block only)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="cuda only")
    parser.add_argument("--peak-tflops", type=float, default=None, help="cuda: dense bf16 peak, if not in the table")
    args = parser.parse_args()
    if args.device == "cuda":  # the JSON is rewritten after every row: a run cut short keeps what it measured
        save = (lambda rows, device: write_json(args, {"model": args.model, **device, "rows": rows})) if args.json else None
        cuda_rows(args, on_row=save)
        return

    torch.manual_seed(0)
    base, _ = load_base(args.model)
    peak = matmul_peak_gflops()
    print(f"{args.model} | prefix {args.prefix} | N_L {args.num_latents} | N_A {args.num_ahead} | "
          f"threads {torch.get_num_threads()} | fp32 matmul peak {peak:.0f} GFLOP/s")
    rows = []
    for num_points in args.points:
        config = CoprocessorConfig(num_latents=args.num_latents, num_ahead=args.num_ahead, num_points=num_points)
        lm = AugmentedLM(base, config).train()
        optimizer = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-5, fused=True)
        input_ids = torch.randint(0, base.config.vocab_size, (args.batch, args.prefix))
        points = lm.sample_points(args.batch, args.prefix, torch.Generator().manual_seed(num_points))
        row = {"points": num_points}
        for method, repeats in (("one_pass", args.repeats), ("reference", args.reference_repeats)):
            step = make_step(lm, optimizer, input_ids, points, method)
            seconds = time_steps(step, repeats)
            flops = count_flops(step)
            row[method] = {"seconds_per_step": seconds, "gflop_per_step": flops / 1e9, "gflops": flops / seconds / 1e9}
        row["speedup"] = row["reference"]["seconds_per_step"] / row["one_pass"]["seconds_per_step"]
        row["one_pass_fraction_of_peak"] = row["one_pass"]["gflops"] / peak
        rows.append(row)
        one, ref = row["one_pass"], row["reference"]
        print(f"points {num_points:3d} | one-pass {one['seconds_per_step']:.2f} s/step "
              f"({one['gflop_per_step']:.0f} GFLOP, {one['gflops']:.0f} GFLOP/s = {100 * row['one_pass_fraction_of_peak']:.0f}% of peak) | "
              f"point-by-point {ref['seconds_per_step']:.2f} s/step ({ref['gflops']:.0f} GFLOP/s) | "
              f"speedup {row['speedup']:.1f}x")
        del lm, optimizer
    if args.json:
        write_json(args, {"model": args.model, "matmul_peak_gflops": peak, "rows": rows})


def write_json(args, result: dict) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "command": "python benchmarks/train_step.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None),
        "git_commit": commit,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        **result,
    }
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
