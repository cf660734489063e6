"""Evaluation with and without augmentation: ahead-token loss, perplexity by position, continuation scoring,
generation and multiple choice (arXiv 2412.17747, sections 3.1-3.2)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch

from . import cache as kv
from . import state as steps
from .coprocessor import AugmentedCache, AugmentedLM

EVAL_POINTS_SEED = 1234  # validation points are fixed, so every evaluation scores the same tokens


@dataclass
class AheadEval:
    """Mean NLL of the N_A tokens after each augmentation point, by offset, with and without latents."""

    loss_augmented: float
    loss_base: float
    nll_by_offset_augmented: list[float]  # (N_A,)
    nll_by_offset_base: list[float]
    num_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Perplexity of the k-th token after the latents, with vs without augmentation."""
        lines = ["offset | ppl augmented | ppl base | change", "------ | ------------- | -------- | ------"]
        for offset, (aug, base) in enumerate(zip(self.nll_by_offset_augmented, self.nll_by_offset_base), 1):
            change = 100 * (math.exp(aug - base) - 1)
            lines.append(f"{offset:6d} | {math.exp(aug):13.3f} | {math.exp(base):8.3f} | {change:+5.1f}%")
        overall = 100 * (math.exp(self.loss_augmented - self.loss_base) - 1)
        lines.append(
            f"   all | {math.exp(self.loss_augmented):13.3f} | {math.exp(self.loss_base):8.3f} | {overall:+5.1f}%"
        )
        return "\n".join(lines)


@torch.no_grad()
def evaluate_ahead(lm: AugmentedLM, batches: list[torch.Tensor], seed: int = EVAL_POINTS_SEED) -> AheadEval:
    """Score every batch (B, T) at fixed seeded points, augmented (one pass) and with the plain base."""
    if not batches:
        raise ValueError("evaluation needs at least one validation batch")
    was_training = lm.training
    lm.eval()
    generator = torch.Generator().manual_seed(seed)
    num_ahead = lm.config.num_ahead
    sums = {"aug": torch.zeros(num_ahead), "base": torch.zeros(num_ahead)}
    counts = torch.zeros(num_ahead)
    for batch in batches:
        batch = batch.to(lm.device)
        points = lm.sample_points(batch.shape[0], batch.shape[1], generator)
        per_offset_count = _offset_counts(points, batch.shape[1], num_ahead)
        for key, out in (("aug", lm.training_loss(batch, points)), ("base", lm.unaugmented_loss(batch, points))):
            sums[key] += out.nll_by_offset.cpu() * per_offset_count
        counts += per_offset_count
    lm.train(was_training)
    by_offset = {key: (value / counts.clamp(min=1)) for key, value in sums.items()}
    total = counts.sum().clamp(min=1)
    return AheadEval(
        loss_augmented=float(sums["aug"].sum() / total),
        loss_base=float(sums["base"].sum() / total),
        nll_by_offset_augmented=by_offset["aug"].tolist(),
        nll_by_offset_base=by_offset["base"].tolist(),
        num_tokens=int(counts.sum()),
    )


def _interval(intervals: dict, index: int) -> str:
    if not intervals:
        return ""
    low, high = intervals["by_offset"][index]
    return f" [{low:+.2f}, {high:+.2f}]"


def _offset_counts(points: torch.Tensor, length: int, num_ahead: int) -> torch.Tensor:
    """(N_A,) how many points have a target at each offset (targets past the sequence end are not scored)."""
    offsets = torch.arange(num_ahead)
    return (points.cpu()[:, :, None] + 1 + offsets < length).sum(dim=(0, 1)).float()


# ---------------------------------------------------------------------------- perplexity by position (Table 1)
TABLE_OFFSETS = (1, 2, 4, 8, 16, 32)  # the offsets arXiv 2412.17747 Table 1 reports


@dataclass
class PositionEval:
    """NLL of the k-th token after the latents (k = 1..K), latents inserted every ``every`` tokens.

    The base numbers score exactly the same targets with no latents: x_{t+k} given x_0..x_{t+k-1}.
    """

    nll_augmented: list[float]  # (K,) mean NLL (nats) of the k-th token after the latents
    nll_base: list[float]  # (K,)
    tokens_by_offset: list[int]  # (K,) targets scored at each offset
    num_sequences: int
    seq_len: int
    every: int
    num_points: int  # augmentation points, all sequences together
    # Per sequence, per offset: NLL sums with and without latents and target counts, (S, K) each; the
    # bootstrap intervals resample sequences (tokens of one sequence are not independent).
    sequence_nll_augmented: list[list[float]] = field(default_factory=list)
    sequence_nll_base: list[list[float]] = field(default_factory=list)
    sequence_counts: list[list[int]] = field(default_factory=list)

    @property
    def num_offsets(self) -> int:
        return len(self.nll_augmented)

    def bootstrap(self, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
        """Percentile intervals of the relative perplexity change (percent), resampling whole sequences:
        {"by_offset": [(lo, hi)] * K, "overall": (lo, hi), "overall_change": value} for offsets 1..K together."""
        if not self.sequence_counts:
            return {}
        aug = torch.tensor(self.sequence_nll_augmented, dtype=torch.float64)  # (S, K)
        base = torch.tensor(self.sequence_nll_base, dtype=torch.float64)
        counts = torch.tensor(self.sequence_counts, dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(counts), (samples, len(counts)), generator=generator)  # (samples, S)

        def change(a, b, c):  # sums over the sequence axis -> percent change
            return 100 * (torch.exp((a.sum(-2) - b.sum(-2)) / c.sum(-2).clamp(min=1)) - 1)

        by_offset = change(aug[picks], base[picks], counts[picks])  # (samples, K)
        overall = change(aug[picks].sum(-1, keepdim=True), base[picks].sum(-1, keepdim=True), counts[picks].sum(-1, keepdim=True))
        low, high = (1 - level) / 2, 1 - (1 - level) / 2
        quantiles = torch.tensor([low, high], dtype=torch.float64)
        offset_ci = torch.quantile(by_offset, quantiles, dim=0).T.tolist()  # (K, 2)
        overall_ci = torch.quantile(overall[:, 0], quantiles).tolist()
        point = change(aug.sum(-1, keepdim=True), base.sum(-1, keepdim=True), counts.sum(-1, keepdim=True))
        return {"by_offset": offset_ci, "overall": overall_ci, "overall_change": float(point[0]), "level": level,
                "samples": samples}

    @property
    def perplexity_augmented(self) -> list[float]:
        return [math.exp(nll) for nll in self.nll_augmented]

    @property
    def perplexity_base(self) -> list[float]:
        return [math.exp(nll) for nll in self.nll_base]

    @property
    def relative_change(self) -> list[float]:
        """(K,) percent change of perplexity with latents vs without (negative = better), as in Table 1."""
        return [100 * (math.exp(aug - base) - 1) for aug, base in zip(self.nll_augmented, self.nll_base)]

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "perplexity_augmented": self.perplexity_augmented,
            "perplexity_base": self.perplexity_base,
            "relative_change_percent": self.relative_change,
            "relative_change_ci95": self.bootstrap(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PositionEval":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def table(self, offsets: tuple[int, ...] = TABLE_OFFSETS) -> str:
        """Markdown: perplexity of the k-th token after the latents, with vs without, and the change."""
        intervals = self.bootstrap()
        header = "change [95% interval]" if intervals else "change"
        lines = [f"| offset | ppl augmented | ppl base | {header} |", "|---:|---:|---:|---:|"]
        for offset in [k for k in offsets if k <= self.num_offsets]:
            index = offset - 1
            lines.append(
                f"| {offset} | {self.perplexity_augmented[index]:.3f} | {self.perplexity_base[index]:.3f} "
                f"| {self.relative_change[index]:+.2f}%{_interval(intervals, index)} |"
            )
        if intervals:
            low, high = intervals["overall"]
            lines.append(f"| 1..{self.num_offsets} | | | {intervals['overall_change']:+.2f}% [{low:+.2f}, {high:+.2f}] |")
        return "\n".join(lines)


def position_points(length: int, num_offsets: int, every: int = 1) -> torch.Tensor:
    """(P,) points 0, every, 2*every, ... that leave all ``num_offsets`` targets inside a sequence of ``length``.

    A sequence too short for one full window falls back to every point in 0..length-2 (partial windows).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    last = length - 1 - num_offsets
    return torch.arange(0, (last if last >= 0 else length - 2) + 1, every)


@torch.no_grad()
def evaluate_positions(
    lm: AugmentedLM,
    batches: list[torch.Tensor],
    num_offsets: int = 32,
    every: int = 1,
    max_queries: int = 2048,
    progress: bool = False,
) -> PositionEval:
    """Perplexity by position (arXiv 2412.17747, section 3.1) over (B, T) batches, with and without latents.

    Augmented: the one-pass block-masked loss with N_A = ``num_offsets``, the points of a sequence split into
    chunks of at most ``max_queries`` new base tokens per row (memory and attention cost stay bounded).
    Base: one plain forward per batch.
    """
    if not batches:
        raise ValueError("perplexity by position needs at least one batch")
    was_training = lm.training
    lm.eval()
    group_size = lm.config.num_latents + num_offsets - 1  # new base tokens per point
    points_per_chunk = max(1, max_queries // group_size)
    sums = {"aug": torch.zeros(num_offsets, dtype=torch.float64), "base": torch.zeros(num_offsets, dtype=torch.float64)}
    counts = torch.zeros(num_offsets, dtype=torch.float64)
    sequence_nll: dict[str, list] = {"aug": [], "base": []}
    sequence_counts: list[list[int]] = []
    num_points = num_sequences = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="perplexity by position", unit="batch", dynamic_ncols=True)
    for batch in iterator:
        batch = batch.to(lm.device)
        rows, length = batch.shape
        points = position_points(length, num_offsets, every).to(lm.device)
        all_points = points.expand(rows, -1)
        per_offset = _offset_counts(all_points, length, num_offsets).double()
        for row in range(rows):  # one sequence at a time: its sums feed the bootstrap over sequences
            sequence = batch[row : row + 1]
            base = lm.unaugmented_loss(sequence, points[None], num_ahead=num_offsets)
            sequence_sums = {"base": base.nll_by_offset.cpu().double() * per_offset / rows, "aug": 0.0}
            for chunk in points.split(points_per_chunk):
                # Targets of this chunk end at t_max + num_offsets: the rest of the sequence is not needed.
                end = min(length, int(chunk[-1]) + num_offsets + 1)
                out = lm.training_loss(sequence[:, :end], chunk[None], num_ahead=num_offsets)
                sequence_sums["aug"] = sequence_sums["aug"] + (
                    out.nll_by_offset.cpu().double() * _offset_counts(chunk[None], end, num_offsets).double()
                )
            for key in ("aug", "base"):
                sums[key] += sequence_sums[key]
            sequence_nll["aug"].append(sequence_sums["aug"].tolist())
            sequence_nll["base"].append(sequence_sums["base"].tolist())
            sequence_counts.append([int(c) for c in per_offset / rows])
        counts += per_offset
        num_points += rows * len(points)
        num_sequences += rows
    lm.train(was_training)
    safe = counts.clamp(min=1)
    return PositionEval(
        nll_augmented=(sums["aug"] / safe).tolist(),
        nll_base=(sums["base"] / safe).tolist(),
        tokens_by_offset=[int(c) for c in counts],
        num_sequences=num_sequences,
        seq_len=max(int(b.shape[1]) for b in batches),
        every=every,
        num_points=num_points,
        sequence_nll_augmented=sequence_nll["aug"],
        sequence_nll_base=sequence_nll["base"],
        sequence_counts=sequence_counts,
    )


# ---------------------------------------------------------------------------- scoring and generation after a context
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation; the continuation's ids are those of
    ``context + continuation`` after the context's own ids, so word-boundary merges are kept.
    """
    if not context:
        raise ValueError("the context must be non-empty: the coprocessor reads its cache")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    return context_ids, whole[len(context_ids):]


def encode(tokenizer, text: str) -> list[int]:
    """A prompt's ids, with the tokenizer's own special tokens (BOS for models that expect one)."""
    return list(tokenizer(text).input_ids)


def context_state(lm: AugmentedLM, context_ids: list[int], augment: bool, cache=None) -> AugmentedCache:
    """The base's cache after ``context_ids`` (read onto a copy of ``cache`` when given), and, if ``augment``,
    the coprocessor's latents written once at its end."""
    if not context_ids:
        raise ValueError("the context must hold at least one token")
    ids = torch.tensor([context_ids], device=lm.device)
    with torch.no_grad():
        return lm.augment(ids, cache) if augment else lm.prefill(ids, cache)


@torch.no_grad()
def continuation_logprobs(
    lm: AugmentedLM, state: AugmentedCache, continuations: list[list[int]]
) -> list[tuple[float, bool]]:
    """(sum of log p, greedy?) of each continuation after ``state``, each scored from a copy of its cache."""
    results = []
    for continuation in continuations:
        if not continuation:
            results.append((0.0, True))
            continue
        logits = [state.logits]  # (1, V): predicts the first continuation token
        if len(continuation) > 1:
            inputs = torch.tensor([continuation[:-1]], device=lm.device)
            logits.append(steps.feed(lm.base, steps.copy_state(state), inputs, logits_to_keep=0)[0])
        log_probs = torch.log_softmax(torch.cat(logits).float(), dim=-1)  # (n, V)
        targets = torch.tensor(continuation, device=lm.device)
        total = log_probs.gather(-1, targets[:, None]).sum().item()
        results.append((total, bool((log_probs.argmax(-1) == targets).all())))
    return results


@torch.no_grad()
def generate_until(
    lm: AugmentedLM,
    tokenizer,
    state: AugmentedCache,
    max_new_tokens: int,
    stop: tuple[str, ...] | list[str] = (),
) -> str:
    """Greedy text after ``state`` (extended in place), cut before the first stop sequence or at EOS."""
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    logits = state.logits
    for step in range(max_new_tokens):
        token = int(logits[0].argmax())
        if token == eos:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if any(sequence in text for sequence in stop):
            break
        if step == max_new_tokens - 1:
            break
        steps.feed_token(lm.base, state, torch.tensor([token], device=lm.device))
        logits = state.logits
    return cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)


# ---------------------------------------------------------------------------- batched generation
@dataclass
class PaddedState:
    """Rows of different lengths decoding in step. Each row's cache slots are: the shared context, its own
    ids, padding up to the longest row (masked out for good), then latents and generated tokens."""

    cache: object  # DynamicCache, (B, H_kv, S, D) per layer
    attention_mask: torch.Tensor  # (B, S) long: 1 for a visible slot, 0 for padding (or a token read again)
    next_position: torch.Tensor  # (B,) position id of each row's next token (padding takes no positions)
    logits: torch.Tensor  # (B, V) base logits predicting each row's next token
    last_token: torch.Tensor  # (B,) each row's last token id
    last_slot: torch.Tensor  # (B,) the slot that token sits in
    pending: torch.Tensor | None = None  # (B, N_L, H) latents still to insert, after ``pending_after`` tokens
    pending_after: int = 0
    latent_slots: torch.Tensor | None = None  # (B, S) bool: slots holding latents
    gates: torch.Tensor | None = None  # (num_layers, H) the coprocessor's latent gates, when gated

    def select(self, rows: torch.Tensor) -> "PaddedState":
        """The rows ``rows`` (1D index), in that order: finished rows leave the batch."""
        def pick(tensor):
            return None if tensor is None else tensor[rows]

        return PaddedState(
            kv.select_rows(self.cache, rows), self.attention_mask[rows], self.next_position[rows], self.logits[rows],
            self.last_token[rows], self.last_slot[rows], pick(self.pending), self.pending_after,
            pick(self.latent_slots), self.gates,
        )

    def step(self, lm: AugmentedLM, tokens: torch.Tensor) -> None:
        """Append ``tokens`` (B, n) to every row, in place; logits follow the last one."""
        width = tokens.shape[1]
        logits, self.attention_mask, self.latent_slots = steps.base_forward(
            lm.base, self.cache, steps.positions(self.next_position, width, tokens.shape[0], lm.device),
            input_ids=tokens, slot_mask=self.attention_mask, latent_slots=self.latent_slots, gates=self.gates,
        )
        self.next_position, self.logits = self.next_position + width, logits[:, -1]
        self.last_token, self.last_slot = tokens[:, -1], torch.full_like(self.last_slot, self.attention_mask.shape[1] - 1)

    def insert(self, lm: AugmentedLM, latents: torch.Tensor) -> None:
        """``latents`` (B, N_L, H) into every row at its current point, as state.insert_latents does."""
        readout, self.gates = steps.recipe(lm)
        batch, num_latents = latents.shape[:2]
        rows = torch.arange(batch, device=lm.device)
        mask, start = self.attention_mask, self.next_position
        if readout == "token":  # each row's last token is read again after its latents, at its own position
            mask, start = mask.clone(), start - 1
            mask[rows, self.last_slot] = 0
            latent_positions = start[:, None].expand(-1, num_latents)
        else:
            latent_positions = steps.positions(start, num_latents, batch, lm.device)
        logits, mask, latent_slots = steps.base_forward(
            lm.base, self.cache, latent_positions, inputs_embeds=latents, slot_mask=mask,
            latent_slots=self.latent_slots, gates=self.gates, is_latent=True,
        )
        if readout == "token":
            logits, mask, latent_slots = steps.base_forward(
                lm.base, self.cache, start[:, None], input_ids=self.last_token[:, None], slot_mask=mask,
                latent_slots=latent_slots, gates=self.gates,
            )
            self.last_slot = torch.full_like(self.last_slot, mask.shape[1] - 1)
        else:
            self.next_position = self.next_position + num_latents
        self.attention_mask, self.latent_slots, self.logits = mask, latent_slots, logits[:, -1]


def padded_batches_are_exact(config) -> bool:
    """Whether rows padded to a common length decode exactly as alone: not when a layer has a sliding window,
    whose size counts cache slots, padding included."""
    from .masks import FULL, attention_layer_kinds

    return all(kind == FULL for kind, _ in attention_layer_kinds(config))


@torch.no_grad()
def padded_context_states(
    lm: AugmentedLM, contexts: list[list[int]], augment: bool, cache=None, delay: int | None = None
) -> PaddedState:
    """``context_state`` for many contexts in one batch: each read onto (a copy of) the one-row ``cache`` when
    given, padded on the right to the longest, and, if ``augment``, followed by its own N_L latents.

    ``delay`` = N (with ``augment``): the latents are computed now but held in ``state.pending``, and
    ``generate_until_batch`` inserts them after N generated tokens (the paper's asynchronous protocol, Table 8;
    as ``generate.Generation`` with ``async_delay_tokens``).
    """
    if delay is not None and (not augment or delay < 0):
        raise ValueError(f"delay needs augment=True and a value >= 0, got {delay}")
    if not contexts or any(not ids for ids in contexts):
        raise ValueError("every context must hold at least one token")
    batch, device = len(contexts), lm.device
    lengths = torch.tensor([len(ids) for ids in contexts], device=device)  # (B,)
    width = int(lengths.max())
    ids = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in contexts], device=device)  # (B, W)
    if cache is None:
        past = kv.new_cache(lm.base.config)
    else:  # one row needs no regrouping, which keeps sliding-window caches usable
        past = kv.copy_cache(cache) if batch == 1 else kv.repeat_batch(cache, batch)
    start = 0 if cache is None else kv.cache_length(past)
    real = (torch.arange(width, device=device) < lengths[:, None]).long()  # (B, W)
    mask = torch.cat([real.new_ones(batch, start), real], dim=1)  # (B, start + W)
    last = lengths - 1
    keep = torch.unique(last)  # sorted columns whose logits some row needs
    out = lm.base(
        input_ids=ids, cache=past, position_ids=start + torch.arange(width, device=device).expand(batch, -1),
        attention_mask=mask, use_cache=True, logits_to_keep=keep,
    )
    logits = out.logits[torch.arange(batch, device=device), torch.searchsorted(keep, last)]  # (B, V)
    rows = torch.arange(batch, device=device)
    state = PaddedState(past, mask, start + lengths, logits, ids[rows, last], start + last)
    if augment:
        num_latents = lm.config.num_latents
        positions = state.next_position[:, None] + torch.arange(num_latents, device=device)  # (B, N_L)
        soft_mask = steps.coprocessor_mask(lm, mask, None, num_latents)
        latents = lm.coprocessor(kv.first_layers(past, lm.num_coprocessor_layers), positions, attention_mask=soft_mask)
        if delay is None:
            state.insert(lm, latents)
        else:
            state.pending, state.pending_after = latents, delay
    return state


@torch.no_grad()
def generate_until_batch(
    lm: AugmentedLM,
    tokenizer,
    state: PaddedState,
    max_new_tokens: int,
    stop: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """``generate_until`` for every row of ``state`` at once (greedy, same stopping rules, same texts).

    ``state`` is consumed. Rows that finish leave the batch, so a long answer does not keep the others' caches
    growing. Latents pending in ``state`` go in before token ``state.pending_after`` is chosen.
    """
    eos = tokenizer.eos_token_id
    tokens: list[list[int]] = [[] for _ in range(state.logits.shape[0])]
    active = list(range(len(tokens)))  # original row of each row still in ``state``
    for step in range(max_new_tokens):
        if state.pending is not None and step == state.pending_after:
            latents, state.pending = state.pending, None
            state.insert(lm, latents)
        chosen = state.logits.argmax(dim=-1)  # (B_active,)
        still = []
        for slot, row in enumerate(active):
            token = int(chosen[slot])
            if token == eos:
                continue
            tokens[row].append(token)
            if not any(sequence in tokenizer.decode(tokens[row], skip_special_tokens=True) for sequence in stop):
                still.append(slot)
        if not still or step == max_new_tokens - 1:
            break
        if len(still) < len(active):
            keep = torch.tensor(still, device=lm.device)
            state, chosen, active = state.select(keep), chosen[keep], [active[slot] for slot in still]
        state.step(lm, tokens=chosen[:, None])
    return [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop) for row in tokens]


def cut_at_stop(text: str, stop) -> str:
    """``text`` before the earliest occurrence of any stop sequence."""
    cuts = [text.find(sequence) for sequence in stop if sequence and sequence in text]
    return text[: min(cuts)] if cuts else text


# ---------------------------------------------------------------------------- multiple choice by log-likelihood
@dataclass
class McEval:
    """Accuracy by summed log-likelihood, and by log-likelihood per character of the choice (lm-eval's acc_norm)."""

    acc_augmented: float | None
    acc_norm_augmented: float | None
    acc_base: float | None
    acc_norm_base: float | None
    num_items: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        def cell(value):
            return "-" if value is None else f"{100 * value:.2f}"

        return "\n".join([
            "| condition | acc | acc_norm |", "|---|---:|---:|",
            f"| augmented | {cell(self.acc_augmented)} | {cell(self.acc_norm_augmented)} |",
            f"| base | {cell(self.acc_base)} | {cell(self.acc_norm_base)} |",
        ])


def read_mc_items(path) -> list[dict]:
    """Rows ``{"context": str, "choices": [str, ...], "gold": int}`` of a JSONL file, checked."""
    from .data import DataError, read_jsonl

    items = []
    for number, row in read_jsonl(path):
        ok = (
            isinstance(row, dict) and isinstance(row.get("context"), str) and row["context"]
            and isinstance(row.get("choices"), list) and len(row["choices"]) >= 2
            and all(isinstance(choice, str) and choice for choice in row["choices"])
            and isinstance(row.get("gold"), int) and 0 <= row["gold"] < len(row["choices"])
        )
        if not ok:
            raise DataError(
                f"{path} line {number}: expected {{\"context\": non-empty str, \"choices\": [>= 2 non-empty str], "
                f"\"gold\": index of the right choice}}, got {json.dumps(row)[:120]}"
            )
        items.append(row)
    if not items:
        raise DataError(f"{path} holds no multiple-choice rows")
    return items


@torch.no_grad()
def evaluate_mc(
    lm: AugmentedLM,
    tokenizer,
    items: list[dict],
    delimiter: str = " ",
    conditions: tuple[bool, ...] = (True, False),
    progress: bool = False,
) -> tuple[McEval, list[dict]]:
    """Score ``delimiter + choice`` after each context; augmented = latents once at the end of the context.

    Returns the accuracies and one record per item and condition (log-likelihoods, predictions).
    """
    was_training = lm.training
    lm.eval()
    records = []
    correct = {(augment, norm): 0 for augment in conditions for norm in (False, True)}
    iterator = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="multiple choice", unit="item", dynamic_ncols=True)
    for index, item in enumerate(iterator):
        pairs = [encode_pair(tokenizer, item["context"], delimiter + choice) for choice in item["choices"]]
        context_ids = pairs[0][0]
        if any(pair[0] != context_ids for pair in pairs):
            raise ValueError(f"item {index}: the choices change how the context is tokenised")
        for augment in conditions:
            state = context_state(lm, context_ids, augment)
            scores = [logprob for logprob, _ in continuation_logprobs(lm, state, [pair[1] for pair in pairs])]
            per_char = [score / max(1, len(choice)) for score, choice in zip(scores, item["choices"])]
            prediction = max(range(len(scores)), key=scores.__getitem__)
            prediction_norm = max(range(len(per_char)), key=per_char.__getitem__)
            correct[(augment, False)] += prediction == item["gold"]
            correct[(augment, True)] += prediction_norm == item["gold"]
            records.append({
                "index": index, "augmented": augment, "gold": item["gold"], "loglikelihoods": scores,
                "prediction": prediction, "prediction_norm": prediction_norm,
            })
    lm.train(was_training)

    def accuracy(augment: bool, norm: bool) -> float | None:
        return correct[(augment, norm)] / len(items) if augment in conditions and items else None

    result = McEval(
        accuracy(True, False), accuracy(True, True), accuracy(False, False), accuracy(False, True), len(items)
    )
    return result, records
