"""Seconds per training step: one block-masked pass over all points vs the point-by-point reference.

    python benchmarks/train_step.py [--model smollm2-135m] [--points 8 16] [--prefix 256] [--json out.json]

Each step is forward + backward + AdamW. FLOPs are counted by torch's FlopCounterMode on one extra step
(the matmuls and attention that actually ran), so GFLOP/s is what the step achieved, set next to the best
fp32 matmul rate measured in the same process.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()

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
        input_ids = torch.randint(0, base.config.vocab_size, (1, args.prefix))
        points = lm.sample_points(1, args.prefix, torch.Generator().manual_seed(num_points))
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
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        result = {
            "command": "python benchmarks/train_step.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if v is not None),
            "git_commit": commit,
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "model": args.model,
            "matmul_peak_gflops": peak,
            "rows": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
