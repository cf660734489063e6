"""One decode step of the base alone (feed_token), at batch 1 and for 4 and 16 stacked rows of different prompt
lengths (the server's batch, with its padding mask) or of equal ones (no mask): what continuous batching can
gain before prefill, HTTP and clients take their share.

    python benchmarks/decode_step.py [--model smollm2-135m] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from cacheaug import load_base
from cacheaug.state import copy_state, feed_token, prefill, stack_states


def step_seconds(base, state, repeats: int) -> float:
    """Mean seconds of ``repeats`` steps after one warm-up, on a copy of ``state``."""
    state, token = copy_state(state), torch.full((state.logits.shape[0],), 13)
    feed_token(base, state, token)
    start = time.perf_counter()
    for _ in range(repeats):
        feed_token(base, state, token)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    base, _ = load_base(args.model)
    torch.manual_seed(0)
    lengths = (120, 128, 131, 125, 128, 126, 127, 129) * 2  # about the load test's 128-token prompts
    with torch.no_grad():
        prompts = [torch.randint(100, 5000, (1, n)) for n in lengths]
        print(f"batch 1: {1000 * step_seconds(base, prefill(base, prompts[0]), args.repeats):.0f} ms")
        for batch in (4, 16):
            stacked = stack_states([prefill(base, ids) for ids in prompts[:batch]])
            equal = stack_states([prefill(base, prompts[1]) for _ in range(batch)])
            equal.slot_mask = equal.last_slot = None  # equal lengths: nothing to hide
            print(f"batch {batch}: {1000 * step_seconds(base, stacked, args.repeats):.0f} ms stacked (padding mask), "
                  f"{1000 * step_seconds(base, equal, args.repeats):.0f} ms equal lengths (no mask)")


if __name__ == "__main__":
    main()
