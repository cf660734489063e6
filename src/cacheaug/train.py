"""The training loop: optimisation, schedule, logging, evaluation and checkpoint cadence.

Runs as one plain process, or under ``torchrun`` / ``accelerate launch`` (which set RANK/WORLD_SIZE) as
DistributedDataParallel with the same code path.
"""

from __future__ import annotations

import json
import math
import os
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
from .config import ConfigError, RunConfig
from .coprocessor import AugmentedLM
from .data import build_training_data
from .flex import resolve_attention
from .evaluate import AheadEval, evaluate_ahead
from .models import load_base

RUN_CONFIG_NAME = "run_config.json"
METRICS_NAME = "metrics.jsonl"


class RunFolderError(ValueError):
    """The output folder holds another run and neither resume nor overwrite was asked for."""


# ---------------------------------------------------------------------------- distributed seam
@dataclass
class Runtime:
    """Who this process is; distributed only when launched by torchrun/accelerate with WORLD_SIZE > 1."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls) -> "Runtime":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device, backend = torch.device("cuda", local_rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=dist.get_rank(), world_size=world_size, device=device)

    def prepare(self, lm: AugmentedLM, strategy: str = "ddp") -> torch.nn.Module:
        """DDP wraps the whole model; FSDP (fully_shard) shards each coprocessor layer and the soft tokens.

        The frozen base is never sharded: every process keeps it whole, as it holds no gradients.
        """
        if not self.distributed:
            return lm
        if strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            stack = lm.coprocessor.stack
            for name in ("layers", "h"):
                for layer in getattr(stack, name, None) or []:
                    fully_shard(layer)
            fully_shard(lm.coprocessor)
            return lm
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(lm, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


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


def _rng_state() -> dict:
    """RNG states as tensors and plain values, so torch.load(weights_only=True) reads them back."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.random.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.random.set_rng_state(state["torch"])


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


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_eval: AheadEval | None
    interrupted: bool = False


# ---------------------------------------------------------------------------- the loop
def train(config: RunConfig) -> TrainResult:
    """Train a coprocessor as ``config`` says; resumable, interruptible (SIGINT saves a checkpoint)."""
    args = config.train
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
        ckpt.check_base_identity(ckpt.read_config(resume_from), base, resume_from)
        state = ckpt.load_trainer_state(resume_from)
        ckpt.load_trainable_weights(lm, resume_from / ckpt.WEIGHTS_NAME)  # full tensors: before sharding
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
        _load_optimizer_state(lm, optimizer, state["optimizer"], sharded, args)
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        step = state["step"]
        if runtime.is_main:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    metrics = MetricsLog(out / METRICS_NAME, step if resume_from is not None else None, runtime.is_main)
    run_dict = config.to_dict()

    def save(at_step: int) -> None:
        # Gathering sharded tensors is collective: every process takes part, the main one writes.
        weights = _full_tensors(lm.trainable_state_dict())
        optimizer_state = _optimizer_state(optimizer, sharded)
        if runtime.is_main:
            trainer_state = {
                "step": at_step,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "data": data.state_dict(),
                "rng": _rng_state(),
            }
            ckpt.save_training_checkpoint(weights, lm.config, out, at_step, trainer_state, run_dict, args.keep_last)
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
            loss_sum, tokens = 0.0, 0
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
                    micro_out = model(batch, points[first : first + args.batch_size], attention=attention)
                    (micro_out.loss / args.grad_accum).backward()
                loss_sum += micro_out.loss.item() / args.grad_accum
                tokens += batch.numel()
            grad_norm = (
                _to_float(torch.nn.utils.clip_grad_norm_(lm.trainable_parameters(), args.grad_clip))
                if args.grad_clip > 0
                else float("nan")
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - started
            loss = runtime.mean(loss_sum)
            if step % args.log_every == 0 or step == args.max_steps:
                record = {
                    "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "seconds_per_step": seconds,
                    "tokens_per_second": tokens * runtime.world_size / seconds,
                }
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
        (out / "final_eval.json").write_text(json.dumps({"step": step, **final.to_dict()}, indent=2) + "\n")
        table = final.table()
        (out / "final_table.md").write_text(table + "\n")
        print("\nAhead-token perplexity on validation, by offset after the latents:\n" + table, flush=True)
        plot_curves(out / METRICS_NAME, out / "curves.png")
    return TrainResult(out, step, final)


def _to_float(value: torch.Tensor) -> float:
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def _full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors of possibly sharded (DTensor) parameters; collective when sharded."""
    return {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in state.items()}


def _optimizer_state(optimizer, sharded: bool) -> dict:
    """The optimiser's state dict with whole tensors, so one file resumes any number of processes."""
    state = optimizer.state_dict()
    if sharded:  # collective: every process gathers the same tensors in the same order
        state["state"] = {index: _full_tensors(entry) for index, entry in state["state"].items()}
    return state


def parameter_groups(lm: AugmentedLM, args: TrainArgs) -> list[dict]:
    """AdamW groups: the body at ``lr``; with ``interface_lr``, the interface parameters in a group of their own."""
    interface = {id(p) for p in lm.interface_parameters()} if args.interface_lr is not None else set()
    body = [p for p in lm.trainable_parameters() if id(p) not in interface]
    fast = [p for p in lm.trainable_parameters() if id(p) in interface]
    groups = [{"params": body}] if body else []
    return groups + ([{"params": fast, "lr": float(args.interface_lr)}] if fast else [])


def _load_optimizer_state(lm: AugmentedLM, optimizer, state: dict, sharded: bool, args: TrainArgs) -> None:
    if sharded:  # cut whole moments into the shards of the parameters they belong to
        from torch.distributed.tensor import distribute_tensor

        parameters = [p for group in parameter_groups(lm, args) for p in group["params"]]  # the optimiser's order
        state["state"] = {
            index: {
                key: distribute_tensor(value, parameters[index].device_mesh, parameters[index].placements)
                if key != "step" and value.shape == parameters[index].shape
                else value
                for key, value in entry.items()
            }
            for index, entry in state["state"].items()
        }
    optimizer.load_state_dict(state)


def _progress(runtime: Runtime, total: int, initial: int):
    if not runtime.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss and validation ahead-token loss (augmented vs base) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if r.get("split") == "validation"]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], label="train (augmented)", alpha=0.6)
    if val_records:
        steps = [r["step"] for r in val_records]
        axis.plot(steps, [r["loss_augmented"] for r in val_records], "o-", label="validation, augmented")
        axis.plot(steps, [r["loss_base"] for r in val_records], "s--", label="validation, base (no latents)")
    axis.set_xlabel("step")
    axis.set_ylabel("ahead-token NLL (nats)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)


def run_config_from_checkpoint(directory: str | os.PathLike) -> RunConfig | None:
    """The run config stored with a training checkpoint, when there is one."""
    path = Path(directory) / ckpt.CONFIG_NAME
    if not path.is_file():
        return None
    stored = json.loads(path.read_text()).get("run_config")
    if stored is None:
        return None
    stored = dict(stored)
    stored["coprocessor"] = {
        k: v for k, v in stored["coprocessor"].items() if k not in ("base_model", "base_identity")
    }
    try:
        return RunConfig.from_dict(stored)
    except ConfigError:
        return None


