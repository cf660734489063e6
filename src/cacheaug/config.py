"""Every typed, validated configuration dataclass of cacheaug: the coprocessor, the data, the training run and
one dataclass per command-line verb (the CLI derives its flags from their fields and comments)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, DataError

COPROCESSOR_INITS = ("pretrained", "scratch")
METHODS = ("coprocessor", "pause")
READOUTS = ("latent", "token")
SOFT_TOKEN_INITS = ("random", "vocab")
# The recipe as in the paper (arXiv 2412.17747): what a saved config that predates these fields was trained with.
PAPER_RECIPE = {"readout": "latent", "latent_gate": False, "soft_token_init": "random"}


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class CoprocessorConfig:
    """What the coprocessor is and how it is trained (arXiv 2412.17747, sections 2.2-2.3).

    Fields left ``None`` are filled from the base model by :meth:`resolve`; a saved config always holds
    the resolved values plus the base model's identity, so a checkpoint describes itself.
    """

    num_latents: int = 16  # N_L: soft tokens in, latent embeddings out
    num_ahead: int = 16  # N_A: tokens after the latents whose likelihood is trained
    num_points: int = 16  # augmentation points sampled per training sequence
    init: str = "pretrained"  # "pretrained": copy of the base's weights; "scratch": re-initialised
    lora_rank: int | None = None  # None: full fine-tune of the copy; int: LoRA adapters (peft)
    lora_alpha: float | None = None  # None: equal to lora_rank (scale 1)
    num_layers: int | None = None  # None: all of the base's layers; k: the first k layers
    latents_after_norm: bool = True  # latents taken after the coprocessor's final norm
    # Multiply latents by a trainable scalar, calibrated at construction so that they enter the base at the
    # scale of its token embeddings (a copied stack's outputs are ~20x larger on SmolLM2). Off by default:
    # in short SmolLM2 runs the raw latents trained faster (results/quickstart/README.md).
    scale_latents: bool = False
    # "pause": the pause-token baseline (Goyal et al., arXiv 2310.02226) -- the N_L trainable embeddings are
    # inserted into the base as they are, no coprocessor; trained and evaluated by the same code.
    method: str = "coprocessor"
    # The do-no-harm recipe (results/recipe-smollm2/); PAPER_RECIPE below sets all three as in the paper.
    # Where the first ahead token is read out. "token": the base reads x_0..x_{t-1}, the latents, then x_t
    # again at its own position, so every prediction is made at a real token (masks.readout_layout);
    # "latent": the last latent predicts x_{t+1}, as in the paper.
    readout: str = "token"
    # A zero-initialised tanh gate per base layer and head on a separate softmax over the latent keys
    # (masks.gated_attention): with readout="token" the augmented base starts exactly equal to the plain one.
    latent_gate: bool = True
    # "vocab": embeddings of random vocabulary tokens; "random": Gaussian at the embedding scale (paper-like).
    soft_token_init: str = "vocab"
    # Filled by resolve(): who the coprocessor was built for (INTERNAL_FIELDS: no flags, not in a run config).
    base_model: str | None = None
    base_identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_positive_int("num_latents", self.num_latents)
        _check_positive_int("num_ahead", self.num_ahead)
        _check_positive_int("num_points", self.num_points)
        _check_positive_int("lora_rank", self.lora_rank, allow_none=True)
        _check_positive_int("num_layers", self.num_layers, allow_none=True)
        if self.init not in COPROCESSOR_INITS:
            raise ConfigError(f"init must be one of {COPROCESSOR_INITS}, got {self.init!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "pause" and self.lora_rank is not None:
            raise ConfigError("lora_rank applies to a coprocessor; method='pause' has none")
        if self.lora_rank is not None and self.init == "scratch":
            # LoRA freezes the copy; a frozen random copy would make the adapters meaningless.
            raise ConfigError("lora_rank needs init='pretrained': LoRA on a randomly initialised frozen copy")
        if self.lora_alpha is not None and (not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0):
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.scale_latents, bool):
            raise ConfigError(f"scale_latents must be true or false, got {self.scale_latents!r}")
        if not isinstance(self.latents_after_norm, bool):
            raise ConfigError(f"latents_after_norm must be true or false, got {self.latents_after_norm!r}")
        if self.readout not in READOUTS:
            raise ConfigError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if not isinstance(self.latent_gate, bool):
            raise ConfigError(f"latent_gate must be true or false, got {self.latent_gate!r}")
        if self.soft_token_init not in SOFT_TOKEN_INITS:
            raise ConfigError(f"soft_token_init must be one of {SOFT_TOKEN_INITS}, got {self.soft_token_init!r}")

    def resolve(self, base_config: Any, base_model: str | None = None) -> "CoprocessorConfig":
        """Return a copy with every ``None`` field filled from the base's HF config."""
        text_config = base_config.get_text_config()
        total_layers = text_config.num_hidden_layers
        num_layers = total_layers if self.num_layers is None else self.num_layers
        if num_layers > total_layers:
            raise ConfigError(f"num_layers={num_layers} but the base model has only {total_layers} layers")
        identity = base_identity_from_config(base_config, base_model)
        return dataclasses.replace(
            self,
            num_layers=num_layers,
            lora_alpha=self.lora_alpha if self.lora_alpha is not None or self.lora_rank is None else float(self.lora_rank),
            base_model=identity["name"],
            base_identity=identity,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CoprocessorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown coprocessor config key(s) {unknown}; known keys: {sorted(known)}")
        if "base_identity" in data:  # a saved, resolved config: fields it lacks predate the new recipe
            data = {**PAPER_RECIPE, **data}
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


INTERNAL_FIELDS = ("base_model", "base_identity")

# Dimensions that must agree for a coprocessor to run on a base model.
IDENTITY_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def base_identity_from_config(base_config: Any, name: str | None = None) -> dict[str, Any]:
    """The base model's name and the dimensions a checkpoint depends on."""
    text = base_config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    identity = {
        "name": name or getattr(base_config, "name_or_path", None) or getattr(base_config, "_name_or_path", None) or "unknown",
        "model_type": text.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", heads),
        "head_dim": getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None),
        "vocab_size": text.vocab_size,
    }
    return identity


def identity_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's base identity and a loaded base."""
    return [
        f"{key}: checkpoint {saved.get(key)!r} vs base {current.get(key)!r}"
        for key in IDENTITY_KEYS
        if key in saved and saved.get(key) != current.get(key)
    ]


PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
# Attention of the training pass (flex.py): auto = flex on CUDA, block elsewhere; sdpa = dense fallback.
ATTENTIONS = ("auto", "block", "flex", "sdpa")


@dataclass
class TrainArgs:
    """Optimisation, schedule, logging and checkpoint cadence of a training run."""

    output_dir: str = "runs/default"  # run folder: metrics.jsonl, step-NNNNNN/ checkpoints, final tables
    max_steps: int = 100  # optimiser steps
    batch_size: int = 1  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimiser step
    lr: float = 1e-4  # peak learning rate of the coprocessor (AdamW)
    # Learning rate of the interface parameters (soft tokens, latent gates, latent scale); None: lr. The
    # schedule scales it like lr. They are few and start where a large step is safe (two speeds).
    interface_lr: float | None = None
    min_lr_ratio: float = 0.1  # cosine decays from lr to lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup from 0 to lr
    weight_decay: float = 0.0  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 0  # model initialisation, augmentation points and RNG state
    precision: str = "fp32"  # "bf16": autocast of the loss computation
    strategy: str = "ddp"  # with several processes: "ddp" replicates the coprocessor, "fsdp" shards it
    attention: str = "auto"  # training pass: "block" (CPU kernel), "flex" (FlexAttention, CUDA), "sdpa" (dense)
    compile_coprocessor: bool = False  # torch.compile the coprocessor stack (static shapes)
    log_every: int = 1  # steps between metrics.jsonl lines
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 4  # validation batches per evaluation
    save_every: int = 50  # 0: only at the end
    keep_last: int = 2  # step folders kept (older ones are deleted)
    resume: bool = False  # continue the run in output_dir from its last checkpoint
    overwrite: bool = False  # replace the run in output_dir

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep_last"):
            _check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if not 0 < self.lr:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if self.interface_lr is not None and (
            isinstance(self.interface_lr, bool) or not isinstance(self.interface_lr, (int, float)) or self.interface_lr <= 0
        ):
            raise ConfigError(f"interface_lr must be a positive number or null, got {self.interface_lr!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("resume", "overwrite", "compile_coprocessor"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not self.output_dir or not isinstance(self.output_dir, str):
            raise ConfigError(f"output_dir must be a folder path, got {self.output_dir!r}")


EMBEDDED_SOURCE = "embedded:arithmetic"
FORMATS = ("auto", "text", "jsonl", "gsm8k")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _require(ok: bool, name: str, value: Any, want: str) -> None:
    if not ok:
        raise DataError(f"{name} must be {want}, got {value!r}")


@dataclass
class DataArgs:
    """Where the training and validation text comes from and how it is cut into sequences."""

    source: str = EMBEDDED_SOURCE  # embedded:arithmetic | file | folder (*.txt, *.jsonl) | glob | hf:<name>[:config]
    format: str = "auto"  # auto (by extension) | text (one file = one document) | jsonl | gsm8k
    text_field: str = "text"  # the JSONL field that holds a document
    seq_len: int = 256  # tokens per training sequence
    validation_fraction: float = 0.05  # of whole documents; ignored for the embedded corpus or a validation_source
    validation_source: str | None = None  # held-out text used for validation instead of a split of source
    seed: int = 0  # the validation split and the shuffling of documents and chunks
    embedded_train_problems: int = 20_000  # training problems of the embedded arithmetic corpus
    embedded_val_problems: int = 200  # its validation problems (from another seed)
    window_mb: float = 16.0  # documents and chunks are shuffled within windows of about this much source text

    def __post_init__(self) -> None:
        _require(_is_text(self.source), "source", self.source, "a non-empty string")
        _require(self.format in FORMATS, "format", self.format, f"one of {FORMATS}")
        _require(_is_text(self.text_field), "text_field", self.text_field, "a non-empty string")
        _require(_is_int(self.seq_len) and self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")
        _require(_is_number(self.validation_fraction) and 0 <= self.validation_fraction < 1, "validation_fraction",
                 self.validation_fraction, "a number in [0, 1)")
        _require(self.validation_source is None or _is_text(self.validation_source), "validation_source",
                 self.validation_source, "None or a non-empty string")
        _require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "a non-negative integer")
        for name in ("embedded_train_problems", "embedded_val_problems"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "a positive integer")
        _require(_is_number(self.window_mb) and self.window_mb > 0, "window_mb", self.window_mb, "a positive number")

    @property
    def window_bytes(self) -> int:
        return max(1, int(self.window_mb * 2**20))


@dataclass
class RunConfig:
    """Everything `cacheaug train` needs: base model, coprocessor, data and optimisation."""

    model: str = "smollm2-135m"  # base model: an embedded name, a .gguf file, a model folder or a Hub id
    dtype: str = "float32"  # float32 | bfloat16 | float16
    coprocessor: CoprocessorConfig = field(default_factory=CoprocessorConfig)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a run config must be a mapping, got {type(data).__name__}")
        sections = {"coprocessor": CoprocessorConfig, "data": DataArgs, "train": TrainArgs}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known top-level keys: {sorted(known)}")
        values = {key: from_mapping(sections[key], value or {}, key) if key in sections else value
                  for key, value in data.items()}
        return cls(**values)


def from_mapping(cls: type, value: Any, section: str | None = None):
    """``cls(**value)`` for a config dataclass, refusing unknown keys by name (``section.key`` in a run config)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{section or cls.__name__} must be a mapping, got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(value) - fields)
    if bad:
        named = [f"{section}.{b}" for b in bad] if section else bad
        raise ConfigError(f"unknown config key(s) {named}; known {section or 'option'} keys: {sorted(fields)}")
    try:
        return cls(**_floats_from_strings(cls, value))
    except TypeError as error:
        raise ConfigError(f"{section or cls.__name__}: {error}") from None


def _floats_from_strings(section: type, value: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads `3e-4` (no dot) as a string; for float fields read it as the number it spells."""
    float_fields = {f.name for f in dataclasses.fields(section) if f.type in (float, "float", "float | None")}
    converted = dict(value)
    for name, item in value.items():
        if name in float_fields and isinstance(item, str):
            try:
                converted[name] = float(item)
            except ValueError:
                pass  # left as is: __post_init__ names the field and the bad value
    return converted


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """tree["train"]["max_steps"] = value for dotted_key "train.max_steps"."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted_key}: {part} is not a section")
        node = child
    node[leaf] = value


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file ({} when empty); a missing or malformed file is a ConfigError."""
    import yaml

    try:
        with open(path) as handle:
            tree = yaml.safe_load(handle) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"config file {path} is not valid YAML: {reason}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(tree).__name__}")
    return tree


def load_run_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config (optional) and apply dotted overrides such as {"train.max_steps": 20}."""
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return RunConfig.from_dict(tree)


def load_args(cls: type, path: str | None = None, overrides: dict[str, Any] | None = None):
    """A verb's arguments: its YAML file (optional) with ``overrides`` applied, validated; RunConfig for train."""
    if cls is RunConfig:
        return load_run_config(path, overrides)
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return from_mapping(cls, tree)


# ---------------------------------------------------------------------------- one dataclass per verb
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
    augment_timeout: float = 30.0  # seconds the coprocessor may take before a request goes on unaugmented

    def __post_init__(self) -> None:
        _check(self, ("port",))


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
