"""Copy a checkpoint with its latent gates scaled: tanh(gate') = alpha * tanh(gate), everything else unchanged.

    python experiments/scale_gates.py CKPT OUT --alpha 0.5

A dial between the trained coprocessor (alpha 1) and the plain base (alpha 0), applied after training: how
much of the in-domain gain survives when the latents speak more quietly, and what that does out of domain.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--alpha", type=float, required=True)
    args = parser.parse_args()
    if not 0 <= args.alpha <= 1:
        parser.error(f"--alpha must lie in 0..1, got {args.alpha}")
    weights = load_file(str(args.checkpoint / "coprocessor.safetensors"))
    if "gate" not in weights:
        parser.error(f"{args.checkpoint} has no latent gates (latent_gate was off)")
    args.out.mkdir(parents=True, exist_ok=True)
    for item in args.checkpoint.iterdir():
        if item.is_file() and item.name not in ("coprocessor.safetensors", "trainer_state.pt"):
            shutil.copy2(item, args.out / item.name)
    weights["gate"] = torch.atanh(args.alpha * torch.tanh(weights["gate"]))  # (num_layers, H)
    save_file(weights, str(args.out / "coprocessor.safetensors"))
    print(f"{args.out}: gates scaled by {args.alpha} (mean |tanh| {weights['gate'].tanh().abs().mean():.4f})")


if __name__ == "__main__":
    main()
