"""How far each checkpoint's latent_residual r and latent gates opened, read from its saved weights.

    python experiments/residual_stats.py --out results/recipe-smollm2/residual.json NAME=CKPT [NAME=CKPT ...]

An existing --out is updated, not replaced: runs named again are recomputed, the others kept (their checkpoints
may be gone), and the earlier files' provenance is kept under "earlier_provenance".

The latents are soft tokens + r x (coprocessor output at the embedding scale). For a scalar r this prints r;
for an (H, H) matrix (latent_residual_matrix) its largest singular values and its RMS gain ||r||_F / sqrt(H),
the factor by which it scales an input of random direction: both 0 mean the pause baseline, 1 the skip connection.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from cacheaug.outputs import write_json


def stats(checkpoint: Path) -> dict:
    with safe_open(str(checkpoint / "coprocessor.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
        if "residual" not in names:
            raise SystemExit(f"{checkpoint}: no latent_residual in its weights")
        residual = weights.get_tensor("residual").float()
        gate = weights.get_tensor("gate").float() if "gate" in names else None
    out: dict = {"checkpoint": str(checkpoint)}
    if residual.dim() == 1:
        out["r"] = residual.item()
    else:
        singular = torch.linalg.svdvals(residual)  # (H,), descending
        out["r_matrix"] = {
            "shape": list(residual.shape),
            "rms_gain": residual.norm().item() / math.sqrt(residual.shape[1]),
            "top_singular_values": [round(s, 5) for s in singular[:8].tolist()],
            # how many directions carry 90% of the squared norm: few = the coprocessor enters along a few directions
            "rank_90": int((singular.pow(2).cumsum(0) / singular.pow(2).sum() < 0.9).sum().item()) + 1,
            "trace_over_h": residual.trace().item() / residual.shape[0],
        }
    if gate is not None:
        out["mean_abs_tanh_gate"] = gate.tanh().abs().mean().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="NAME=CKPT: a run's name and its checkpoint folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = dict(earlier.get("runs", {}))
    for item in args.checkpoints:
        name, sep, path = item.partition("=")
        if not sep or not Path(path, "coprocessor.safetensors").is_file():
            parser.error(f"expected NAME=CKPT with CKPT/coprocessor.safetensors, got {item!r}")
        runs[name] = stats(Path(path))
        print(name, runs[name])
    kept = earlier.get("earlier_provenance", []) + ([earlier["provenance"]] if "provenance" in earlier else [])
    write_json(args.out, {"runs": runs, **({"earlier_provenance": kept} if kept else {})})


if __name__ == "__main__":
    main()
