"""The decode state and the steps of the frozen base over a kv-cache: prefill, feed, compute and insert latents,
copy, select, stack and compact rows.

One state serves one sequence or a padded batch of rows of different lengths (their next positions differ).
Outside the training loss, every forward of the base with a cache goes through :func:`base_forward`, which
keeps per-slot bookkeeping next to the cache: which slots are visible (padding, and a token read again after
the latents, hide theirs) and which hold latents (the gated attention of ``latent_gate`` reads them through its
own softmax). A state without hidden slots and without gates steps the base exactly as a plain forward does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cache as kv
from .errors import InputError
from .masks import FULL, GATED_ATTENTION, attention_layer_kinds, block_attention_for


@dataclass
class DecodeState:
    """The base's cache after a prefix (and, when augmented, its latents), ready to decode from."""

    cache: object  # transformers DynamicCache holding prefix (+ latents), (B, H_kv, S, D) per layer
    next_position: int | torch.Tensor  # position id of the next token fed to the base; (B,) when rows differ
    logits: torch.Tensor  # (B, V) base logits predicting the next token
    latents: torch.Tensor | None = None  # (B, N_L, H) latent embeddings written into the cache
    slot_mask: torch.Tensor | None = None  # (B, S) long, 1 = visible slot, 0 = hidden or padding; None: all visible
    latent_slots: torch.Tensor | None = None  # (B, S) bool, slots holding latents; None: no latents
    last_token: torch.Tensor | None = None  # (B,) the last token id fed (readout="token" reads it again)
    gates: torch.Tensor | None = None  # (num_layers, H) the coprocessor's latent gates, when gated
    last_slot: torch.Tensor | None = None  # (B,) slot of each row's last token, when padding follows it
    pending: torch.Tensor | None = None  # (B, N_L, H) latents to insert before generated token ``pending_after``
    pending_after: int = 0


AugmentedCache = DecodeState  # its name in earlier versions


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
    new_mask: torch.Tensor | None = None,
    logits_to_keep: int | torch.Tensor = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The base over ``input_ids`` (B, n) or ``inputs_embeds`` (B, n, H), appended to ``cache`` in place.

    ``new_mask`` (B, n): which of the n new slots are visible (padding: 0); all of them by default. Returns
    (logits (B, k, V), slot mask, latent slots), the two masks extended by the n new slots (None stays None
    while nothing is hidden / no latent was fed).
    """
    new = input_ids if input_ids is not None else inputs_embeds
    batch, width = new.shape[:2]
    device = position_ids.device
    seen = kv.cache_length(cache)
    if new_mask is not None and slot_mask is None:
        slot_mask = torch.ones(batch, seen, dtype=torch.long, device=device)
    if slot_mask is not None:
        slot_mask = torch.cat([slot_mask, slot_mask.new_ones(batch, width) if new_mask is None else new_mask], dim=1)
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
def prefill(base, input_ids: torch.Tensor, context: DecodeState | None = None, cache=None) -> DecodeState:
    """The base over ``input_ids`` (B, T), after a copy of ``context`` (a state) or ``cache`` (a plain cache)."""
    if context is not None:
        state = copy_state(context)
    else:
        past = kv.new_cache(base.config) if cache is None else kv.copy_cache(cache)
        state = DecodeState(past, kv.cache_length(past), None)
    feed(base, state, input_ids)
    return state


@torch.no_grad()
def prefill_rows(base, rows: list[list[int]], cache=None) -> DecodeState:
    """Rows of different lengths in one batch, each read onto (a copy of) the one-row ``cache`` when given.

    Padded on the right to the longest row; the padding stays masked out for good and takes no positions, so
    each row decodes as it would alone (where no layer has a sliding window: see padded_batches_are_exact).
    """
    if not rows or any(not ids for ids in rows):
        raise InputError("every context must hold at least one token")
    device = base.device
    batch = len(rows)
    lengths = torch.tensor([len(ids) for ids in rows], device=device)  # (B,)
    width = int(lengths.max())
    ids = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in rows], device=device)  # (B, W)
    if cache is None:
        past = kv.new_cache(base.config)
    else:  # one row needs no regrouping, which keeps sliding-window caches usable
        past = kv.copy_cache(cache) if batch == 1 else kv.repeat_batch(cache, batch)
    start = kv.cache_length(past)
    real = (torch.arange(width, device=device) < lengths[:, None]).long()  # (B, W)
    last = lengths - 1
    keep = torch.unique(last)  # sorted columns whose logits some row needs
    logits, slot_mask, _ = base_forward(
        base, past, positions(start, width, batch, device), input_ids=ids, new_mask=real, logits_to_keep=keep,
    )
    row = torch.arange(batch, device=device)
    logits = logits[row, torch.searchsorted(keep, last)]  # (B, V)
    return DecodeState(past, start + lengths, logits, slot_mask=slot_mask, last_token=ids[row, last],
                       last_slot=start + last)


def feed(base, state: DecodeState, input_ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
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
    state.next_position = state.next_position + width  # rebound, never in place: copies share the tensor
    state.last_slot = None  # the last token now sits in the last slot
    return logits


def feed_token(base, state: DecodeState, token: torch.Tensor) -> None:
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


def compute_latents(lm, state: DecodeState) -> torch.Tensor:
    """(B, N_L, H) latents the coprocessor emits for ``state``'s cache; the state is not touched (the
    coprocessor extends its own copy), so this may run in another thread while the base decodes.

    The soft tokens sit at the positions after the state's next position (arXiv 2412.17747, section 2.2).
    """
    past = kv.first_layers(state.cache, lm.num_coprocessor_layers)  # a copy
    num_latents = lm.config.num_latents
    batch = kv.cache_batch_size(past)
    mask = coprocessor_mask(lm, state.slot_mask, state.latent_slots, num_latents)
    return lm.coprocessor(past, positions(state.next_position, num_latents, batch, lm.device), attention_mask=mask)


def latents_for(lm, state) -> torch.Tensor:
    """(B, N_L, H) latents for ``state`` (a DecodeState, or a plain cache), as :func:`compute_latents`."""
    if not isinstance(state, DecodeState):
        state = DecodeState(state, kv.cache_length(state), None)
    return compute_latents(lm, state)


def insert_latents(lm, state: DecodeState, latents: torch.Tensor) -> DecodeState:
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
    device = latents.device
    if readout == "token":
        if state.last_token is None:
            raise InputError("readout='token' needs the state's last token id: build the state with input_ids")
        slots = kv.cache_length(new.cache)
        slot_mask = new.slot_mask.clone() if new.slot_mask is not None else torch.ones(
            batch, slots, dtype=torch.long, device=device
        )
        if state.last_slot is None:
            slot_mask[:, slots - 1] = 0  # the token is read again after the latents
        else:
            slot_mask[torch.arange(batch, device=device), state.last_slot] = 0
        start = new.next_position - 1
        at_start = (start[:, None] if isinstance(start, torch.Tensor) else torch.full((batch, 1), start)).to(device)
        latent_positions = at_start.expand(-1, num_latents)
    else:
        slot_mask, latent_positions = new.slot_mask, positions(new.next_position, num_latents, batch, device)
    logits, new.slot_mask, new.latent_slots = base_forward(
        base, new.cache, latent_positions, inputs_embeds=latents, slot_mask=slot_mask,
        latent_slots=new.latent_slots, gates=gates, is_latent=True,
    )
    if readout == "token":
        logits, new.slot_mask, new.latent_slots = base_forward(
            base, new.cache, at_start, input_ids=state.last_token[:, None], slot_mask=new.slot_mask,
            latent_slots=new.latent_slots, gates=gates,
        )
        new.last_slot = None
    else:
        new.next_position = new.next_position + num_latents
    new.logits = logits[:, -1]
    return new


def copy_state(state: DecodeState) -> DecodeState:
    """A state that decoding can extend without touching ``state``: the cache is copied (its tensors are
    shared, never written), logits and latents are cloned; the other tensors are only ever rebound, so shared."""
    return DecodeState(
        kv.copy_cache(state.cache),
        state.next_position,
        None if state.logits is None else state.logits.clone(),
        None if state.latents is None else state.latents.clone(),
        state.slot_mask,
        state.latent_slots,
        state.last_token,
        state.gates,
        state.last_slot,
        state.pending,
        state.pending_after,
    )


def select_rows(state: DecodeState, rows: torch.Tensor) -> DecodeState:
    """The rows ``rows`` (1D index) of ``state``, in that order: finished rows leave a batch."""
    def pick(tensor):
        return None if tensor is None else tensor[rows]

    position = state.next_position
    return DecodeState(
        kv.select_rows(state.cache, rows), position[rows] if isinstance(position, torch.Tensor) else position,
        pick(state.logits), pick(state.latents), pick(state.slot_mask), pick(state.latent_slots),
        pick(state.last_token), state.gates, pick(state.last_slot), pick(state.pending), state.pending_after,
    )


def stack_states(states: list[DecodeState]) -> DecodeState:
    """One state holding the rows of every state in ``states``, in order, so that one forward advances them all
    (a server's running batch taking in new requests).

    The caches are aligned on their last slot: a shorter one gets hidden slots on the left (kv.stack_rows), and
    every row keeps its own next position, so each row decodes as it would alone where padding is exact
    (padded_batches_are_exact: no sliding-window layer). Latents waiting in ``pending`` are refused: whoever
    stacks rows inserts latents itself.
    """
    if any(state.pending is not None for state in states):
        raise InputError("cannot stack states whose latents are still pending")
    if len(states) == 1:
        return states[0]
    lengths = [kv.cache_length(state.cache) for state in states]
    width = max(lengths)
    device = states[0].logits.device
    slot_masks, latent_slots, next_positions, last_slots = [], [], [], []
    any_latents = any(state.latent_slots is not None for state in states)
    for state, length in zip(states, lengths):
        batch, pad = state.logits.shape[0], width - length
        shown = state.slot_mask if state.slot_mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        slot_masks.append(torch.cat([shown.new_zeros(batch, pad), shown], dim=1))  # (b, width)
        if any_latents:
            held = state.latent_slots if state.latent_slots is not None else torch.zeros(
                batch, length, dtype=torch.bool, device=device
            )
            latent_slots.append(torch.cat([held.new_zeros(batch, pad), held], dim=1))
        position = state.next_position
        next_positions.append(position if isinstance(position, torch.Tensor) else torch.full((batch,), position, device=device))
        last = state.last_slot if state.last_slot is not None else torch.full((batch,), length - 1, device=device)
        last_slots.append(last + pad)
    last_slot = torch.cat(last_slots)
    tokens = [state.last_token for state in states]
    return DecodeState(
        kv.stack_rows([state.cache for state in states]),
        torch.cat(next_positions),
        torch.cat([state.logits for state in states]),
        slot_mask=torch.cat(slot_masks),
        latent_slots=torch.cat(latent_slots) if any_latents else None,
        last_token=torch.cat(tokens) if all(token is not None for token in tokens) else None,
        gates=next((state.gates for state in states if state.gates is not None), None),
        last_slot=None if bool((last_slot == width - 1).all()) else last_slot,
    )


def drop_hidden_slots(state: DecodeState, at_least: float = 0.0) -> DecodeState:
    """``state`` without the slots that no row sees (padding left behind by rows that have gone, tokens read
    again after latents): the same attention for every row, a shorter cache. Full-attention caches only.
    ``at_least``: leave the state as it is unless that fraction of its slots would go (the copy costs a pass
    over the whole cache, so a server compacts in bulk)."""
    if state.slot_mask is None:
        return state
    seen = state.slot_mask.bool().any(dim=0)  # (S,)
    hidden = int((~seen).sum())
    if hidden == 0 or hidden < at_least * seen.numel():
        return state
    slots = seen.nonzero()[:, 0]
    new = copy_state(state)
    new.cache = kv.keep_slots(state.cache, slots)
    new.slot_mask = state.slot_mask[:, slots]
    if state.latent_slots is not None:
        new.latent_slots = state.latent_slots[:, slots]
    if state.last_slot is not None:  # a row's last token is visible, so it keeps a slot: its new index
        new.last_slot = (seen.long().cumsum(0) - 1)[state.last_slot]
    return new


# ---------------------------------------------------------------------------- states after a context
def context_state(lm, context_ids: list[int], augment: bool, cache=None) -> DecodeState:
    """The base's cache after ``context_ids`` (read onto a copy of ``cache`` when given), and, if ``augment``,
    the coprocessor's latents written once at its end."""
    if not context_ids:
        raise InputError("the context must hold at least one token")
    ids = torch.tensor([context_ids], device=lm.device)
    with torch.no_grad():
        return lm.augment(ids, cache) if augment else lm.prefill(ids, cache)


def padded_batches_are_exact(config) -> bool:
    """Whether rows padded to a common length decode exactly as alone: not when a layer has a sliding window,
    whose size counts cache slots, padding included."""
    return all(kind == FULL for kind, _ in attention_layer_kinds(config))


@torch.no_grad()
def padded_context_states(lm, contexts: list[list[int]], augment: bool, cache=None, delay: int | None = None):
    """``context_state`` for many contexts in one batch (:func:`prefill_rows`), each followed, if ``augment``,
    by its own N_L latents.

    ``delay`` = N (with ``augment``): the latents are computed now but held in ``state.pending``, and the decode
    loop inserts them before generated token N (the paper's asynchronous protocol, Table 8; as
    ``stream.Generation`` with ``async_delay_tokens``).
    """
    if delay is not None and (not augment or delay < 0):
        raise InputError(f"delay needs augment=True and a value >= 0, got {delay}")
    state = prefill_rows(lm.base, contexts, cache)
    if augment:
        latents = compute_latents(lm, state)
        if delay is None:
            state = insert_latents(lm, state, latents)
        else:
            state.pending, state.pending_after = latents, delay
    return state
