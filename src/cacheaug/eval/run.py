"""One importable runner per `cacheaug eval` task: check the inputs before any model is loaded, load the
checkpoint, evaluate, print the result as a Markdown table and write it into ``args.out`` (JSON for
`cacheaug report`, with its provenance; the same Markdown table; JSONL records and plots where the task has them).

Each runner takes its task's arguments (config.*Args), optionally a loaded ``model`` = (AugmentedLM, tokenizer),
and the ``command`` recorded as provenance (the CLI passes its own command line).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from ..checkpoint import describe
from ..config import DataArgs
from ..verbs import CONDITIONS, AheadArgs, Gsm8kArgs, HarnessArgs, McArgs, PerplexityArgs
from ..errors import DataError, require_extra
from ..outputs import JsonlWriter, write_json, write_text

__all__ = ["run_ahead", "run_gsm8k", "run_harness_tasks", "run_mc", "run_perplexity", "TASKS"]


def run_meta(lm, ckpt, conditions=(True, False)) -> dict:
    """What was evaluated, as `cacheaug report` labels it; the plain base alone when nothing was augmented."""
    if tuple(conditions) == (False,):
        return {"checkpoint": None, "base_model": lm.config.base_model, "method": "base", "num_latents": None,
                "num_ahead": None, "step": None}
    step = describe(ckpt).step if ckpt is not None and Path(ckpt, "cacheaug_config.json").is_file() else None
    return {
        "checkpoint": str(ckpt), "base_model": lm.config.base_model, "method": lm.config.method,
        "num_latents": lm.config.num_latents, "num_ahead": lm.config.num_ahead, "step": step,
    }


def data_name(path: str) -> str:
    """A short name for a data path: ``prose/test.txt`` -> ``prose-test``, ``items.jsonl`` -> ``items``."""
    source = Path(path)
    generic = source.stem.lower() in ("test", "valid", "validation", "val", "train", "dev", "data")
    name = (f"{source.parent.name}-{source.stem}" if generic else source.stem) if source.is_file() else source.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "data"


def _model(args, model):
    if model is not None:
        return model
    describe(args.ckpt)  # a missing or damaged folder fails here, before the base model loads
    from ..coprocessor import load_checkpoint  # torch: only once the inputs are checked

    return load_checkpoint(args.ckpt, args.dtype)


def _finish(out: Path, name: str, record: dict, table: str, command: str | None) -> Path:
    """name.json (the record and its provenance) and name.md (the table) in ``out``; the table printed."""
    write_json(out / f"{name}.json", record, command)
    write_text(out / f"{name}.md", table)
    print(table)
    return out / f"{name}.json"


# ---------------------------------------------------------------------------- the tasks
def run_ahead(args: AheadArgs, model=None, command: str | None = None):
    """Ahead-token loss by offset after the latents, with and without them, on the run's validation data."""
    run = describe(args.ckpt).run_config
    data_args = run.data if run is not None else DataArgs()
    overrides = {"source": args.data} if args.data else {}
    if args.seq_len:
        overrides["seq_len"] = args.seq_len
    data_args = DataArgs(**{**vars(data_args), **overrides})
    if args.data:
        from ..data.sources import check_source

        check_source(args.data)
    from ..data import validation_batches
    from .metrics import evaluate_ahead

    lm, tokenizer = _model(args, model)
    batches = validation_batches(data_args, tokenizer, args.batch_size, max_batches=args.batches)
    if not batches:
        raise DataError(f"no validation data from {data_args.source!r}")
    started = time.perf_counter()
    result = evaluate_ahead(lm, batches, progress=True)
    record = {"kind": "ahead", "name": "ahead", "run": run_meta(lm, args.ckpt),
              "settings": {"data": data_args.source, "seq_len": data_args.seq_len, "batches": len(batches),
                           "batch_size": args.batch_size},
              "result": result.to_dict(), "seconds": time.perf_counter() - started}
    if args.json:
        write_json(args.json, result.to_dict(), command)
    if args.out:
        _finish(Path(args.out), "ahead", record, result.table(), command)
    else:
        print(result.table())
    return result


def run_perplexity(args: PerplexityArgs, model=None, command: str | None = None) -> Path:
    """Perplexity by position on ``args.data`` (file, folder or glob): perplexity-<name>.{json,md,png}."""
    from ..data.sources import check_source

    check_source(args.data)  # a missing file fails before the model loads
    describe(args.ckpt)
    from ..data import validation_batches
    from .metrics import evaluate_positions
    from .report import plot_position_eval

    lm, tokenizer = _model(args, model)
    data = DataArgs(source=args.data, validation_source=args.data, format=args.format, seq_len=args.seq_len)
    max_batches = None if args.max_tokens is None else max(1, math.ceil(args.max_tokens / (args.seq_len * args.batch_size)))
    batches = validation_batches(data, tokenizer, args.batch_size, max_batches=max_batches)
    if not batches:
        raise DataError(f"no sequences of {args.seq_len} tokens in {args.data!r}")
    started = time.perf_counter()
    result = evaluate_positions(lm, batches, num_offsets=args.offsets, every=args.every, max_queries=args.max_queries,
                                progress=True)
    name = args.name or data_name(args.data)
    out = Path(args.out)
    record = {
        "kind": "perplexity", "name": name, "run": run_meta(lm, args.ckpt),
        "settings": {"data": args.data, "every": args.every, "seq_len": args.seq_len, "offsets": args.offsets,
                     "max_tokens": args.max_tokens, "batch_size": args.batch_size, "sequences": result.num_sequences},
        "result": result.to_dict(), "seconds": time.perf_counter() - started,
    }
    print(f"perplexity by position on {name} ({result.num_points} points, every {args.every}):")
    path = _finish(out, f"perplexity-{name}", record, result.table(), command)
    plot_position_eval(record["result"], out / f"perplexity-{name}.png", title=f"{name}: {Path(str(args.ckpt)).name}")
    return path


def run_gsm8k(args: Gsm8kArgs, model=None, command: str | None = None) -> Path:
    """GSM8K accuracy: gsm8k-<shots>shot[-cot].{json,md} (summary) and .jsonl (every item) in ``args.out``."""
    from ..data.documents import read_gsm8k

    rows = read_gsm8k(args.data)[: args.limit] if args.limit else read_gsm8k(args.data)
    exemplars, train_file = [], args.train_file
    if args.shots:
        train_file = train_file or str(Path(args.data).with_name("train.jsonl"))
        if not Path(train_file).is_file():
            raise DataError(f"{args.shots}-shot prompts need exemplars: no training file {train_file} (pass --train-file)")
        from .gsm8k import choose_exemplars

        exemplars = choose_exemplars(read_gsm8k(train_file), args.shots, args.exemplar_seed)
    from .gsm8k import evaluate_gsm8k

    lm, tokenizer = _model(args, model)
    conditions = CONDITIONS[args.conditions]
    name = (f"gsm8k-{args.shots}shot" + ("-cot" if args.cot else "")
            + (f"-async{args.async_delay}" if args.async_delay is not None else ""))
    out = Path(args.out)
    started = time.perf_counter()
    result, _ = evaluate_gsm8k(
        lm, tokenizer, rows, exemplars, cot=args.cot, conditions=conditions, max_new_tokens=args.max_new_tokens,
        on_record=JsonlWriter(out / f"{name}.jsonl"), progress=True, batch_size=args.batch_size,
        async_delay=args.async_delay,
    )
    record = {
        "kind": "gsm8k", "name": name, "run": run_meta(lm, args.ckpt, conditions),
        "settings": {"data": args.data, "train_file": train_file, "shots": args.shots, "cot": args.cot,
                     "limit": args.limit, "exemplar_seed": args.exemplar_seed, "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size, "async_delay": args.async_delay},
        "result": result.to_dict(), "seconds": time.perf_counter() - started,
    }
    return _finish(out, name, record, result.table(), command)


def run_mc(args: McArgs, model=None, command: str | None = None) -> Path:
    """Multiple-choice accuracy: mc-<name>.{json,md} (summary) and .jsonl (log-likelihoods of every item)."""
    from ..data.documents import read_mc_items

    items = read_mc_items(args.data)[: args.limit] if args.limit else read_mc_items(args.data)
    from .mc import evaluate_mc

    lm, tokenizer = _model(args, model)
    conditions = CONDITIONS[args.conditions]
    name = args.name or data_name(args.data)
    out = Path(args.out)
    result, records = evaluate_mc(lm, tokenizer, items, args.delimiter, conditions, progress=True)
    writer = JsonlWriter(out / f"mc-{name}.jsonl")
    for item in records:
        writer.write(item)
    record = {"kind": "mc", "name": name, "run": run_meta(lm, args.ckpt, conditions),
              "settings": {"data": args.data, "delimiter": args.delimiter, "limit": args.limit},
              "result": result.to_dict()}
    return _finish(out, f"mc-{name}", record, result.table(), command)


def run_harness_tasks(args: HarnessArgs, model=None, command: str | None = None) -> Path:
    """lm-evaluation-harness tasks through the ``cacheaug`` model: harness.{json,md} in ``args.out``."""
    require_extra("lm_eval", "eval", "cacheaug eval harness")
    from .harness import run_harness, table

    lm, tokenizer = _model(args, model)
    conditions = CONDITIONS[args.conditions]
    tasks = [task for task in args.tasks.split(",") if task]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_harness(lm, tokenizer, tasks, conditions, args.include_path, limit, args.num_fewshot,
                          include_defaults=not args.local_tasks_only)
    record = {"kind": "harness", "name": "harness", "run": run_meta(lm, args.ckpt, conditions),
              "settings": {"tasks": tasks, "include_path": args.include_path, "limit": limit,
                           "num_fewshot": args.num_fewshot},
              "result": results}
    return _finish(Path(args.out), "harness", record, table(results), command)


TASKS = {"ahead": run_ahead, "perplexity": run_perplexity, "gsm8k": run_gsm8k, "mc": run_mc,
         "harness": run_harness_tasks}
