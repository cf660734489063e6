"""Do a checkpoint's latents carry its context? Perplexity by position with each sequence's own latents, and with
the latents the coprocessor computed at the same points of another test sequence, on the same targets.

    python experiments/context_swap.py CKPT --data DIR_OR_FILE --out results/recipe-smollm2/RUN/context-swap-NAME.json

The test sequences (as `cacheaug eval perplexity --seq-len 256 --every 16 --offsets 32 --max-tokens N` reads them)
are paired, sequence i with sequence i + S/2 (far apart: another part of the book, or another file). Each pair is one
batch of two; "own" is training_loss on it, "swapped" the same call with the coprocessor's output exchanged between
the two rows (a forward hook), so each row's base reads latents computed from the other row's prefix at the same
positions. Everything else (prefix, readout token, gates, targets) is unchanged. If the latents were a soft prompt
that ignores the context, swapping would cost nothing; the pause method is that case exactly (its check, below).

Writes the three evaluations (own, swapped, base; per pair, so the bootstrap resamples pairs), their changes vs the
base and the paired change swapped vs own, with 95% intervals. The "own" numbers recompute `eval perplexity`'s on
the same targets in batches of two, so they are printed beside the checkpoint's perplexity-*.json when one is given.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from cacheaug.config import DataArgs
from cacheaug.coprocessor import load_checkpoint
from cacheaug.data import validation_batches
from cacheaug.data.sources import check_source
from cacheaug.eval.metrics import PositionEval, evaluating, position_points
from cacheaug.outputs import write_json


def pair_sums(lm, pair: torch.Tensor, points: torch.Tensor, offsets: int, swap: bool) -> list[float]:
    """(K,) NLL sums over both rows of ``pair`` (2, T) at ``points`` (2, P), latents swapped between rows or not."""
    handle = None
    if swap:  # (2, P*N_L, H) -> the other row's latents; a pause model's rows are identical, so it changes nothing
        handle = lm.coprocessor.register_forward_hook(lambda module, inputs, output: output.roll(1, dims=0))
    try:
        out = lm.training_loss(pair, points, num_ahead=offsets)
    finally:
        if handle is not None:
            handle.remove()
    # every target of these points lies inside the sequence (position_points), so each offset scores 2 * P tokens
    return (out.nll_by_offset.double().cpu() * points.numel()).tolist()


def change_summary(result: PositionEval) -> dict:
    intervals = result.bootstrap()
    return {"by_offset": result.relative_change, "by_offset_ci": intervals["by_offset"],
            "overall": intervals["overall_change"], "overall_ci": intervals["overall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--data", required=True, help="text file or folder, as `cacheaug eval perplexity --data`")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--every", type=int, default=16)
    parser.add_argument("--offsets", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=18432)
    parser.add_argument("--compare", type=Path, help="the checkpoint's perplexity-*.json on the same data")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    check_source(args.data)
    torch.manual_seed(0)

    lm, tokenizer = load_checkpoint(args.ckpt)
    data = DataArgs(source=args.data, validation_source=args.data, seq_len=args.seq_len)
    batches = validation_batches(data, tokenizer, 1, max_batches=math.ceil(args.max_tokens / args.seq_len))
    sequences = [s for s in batches if s.shape[1] == args.seq_len]  # (1, T) each
    half = len(sequences) // 2
    if half == 0:
        raise SystemExit(f"context_swap: fewer than 2 sequences of {args.seq_len} tokens in {args.data!r}")
    points = position_points(args.seq_len, args.offsets, args.every)[None].expand(2, -1).to(lm.device)
    sums: dict[str, list] = {"own": [], "swapped": [], "base": []}
    with evaluating(lm), torch.no_grad():
        for i in range(half):
            pair = torch.cat([sequences[i], sequences[i + half]]).to(lm.device)  # (2, T)
            sums["own"].append(pair_sums(lm, pair, points, args.offsets, swap=False))
            sums["swapped"].append(pair_sums(lm, pair, points, args.offsets, swap=True))
            base = lm.unaugmented_loss(pair, points, num_ahead=args.offsets)
            sums["base"].append((base.nll_by_offset.double().cpu() * points.numel()).tolist())
            print(f"pair {i + 1}/{half}", flush=True)
    counts = [[points.numel()] * args.offsets for _ in range(half)]
    total = [sum(column) for column in zip(*counts)]

    def evaluation(key: str) -> PositionEval:
        return PositionEval(
            nll_augmented=[sum(column) / n for column, n in zip(zip(*sums[key]), total)],
            nll_base=[sum(column) / n for column, n in zip(zip(*sums["base"]), total)],
            tokens_by_offset=total, num_sequences=2 * half, seq_len=args.seq_len, every=args.every,
            num_points=2 * half * points.shape[1], sequence_nll_augmented=sums[key], sequence_nll_base=sums["base"],
            sequence_counts=counts,
        )

    own, swapped = evaluation("own"), evaluation("swapped")
    record = {
        "checkpoint": str(args.ckpt), "method": lm.config.method, "data": args.data,
        "settings": {"seq_len": args.seq_len, "every": args.every, "offsets": args.offsets,
                     "max_tokens": args.max_tokens, "pairs": half, "pairing": "sequence i with sequence i + S/2"},
        "own_vs_base": change_summary(own), "swapped_vs_base": change_summary(swapped),
        "swapped_vs_own": swapped.paired_change(own),
        "own": own.to_dict(), "swapped": swapped.to_dict(),
    }
    if args.compare is not None:
        reference = json.loads(args.compare.read_text())["result"]
        record["own_recomputes"] = {"file": str(args.compare),
                                    "overall_change": PositionEval.from_dict(reference).bootstrap()["overall_change"],
                                    "sequences": reference["num_sequences"]}
    write_json(args.out, record)
    for name in ("own_vs_base", "swapped_vs_base", "swapped_vs_own"):
        r = record[name]
        print(f"{name}: k=1 {r['by_offset'][0]:+.2f}% [{r['by_offset_ci'][0][0]:+.2f}, {r['by_offset_ci'][0][1]:+.2f}], "
              f"k = 1..{args.offsets} {r['overall']:+.2f}% [{r['overall_ci'][0]:+.2f}, {r['overall_ci'][1]:+.2f}]")
    if "own_recomputes" in record:
        print(f"eval perplexity on the same data: k = 1..{args.offsets} {record['own_recomputes']['overall_change']:+.2f}% "
              f"({record['own_recomputes']['sequences']} sequences)")


if __name__ == "__main__":
    main()
