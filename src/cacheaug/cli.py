"""Command line: parse and dispatch to importable functions, nothing else."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

from .errors import CacheaugError, ConfigError, DataError
from .eval_cli import add_eval_tasks, add_report


def parse_overrides(tokens: list[str]) -> dict:
    """["--train.max_steps", "20", "--data.seq_len=128"] -> {"train.max_steps": 20, "data.seq_len": 128}."""
    overrides, index = {}, 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or "." not in token:
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key value")
        key = token[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            index += 1
        elif index + 1 < len(tokens):
            raw = tokens[index + 1]
            index += 2
        else:
            raise ConfigError(f"override {token} has no value")
        overrides[key] = yaml.safe_load(raw)
    return overrides


def cmd_train(args, extra: list[str]) -> int:
    from .config import load_run_config
    from .train import train

    overrides = parse_overrides(extra)
    if args.resume:
        overrides["train.resume"] = True
    if args.overwrite:
        overrides["train.overwrite"] = True
    result = train(load_run_config(args.config, overrides), command=args.command)
    return 130 if result.interrupted else 0


def _load_checkpoint(path: str):
    from .checkpoint import read_config
    from .coprocessor import AugmentedLM
    from .models import load_base

    config = read_config(path)
    base, tokenizer = load_base(config.base_model)
    return AugmentedLM.from_pretrained(path, base=base), tokenizer


def cmd_eval(args, extra: list[str]) -> int:
    from .data import DataArgs, validation_batches
    from .evaluate import evaluate_ahead
    from .train import run_config_from_checkpoint

    if not args.ckpt:
        raise ConfigError("--ckpt is required (or name a task: cacheaug eval {perplexity,gsm8k,mc,harness} ...)")
    lm, tokenizer = _load_checkpoint(args.ckpt)
    run = run_config_from_checkpoint(args.ckpt)
    data_args = run.data if run is not None else DataArgs()
    overrides = {"source": args.data} if args.data else {}
    if args.seq_len:
        overrides["seq_len"] = args.seq_len
    data_args = DataArgs(**{**data_args.__dict__, **overrides})
    batches = validation_batches(data_args, tokenizer, args.batch_size, max_batches=args.batches)
    if not batches:
        raise DataError(f"no validation data from {data_args.source!r}")
    result = evaluate_ahead(lm, batches)
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def cmd_generate(args, extra: list[str]) -> int:
    lm, tokenizer = _load_checkpoint(args.ckpt)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if input_ids.shape[1] == 0:
        raise ConfigError("--prompt is empty")
    output = lm.generate(
        input_ids, args.max_new_tokens, augment=not args.no_augment, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, eos_token_id=tokenizer.eos_token_id,
    )
    print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
    return 0


def cmd_info(args, extra: list[str]) -> int:
    from .checkpoint import CONFIG_NAME, read_config

    config = read_config(args.dir)
    description = json.loads((Path(args.dir) / CONFIG_NAME).read_text())
    print(f"checkpoint        {args.dir}")
    print(f"base model        {config.base_model} ({config.base_identity.get('model_type')}, "
          f"hidden {config.base_identity.get('hidden_size')}, {config.base_identity.get('num_hidden_layers')} layers)")
    print(f"trainable params  {description.get('trainable_parameters', 0) / 1e6:.2f}M")
    if "step" in description:
        print(f"step              {description['step']}")
    for key, value in config.to_dict().items():
        if key not in ("base_model", "base_identity"):
            print(f"{key:17s} {value}")
    return 0


def cmd_serve(args, extra: list[str]) -> int:
    from .serve import serve

    lm, tokenizer = _load_checkpoint(args.ckpt)
    serve(lm, tokenizer, host=args.host, port=args.port, augment_timeout_s=args.augment_timeout)
    return 0


def cmd_bank_add(args, extra: list[str]) -> int:
    from .bank import CacheBank
    from .models import cache_home

    lm, tokenizer = _load_checkpoint(args.ckpt)
    bank = CacheBank(args.root or cache_home() / "bank", lm, tokenizer)
    for file in args.files:
        try:
            entry = bank.add_text(Path(file).read_text())
        except ValueError as error:  # empty or longer than the model's context
            raise ConfigError(f"{file}: {error}") from None
        print(f"{file}: {entry.num_tokens} tokens, {entry.status} -> {entry.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheaug", description="Differentiable cache augmentation (arXiv 2412.17747).")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a coprocessor; extra --section.key value pairs override the config")
    train.add_argument("--config", help="YAML run config (configs/*.yaml)")
    train.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    train.add_argument("--overwrite", action="store_true", help="replace the run in the output folder")
    train.set_defaults(func=cmd_train)

    evaluate = verbs.add_parser("eval", help="ahead-token loss with and without augmentation for a checkpoint")
    evaluate.add_argument("--ckpt", help="checkpoint folder")
    evaluate.add_argument("--data", help="validation source (default: the run's own)")
    evaluate.add_argument("--seq-len", type=int)
    evaluate.add_argument("--batches", type=int, default=8)
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--json", help="also write the result here")
    evaluate.set_defaults(func=cmd_eval)
    add_eval_tasks(evaluate)  # eval perplexity|gsm8k|mc|harness
    add_report(verbs)

    generate = verbs.add_parser("generate", help="decode from a prompt, augmented by a checkpoint")
    generate.add_argument("--ckpt", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--no-augment", action="store_true", help="decode with the plain base")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--sample", action="store_true")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.set_defaults(func=cmd_generate)

    serve = verbs.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, SSE) for a checkpoint")
    serve.add_argument("--ckpt", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--augment-timeout", type=float, default=30.0, help="seconds the coprocessor may take")
    serve.set_defaults(func=cmd_serve)

    bank = verbs.add_parser("bank", help="cache bank: contexts augmented once, stored, reused")
    bank_verbs = bank.add_subparsers(dest="bank_verb", required=True)
    bank_add = bank_verbs.add_parser("add", help="augment text files and store their caches")
    bank_add.add_argument("--ckpt", required=True)
    bank_add.add_argument("--root", help="bank folder (default: $CACHEAUG_HOME/bank)")
    bank_add.add_argument("files", nargs="+")
    bank_add.set_defaults(func=cmd_bank_add)

    info = verbs.add_parser("info", help="config, base model and trainable parameters of a checkpoint")
    info.add_argument("dir")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.command = shlex.join(["cacheaug", *(sys.argv[1:] if argv is None else argv)])  # for result files
    if extra and args.verb != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except (CacheaugError, FileNotFoundError) as error:
        print(f"cacheaug {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
