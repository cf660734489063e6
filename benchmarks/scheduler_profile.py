"""Where the server's decode loop spends its time under load, without HTTP: the Scheduler of `cacheaug serve`
driven in-process by a closed loop of `--concurrency` greedy requests (`--prompt-tokens`-token prompts,
`--max-tokens` new tokens), with the loop's parts timed: prefill of admitted prompts, the batched decode
forward, rows leaving (select_rows, compaction) and rows joining (stack_states).

    python benchmarks/scheduler_profile.py [--model smollm2-135m] [--dtype float32] [--concurrency 1 16]
        [--requests-per-slot 2] [--prompt-tokens 128] [--max-tokens 64] [--json OUT.json]

The gap between this tokens/s and benchmarks/serve.py's is what HTTP, JSON and the clients cost.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import defaultdict

import torch

from cacheaug import load_base
from cacheaug.outputs import write_json
from cacheaug.serving import scheduler as loop
from cacheaug.serving.tickets import ErrorEvent, Sampling
from cacheaug.stream import TokenEvent

TIMED = ("prefill_rows", "prefill", "feed_token", "select_rows", "stack_states", "drop_hidden_slots",
         "compute_latents", "insert_latents")


def instrument(spent: dict[str, float]) -> None:
    """Wrap the state functions the scheduler module calls so that ``spent[name]`` sums their seconds."""
    for name in TIMED:
        inner = getattr(loop, name)

        def timed(*args, _inner=inner, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - start

        setattr(loop, name, timed)


def drive(scheduler, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """Closed loop: ``concurrency`` client threads, each submitting its share of ``prompts`` one after another."""
    ttfts, gaps, tokens, problems = [], [], [0], []
    lock = threading.Lock()

    def client(share: list[list[int]]) -> None:
        try:
            requests(share)
        except Exception as error:  # noqa: BLE001 (reported after the join: a thread's exception would vanish)
            problems.append(f"{type(error).__name__}: {error}")

    def requests(share: list[list[int]]) -> None:
        for ids in share:
            start = time.perf_counter()
            ticket = scheduler.submit(ids, Sampling(max_tokens=max_tokens, temperature=0.0, augment="off"))
            first = last = None
            count = 0
            for event in ticket.events():
                if isinstance(event, TokenEvent):
                    last = time.perf_counter()
                    first = first or last
                    count += 1
                elif isinstance(event, ErrorEvent):
                    raise RuntimeError(event.message)  # noqa: TRY004 (a failed request, not a type error)
            with lock:
                ttfts.append(first - start)
                gaps.append((last - first) / max(count - 1, 1))
                tokens[0] += count

    threads = [threading.Thread(target=client, args=(prompts[i::concurrency],)) for i in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if problems:
        raise SystemExit(f"a client failed: {problems[0]}")
    ordered = sorted(ttfts)
    return {"wall_s": wall, "tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
            "ttft_p50_s": ordered[len(ordered) // 2], "ttft_max_s": ordered[-1],
            "token_gap_p50_s": sorted(gaps)[len(gaps) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-prefill-tokens", type=int, default=1024)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    base, _ = load_base(args.model, dtype=args.dtype)
    spent: dict[str, float] = defaultdict(float)
    instrument(spent)
    generator = torch.Generator().manual_seed(0)
    vocab = base.config.get_text_config().vocab_size
    results = []
    for concurrency in args.concurrency:
        count = concurrency * args.requests_per_slot
        prompts = torch.randint(min(100, vocab - 1), min(5000, vocab), (count, args.prompt_tokens), generator=generator).tolist()
        scheduler = loop.Scheduler(base, None, max_batch=max(32, concurrency), max_prefill_tokens=args.max_prefill_tokens)
        drive(scheduler, prompts[:1], 1, 4)  # warm-up
        spent.clear()
        steps_before = scheduler.counters["steps"]
        result = drive(scheduler, prompts, concurrency, args.max_tokens)
        scheduler.close()
        result.update(concurrency=concurrency, requests=count, steps=scheduler.counters["steps"] - steps_before,
                      seconds={name: round(spent[name], 3) for name in TIMED if spent[name]})
        result["seconds"]["other"] = round(result["wall_s"] - sum(spent.values()), 3)
        results.append(result)
        print(f"concurrency {concurrency}: {result['tokens_per_s']:.1f} tok/s, TTFT p50 {result['ttft_p50_s']:.2f} s "
              f"max {result['ttft_max_s']:.2f} s, gap p50 {1000 * result['token_gap_p50_s']:.0f} ms, "
              f"{result['steps']} steps; seconds: {result['seconds']}", flush=True)
    if args.json:  # with its provenance: command line, commit, machine, versions
        write_json(args.json, {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": results})


if __name__ == "__main__":
    main()
