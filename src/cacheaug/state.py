"""The decode state and the steps of the frozen base over a kv-cache: prefill, feed, compute and insert latents.

Outside the training loss, every forward of the base with a cache goes through :func:`base_forward`, which
keeps per-slot bookkeeping next to the cache: which slots are visible (a token read again after the latents
hides its first slot) and which hold latents (the gated attention of ``latent_gate`` reads them through its
own softmax). A state without hidden slots and without gates steps the base exactly as a plain forward does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cache as kv
from .masks import GATED_ATTENTION, block_attention_for


@dataclass
class AugmentedCache:
    """The base's cache after a prefix (and, when augmented, its latents), ready to decode from."""

    cache: object  # transformers DynamicCache holding prefix (+ latents)
    next_position: int  # position id of the next token fed to the base
    logits: torch.Tensor  # (B, V) base logits predicting the next token
    latents: torch.Tensor | None = None  # (B, N_L, H) latent embeddings written into the cache
    slot_mask: torch.Tensor | None = None  # (B, S) long, 1 = visible slot, 0 = hidden; None: all visible
    latent_slots: torch.Tensor | None = None  # (B, S) bool, slots holding latents; None: no latents
    last_token: torch.Tensor | None = None  # (B,) the last token id fed (readout="token" reads it again)
    gates: torch.Tensor | None = None  # (num_layers, H) the coprocessor's latent gates, when gated


def positions(start: int | torch.Tensor, length: int, batch: int, device) -> torch.Tensor:
    """(B, length) position ids from ``start`` (an int, or (B,) per row)."""
    offsets = torch.arange(length, device=device)
    if isinstance(start, torch.Tensor):
        return start.to(device)[:, None] + offsets
    return (start + offsets).expand(batch, -1)


def recipe(lm) -> tuple[str, torch.Tensor | None]:
    """(readout, gates) of an AugmentedLM; a plain base inserts latents as the paper does, ungated."""
    coprocessor = getattr(lm, "coprocessor", None)
    if coprocessor is None:
        return "latent", None
    return lm.config.readout, coprocessor.gate


def base_of(lm):
    return getattr(lm, "base", lm)


def base_forward(
    base,
    cache,
    position_ids: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    slot_mask: torch.Tensor | None = None,
    latent_slots: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    is_latent: bool = False,
    logits_to_keep: int | torch.Tensor = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The base over ``input_ids`` (B, n) or ``inputs_embeds`` (B, n, H), appended to ``cache`` in place.

    Returns (logits (B, k, V), slot mask, latent slots), the two masks extended by the n new slots (None
    stays None while nothing is hidden / no latent was fed).
    """
    new = input_ids if input_ids is not None else inputs_embeds
    batch, width = new.shape[:2]
    device = position_ids.device
    seen = kv.cache_length(cache)
    if slot_mask is not None:
        slot_mask = torch.cat([slot_mask, slot_mask.new_ones(batch, width)], dim=1)
    if latent_slots is not None or is_latent:
        before = latent_slots if latent_slots is not None else torch.zeros(batch, seen, dtype=torch.bool, device=device)
        latent_slots = torch.cat([before, torch.full((batch, width), is_latent, device=device)], dim=1)
    options = {}
    if slot_mask is not None and not bool(slot_mask.all()):
        options["attention_mask"] = slot_mask
    gated = gates is not None and latent_slots is not None and bool(latent_slots.any())
    if gated:
        options.update(cacheaug_latent_keys=latent_slots, cacheaug_gates=gates)
    with block_attention_for(base if gated else None, implementation=GATED_ATTENTION):
        out = base(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **options,
        )
    return out.logits, slot_mask, latent_slots


@torch.no_grad()
def prefill(base, input_ids: torch.Tensor, context: AugmentedCache | None = None, cache=None) -> AugmentedCache:
    """The base over ``input_ids`` (B, T), after a copy of ``context`` (a state) or ``cache`` (a plain cache)."""
    if context is not None:
        state = copy_state(context)
    else:
        past = kv.new_cache(base.config) if cache is None else kv.copy_cache(cache)
        state = AugmentedCache(past, kv.cache_length(past), None)
    feed(base, state, input_ids)
    return state


def feed(base, state: AugmentedCache, input_ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
    """Append ``input_ids`` (B, n) to ``state`` in place; returns the logits (B, k, V) of the last k tokens."""
    batch, width = input_ids.shape
    logits, state.slot_mask, state.latent_slots = base_forward(
        base,
        state.cache,
        positions(state.next_position, width, batch, input_ids.device),
        input_ids=input_ids,
        slot_mask=state.slot_mask,
        latent_slots=state.latent_slots,
        gates=state.gates,
        logits_to_keep=logits_to_keep,
    )
    state.logits, state.last_token = logits[:, -1], input_ids[:, -1].clone(memory_format=torch.contiguous_format)
    state.next_position += width
    return logits


def feed_token(base, state: AugmentedCache, token: torch.Tensor) -> None:
    """Append ``token`` (B,) to ``state`` in place: its cache grows by one, its logits predict the next token."""
    feed(base, state, token[:, None])


def coprocessor_mask(lm, slot_mask: torch.Tensor | None, latent_slots: torch.Tensor | None, num_latents: int):
    """The coprocessor's 2D mask over [cache slots ; N_L soft tokens] (None when it sees every slot).

    With the new recipe (readout="token" or a gate) it reads text slots only, as in training, where it sees
    the prefix and never a latent; as in the paper, it reads every visible slot.
    """
    readout, gates = recipe(lm)
    visible = slot_mask
    if latent_slots is not None and (readout == "token" or gates is not None) and bool(latent_slots.any()):
        visible = (~latent_slots).long() if visible is None else visible * (~latent_slots).long()
    if visible is None:
        return None
    return torch.cat([visible, visible.new_ones(visible.shape[0], num_latents)], dim=1)


def compute_latents(lm, state: AugmentedCache) -> torch.Tensor:
    """(B, N_L, H) latents the coprocessor emits for ``state``'s cache; the state is not touched (the
    coprocessor extends its own copy), so this may run in another thread while the base decodes.

    The soft tokens sit at the positions after the state's next position (arXiv 2412.17747, section 2.2).
    """
    past = kv.first_layers(state.cache, lm.num_coprocessor_layers)  # a copy
    num_latents = lm.config.num_latents
    batch = kv.cache_batch_size(past)
    mask = coprocessor_mask(lm, state.slot_mask, state.latent_slots, num_latents)
    return lm.coprocessor(past, positions(state.next_position, num_latents, batch, lm.device), attention_mask=mask)


def insert_latents(lm, state: AugmentedCache, latents: torch.Tensor) -> AugmentedCache:
    """A new state: ``latents`` (B, N_L, H) fed at ``state``'s CURRENT point, the state itself untouched (a
    failure half-way through the layers leaves nothing half-written).

    readout="latent" (the paper): the latents take the next N_L positions and the last one predicts the next
    token. readout="token": the last token's slot is hidden, the latents share its position, and the token is
    read again after them, at its own position, to predict the next one (masks.readout_layout). Latents
    computed on an older cache (async) land after the tokens decoded meanwhile either way.
    """
    readout, gates = recipe(lm)
    base = base_of(lm)
    new = copy_state(state)
    new.latents, new.gates = latents, gates
    batch, num_latents = latents.shape[:2]
    if readout == "token":
        if state.last_token is None:
            raise ValueError("readout='token' needs the state's last token id: build the state with input_ids")
        slots = kv.cache_length(new.cache)
        slot_mask = new.slot_mask.clone() if new.slot_mask is not None else torch.ones(
            batch, slots, dtype=torch.long, device=latents.device
        )
        slot_mask[:, slots - 1] = 0  # the token is read again after the latents
        start = new.next_position - 1
    else:
        slot_mask, start = new.slot_mask, new.next_position
    logits, new.slot_mask, new.latent_slots = base_forward(
        base,
        new.cache,
        torch.full((batch, num_latents), start, device=latents.device)
        if readout == "token"
        else positions(start, num_latents, batch, latents.device),
        inputs_embeds=latents,
        slot_mask=slot_mask,
        latent_slots=new.latent_slots,
        gates=gates,
        is_latent=True,
    )
    if readout == "token":
        logits, new.slot_mask, new.latent_slots = base_forward(
            base,
            new.cache,
            torch.full((batch, 1), start, device=latents.device),
            input_ids=state.last_token[:, None],
            slot_mask=new.slot_mask,
            latent_slots=new.latent_slots,
            gates=gates,
        )
    else:
        new.next_position += num_latents
    new.logits = logits[:, -1]
    return new


def copy_state(state: AugmentedCache) -> AugmentedCache:
    """A state that decoding can extend without touching ``state``: the cache is copied (its tensors are
    shared, never written), logits and latents are cloned; the masks are only ever rebound, so shared."""
    return AugmentedCache(
        kv.copy_cache(state.cache),
        state.next_position,
        None if state.logits is None else state.logits.clone(),
        None if state.latents is None else state.latents.clone(),
        state.slot_mask,
        state.latent_slots,
        state.last_token,
        state.gates,
    )
