"""Who a coprocessor was built for: the base model's name and the dimensions a checkpoint depends on, saved in
``CoprocessorConfig.base_identity`` and checked when a checkpoint or a bank meets a base."""

from __future__ import annotations

from typing import Any

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
