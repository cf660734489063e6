"""Command line: one table of verbs, each mapped to an importable function, with flags derived from the verb's
dataclass in verbs.py or config.py (flags.py: a field's comment is its help), so an option exists once. Every verb takes
``--config FILE.yaml``; flags override it (``--section.key VALUE`` for the sections of a run config).

Nothing heavy is imported before a verb runs: ``--help`` and bad arguments answer at once, and the inputs a
verb names (config, checkpoint, data files) are checked before any model loads. Every bad input prints one
line, ``cacheaug VERB: error: ...``, and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import config as cfg
from .config import INTERNAL_FIELDS, RunConfig
from .verbs import (
    AheadArgs, BankAddArgs, GenerateArgs, Gsm8kArgs, HarnessArgs, InfoArgs, McArgs, PerplexityArgs, ReportArgs, ServeArgs,
)
from .errors import CacheaugError, ConfigError, DataError, InputError, require_extra
from .flags import Parser, UsageError, add_dataclass_arguments

# ---------------------------------------------------------------------------- what each verb does
# Each takes its parsed arguments (a config dataclass) and the command line (recorded as provenance).


def run_train(config: RunConfig, command: str) -> int:
    from .data.sources import check_source

    check_source(config.data.source)
    if config.data.validation_source:
        check_source(config.data.validation_source)
    from .train import train

    return 130 if train(config, command=command).interrupted else 0


def run_eval(task: str) -> Callable[..., int]:
    def run(args, command: str) -> int:
        from .eval.run import TASKS

        TASKS[task](args, command=command)
        return 0

    return run


def run_generate(args: GenerateArgs, command: str) -> int:
    from .checkpoint import describe

    if not args.prompt.strip():
        raise InputError("--prompt is empty")
    describe(args.ckpt)
    from .coprocessor import load_checkpoint  # torch: only once the inputs are known to be good

    lm, tokenizer = load_checkpoint(args.ckpt, args.dtype)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    context = lm.base.config.get_text_config().max_position_embeddings
    latents = lm.config.num_latents if args.augment else 0
    if input_ids.shape[1] == 0:
        raise InputError("--prompt is empty after tokenization")
    if input_ids.shape[1] + latents + args.max_new_tokens > context:
        raise InputError(f"the prompt ({input_ids.shape[1]} tokens) + latents ({latents}) + --max-new-tokens "
                         f"({args.max_new_tokens}) exceed the model's context of {context} positions")
    output = lm.generate(
        input_ids.to(lm.device), args.max_new_tokens, augment=args.augment, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, eos_token_id=tokenizer.eos_token_id,
    )
    print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
    return 0


def run_serve(args: ServeArgs, command: str) -> int:
    from .checkpoint import describe

    for module in ("fastapi", "uvicorn"):
        require_extra(module, "serve", "cacheaug serve")
    describe(args.ckpt)
    from .serving import server

    from .coprocessor import load_checkpoint  # torch: only once the inputs are known to be good

    if args.bank is not None and not Path(args.bank).is_dir():
        raise DataError(f"--bank {args.bank} is not a folder (make one with `cacheaug bank add --root`)")
    lm, tokenizer = load_checkpoint(args.ckpt, args.dtype)
    bank = None
    if args.bank is not None:
        from .serving.bank import CacheBank

        bank = CacheBank(args.bank, lm, tokenizer)
        print(f"cache bank {args.bank}: {bank.refresh_index()} entries for this checkpoint")
    server.serve(
        lm, tokenizer, host=args.host, port=args.port, augment_timeout_s=args.augment_timeout,
        max_batch=args.max_batch, max_queue=args.max_queue, request_timeout_s=args.request_timeout, bank=bank,
        api_key=args.api_key or os.environ.get(server.API_KEY_ENV) or None,
    )
    return 0


def run_bank_add(args: BankAddArgs, command: str) -> int:
    from .checkpoint import describe

    for file in args.files:
        if not Path(file).is_file():
            raise DataError(f"{file} does not exist (bank add takes text files)")
    describe(args.ckpt)
    from .models import cache_home
    from .serving.bank import CacheBank

    from .coprocessor import load_checkpoint  # torch: only once the inputs are known to be good

    lm, tokenizer = load_checkpoint(args.ckpt, args.dtype)
    bank = CacheBank(args.root or cache_home() / "bank", lm, tokenizer)
    for file in args.files:
        try:
            entry = bank.add_text(Path(file).read_text())
        except InputError as error:  # empty or longer than the model's context
            raise InputError(f"{file}: {error}") from None
        print(f"{file}: {entry.num_tokens} tokens, {entry.status} -> {entry.path}")
    return 0


def run_report(args: ReportArgs, command: str) -> int:
    from .eval.report import write_report

    path = write_report(args.runs, args.out)
    print(path.read_text())
    print(f"wrote {path}")
    return 0


def run_info(args: InfoArgs, command: str) -> int:
    from .checkpoint import describe

    info = describe(args.dir)
    identity = info.config.base_identity
    print(f"checkpoint        {args.dir}")
    print(f"base model        {info.base_model} ({identity.get('model_type')}, "
          f"hidden {identity.get('hidden_size')}, {identity.get('num_hidden_layers')} layers)")
    print(f"trainable params  {info.trainable_parameters / 1e6:.2f}M")
    if info.step is not None:
        print(f"step              {info.step}")
    for key, value in info.config.to_dict().items():
        if key not in INTERNAL_FIELDS:
            print(f"{key:17s} {value}")
    return 0


@dataclass
class Verb:
    args: type  # the dataclass its flags come from
    help: str
    run: Callable[..., int]


VERBS: dict[str, Verb | dict[str, Verb]] = {
    "train": Verb(RunConfig, "train a coprocessor (a YAML run config and/or --section.key overrides)", run_train),
    "eval": {
        "ahead": Verb(AheadArgs, "ahead-token loss by offset, with vs without latents (`eval --ckpt DIR` also)",
                      run_eval("ahead")),
        "perplexity": Verb(PerplexityArgs, "perplexity of the k-th token after latents inserted every few tokens",
                           run_eval("perplexity")),
        "gsm8k": Verb(Gsm8kArgs, "GSM8K accuracy, greedy, latents once at the end of the prompt", run_eval("gsm8k")),
        "mc": Verb(McArgs, 'multiple choice by log-likelihood; JSONL rows {"context", "choices", "gold"}',
                   run_eval("mc")),
        "harness": Verb(HarnessArgs, "lm-evaluation-harness tasks with the cacheaug model", run_eval("harness")),
    },
    "generate": Verb(GenerateArgs, "decode from a prompt, augmented by a checkpoint", run_generate),
    "serve": Verb(ServeArgs, "OpenAI-compatible HTTP server (completions, chat, SSE) for a checkpoint", run_serve),
    "bank": {"add": Verb(BankAddArgs, "augment text files once and store their caches", run_bank_add)},
    "report": Verb(ReportArgs, "Markdown tables and plots comparing evaluated run folders", run_report),
    "info": Verb(InfoArgs, "config, base model and trainable parameters of a checkpoint", run_info),
}
GROUP_HELP = {"eval": "evaluate a checkpoint: ahead | perplexity | gsm8k | mc | harness",
              "bank": "cache bank: contexts augmented once, stored, reused"}

CONFIG_HELP = ("a YAML file of these options (keys as the option names, with underscores; sections as mappings); "
               "flags given as well override it")


def _add_verb(subparsers, name: str, verb: Verb, path: str, flags: bool = True) -> None:
    doc = (verb.args.__doc__ or "").strip()
    epilog = None
    if verb.args is RunConfig:
        epilog = ("Every key of the run config is a flag, --section.key VALUE (e.g. --train.max_steps 20 "
                  "--data.seq_len 128 --coprocessor.num_latents 4), applied over --config. Without --config, "
                  "give at least --model and --train.output_dir.")
    parser = subparsers.add_parser(name, help=verb.help, description=doc, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP, default=None)
    if flags:
        add_dataclass_arguments(parser, verb.args)
    parser.set_defaults(_verb=path)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given ``argv``, only the verb it names gets its flags (start-up stays fast)."""
    words = [token for token in argv or [] if not token.startswith("-")][:2]
    parser = Parser(prog="cacheaug", description="Differentiable cache augmentation (arXiv 2412.17747).",
                    epilog="Each verb has its own --help; every one takes --config FILE.yaml.")
    verbs = parser.add_subparsers(dest="_top", metavar="VERB", required=True)
    for name, entry in VERBS.items():
        wanted = argv is None or (words[:1] == [name])
        if isinstance(entry, Verb):
            _add_verb(verbs, name, entry, name, flags=wanted)
            continue
        group = verbs.add_parser(name, help=GROUP_HELP[name], description=GROUP_HELP[name])
        inner = group.add_subparsers(dest=f"_{name}", metavar="TASK", required=True)
        for task, verb in entry.items():
            _add_verb(inner, task, verb, f"{name} {task}", flags=wanted and (argv is None or words[1:2] == [task]))
    return parser


def parse_overrides(tokens: list[str], cls: type = RunConfig) -> dict:
    """Flags of ``cls`` -> {dotted key: typed value}: ["--train.max_steps", "20"] -> {"train.max_steps": 20}."""
    parser = Parser(prog="cacheaug")
    add_dataclass_arguments(parser, cls)
    namespace, extra = parser.parse_known_args(tokens)
    if extra:
        raise _unknown("train", extra) if cls is RunConfig else UsageError(f"unknown option {extra[0]}")
    return vars(namespace)


def _verb(path: str) -> Verb:
    entry = VERBS[path.split()[0]]
    return entry if isinstance(entry, Verb) else entry[path.split()[1]]


def _flags(verb: Verb) -> set[str]:
    probe = Parser()
    add_dataclass_arguments(probe, verb.args)
    return {option for action in probe._actions for option in action.option_strings}


def _unknown(path: str, extra: list[str]) -> ConfigError:
    """The one-line error for arguments the verb does not take, naming the verbs an option belongs to."""
    token = extra[0]
    if not token.startswith("-"):
        return UsageError(f"unexpected argument {token!r}")
    option = token.split("=", 1)[0]
    verb = _verb(path)
    if verb.args is RunConfig and "." in option:  # an unknown key of a run-config section
        section, _, key = option[2:].partition(".")
        sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
        hints = typing.get_type_hints(RunConfig)
        if section in sections and dataclasses.is_dataclass(hints[section]):
            known = sorted(f.name for f in dataclasses.fields(hints[section]))
            return ConfigError(f"unknown config key(s) ['{section}.{key}']; known {section} keys: {known}")
        return ConfigError(f"unknown config key(s) ['{option[2:]}']; known top-level keys: {sorted(sections)}")
    owners = []
    for name, entry in VERBS.items():
        for sub, other in ([(None, entry)] if isinstance(entry, Verb) else entry.items()):
            label = name if sub is None else f"{name} {sub}"
            if label != path and option in _flags(other):
                owners.append(label)
    if owners:
        return UsageError(f"{option} is an option of {', '.join('cacheaug ' + o for o in owners)}, not of cacheaug {path}")
    return UsageError(f"unknown option {option} (see cacheaug {path} --help)")


def _normalise(argv: list[str]) -> list[str]:
    """`cacheaug eval --ckpt DIR ...` is the ahead task, as in earlier versions."""
    if len(argv) >= 2 and argv[0] == "eval" and argv[1].startswith("-") and argv[1] not in ("-h", "--help"):
        return ["eval", "ahead", *argv[1:]]
    return argv


def parse(argv: list[str]) -> tuple[str, object]:
    """(verb path such as "eval gsm8k", its validated arguments) for a command line."""
    argv = _normalise(argv)
    namespace, extra = build_parser(argv).parse_known_args(argv)
    path = namespace._verb
    if extra:
        raise _unknown(path, extra)
    given = {key: value for key, value in vars(namespace).items() if not key.startswith("_") and key != "config"}
    verb = _verb(path)
    if verb.args is RunConfig and namespace.config is None and not {"model", "train.output_dir"} <= set(given):
        raise UsageError("nothing to train: pass --config FILE.yaml (see configs/), or at least --model NAME and "
                         "--train.output_dir DIR")
    return path, cfg.load_args(verb.args, namespace.config, given)


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["cacheaug", *argv])  # recorded in the result files
    words = [token for token in _normalise(argv) if not token.startswith("-")][:2]
    verb = " ".join(words if words and isinstance(VERBS.get(words[0]), dict) else words[:1])
    verb = verb if words and words[0] in VERBS else ""
    try:
        path, args = parse(argv)
        verb = path
        _log_to_stderr()
        return _verb(path).run(args, command)
    except (CacheaugError, FileNotFoundError) as error:
        print(f"{'cacheaug ' + verb if verb else 'cacheaug'}: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _log_to_stderr() -> None:
    """cacheaug's log messages (bank rejections, ...) on stderr, once a verb runs."""
    logger = logging.getLogger("cacheaug")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cacheaug: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
