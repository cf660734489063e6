"""The training loop only: schedule, augmentation points, output folder, and the optimise / log / evaluate / save
cadence. The process seam (one process, DDP or FSDP) is distributed.py; checkpoints are checkpoint.py."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import RunConfig, TrainArgs
from .coprocessor import AugmentedLM
from .data import build_training_data
from .distributed import Runtime, full_tensors, load_optimizer_state, optimizer_state, rng_state, set_rng_state, to_float
from .errors import CacheaugError, RunFolderError, require_extra
from .eval.metrics import AheadEval, evaluate_ahead
from .eval.report import plot_curves
from .flex import resolve_attention
from .models import load_base
from .outputs import JsonlWriter, write_json, write_text

RUN_CONFIG_NAME = "run_config.json"
METRICS_NAME = "metrics.jsonl"


# ---------------------------------------------------------------------------- pieces of the loop
def lr_lambda(args):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def step_points(lm: AugmentedLM, seed: int, step: int, rows: int, length: int) -> torch.Tensor:
    """Points for every sequence of one optimiser step (all micro-batches, all ranks), from (seed, step) only.

    Rows are ordered micro-batch, then rank, then sequence: the order in which the data hands out chunks,
    so 2 ranks x batch b, accumulation 2 x batch b, and batch 2b all score the same tokens.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return lm.sample_points(rows, length, generator)


def prepare_output_dir(args, runtime: Runtime) -> Path | None:
    """Refuse to mix two runs in one folder; return the checkpoint to resume from, if any."""
    out = Path(args.output_dir)
    holds_run = out.is_dir() and (
        any((out / name).exists() for name in (RUN_CONFIG_NAME, METRICS_NAME)) or bool(ckpt.list_checkpoints(out))
    )
    if holds_run and args.resume:
        checkpoints = ckpt.list_checkpoints(out)
        return checkpoints[-1] if checkpoints else None
    if holds_run and not args.overwrite:
        raise RunFolderError(
            f"output folder {out} holds another run; pass --resume to continue it or --overwrite to replace it"
        )
    if holds_run and args.overwrite and runtime.is_main:
        shutil.rmtree(out)
    runtime.barrier()
    return None


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_eval: AheadEval | None
    interrupted: bool = False


# ---------------------------------------------------------------------------- the loop
def train(config: RunConfig, command: str | None = None) -> TrainResult:
    """Train a coprocessor as ``config`` says; resumable, interruptible (SIGINT saves a checkpoint).

    ``command`` is recorded in the provenance of final_eval.json (default: this process's command line)."""
    args = config.train
    if config.coprocessor.lora_rank is not None:
        require_extra("peft", "lora", "a LoRA coprocessor (lora_rank)")
    runtime = Runtime.from_environment()
    attention = resolve_attention(args.attention, runtime.device)  # flex without CUDA fails here, not mid-run
    resume_from = prepare_output_dir(args, runtime)
    out = Path(args.output_dir)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    base, tokenizer = load_base(config.model, config.dtype)
    lm = AugmentedLM(base.to(runtime.device), config.coprocessor).to(runtime.device)
    if args.compile_coprocessor and lm.coprocessor.stack is not None:
        lm.coprocessor.stack.compile(dynamic=False)  # in place: parameter names, checkpoints unchanged
    if runtime.is_main:
        print(f"cacheaug | {config.model} | {lm.trainable_summary()} | world size {runtime.world_size} | "
              f"attention {attention} | {args.precision}", flush=True)
    data, validation = build_training_data(
        config.data, tokenizer, args.batch_size, min_doc_tokens=lm.config.num_ahead + 1,
        max_val_batches=args.eval_batches,
    )
    data = data.shard(runtime.rank, runtime.world_size)

    step, state = 0, None
    if resume_from is not None:
        state = ckpt.resume(lm, resume_from)  # full tensors: before sharding
    sharded = runtime.distributed and args.strategy == "fsdp"
    model = runtime.prepare(lm, args.strategy)
    # After prepare: FSDP replaces the parameters by sharded ones, which the optimiser must hold.
    optimizer = torch.optim.AdamW(
        parameter_groups(lm, args),
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        weight_decay=args.weight_decay,
        fused=runtime.device.type in ("cpu", "cuda") and not sharded,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    if state is not None:
        load_optimizer_state(optimizer, state["optimizer"], sharded)
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step = state["step"]
        if runtime.is_main:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    metrics = JsonlWriter(out / METRICS_NAME, step if resume_from is not None else None, runtime.is_main)
    run_dict = config.to_dict()

    def save(at_step: int) -> None:
        # Gathering sharded tensors is collective: every process takes part, the main one writes.
        weights = full_tensors(lm.trainable_state_dict())
        moments = optimizer_state(optimizer, sharded)
        if runtime.is_main:
            trainer_state = {
                "step": at_step,
                "optimizer": moments,
                "scheduler": scheduler.state_dict(),
                "data": data.state_dict(),
                "rng": rng_state(),
            }
            ckpt.save_step(weights, lm.config, out, at_step, trainer_state, run_dict, args.keep_last)
        runtime.barrier()

    def evaluate(at_step: int) -> AheadEval:
        result = evaluate_ahead(lm, validation)
        metrics.write({"step": at_step, "split": "validation", **result.to_dict()})
        return result

    interrupted = False

    def on_sigint(signum, frame):  # finish the current step, save, then stop
        nonlocal interrupted
        interrupted = True

    previous_handler = signal.signal(signal.SIGINT, on_sigint) if runtime.is_main else None
    progress = _progress(runtime, args.max_steps, step)
    autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    rows_per_micro = runtime.world_size * args.batch_size
    model.train()
    last_eval = None
    try:
        while step < args.max_steps and not interrupted:
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, kl_sum, tokens = 0.0, 0.0, 0
            kl_weight = args.kl_weight(step)  # 0 once annealed: training_loss then skips the KL entirely
            points = None
            for micro in range(args.grad_accum):
                batch = next(data).to(runtime.device)
                if points is None:
                    points = step_points(lm, args.seed, step, rows_per_micro * args.grad_accum, batch.shape[1])
                first = micro * rows_per_micro + runtime.rank * args.batch_size
                last_micro = micro == args.grad_accum - 1
                if sharded:
                    lm.coprocessor.set_requires_gradient_sync(last_micro)
                sync = model.no_sync() if runtime.distributed and not sharded and not last_micro else nullcontext()
                with sync, autocast:
                    micro_out = model(
                        batch, points[first : first + args.batch_size], attention=attention, kl_weight=kl_weight
                    )
                    (micro_out.loss / args.grad_accum).backward()
                loss_sum += micro_out.loss.item() / args.grad_accum
                if micro_out.kl is not None:
                    kl_sum += micro_out.kl.item() / args.grad_accum
                tokens += batch.numel()
            grad_norm = (
                to_float(torch.nn.utils.clip_grad_norm_(lm.trainable_parameters(), args.grad_clip))
                if args.grad_clip > 0
                else float("nan")
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - started
            loss = runtime.mean(loss_sum)
            kl = runtime.mean(kl_sum) if kl_weight > 0 else None  # kl_weight is equal on every rank: all join the collective
            if step % args.log_every == 0 or step == args.max_steps:
                record = {
                    "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "seconds_per_step": seconds,
                    "tokens_per_second": tokens * runtime.world_size / seconds,
                }
                if kl is not None:  # loss is then the objective NLL + kl_weight * kl; nll compares with KL-free runs
                    record.update(nll=loss - kl_weight * kl, kl=kl, kl_weight=kl_weight)
                metrics.write(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(
                    f"loss {loss:.3f} | lr {lr:.1e} | {seconds:.2f} s/step | {tokens * runtime.world_size / seconds:.0f} tok/s"
                )
            if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                last_eval = evaluate(step)
                if progress is not None:
                    progress.write(
                        f"step {step} | validation ahead loss {last_eval.loss_augmented:.4f} augmented, "
                        f"{last_eval.loss_base:.4f} base"
                    )
            if (args.save_every and step % args.save_every == 0) or step == args.max_steps or interrupted:
                save(step)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if progress is not None:
            progress.close()

    if interrupted:
        if runtime.is_main:
            print(f"interrupted: checkpoint saved at step {step}; rerun with --resume to continue", flush=True)
        return TrainResult(out, step, last_eval, interrupted=True)
    final = evaluate(step)
    if runtime.is_main:
        write_json(out / "final_eval.json", {"step": step, **final.to_dict()}, command)
        table = final.table()
        write_text(out / "final_table.md", table)
        print("\nAhead-token perplexity on validation, by offset after the latents:\n" + table, flush=True)
        try:
            plot_curves(out / METRICS_NAME, out / "curves.png")
        except CacheaugError as error:  # matplotlib absent: the run is fine, only its figure is missing
            print(f"curves.png not written: {error}", flush=True)
    return TrainResult(out, step, final)


def parameter_groups(lm: AugmentedLM, args: TrainArgs) -> list[dict]:
    """AdamW groups: the body at ``lr``; with ``interface_lr``, the interface parameters in a group of their own."""
    interface = {id(p) for p in lm.interface_parameters()} if args.interface_lr is not None else set()
    body = [p for p in lm.trainable_parameters() if id(p) not in interface]
    fast = [p for p in lm.trainable_parameters() if id(p) in interface]
    groups = [{"params": body}] if body else []
    return groups + ([{"params": fast, "lr": float(args.interface_lr)}] if fast else [])


def _progress(runtime: Runtime, total: int, initial: int):
    if not runtime.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
