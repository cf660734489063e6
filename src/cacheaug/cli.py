"""Command line: one table of verbs, each mapped to an importable function, with flags derived from the verb's
dataclass in config.py (a field's comment is its help), so an option exists once. Every verb takes
``--config FILE.yaml``; flags override it (``--section.key VALUE`` for the sections of a run config).

Nothing heavy is imported before a verb runs: ``--help`` and bad arguments answer at once, and the inputs a
verb names (config, checkpoint, data files) are checked before any model loads. Every bad input prints one
line, ``cacheaug VERB: error: ...``, and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import logging
import re
import shlex
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import config as cfg
from .config import (
    INTERNAL_FIELDS, AheadArgs, BankAddArgs, GenerateArgs, Gsm8kArgs, HarnessArgs, InfoArgs, McArgs, PerplexityArgs,
    ReportArgs, RunConfig, ServeArgs,
)
from .errors import CacheaugError, ConfigError, DataError, InputError, require_extra

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
    from .checkpoint import describe, load_checkpoint

    if not args.prompt.strip():
        raise InputError("--prompt is empty")
    describe(args.ckpt)
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
    from .checkpoint import describe, load_checkpoint

    for module in ("fastapi", "uvicorn"):
        require_extra(module, "serve", "cacheaug serve")
    describe(args.ckpt)
    from .serving import server

    lm, tokenizer = load_checkpoint(args.ckpt, args.dtype)
    server.serve(lm, tokenizer, host=args.host, port=args.port, augment_timeout_s=args.augment_timeout)
    return 0


def run_bank_add(args: BankAddArgs, command: str) -> int:
    from .checkpoint import describe, load_checkpoint

    for file in args.files:
        if not Path(file).is_file():
            raise DataError(f"{file} does not exist (bank add takes text files)")
    describe(args.ckpt)
    from .models import cache_home
    from .serving.bank import CacheBank

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
SHORTCUTS = {"train.resume": "--resume", "train.overwrite": "--overwrite"}  # train's flags of old

# ---------------------------------------------------------------------------- flags from dataclass fields


class UsageError(ConfigError):
    """A command line argparse refuses (unknown option, bad value, missing argument)."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line raised to main (not usage text and exit); no abbreviated options."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(message)


@functools.lru_cache(maxsize=None)
def _source_lines(path: str) -> tuple[str, ...]:
    return tuple(Path(path).read_text().splitlines())


def _class_body(klass: type) -> list[str]:
    """The lines of a class statement (inspect.getsource, minus its parse of the whole module: fast)."""
    try:
        lines = _source_lines(inspect.getsourcefile(klass))
    except (OSError, TypeError):
        return []
    start = next((i for i, line in enumerate(lines) if re.match(rf"class {klass.__name__}\b", line)), None)
    if start is None:
        return []
    body = []
    for line in lines[start + 1:]:
        if line and not line[0].isspace():
            break
        body.append(line)
    return body


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source (the lines above it and its end-of-line comment)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        pending: list[str] = []
        for line in _class_body(klass):
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped[1:].strip())
                continue
            match = re.match(r"    (\w+)\s*:", line)
            if match:
                inline = line.partition("  # ")[2].strip()
                text = " ".join(pending + ([inline] if inline else []))
                if text:
                    comments[match.group(1)] = text
            pending = []
    return comments


def _plain_type(hint) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a field annotation such as ``int | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return members[0], len(members) < len(typing.get_args(hint))
    return hint, False


def _converter(kind: type, optional: bool) -> Callable[[str], object]:
    def convert(raw: str):
        if optional and raw.strip().lower() in ("null", "~"):  # as YAML spells None
            return None
        if kind is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")
        if kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                word = "an integer" if kind is int else "a number"
                raise argparse.ArgumentTypeError(f"expected {word}, got {raw!r}") from None
        return raw

    return convert


def _help(comment: str, default, required: bool) -> str:
    text = comment or ""
    if required:
        text += " (required)"
    elif isinstance(default, bool):
        text += f" (default: {'on' if default else 'off'})"
    elif default not in (None, dataclasses.MISSING, [], ""):
        text += f" (default: {default!r})" if isinstance(default, str) and default.strip() != default else f" (default: {default})"
    return text.strip().replace("%", "%%")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One flag per field of ``cls``: ``--name`` (kebab case) at the top, ``--section.name`` in sections."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    group = parser if not prefix else parser.add_argument_group(f"{prefix[:-1]} section (--{prefix}KEY VALUE)")
    for f in dataclasses.fields(cls):
        if f.name in INTERNAL_FIELDS:
            continue
        kind, optional = _plain_type(hints[f.name])
        dest = prefix + f.name
        if dataclasses.is_dataclass(kind):
            add_dataclass_arguments(parser, kind, prefix=f"{dest}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = _help(comments.get(f.name, ""), default, f.metadata.get("required", False))
        if f.metadata.get("positional"):
            many = typing.get_origin(kind) is list
            group.add_argument(dest, nargs="*" if many else "?", default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper())
            continue
        kebab = f.name.replace("_", "-")
        names = [f"--{dest}"] if prefix else [f"--{kebab}"]
        hidden = [f"--{dest}"] if not prefix and "_" in f.name else []  # the YAML spelling works too
        names += [SHORTCUTS[dest]] if dest in SHORTCUTS else []
        common = dict(dest=dest, default=argparse.SUPPRESS)
        if kind is bool:  # --flag, --flag VALUE (true/false), --no-flag
            positive = dict(nargs="?", const=True, type=_converter(bool, False), metavar="BOOL", **common)
            group.add_argument(*names, help=help_text if default is not True else argparse.SUPPRESS, **positive)
            negative = f"--{prefix}no_{f.name}" if prefix else f"--no-{kebab}"
            group.add_argument(negative, action="store_const", const=False,
                               help=help_text if default is True else argparse.SUPPRESS, **common)
            if hidden:
                group.add_argument(*hidden, help=argparse.SUPPRESS, **positive)
            continue
        value = dict(type=_converter(kind, optional), metavar=f.name.upper(), **common)
        group.add_argument(*names, help=help_text, **value)
        if hidden:
            group.add_argument(*hidden, help=argparse.SUPPRESS, **value)


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
