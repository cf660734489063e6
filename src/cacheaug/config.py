"""The typed, validated configurations of cacheaug: the coprocessor, the data, the training run, and how they
are read from YAML with dotted overrides. The arguments of each command-line verb are in verbs.py."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, DataError
from .identity import base_identity_from_config

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
    # Latents = soft tokens + r * (coprocessor output at the embedding scale), r a trainable scalar starting
    # at latent_residual_init: at 0 training starts as the pause-token baseline and the coprocessor adds to it
    # once r opens (in 500 steps it stayed under 0.01: res16); 1 is a skip connection around the coprocessor
    # (r stayed near 1 and the result was worse at that budget: res16-r1, results/recipe-smollm2/).
    latent_residual: bool = False
    # r's starting value with latent_residual (see above).
    latent_residual_init: float = 0.0
    # With latent_residual: r is an (H, H) matrix starting at latent_residual_init x identity, trained at the
    # body's lr, so the coprocessor's output can enter the latents along any direction, not only its own (a scalar
    # r stayed near 0 in res16; the matrix opened in res16-mat, results/recipe-smollm2/).
    latent_residual_matrix: bool = False
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
        if not isinstance(self.latent_residual, bool):
            raise ConfigError(f"latent_residual must be true or false, got {self.latent_residual!r}")
        if self.latent_residual and self.method == "pause":
            raise ConfigError("latent_residual adds a coprocessor's output to the soft tokens; method='pause' has none")
        if not (_is_number(self.latent_residual_init) and math.isfinite(self.latent_residual_init)):
            raise ConfigError(f"latent_residual_init must be a finite number, got {self.latent_residual_init!r}")
        if self.latent_residual_init != 0 and not self.latent_residual:
            raise ConfigError("latent_residual_init sets r of latent_residual; turn latent_residual on to use it")
        if not isinstance(self.latent_residual_matrix, bool):
            raise ConfigError(f"latent_residual_matrix must be true or false, got {self.latent_residual_matrix!r}")
        if self.latent_residual_matrix and not self.latent_residual:
            raise ConfigError("latent_residual_matrix makes r of latent_residual a matrix; turn latent_residual on to use it")
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
    # Weight at step 0 of KL(p_aug || p_base) to the frozen base on every scored token, added to the loss: keeps
    # the augmented model at the base where it cannot improve on it (out-of-domain text). 0: off.
    kl_to_base: float = 0.0
    kl_anneal_steps: int | None = None  # the KL weight decays linearly to 0 over this many steps; null: constant
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
        if isinstance(self.kl_to_base, bool) or not isinstance(self.kl_to_base, (int, float)) or not (
            0 <= self.kl_to_base < float("inf")
        ):
            raise ConfigError(f"kl_to_base must be a non-negative number, got {self.kl_to_base!r}")
        if self.kl_anneal_steps is not None and (
            isinstance(self.kl_anneal_steps, bool) or not isinstance(self.kl_anneal_steps, int) or self.kl_anneal_steps < 1
        ):
            raise ConfigError(f"kl_anneal_steps must be a positive integer or null, got {self.kl_anneal_steps!r}")
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

    def kl_weight(self, step: int) -> float:
        """The KL-to-base weight of optimiser step ``step`` (0-based): kl_to_base, decayed linearly to 0 at
        kl_anneal_steps and 0 after it; constant when kl_anneal_steps is None."""
        if self.kl_anneal_steps is None:
            return float(self.kl_to_base)
        return float(self.kl_to_base) * max(0.0, 1.0 - step / self.kl_anneal_steps)


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
