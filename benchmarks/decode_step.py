"""One decode step of the base alone (feed_token), at batch 1 and for 4 and 16 stacked rows of different prompt
lengths (the server's batch, with its padding mask) or of equal ones (no mask): what continuous batching can
gain before prefill, HTTP and clients take their share; the same for 16 rows of a 1,024-slot context. Then the
prefill of 1 and 8 such prompts in one batch (prefill_rows, as the server admits them): the other half of a
server's forward work.

    python benchmarks/decode_step.py [--model smollm2-135m] [--dtype float32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from cacheaug import load_base
from cacheaug.state import copy_state, feed_token, prefill, prefill_rows, stack_states


def step_seconds(base, state, repeats: int) -> float:
    """Mean seconds of ``repeats`` steps after one warm-up, on a copy of ``state``."""
    state, token = copy_state(state), torch.full((state.logits.shape[0],), 3)
    feed_token(base, state, token)
    start = time.perf_counter()
    for _ in range(repeats):
        feed_token(base, state, token)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16: the base's weights")
    args = parser.parse_args()
    base, _ = load_base(args.model, dtype=args.dtype)
    torch.manual_seed(0)
    lengths = (120, 128, 131, 125, 128, 126, 127, 129) * 2  # about the load test's 128-token prompts
    with torch.no_grad():
        vocab = base.config.get_text_config().vocab_size
        prompts = [torch.randint(min(100, vocab - 1), min(5000, vocab), (1, n)) for n in lengths]
        print(f"batch 1: {1000 * step_seconds(base, prefill(base, prompts[0]), args.repeats):.0f} ms")
        for batch in (4, 16):
            stacked = stack_states([prefill(base, ids) for ids in prompts[:batch]])
            equal = stack_states([prefill(base, prompts[1]) for _ in range(batch)])
            equal.slot_mask = equal.last_slot = None  # equal lengths: nothing to hide
            print(f"batch {batch}: {1000 * step_seconds(base, stacked, args.repeats):.0f} ms stacked (padding mask), "
                  f"{1000 * step_seconds(base, equal, args.repeats):.0f} ms equal lengths (no mask)")
        # a long context: 16 equal rows of 1,024 slots, where re-concatenating the cache each step would dominate
        long = prefill(base, torch.randint(min(100, vocab - 1), min(5000, vocab), (1, 1024)))
        rows16 = stack_states([copy_state(long) for _ in range(16)])
        rows16.slot_mask = rows16.last_slot = None
        print(f"batch 16 at 1,024 slots: {1000 * step_seconds(base, rows16, args.repeats):.0f} ms (equal lengths, no mask)")
        for batch in (1, 8):
            rows = [ids[0].tolist() for ids in prompts[:batch]]
            prefill_rows(base, rows)  # warm-up
            start = time.perf_counter()
            for _ in range(max(1, args.repeats // 5)):
                prefill_rows(base, rows)
            seconds = (time.perf_counter() - start) / max(1, args.repeats // 5)
            print(f"prefill of {batch} prompt(s), {sum(map(len, rows))} tokens: {1000 * seconds:.0f} ms "
                  f"({sum(map(len, rows)) / seconds:.0f} tokens/s)")


if __name__ == "__main__":
    main()
