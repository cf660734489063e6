"""Serving cost of augmentation: time to first token and tokens/s, plain vs sync vs async augmentation vs a
zero-shot-CoT answer given N_L extra tokens; then a bounded loopback load test of the HTTP server.

    python benchmarks/serve.py [--model smollm2-135m] [--ckpt DIR] [--dtype float32] [--prompt-tokens 512] [--json out.json]

Without --ckpt the coprocessor is a fresh, untrained one on the base (timing does not depend on training).
Decoding is greedy with no eos, so every mode decodes exactly its budget. "added" is a mode's extra time to
its first *answer* token over plain decoding: for sync/async augmentation, TTFT - plain TTFT; for CoT, the
time to token N_L+1 (after N_L "thinking" tokens) - plain TTFT.

The load test starts `cacheaug serve` (its continuous-batching scheduler) in its own process on 127.0.0.1 (a free
port) and, for each augment mode and concurrency level, streams a fixed number of completions from that many
closed-loop clients: aggregate generated tokens/s, time to first token and per-token latency (p50/p95),
errors, and the server's resident memory. Then a soak of --soak-requests short requests checks that memory
stays flat (after the first 50 vs at the end), and the bank: the same prompts continued from a banked
context vs computed afresh. Loopback only. About 10 minutes on 2 CPU cores for SmolLM2-135M with the defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cacheaug import AugmentedLM, CoprocessorConfig, load_base
from cacheaug import cache as kv
from cacheaug import load_checkpoint
from cacheaug.data.arithmetic import arithmetic_problems
from cacheaug.serving.loadtest import resident_memory_bytes, run_stream_load_test
from cacheaug.state import copy_state, feed_token, insert_latents, latents_for, prefill
from cacheaug.stream import TokenEvent, stream

COT_SUFFIX = "\nLet's think step by step."


def load_model(args):
    if args.ckpt:
        return load_checkpoint(args.ckpt, args.dtype)
    base, tokenizer = load_base(args.model, dtype=args.dtype)
    return AugmentedLM(base, CoprocessorConfig(num_latents=args.num_latents)), tokenizer


def corpus_ids(tokenizer, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """(1, num_tokens) ids of arithmetic word problems, a stand-in for a real long prompt."""
    text, ids = "", torch.zeros(1, 0, dtype=torch.long)
    count = 8
    while ids.shape[1] < num_tokens:
        text = "\n\n".join(arithmetic_problems(count, seed))
        ids = tokenizer(text, return_tensors="pt").input_ids
        count *= 2
    return ids[:, :num_tokens]


def timed_stream(lm, ids: torch.Tensor, new_tokens: int, augment: str) -> dict:
    """Seconds from the call to each generated token (prefill and a sync coprocessor included)."""
    start = time.perf_counter()
    times, finish = [], None
    for event in stream(lm, ids, new_tokens, augment=augment):
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter() - start)
        else:
            finish = event
    return {"times": times, "augmentation": finish.augmentation, "insertions": finish.insertions}


def median_run(runs: list[dict], answer_index: int = 0) -> dict:
    """Medians over repeats: time to the answer's first token, and decode tokens/s after the first token."""
    first = [run["times"][answer_index] for run in runs]
    rates = [(len(run["times"]) - 1) / (run["times"][-1] - run["times"][0]) for run in runs if len(run["times"]) > 1]
    return {
        "time_to_answer_s": statistics.median(first),
        "time_to_first_token_s": statistics.median(run["times"][0] for run in runs),
        "total_s": statistics.median(run["times"][-1] for run in runs),
        "decode_tokens_per_s": statistics.median(rates) if rates else float("nan"),
        "augmentation": [run["augmentation"] for run in runs],
        "insertions": [run["insertions"] for run in runs],
    }


def bench_decoding(lm, tokenizer, args) -> dict:
    num_latents = lm.config.num_latents
    prompt = corpus_ids(tokenizer, args.prompt_tokens)
    cot_prompt = torch.cat([prompt, tokenizer(COT_SUFFIX, return_tensors="pt", add_special_tokens=False).input_ids], 1)
    modes = {
        "plain": (prompt, args.new_tokens, "off", 0),
        "sync": (prompt, args.new_tokens, "sync", 0),
        "async": (prompt, args.new_tokens, "async", 0),
        "cot": (cot_prompt, num_latents + args.new_tokens, "off", num_latents),
    }
    results = {}
    for name, (ids, new_tokens, augment, answer_index) in modes.items():
        timed_stream(lm, ids, new_tokens, augment)  # warm-up
        runs = [timed_stream(lm, ids, new_tokens, augment) for _ in range(args.repeats)]
        results[name] = {"prompt_tokens": ids.shape[1], "new_tokens": new_tokens, **median_run(runs, answer_index)}
        print(f"  {name:6s} done: time to answer {results[name]['time_to_answer_s']:.3f} s", flush=True)
    plain = results["plain"]["time_to_answer_s"]
    for result in results.values():
        result["added_vs_plain_s"] = result["time_to_answer_s"] - plain
    # The parts sync augmentation cannot avoid, each timed alone in this thread: the coprocessor's pass of N_L
    # soft tokens over the prompt's cache, and the base's pass over the N_L latents (which also yields the
    # first token's logits). Their sum is the floor of sync's added TTFT; one decode step is CoT's unit cost.
    with torch.no_grad():
        state = prefill(lm.base, prompt)
        latents = latents_for(lm, state)
        parts = {  # each as sync decoding runs it, with the checkpoint's recipe (readout="token": + x_t again)
            "coprocessor_pass_s": lambda: latents_for(lm, state),
            "latent_pass_s": lambda: insert_latents(lm, state, latents),
            "decode_step_s": lambda: feed_token(lm.base, copy_state(state), torch.tensor([13])),
        }
        for name, part in parts.items():
            seconds = []
            for _ in range(args.repeats + 2):
                start = time.perf_counter()
                part()
                seconds.append(time.perf_counter() - start)
            results[name] = statistics.median(seconds[1:])
    results["sync_floor_s"] = results["coprocessor_pass_s"] + results["latent_pass_s"]
    results["cot_over_sync"] = results["cot"]["added_vs_plain_s"] / max(results["sync"]["added_vs_plain_s"], 1e-9)
    results["cot_over_sync_floor"] = results["cot"]["added_vs_plain_s"] / results["sync_floor_s"]
    results["prompt_cache_positions"] = kv.cache_length(state.cache)
    return results


def load_prompts(tokenizer, num_tokens: int, count: int = 64) -> list[str]:
    """Distinct prompts of about ``num_tokens`` tokens (overlapping windows of one arithmetic-problem text)."""
    ids = corpus_ids(tokenizer, num_tokens * (count // 2 + 2), seed=1)[0]
    return [tokenizer.decode(ids[offset : offset + num_tokens]) for offset in range(0, num_tokens * count // 2, num_tokens // 2)]


class ServerProcess:
    """`cacheaug serve --ckpt DIR` in its own process on a free loopback port (its memory and its GIL its own:
    the load clients run in this process); a context manager."""

    def __init__(self, ckpt: str, *options: str):
        self.ckpt, self.options = ckpt, options

    def __enter__(self) -> "ServerProcess":
        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "cacheaug.cli", "serve", "--ckpt", self.ckpt, "--port", str(port), *self.options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 300 s")
            time.sleep(0.5)

    def rss(self) -> int:
        return resident_memory_bytes(self.process.pid)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def bench_load(ckpt: str, tokenizer, args) -> dict:
    prompts = load_prompts(tokenizer, args.load_prompt_tokens)
    levels, memory = [], {}
    size = ["--max-batch", str(max(args.concurrency)), "--max-queue", str(4 * max(args.concurrency)), "--dtype", args.dtype]
    with ServerProcess(ckpt, *size) as server:
        memory["before_load_bytes"] = server.rss()
        for augment in args.load_augment:
            for concurrency, requests in zip(args.concurrency, args.requests):
                payloads = [{"prompt": prompts[i % len(prompts)], "max_tokens": args.load_max_tokens, "temperature": 0,
                             "augment": augment} for i in range(requests)]
                run_stream_load_test(server.url, payloads[:1], concurrency=1)  # warm-up
                result = {"augment": augment, **run_stream_load_test(server.url, payloads, concurrency).to_dict()}
                levels.append(result)
                print(f"  {augment:5s} concurrency {concurrency:2d}: {requests} requests, {result['tokens_per_s']:.1f} tok/s, "
                      f"TTFT p50 {result['ttft_p50_s']:.2f} s p95 {result['ttft_p95_s']:.2f} s, "
                      f"{result['errors']} errors", flush=True)
        memory["after_levels_bytes"] = server.rss()
        soak = None
        if args.soak_requests:
            payloads = [{"prompt": prompts[i % len(prompts)], "max_tokens": 16, "temperature": 0, "augment": "sync"}
                        for i in range(args.soak_requests)]
            first = run_stream_load_test(server.url, payloads[:50], args.soak_concurrency)
            after_50 = server.rss()
            rest = run_stream_load_test(server.url, payloads[50:], args.soak_concurrency)
            after_all = server.rss()
            soak = {"requests": args.soak_requests, "concurrency": args.soak_concurrency, "max_tokens": 16,
                    "errors": first.errors + rest.errors, "rss_after_50_bytes": after_50,
                    "rss_after_all_bytes": after_all, "rss_growth": after_all / after_50 - 1,
                    "tokens_per_s": rest.tokens_per_s}
            print(f"  soak: {args.soak_requests} requests, RSS {after_50 / 2**20:.0f} MiB after 50 -> "
                  f"{after_all / 2**20:.0f} MiB after all ({100 * soak['rss_growth']:+.1f}%), {soak['errors']} errors",
                  flush=True)
    return {"levels": levels, "memory": memory, "soak": soak, "bank": bench_bank(ckpt, tokenizer, args)}


def bench_bank(ckpt: str, tokenizer, args) -> dict | None:
    """TTFT of questions about one long banked context, from the bank vs computed afresh (sync augmentation)."""
    if not args.bank_context_tokens:
        return None
    context = tokenizer.decode(corpus_ids(tokenizer, args.bank_context_tokens, seed=2)[0])
    questions = [f"\nQuestion {i}: what is the answer to problem {i}?\nAnswer:" for i in range(8)]
    payloads = [{"prompt": context + q, "max_tokens": 8, "temperature": 0, "augment": "sync"} for q in questions]
    results = {}
    with tempfile.TemporaryDirectory() as root:
        Path(root, "context.txt").write_text(context)
        added = subprocess.run([sys.executable, "-m", "cacheaug.cli", "bank", "add", "--ckpt", ckpt, "--dtype", args.dtype,
                                "--root", root, str(Path(root, "context.txt"))], capture_output=True, text=True)
        if added.returncode:
            raise RuntimeError(f"cacheaug bank add failed: {added.stderr[-2000:]}")
        for name, options in (("fresh", ()), ("banked", ("--bank", root))):
            with ServerProcess(ckpt, "--dtype", args.dtype, *options) as server:
                run_stream_load_test(server.url, payloads[:1], concurrency=1)  # warm-up
                results[name] = run_stream_load_test(server.url, payloads, concurrency=1).to_dict()
    results["context_tokens"] = args.bank_context_tokens
    results["ttft_saving"] = 1 - results["banked"]["ttft_p50_s"] / results["fresh"]["ttft_p50_s"]
    print(f"  bank: {args.bank_context_tokens}-token context, TTFT p50 fresh {results['fresh']['ttft_p50_s']:.2f} s, "
          f"banked {results['banked']['ttft_p50_s']:.2f} s", flush=True)
    return results


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def machine() -> dict:
    return {
        "node": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpus": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def git_commit() -> dict:
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], capture_output=True, text=True, cwd=Path(__file__).parent).stdout

    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}


def report(decoding: dict, load: list[dict], num_latents: int) -> str:
    lines = ["mode    | prompt | new | time to answer | added vs plain | decode tok/s | augmentation",
             "------- | ------ | --- | -------------- | -------------- | ------------ | ------------"]
    for name in ("plain", "sync", "async", "cot"):
        r = decoding[name]
        lines.append(f"{name:7s} | {r['prompt_tokens']:6d} | {r['new_tokens']:3d} | {r['time_to_answer_s']:12.3f} s "
                     f"| {r['added_vs_plain_s']:+12.3f} s | {r['decode_tokens_per_s']:12.1f} | {r['augmentation'][0]}")
    d = decoding
    plain = d["plain"]["time_to_answer_s"]
    lines.append(f"(cot: answer = token {num_latents + 1}, after N_L={num_latents} thinking tokens)")
    lines.append(f"parts: coprocessor pass {d['coprocessor_pass_s']:.3f} s + base pass over the latents "
                 f"{d['latent_pass_s']:.3f} s = sync floor {d['sync_floor_s']:.3f} s "
                 f"({100 * d['sync_floor_s'] / plain:.0f}% of plain TTFT); one decode step {d['decode_step_s']:.3f} s")
    lines.append(f"sync added {100 * d['sync']['added_vs_plain_s'] / plain:+.0f}% TTFT; CoT of N_L tokens costs "
                 f"{d['cot_over_sync']:.1f}x sync's added time ({d['cot_over_sync_floor']:.1f}x its floor)")
    if load:
        lines += ["", "augment | concurrency | requests | tok/s | x conc. 1 | TTFT p50 | TTFT p95 | per-token p50 | p95 | errors",
                  "------- | ----------- | -------- | ----- | --------- | -------- | -------- | ------------- | --- | ------"]
        single = {r["augment"]: r["tokens_per_s"] for r in load["levels"] if r["concurrency"] == 1}
        for r in load["levels"]:
            speedup = r["tokens_per_s"] / single[r["augment"]] if r["augment"] in single else float("nan")
            lines.append(f"{r['augment']:7s} | {r['concurrency']:11d} | {r['requests']:8d} | {r['tokens_per_s']:5.1f} "
                         f"| {speedup:8.1f}x | {r['ttft_p50_s']:6.2f} s | {r['ttft_p95_s']:6.2f} s "
                         f"| {1000 * r['token_latency_p50_s']:10.0f} ms | {1000 * r['token_latency_p95_s']:3.0f} ms "
                         f"| {r['errors']:6d}")
        memory = load["memory"]
        lines.append(f"server RSS: {memory['before_load_bytes'] / 2**20:.0f} MiB before the load, "
                     f"{memory['after_levels_bytes'] / 2**20:.0f} MiB after it")
        if load["soak"]:
            soak = load["soak"]
            lines.append(f"soak: {soak['requests']} requests at concurrency {soak['concurrency']}: RSS "
                         f"{soak['rss_after_50_bytes'] / 2**20:.0f} MiB after 50, {soak['rss_after_all_bytes'] / 2**20:.0f} "
                         f"MiB after all ({100 * soak['rss_growth']:+.1f}%), {soak['errors']} errors")
        if load["bank"]:
            bank = load["bank"]
            lines.append(f"bank: {bank['context_tokens']}-token banked context + question, TTFT p50 "
                         f"{bank['fresh']['ttft_p50_s']:.2f} s afresh vs {bank['banked']['ttft_p50_s']:.2f} s banked "
                         f"({100 * bank['ttft_saving']:.0f}% saved)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model when no --ckpt is given")
    parser.add_argument("--ckpt", help="a coprocessor checkpoint (default: a fresh, untrained one)")
    parser.add_argument("--num-latents", type=int, default=16, help="N_L of the fresh coprocessor")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16: the weights, here and in "
                        "the server (`cacheaug serve --dtype`)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32, help="answer tokens decoded per mode")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median), after one warm-up")
    parser.add_argument("--requests", type=_int_list, default=[4, 8, 32, 64], help="requests per load level")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 32], help="concurrent clients per level")
    parser.add_argument("--load-prompt-tokens", type=int, default=128)
    parser.add_argument("--load-max-tokens", type=int, default=64)
    parser.add_argument("--load-augment", type=lambda text: text.split(","), default=["off", "sync", "async"],
                        help="augment modes of the load test, comma-separated")
    parser.add_argument("--soak-requests", type=int, default=500, help="requests of the memory soak (0: none)")
    parser.add_argument("--soak-concurrency", type=int, default=16)
    parser.add_argument("--bank-context-tokens", type=int, default=1024, help="banked context of the bank check (0: none)")
    parser.add_argument("--skip-load", action="store_true", help="only the decoding measurements")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if len(args.requests) != len(args.concurrency):
        parser.error("--requests and --concurrency need the same number of levels")

    started = time.perf_counter()
    lm, tokenizer = load_model(args)
    lm.eval()
    print(f"{lm.config.base_model}: N_L={lm.config.num_latents}, prompt {args.prompt_tokens} tokens, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    decoding = bench_decoding(lm, tokenizer, args)
    load = None
    if not args.skip_load:
        with tempfile.TemporaryDirectory() as folder:  # the server process loads the same coprocessor from here
            ckpt = args.ckpt or str(Path(folder) / "fresh")
            if not args.ckpt:
                lm.save_pretrained(ckpt)
            load = bench_load(ckpt, tokenizer, args)
    text = report(decoding, load, lm.config.num_latents)
    print(text)
    if args.json:
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "git": git_commit(),
            "machine": machine(),
            "model": lm.config.base_model,
            "checkpoint": args.ckpt,
            "num_latents": lm.config.num_latents,
            "settings": {key: value for key, value in vars(args).items() if key != "json"},
            "decoding": decoding,
            "load": load,
            "wall_s": time.perf_counter() - started,
            "table": text,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
