"""One typed dataclass per command-line verb: what each verb takes (cli.py derives the flags from the fields
and their comments). The configs they build on (coprocessor, data, training) are in config.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import DataArgs, _check_positive_int
from .errors import ConfigError

# Field comments are the flags' help (cli.py); metadata marks required and positional fields.
REQUIRED = {"required": True}
POSITIONAL = {"required": True, "positional": True}
CONDITIONS = {"both": (True, False), "augmented": (True,), "base": (False,)}  # evaluated with / without latents
DTYPES = ("float32", "bfloat16", "float16")


def _check(args, positive: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> None:
    """The one validation helper of the verbs: required fields given, counts positive, choices known."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.metadata.get("required") and value in (None, "", []):
            flag = f.name.upper() if f.metadata.get("positional") else f"--{f.name.replace('_', '-')}"
            raise ConfigError(f"{f.name} is required ({flag})")
    for name in positive:
        _check_positive_int(name, getattr(args, name), allow_none=name in optional)
    if getattr(args, "dtype", "float32") not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {args.dtype!r}")
    if getattr(args, "conditions", "both") not in CONDITIONS:
        raise ConfigError(f"conditions must be one of {tuple(CONDITIONS)}, got {args.conditions!r}")


@dataclass
class CheckpointArgs:
    """A verb that runs a trained checkpoint."""

    ckpt: str | None = field(default=None, metadata=REQUIRED)  # checkpoint folder (step-NNNNNN/)
    dtype: str = "float32"  # float32 | bfloat16 | float16: the base's weights


@dataclass
class EvalArgs(CheckpointArgs):
    """An evaluation task that writes its results into a folder."""

    out: str | None = field(default=None, metadata=REQUIRED)  # folder for the results (JSON, Markdown, plots)


@dataclass
class AheadArgs(CheckpointArgs):
    """`cacheaug eval ahead`: ahead-token loss by offset, with vs without latents, on validation data."""

    data: str | None = None  # validation source (default: the run's own)
    seq_len: int | None = None  # tokens per sequence (default: the run's own)
    batches: int = 8  # validation batches to score
    batch_size: int = 4  # sequences per batch
    json: str | None = None  # also write the result to this JSON file
    out: str | None = None  # also write ahead.json and ahead.md into this folder

    def __post_init__(self) -> None:
        _check(self, ("seq_len", "batches", "batch_size"), optional=("seq_len",))


@dataclass
class PerplexityArgs(EvalArgs):
    """`cacheaug eval perplexity`: perplexity of the k-th token after latents inserted every few tokens."""

    data: str | None = field(default=None, metadata=REQUIRED)  # text file, folder of .txt/.jsonl, or glob
    every: int = 1  # latents after every k-th token (1: every token)
    max_tokens: int | None = None  # read at most this many tokens of text
    seq_len: int = 256  # tokens per sequence
    offsets: int = 32  # tokens scored after each insertion
    batch_size: int = 1  # sequences per batch
    max_queries: int = 2048  # new base tokens per row in one pass (bounds memory)
    format: str = "auto"  # data format: auto | text | jsonl | gsm8k
    name: str | None = None  # name in file names and the report (default: from --data)

    def __post_init__(self) -> None:
        _check(self, ("every", "max_tokens", "offsets", "batch_size", "max_queries"), optional=("max_tokens",))
        DataArgs(source=self.data, format=self.format, seq_len=self.seq_len)  # the data section's own checks


@dataclass
class Gsm8kArgs(EvalArgs):
    """`cacheaug eval gsm8k`: GSM8K accuracy, greedy, latents once at the end of the prompt."""

    data: str | None = field(default=None, metadata=REQUIRED)  # GSM8K test JSONL
    shots: int = 8  # solved exemplars before each question
    train_file: str | None = None  # exemplars from here (default: train.jsonl next to --data)
    exemplar_seed: int | None = None  # draw the exemplars with this seed (default: the first k)
    cot: bool = False  # end the prompt with "Let's think step by step."
    limit: int | None = None  # the first N test items
    max_new_tokens: int = 256  # tokens generated per answer at most
    conditions: str = "both"  # both | augmented | base
    batch_size: int = 8  # items decoded together (same texts as one by one)
    async_delay: int | None = None  # insert the latents after N generated tokens, as an asynchronous coprocessor

    def __post_init__(self) -> None:
        _check(self, ("limit", "max_new_tokens", "batch_size"), optional=("limit",))
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 0:
            raise ConfigError(f"shots must be a non-negative integer, got {self.shots!r}")
        if self.async_delay is not None and (self.async_delay < 0 or True not in CONDITIONS[self.conditions]):
            raise ConfigError(f"--async-delay needs a value >= 0 and the augmented condition, got {self.async_delay}")


@dataclass
class McArgs(EvalArgs):
    """`cacheaug eval mc`: multiple choice by log-likelihood; JSONL rows {"context", "choices", "gold"}."""

    data: str | None = field(default=None, metadata=REQUIRED)  # multiple-choice JSONL
    delimiter: str = " "  # put between context and each choice
    limit: int | None = None  # the first N items
    name: str | None = None  # name in file names and the report (default: from --data)
    conditions: str = "both"  # both | augmented | base

    def __post_init__(self) -> None:
        _check(self, ("limit",), optional=("limit",))


@dataclass
class HarnessArgs(EvalArgs):
    """`cacheaug eval harness`: lm-evaluation-harness tasks with the cacheaug model."""

    tasks: str | None = field(default=None, metadata=REQUIRED)  # comma-separated lm-eval task names
    include_path: str | None = None  # folder of extra task YAMLs (local tasks)
    local_tasks_only: bool = False  # index only --include-path (faster start)
    limit: float | None = None  # items per task: a count (>= 1) or a fraction (< 1)
    num_fewshot: int | None = None  # few-shot examples (default: the task's own)
    conditions: str = "both"  # both | augmented | base

    def __post_init__(self) -> None:
        _check(self)


@dataclass
class GenerateArgs(CheckpointArgs):
    """`cacheaug generate`: decode from a prompt, augmented by a checkpoint."""

    prompt: str | None = field(default=None, metadata=REQUIRED)  # the text to continue
    augment: bool = True  # latents after the prompt; --no-augment decodes with the plain base
    max_new_tokens: int = 64  # tokens generated at most
    sample: bool = False  # sample instead of greedy decoding
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this probability
    seed: int | None = None  # sampling seed

    def __post_init__(self) -> None:
        _check(self, ("max_new_tokens",))
        if self.sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class ServeArgs(CheckpointArgs):
    """`cacheaug serve`: an OpenAI-compatible HTTP server (completions, chat, SSE) for a checkpoint."""

    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # port to listen on
    augment_timeout: float = 30.0  # seconds an async coprocessor may take before its request goes on unaugmented
    max_batch: int = 32  # requests decoded at once (one batched forward per token)
    max_queue: int = 64  # requests waiting for a row; beyond, 503 with Retry-After
    request_timeout: float = 600.0  # seconds a request may take from its arrival, then 504
    bank: str | None = None  # a cache bank folder (`cacheaug bank add --root`): prompts continue banked contexts
    api_key: str | None = None  # require `Authorization: Bearer <key>` (default: $CACHEAUG_API_KEY)

    def __post_init__(self) -> None:
        _check(self, ("port", "max_batch"))
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        if not (self.request_timeout > 0 and self.augment_timeout > 0):
            raise ConfigError(f"timeouts must be > 0, got {self.request_timeout} and {self.augment_timeout}")


@dataclass
class BankAddArgs(CheckpointArgs):
    """`cacheaug bank add`: augment text files once and store their caches."""

    files: list[str] = field(default_factory=list, metadata=POSITIONAL)  # text files to augment
    root: str | None = None  # bank folder (default: $CACHEAUG_HOME/bank)

    def __post_init__(self) -> None:
        _check(self)


@dataclass
class ReportArgs:
    """`cacheaug report`: Markdown tables and plots comparing evaluated run folders."""

    runs: list[str] = field(default_factory=list, metadata=POSITIONAL)  # folders written by `cacheaug eval ... --out`
    out: str | None = field(default=None, metadata=REQUIRED)  # folder for report.md and the plots

    def __post_init__(self) -> None:
        _check(self)


@dataclass
class InfoArgs:
    """`cacheaug info`: config, base model and trainable parameters of a checkpoint."""

    dir: str | None = field(default=None, metadata=POSITIONAL)  # checkpoint folder

    def __post_init__(self) -> None:
        _check(self)
