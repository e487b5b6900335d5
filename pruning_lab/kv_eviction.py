"""KV-cache eviction during generation: StreamingLLM, H2O, TOVA, SnapKV and LazyEviction (chapter 04).

A decoder keeps the keys and values of every token it has seen. Eviction keeps only ``budget`` of
them per layer and KV head. The policies differ only in *which* tokens they keep, so each is one
small dataclass with one ``score()`` (higher = keep) over one shared mechanism. The mechanism never
asks what type a policy is; it asks the policy:

- ``keeps_everything``: the full cache (the reference) never evicts;
- ``floor(budget)``: what the policy always keeps (sinks + its recent or observation window), so
  ``budget - floor(budget)`` slots are left for it to *choose* (``free_slots`` also subtracts the
  room the next chunk of new tokens needs at decode time);
- ``evict_every``: how many decoding steps pass between two evictions (1 for the papers' per-step
  eviction, the observation window for LazyEviction);
- ``per_head``: whether each KV head chooses its own tokens, or the layer keeps one set (TOVA).

Pieces:

- ``EvictingCache`` is a ``transformers`` ``Cache`` whose layers (``EvictingLayer``) count the tokens
  they have seen, remember the full-sequence position of every kept slot, and store only compact
  tensors (decoding: buffers of the budget's size that new tokens are appended to in place; a token
  evicted alone, as at every step of H2O, TOVA and StreamingLLM, is overwritten by the newest slot
  instead of gathering the whole cache again). It plugs into
  ``model.generate(..., past_key_values=cache)`` and into a manual decode loop.
- ``evicting(model, policy, budget, moment)`` is the context manager that creates the cache and the
  hooks: the query of every layer (rotated like the keys) is captured from ``q_proj`` and the rotary
  ``position_embeddings``, so the attention a policy needs is computed from the current queries and
  the cached keys, with the model's default (SDPA) attention left as it is. The hooks are removed in
  ``finally``.
- ``Prefill`` reads a batch of prompts once with the full cache and the statistics of several
  policies, so that prompt compression by many (policy, budget) settings shares one prefill.

Two moments to evict, for every policy:

- ``moment="prompt"``: prompt compression (SnapKV, kvpress). The prompt is prefilled whole; before
  the first decoding step the cache is cut to ``budget`` tokens, chosen with the whole prompt
  (question included) in view; decoding then grows it again.
- ``moment="decode"``: the cache never holds more than ``budget`` keys (StreamingLLM, H2O, TOVA,
  LazyEviction): ``generate`` reads the prompt in small chunks (32 tokens unless told), and before
  each chunk or decoding step the cache is cut to ``budget - max(chunk, evict_every)`` tokens, chosen
  among the tokens already read, so the new ones fit.

The budget is a number of tokens per KV head of each layer (an int ``>= 2``), or a fraction in
(0, 1] of each row's own context (its real prompt tokens, never padding, + the new tokens). It is
resolved once per row by ``plan_budget``, which ``generate`` and ``fits`` share; a budget that leaves
a policy no room to choose is refused before any model work, with the policy's fixed parts named.
Rows of a batch may have different budgets: a row keeps its own budget of real tokens, and the slots
it does not use are masked like padding (tested against one row at a time).

Positions: new tokens get the positions of the full sequence (``get_seq_length`` is the number of
tokens seen, not kept), and the attention mask the model sees is rebuilt before every forward from
the validity of the kept slots (left padding and unused slots first), so it lines up by construction.
The same number of slots is kept in every layer: transformers builds one mask for all layers from
layer 0's sizes, so per-layer budgets (PyramidKV-style) are left out.
"""

from __future__ import annotations

import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicLayer

from .data import left_padded as _batch  # notebook 04 calls kv._batch too
from .eval import cache_bytes
from .needle import is_correct
from .stats import paired_binary, verdict_words

MOMENTS = ("prompt", "decode")
DECODE_CHUNK = 32  # tokens of the prompt read per forward at decode time (generate's default)


# --------------------------------------------------------------------------- policies


@dataclass
class Policy:
    """What every policy tells the mechanism. Subclasses override ``score`` (higher = keep) and, when
    they protect a window of recent tokens, ``recent``."""

    name: ClassVar[str] = "policy"
    keeps_everything: ClassVar[bool] = False
    observes: ClassVar[bool] = False  # every query's attention must pass through ``observe`` once
    observes_sum: ClassVar[bool] = False  # ... and only its sum over queries matters
    stochastic: ClassVar[bool] = False  # draws random numbers: report an expectation over draws
    recent_label: ClassVar[str] = "recent"
    sinks: int = 0
    per_head: bool = True  # each KV head chooses its own tokens (False: one set per layer)

    @property
    def queries(self) -> int:
        """How many of the latest queries ``score`` needs (their attention is computed for it)."""
        return 0

    @property
    def evict_every(self) -> int:
        """Decoding steps between two evictions (the cache is cut that many slots deeper)."""
        return 1

    def recent(self, budget: int) -> int:
        """The most recent tokens always kept at this budget."""
        return 0

    def floor(self, budget: int) -> int:
        """Tokens the policy always keeps at this budget, whatever their scores."""
        return self.sinks + self.recent(budget)

    def fixed_parts(self, budget: int) -> dict[str, int]:
        """The always-kept parts by name (for tables and error messages)."""
        parts = {"sinks": self.sinks, self.recent_label: self.recent(budget)}
        return {k: v for k, v in parts.items() if v}

    def observe(self, state: dict, attn: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                valid: torch.Tensor | None = None) -> None:
        """Update running statistics from the attention (B, H, Q, S) of new queries over the keys at
        ``key_pos`` (``valid``: False for padding and unused slots); default: none."""

    def score(self, state: dict, attn: torch.Tensor | None, key_pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class FullCache(Policy):
    """The reference: keep everything (never evicts, whatever the budget)."""

    name: ClassVar[str] = "full"
    keeps_everything: ClassVar[bool] = True

    def score(self, state, attn, key_pos):
        return key_pos.float()


@dataclass
class StreamingLLM(Policy):
    """Xiao et al. 2024: keep the first ``sinks`` tokens (attention sinks) and the most recent ones."""

    name: ClassVar[str] = "streaming_llm"
    sinks: int = 4

    def score(self, state, attn, key_pos):
        return key_pos.float()  # the most recent win; the sinks are protected by the mechanism


@dataclass
class Recency(StreamingLLM):
    """The trivial baseline: the last ``budget`` tokens, nothing else (StreamingLLM without sinks)."""

    name: ClassVar[str] = "recency"
    sinks: int = 0


@dataclass
class H2O(Policy):
    """Zhang et al. 2023: heavy hitters (largest attention accumulated over all queries so far) plus
    the most recent tokens, ``recent_ratio`` of the budget (half and half, as published)."""

    name: ClassVar[str] = "h2o"
    observes: ClassVar[bool] = True
    observes_sum: ClassVar[bool] = True
    recent_ratio: float = 0.5

    def recent(self, budget):
        return int(budget * self.recent_ratio)

    def observe(self, state, attn, key_pos, query_pos, valid=None):
        acc = state.get("acc")
        s = attn.shape[-1]
        if acc is None:
            acc = attn.new_zeros(attn.shape[0], attn.shape[1], s)
        elif acc.shape[-1] < s:  # keys appended since the last observation start from zero
            acc = F.pad(acc, (0, s - acc.shape[-1]))
        state["acc"] = acc + attn.sum(2)

    def score(self, state, attn, key_pos):
        return state["acc"]


@dataclass
class TOVA(Policy):
    """Oren et al. 2024: evict the tokens the current (latest) query attends to least. As in the paper's
    code (and kvpress), the attention is averaged over *all* query heads and each layer keeps one set of
    tokens; ``per_head=True`` is our variant in which each KV head chooses (its query heads averaged)."""

    name: ClassVar[str] = "tova"
    per_head: bool = False

    @property
    def queries(self):
        return 1

    def score(self, state, attn, key_pos):
        return attn[:, :, -1]


@dataclass
class TOVAPerHead(TOVA):
    """The variant of TOVA in which each KV head chooses its own tokens (its query heads averaged)."""

    name: ClassVar[str] = "tova_per_head"
    per_head: bool = True


@dataclass
class SnapKV(Policy):
    """Li et al. 2024, as kvpress computes it: the attention of the last ``window`` queries (the
    observation window) over the keys *before* the window, averaged over the window, smoothed by
    average pooling of ``kernel_size`` (zero padding counted, as ``avg_pool1d``'s default), averaged
    over the query heads of a KV group; the window itself is always kept. kvpress's defaults: window
    64, kernel 5 (the SnapKV paper's LongBench runs use window 32 and kernel 7)."""

    name: ClassVar[str] = "snapkv"
    recent_label: ClassVar[str] = "observation window"
    window: int = 64
    kernel_size: int = 5

    @property
    def queries(self):
        return self.window

    def recent(self, budget):
        return self.window

    def score(self, state, attn, key_pos):
        votes = attn.mean(2)  # (B, H, S): mean over the window's queries
        # keys inside the window vote nothing: pooling then sees zeros there, as kvpress pools over the
        # keys before the window with zero padding at its right end
        newest = key_pos.amax(-1, keepdim=True)
        votes = votes.masked_fill(key_pos > newest - self.window, 0.0)
        b, h, s = votes.shape
        pooled = F.avg_pool1d(votes.reshape(b * h, 1, s), self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return pooled.reshape(b, h, s)


@dataclass
class LazyEviction(Policy):
    """Zhang et al. 2025 (our reading of the paper's description): evict lazily, once per
    ``observation_window`` decoding steps, and rank tokens by their recurrence. A token is *attended*
    at a step when its attention is at least ``threshold`` × the uniform share 1/n. For each token we
    track the last step it was attended and its maximum recurrence interval (MRI: the longest gap
    between two attended steps seen so far). Score = MRI − (steps since last attended): a token that
    usually comes back after k steps is kept until it has been silent for longer than k; tokens never
    attended twice rank by how recently they were attended. The most recent ``observation_window``
    tokens are always kept. Defaults: window 16 and threshold 1.0 are ours — the paper's exact values
    could not be read here; the notebook says so."""

    name: ClassVar[str] = "lazy_eviction"
    observes: ClassVar[bool] = True
    recent_label: ClassVar[str] = "observation window"
    observation_window: int = 16
    threshold: float = 1.0

    @property
    def evict_every(self):
        return self.observation_window

    def recent(self, budget):
        return self.observation_window

    def observe(self, state, attn, key_pos, query_pos, valid=None):
        s = attn.shape[-1]
        seen = key_pos[:, :, None, :] <= query_pos[None, None, :, None]
        if valid is not None:
            seen = seen & valid[:, :, None, :]
        n = seen.sum(-1, keepdim=True).clamp(min=1)  # the keys the query saw (padding excluded)
        hit = attn * n >= self.threshold  # (B, H, Q, S): attended at that step
        last, mri = state.get("last"), state.get("mri")
        if last is None:
            last = key_pos.float().clone()  # a token counts as attended when it is born
            mri = torch.zeros_like(last)
        elif last.shape[-1] < s:
            new = key_pos[..., last.shape[-1]:].float()
            last, mri = torch.cat([last, new], -1), torch.cat([mri, torch.zeros_like(new)], -1)
        # queries along the last dimension (B, H, S, Q): a running max over the last dimension is fast on CPU
        hit = hit.transpose(2, 3)
        steps = torch.where(hit, query_pos.float(), -math.inf)
        # last attended step before each query: running max over the queries, seeded with `last`
        prev = torch.cat([last[..., None], steps], -1).cummax(-1).values  # (B, H, S, Q+1)
        gaps = torch.where(hit, steps - prev[..., :-1], -math.inf)
        state["mri"] = torch.maximum(mri, gaps.amax(-1).clamp(min=0))
        state["last"] = prev[..., -1]
        state["now"] = float(query_pos[-1])

    def score(self, state, attn, key_pos):
        return state["mri"] - (state["now"] - state["last"])


@dataclass
class Random(Policy):
    """The chance baseline: ``sinks`` first tokens and the last ``window`` tokens (the question) kept,
    the rest of the budget drawn uniformly at random among the other tokens, independently per layer,
    KV head and row. Its accuracy is reported as an expectation over draws."""

    name: ClassVar[str] = "random"
    stochastic: ClassVar[bool] = True
    sinks: int = 4
    window: int = 32
    seed: int = 0
    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def recent(self, budget):
        return self.window

    def score(self, state, attn, key_pos):
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(key_pos.shape, generator=self._generator).to(key_pos.device)


@dataclass
class Oracle(Policy):
    """Not a paper's policy but a check of the mechanism: keeps the given full-sequence ``positions``
    (e.g. the inserted fact) before anything else, then the most recent tokens. ``positions`` is one
    tuple for every row, or one tuple per row (positions in the padded batch). If the model answers
    under this policy where the others fail, the failures come from their choices, not the mechanism."""

    name: ClassVar[str] = "oracle"
    positions: tuple = ()

    def score(self, state, attn, key_pos):
        per_row = bool(self.positions) and isinstance(self.positions[0], (tuple, list))
        rows = self.positions if per_row else [self.positions] * key_pos.shape[0]
        if len(rows) != key_pos.shape[0]:
            raise ValueError(f"Oracle has positions for {len(rows)} rows, the batch has {key_pos.shape[0]}.")
        width = max(1, max(len(r) for r in rows))
        table = torch.full((len(rows), width), -1, dtype=key_pos.dtype, device=key_pos.device)
        for i, r in enumerate(rows):
            table[i, :len(r)] = torch.tensor(r, dtype=key_pos.dtype)
        wanted = (key_pos[..., None] == table[:, None, None, :]).any(-1)
        return key_pos.float() + 1e9 * wanted


POLICIES = {p.name: p for p in (FullCache, StreamingLLM, Recency, H2O, TOVA, TOVAPerHead, SnapKV, LazyEviction, Random)}

# one look per policy in every figure: its own colour and its own marker (the baselines dotted and grey/black,
# TOVA's per-head variant dashed in a colour of its own)
POLICY_STYLES = {
    "full": dict(color="k", ls="--", marker=""),
    "recency": dict(color="k", ls=":", marker="h"),
    "random": dict(color="0.55", ls=":", marker="x"),
    "streaming_llm": dict(color="C0", ls="-", marker="o"),
    "h2o": dict(color="C1", ls="-", marker="s"),
    "tova": dict(color="C2", ls="-", marker="^"),
    "tova_per_head": dict(color="C6", ls="--", marker="v"),
    "snapkv": dict(color="C3", ls="-", marker="D"),
    "lazy_eviction": dict(color="C4", ls="-", marker="P"),
    "oracle": dict(color="C7", ls="none", marker="*"),
}


def get_policy(policy) -> Policy:
    """A policy instance from a name (``"h2o"``) or an instance."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]()
    raise ValueError(f"Unknown KV policy {policy!r}: choose one of {sorted(POLICIES)} or pass a policy instance.")


# --------------------------------------------------------------------------- budgets


_BUDGET_KINDS = "give a number of tokens (int >= 2) or a fraction of the context in (0, 1]"


def check_budget_value(budget) -> None:
    """Refuse, before any model work, a budget that is not ``None``, a token count (an int >= 2) or a
    fraction of the context (a float in (0, 1]). The type decides: ints count tokens, floats are
    fractions, so ``1.0`` is the whole context and ``1`` (1 token or 100%?) is refused as ambiguous."""
    if budget is None:
        return
    if isinstance(budget, str):
        raise ValueError(f"budget={budget!r} is a string: {_BUDGET_KINDS}.")
    if isinstance(budget, bool) or type(budget).__name__ == "bool_":
        raise ValueError(f"budget={budget!r} is a bool: {_BUDGET_KINDS}, or None to keep every token.")
    if not isinstance(budget, numbers.Real):
        raise ValueError(f"budget={budget!r} ({type(budget).__name__}) is not a number: {_BUDGET_KINDS}.")
    if isinstance(budget, numbers.Integral):
        if budget == 1:
            raise ValueError("budget=1 is ambiguous: 1 token or 100% of the context? Ints count tokens, floats are "
                             "fractions of the context: give 1.0 to keep the whole context, None for no eviction, "
                             "or >= 2 tokens.")
        if budget <= 0:
            raise ValueError(f"budget={budget} tokens: a token count must be >= 2 (ints count tokens; a fraction "
                             "of the context is a float in (0, 1]).")
        return
    if math.isnan(budget):
        raise ValueError(f"budget=nan: {_BUDGET_KINDS}.")
    if not 0 < budget <= 1:
        whole = math.isfinite(budget) and float(budget).is_integer() and budget > 1
        hint = f"; for {int(budget)} tokens give the int {int(budget)}" if whole else ""
        raise ValueError(f"budget={budget} is a float, i.e. a fraction of the context, and must be in (0, 1]{hint}.")


def resolve_budget(budget, context: int) -> int | None:
    """``None`` (keep all), a token count (int >= 2), or a fraction in (0, 1] of ``context`` tokens
    (checked by ``check_budget_value``: ``1`` is refused as ambiguous, write ``1.0`` for the whole context)."""
    check_budget_value(budget)
    if budget is None:
        return None
    if isinstance(budget, numbers.Integral):
        return int(budget)
    return max(1, round(float(budget) * context))


def _check_tokens(value, name: str = "budget", hint: str = "for a fraction of the context give "
                  "round(fraction * context), or pass the fraction to generate") -> None:
    """Refuse a token budget that is not an int (``evicting`` takes tokens; ``fits`` without a context)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} is not a number of tokens: give an int here ({hint}).")


def _check_steps(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r}: give an int >= 1 (the number of tokens to generate; the first is "
                         "the prompt's next token).")


class NoRoom(ValueError):
    """A budget that leaves the policy no slot to choose (``fits`` answers False for it)."""


def free_slots(policy, budget: int, moment: str = "prompt", chunk: int = DECODE_CHUNK,
               evict_every: int | None = None) -> int | None:
    """Slots the policy *chooses* at this token budget: the budget minus what it always keeps, and at
    decode time minus the room the next chunk (or ``evict_every`` steps) needs. ``None``: keeps all."""
    p = get_policy(policy)
    if p.keeps_everything:
        return None
    every = p.evict_every if evict_every is None else evict_every
    reserve = max(chunk, every) if moment == "decode" else 0
    return budget - p.floor(budget) - reserve


def _describe(p: Policy, budget: int) -> str:
    parts = p.fixed_parts(budget)
    return " + ".join(f"{v} {k}" for k, v in parts.items()) or "nothing"


def plan_budget(policy, budget, *, context: int | Sequence[int], moment: str = "prompt",
                chunk: int = DECODE_CHUNK, evict_every: int | None = None,
                prompt: Sequence[int] | None = None) -> list[int] | None:
    """The one resolution of a budget that ``generate``, ``fits`` and the notebook share: per row, the
    token budget resolved from that row's ``context`` (its real tokens + new tokens); ``budget`` may
    also be one value per row. Raises (before any model work) when a row's budget leaves the policy no
    slot to choose, naming its fixed parts. At decode time the next chunk of the prompt must fit beside
    them — unless the row's ``prompt`` fits in its budget whole (then only decoding steps need room)."""
    p = get_policy(policy)
    if moment not in MOMENTS:
        raise ValueError(f"moment={moment!r}: choose 'prompt' (compress the prompt once) or 'decode' (never exceed "
                         "the budget).")
    contexts = [int(context)] if isinstance(context, int) else [int(c) for c in context]
    if isinstance(budget, (list, tuple)):
        if len(budget) != len(contexts):
            raise ValueError(f"{len(budget)} budgets for {len(contexts)} rows: give one budget, or one per row.")
        resolved = [resolve_budget(b, c) for b, c in zip(budget, contexts)]
    else:
        resolved = [resolve_budget(budget, c) for c in contexts]
    if budget is None or p.keeps_everything:
        return None if budget is None else resolved
    every = p.evict_every if evict_every is None else evict_every
    if every < 1:
        raise ValueError(f"evict_every={every} must be >= 1.")
    prompts = list(prompt) if prompt is not None else [None] * len(resolved)
    for b, c in sorted({(b, chunk if pr is None or pr > b else 1) for b, pr in zip(resolved, prompts)}):
        free = free_slots(p, b, moment, c, every)
        if free < 1:
            extra = (f", and at decode time room for the next {max(c, every)} new tokens "
                     f"({'a prompt chunk' if c >= every else 'evict_every'})") if moment == "decode" else ""
            raise NoRoom(f"budget={b} tokens leaves {p.name} no room to choose: it always keeps "
                             f"{_describe(p, b)} ({p.floor(b)} tokens){extra}. Give a budget above "
                             f"{b - free}{', or a smaller prefill_chunk' if moment == 'decode' else ''}.")
    return resolved


def fits(policy, budget, moment: str, *, context: int | Sequence[int] | None = None, chunk: int = DECODE_CHUNK,
         evict_every: int | None = None) -> bool:
    """Whether ``policy`` can run at this budget (``plan_budget`` accepts it). Without ``context`` the
    budget is a number of tokens (an int); a fraction needs ``context``. Bad input raises, it is not "no"."""
    if context is None:
        for b in (budget if isinstance(budget, (list, tuple)) else [budget]):
            if b is not None:
                _check_tokens(b, hint="or a fraction in (0, 1] together with context=[tokens of each row]")
        context = 0
    try:
        plan_budget(policy, budget, context=context, moment=moment, chunk=chunk, evict_every=evict_every)
    except NoRoom:
        return False
    return True


# --------------------------------------------------------------------------- the cache


class EvictingLayer(DynamicLayer):
    """One layer's compact keys/values, the full-sequence position of every kept slot, whether the slot
    holds a real token (``valid``: False for padding and unused slots), and the policy's running
    statistics. ``get_seq_length`` is the number of tokens seen."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.positions: torch.Tensor | None = None  # (B, H, S) long
        self.valid: torch.Tensor | None = None  # (B, H, S) bool
        self.queries: torch.Tensor | None = None  # (B, Hq, Q, D) buffered rotated queries
        self.query_pos: torch.Tensor | None = None  # (Q,) their positions
        self.observed = 0  # queries already passed to policy.observe
        self.state: dict = {}
        self.pending_q: torch.Tensor | None = None
        self.pending_valid: torch.Tensor | None = None
        self._views: tuple | None = None  # (keys, values, positions, valid) as last appended, views of _bufs
        self._bufs: list | None = None
        self._capacity = 0
        self.capacity: int | None = None  # slots to allocate (decode-time eviction: the budget)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        pos = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q)
        valid = (self.pending_valid if self.pending_valid is not None
                 else torch.ones(b, q, dtype=torch.bool, device=key_states.device))[:, None, :].expand(b, h, q)
        if self.positions is None:
            self.keys, self.values, self.positions, self.valid = key_states, value_states, pos, valid
        else:
            self._append(key_states, value_states, pos, valid)
        if self.pending_q is not None:
            qpos = torch.arange(self.seen, self.seen + q, device=key_states.device)
            self.queries = self.pending_q if self.queries is None else torch.cat([self.queries, self.pending_q], 2)
            self.query_pos = qpos if self.query_pos is None else torch.cat([self.query_pos, qpos])
            self.pending_q = None
        self.seen += q
        return self.keys, self.values

    SPARE = 64  # slots reserved after the kept ones, so that decoding steps append in place

    def _append(self, key_states, value_states, pos, valid) -> None:
        """Append along the slots without copying the cache at every step: the four tensors are views of
        buffers written in place while they have room. A buffer holds ``capacity`` slots when the cache
        set one (decode-time eviction: the largest row budget, so memory never exceeds the budget), else
        ``SPARE`` more than needed. Tensors assigned from outside (a shared prefill, a compressed copy) are
        never written to: the first append copies them. An eviction during decoding gathers the kept slots
        into new buffers of ``capacity`` slots (``_select``) and registers them here, so it is not copied again."""
        new = (key_states, value_states, pos, valid)
        cur = (self.keys, self.values, self.positions, self.valid)
        n, q = cur[0].shape[-2], key_states.shape[-2]
        views = self._views
        if views is None or any(a is not b for a, b in zip(cur, views)) or n + q > self._capacity:
            cap = max(n + q, self.capacity) if self.capacity else n + q + self.SPARE
            bufs = [c.new_empty(c.shape[:2] + (cap,) + c.shape[3:]) for c in cur]
            for buf, c in zip(bufs, cur):
                buf[:, :, :n] = c
            self._bufs, self._capacity = bufs, cap
        for buf, x in zip(self._bufs, new):
            buf[:, :, n:n + q] = x
        self.keys, self.values, self.positions, self.valid = self._views = tuple(buf[:, :, :n + q] for buf in self._bufs)

    def get_seq_length(self) -> int:
        return self.seen

    def kept(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.kept() + query_length, self.seen - self.kept()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("An evicting KV cache cannot be cropped (assisted decoding is not supported).")

    def reset(self) -> None:
        super().reset()
        self.__init__()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def group_attention(queries: torch.Tensor, query_pos: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor,
                    valid: torch.Tensor, sum_queries: bool = False, newest: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ/√d) of each buffered query over the cached keys, causal by full-sequence position,
    padding masked, averaged over the query heads that share a KV head: (B, H_kv, Q, S).
    ``sum_queries=True`` returns its sum over the queries instead, as one row (B, H_kv, 1, S).

    The slots no query can see yet (positions after the last query) form a tail of every row (kept slots
    are in sequence order after the invalid ones whenever several queries are scored: ``_swap_out``, which
    permutes slots, runs only for policies that score the newest query alone, which sees every slot): it is
    cut before the matmul and comes back as zeros, and the causal mask is applied only where some query can
    see a key that another cannot.
    ``newest=True`` says the one query is the newest token (decoding): it sees every key, so with no padding
    slot nothing is masked and the masks are not built (the same numbers, fewer operations)."""
    b, hq, q, d = queries.shape
    s, hkv = keys.shape[-2], keys.shape[1]
    g = hq // hkv
    plain = newest and q == 1 and bool(valid.all())  # every key visible, none masked
    n = s if plain else int((key_pos <= query_pos[-1]).sum(-1).max())  # slots some query can see: a prefix of every row
    keys, key_pos, valid = keys[:, :, :n], key_pos[..., :n], valid[..., :n]
    # one batched matmul per KV head over its g query heads (scaled queries: no pass over the scores)
    scaled = queries.float().reshape(b, hkv, g * q, d) * (1 / math.sqrt(d))
    logits = torch.matmul(scaled, keys.float().transpose(-1, -2)).view(b, hkv, g, q, n)
    if not plain:
        m = 0 if not bool(valid.all()) else int((key_pos < query_pos[0]).sum(-1).min())  # all queries see [0, m)
        allowed = (key_pos[:, :, None, m:] <= query_pos[None, None, :, None]) & valid[:, :, None, m:]  # (B, H, Q, n-m)
        logits[..., m:].masked_fill_(~allowed[:, :, None], -math.inf)
    probs = torch.softmax(logits, -1)
    if not plain and bool(torch.isnan(probs[..., 0]).any()):  # a query (a padding slot) that sees no key: NaN row
        probs = probs.nan_to_num_(0.0)
    if sum_queries:  # a matmul with ones: the sum over g·q rows without a slow middle-dimension reduction
        out = torch.matmul(probs.new_full((1, g * q), 1.0 / g), probs.view(b, hkv, g * q, n))
    else:  # the group mean as g - 1 contiguous adds (a reduction over a middle dimension is slow on CPU)
        out = probs[:, :, 0].clone()
        for j in range(1, g):
            out += probs[:, :, j]
        out /= g
    return F.pad(out, (0, s - n)) if n < s else out


def _gather_rows(t: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor | None, bases: dict | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` (B, H, S, ...) gathered at slot indices ``idx`` (B', H, T) of storage rows ``rows`` (B',).
    ``bases``: a dict in which calls over tensors of one layout share their row offsets. ``out``: a contiguous
    tensor of the result's shape to write it into (returned)."""
    if t.ndim == 4 and t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.stride(1) % t.shape[3] == 0 \
            and t.stride(0) % t.shape[3] == 0:
        # keys/values: each slot is one contiguous row of D numbers (also in a view of a longer buffer), so the
        # kept rows are copied whole by one index_select over a (rows, D) view of that memory, ~3x faster on CPU
        # than an element-wise gather; the values are the same
        b, h, s, d = t.shape
        rb, rh = t.stride(0) // d, t.stride(1) // d
        flat = t.as_strided(((b - 1) * rb + (h - 1) * rh + s, d), (d, 1))
        key = (idx.shape[0], h, rb, rh)
        base = None if bases is None else bases.get(key)
        if base is None:
            src = torch.arange(idx.shape[0], device=t.device) if rows is None else rows
            base = (src * rb)[:, None, None] + (torch.arange(h, device=t.device) * rh)[None, :, None]
            if bases is not None:
                bases[key] = base
        if out is not None:
            torch.index_select(flat, 0, (base + idx).reshape(-1), out=out.view(-1, d))
            return out
        return flat.index_select(0, (base + idx).reshape(-1)).view(*idx.shape, d)
    if rows is None:
        if t.ndim == 4:
            got = t.gather(2, idx[..., None].expand(-1, -1, -1, t.shape[-1]))
        else:
            got = t.gather(2, idx)
    else:
        heads = torch.arange(t.shape[1], device=t.device)
        got = t[rows[:, None, None], heads[None, :, None], idx]
    return got.contiguous() if out is None else out.copy_(got)


class EvictingCache(Cache):
    """A ``transformers`` cache of ``EvictingLayer`` s driven by one policy and a budget per row."""

    def __init__(self, num_layers: int, policy: Policy, budget: int | Sequence[int] | None, moment: str,
                 evict_every: int = 1, record: bool = False):
        super().__init__(layers=[EvictingLayer() for _ in range(num_layers)])
        self.policy, self.moment, self.evict_every = policy, moment, evict_every
        self.budget = budget  # None, one token count, or one per row
        self.compressed = False
        self.capturing = policy.queries > 0 or policy.observes  # the hooks buffer queries while True
        self.record = record
        self.events: list[dict] = []  # one per eviction: tokens seen, kept (if record: positions per layer)
        self.evictions = 0  # tokens evicted, summed over layers and rows (per KV head)
        self.scoring_seconds = 0.0
        self._stack: tuple | None = None  # decoding: every layer's buffers as slices of four stacked tensors
        if moment == "decode" and budget is not None and not policy.keeps_everything:
            cap = budget if isinstance(budget, int) else max(budget)
            for layer in self.layers:
                layer.capacity = int(cap)

    def row_budgets(self, batch: int, device) -> torch.Tensor | None:
        if self.budget is None:
            return None
        b = [self.budget] * batch if isinstance(self.budget, int) else list(self.budget)
        if len(b) != batch:
            raise ValueError(f"{len(b)} row budgets for a batch of {batch} rows.")
        return torch.tensor(b, dtype=torch.long, device=device)

    def alive(self) -> torch.Tensor:
        """(B,) real tokens each row holds (layer 0; every layer and head holds as many)."""
        return self.layers[0].valid[:, 0].sum(-1)

    # -- the shared mechanism: score, protect, select, gather into compact tensors
    def _observe(self, layer: EvictingLayer, chunk: int = 256) -> torch.Tensor | None:
        """Pass the queries not yet observed to ``policy.observe`` (in chunks, in time order), and return
        the attention of the latest ``policy.queries`` queries over the current keys (for ``score``)."""
        p = self.policy
        if layer.queries is None:
            return None
        total = layer.queries.shape[2]
        latest = int(layer.query_pos[-1]) == layer.seen - 1  # the last buffered query is the newest token
        if p.observes:
            for a in range(layer.observed, total, chunk):
                qs, qp = layer.queries[:, :, a:a + chunk], layer.query_pos[a:a + chunk]
                attn = group_attention(qs, qp, layer.keys, layer.positions, layer.valid, sum_queries=p.observes_sum,
                                       newest=latest and a + 1 == total)
                p.observe(layer.state, attn, layer.positions, qp, layer.valid)
        attn = None
        if p.queries > 0:
            need = min(p.queries, total)
            attn = group_attention(layer.queries[:, :, total - need:], layer.query_pos[total - need:],
                                   layer.keys, layer.positions, layer.valid,
                                   newest=latest and need == 1)
        keep = min(p.queries, total)  # the buffer keeps what the next scoring may need again
        layer.queries = layer.queries[:, :, total - keep:] if keep else None
        layer.query_pos = layer.query_pos[total - keep:] if keep else None
        layer.observed = keep
        return attn

    def _evict(self, keep: torch.Tensor) -> None:
        """Cut every row to ``keep`` (B,) real tokens in every layer and KV head."""
        t0 = time.perf_counter()
        before = self.alive()
        self._select(self.layers, self.layers, keep)
        self.evictions += int((before - self.alive()).sum()) * len(self.layers)
        self.scoring_seconds += time.perf_counter() - t0
        ev = {"seen": self.layers[0].seen, "kept": torch.as_tensor(keep).expand(len(before)).tolist()}
        if self.record:
            ev["positions"] = self.kept_positions().to(torch.int32).cpu()
            ev["valid"] = torch.stack([layer.valid for layer in self.layers]).cpu()
        self.events.append(ev)

    def _select(self, src: list[EvictingLayer], dst: list[EvictingLayer], keep: torch.Tensor,
                scores: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        """Keep, in each row, the ``keep`` real tokens of highest score (protected: the sinks and the recent
        window), gathered from the ``src`` layers into the ``dst`` layers. Scores come per layer (each has
        its own queries and keys), or precomputed as (L, B, H, S); protection, the top-k and the sort run
        once over all layers stacked. ``rows`` (B',) maps output rows to storage rows (several draws of one
        prompt). Slots a row does not use (its budget is below the batch's largest) stay, marked invalid,
        at the front like padding; kept slots follow in sequence order — except after ``_swap_out``, which
        evicts one token per row while decoding by moving the newest slot into its place."""
        p = self.policy
        if scores is None:
            scores = torch.stack([p.score(layer.state, self._observe(layer), layer.positions).float() for layer in src])
        n = self._swappable(src, dst, rows)
        if n:  # the layers' positions and valid flags are slices of the stacked buffers: no stacking
            pos, valid = self._stack[2][..., :n], self._stack[3][..., :n]
        else:
            pos = torch.stack([layer.positions for layer in src])  # (L, B, H, S)
            valid = torch.stack([layer.valid for layer in src])
        if rows is not None:
            pos, valid = pos[:, rows], valid[:, rows]
            if scores.shape[1] != len(rows):
                scores = scores[:, rows]
        L, B, H, S = pos.shape
        keep = torch.as_tensor(keep, device=pos.device).expand(B)
        seen = src[0].seen
        budgets = self.row_budgets(B, pos.device)
        if budgets is not None:
            recent = torch.tensor([p.recent(int(x)) for x in budgets], device=pos.device)
        else:
            recent = torch.zeros(B, dtype=torch.long, device=pos.device)
        recent = torch.minimum(recent, keep)
        first_real = torch.where(valid, pos, seen).amin(-1, keepdim=True)  # sinks: the first real tokens
        protect = (pos >= (seen - recent)[None, :, None, None]) | ((pos - first_real < p.sinks) & valid)
        if not p.per_head:  # one choice per layer: the mean score over heads (same protection in every head)
            scores, pos_h, valid_h, protect = scores.mean(2, keepdim=True), pos[:, :, :1], valid[:, :, :1], protect[:, :, :1]
        else:
            pos_h, valid_h = pos, valid
        score = torch.where(protect, math.inf, scores.float())
        # invalid slots: lowest of all, below every real token (-inf is taken by nothing else)
        score = torch.where(valid_h, score.nan_to_num(neginf=-1e30), -math.inf)
        if n and bool((keep == n - 1).all()) and bool(valid.all()):
            self._swap_out(dst, score, pos_h, n)
            return
        total = int(keep.max())
        # by score, highest first; ties go to the more recent token, whatever the slots' layout (a row alone
        # and the same row in a padded batch choose alike): a stable sort of the slots ordered newest first
        newest = torch.where(valid_h, pos_h, -1).argsort(-1, descending=True)
        ranked = score.gather(-1, newest).sort(dim=-1, descending=True, stable=True).indices[..., :total]
        idx = newest.gather(-1, ranked)
        alive = (torch.arange(total, device=pos.device) < keep[None, :, None, None]) & valid_h.gather(-1, idx)
        order = torch.where(alive, pos_h.gather(-1, idx), -1).argsort(-1)  # unused slots first, then by position
        idx, alive = idx.gather(-1, order), alive.gather(-1, order)
        if not p.per_head:
            idx, alive = idx.expand(L, B, H, total), alive.expand(L, B, H, total)
        new_pos = pos.gather(-1, idx)
        # decoding: the kept slots are gathered straight into buffers with room for the next tokens (the gather
        # index padded with copies of its last slot), so the next appends write in place instead of copying the
        # whole cache once more (EvictingLayer._append)
        cap = dst[0].capacity
        if rows is not None or not total or not cap or cap <= total or any(d.capacity != cap for d in dst):
            cap = None
        if cap is not None:
            gather_idx = torch.cat([idx, idx[..., -1:].expand(L, B, H, cap - total)], -1)
            pos_bufs, valid_bufs = new_pos.new_zeros(L, B, H, cap), alive.new_zeros(L, B, H, cap)
            pos_bufs[..., :total], valid_bufs[..., :total] = new_pos, alive
            k0, v0 = src[0].keys, src[0].values
            key_bufs = k0.new_empty(L, B, H, cap, k0.shape[-1])  # one tensor for all layers (see _swap_out)
            value_bufs = v0.new_empty(L, B, H, cap, v0.shape[-1])
            self._stack = (key_bufs, value_bufs, pos_bufs, valid_bufs, [])
        else:
            gather_idx = idx
            self._stack = None if dst is self.layers else self._stack
        bases = {}
        for i, (s_layer, d_layer) in enumerate(zip(src, dst)):
            out_k, out_v = (self._stack[0][i], self._stack[1][i]) if cap is not None else (None, None)
            keys = _gather_rows(s_layer.keys, gather_idx[i], rows, bases, out=out_k)
            values = _gather_rows(s_layer.values, gather_idx[i], rows, bases, out=out_v)
            if cap is not None:
                d_layer._bufs, d_layer._capacity = [keys, values, pos_bufs[i], valid_bufs[i]], cap
                self._stack[4].append(d_layer._bufs)
                d_layer.keys, d_layer.values, d_layer.positions, d_layer.valid = d_layer._views = tuple(
                    buf[:, :, :total] for buf in d_layer._bufs)
            else:
                d_layer.keys, d_layer.values = keys, values
                d_layer.positions, d_layer.valid = new_pos[i], alive[i]
            d_layer.state = {k: (_gather_rows(v, idx[i], rows) if torch.is_tensor(v) and v.ndim == 3 else v)
                             for k, v in s_layer.state.items()}
            d_layer.seen, d_layer.is_initialized = s_layer.seen, True
            if d_layer is not s_layer:
                d_layer.dtype, d_layer.device = s_layer.dtype, s_layer.device

    def _swappable(self, src: list[EvictingLayer], dst: list[EvictingLayer], rows) -> int:
        """The slot count of every layer when this eviction may use ``_swap_out`` (else 0): decoding with the
        layers' slots in the stacked buffers of the last gather, appended in place since, their policy
        deterministic and scoring at most the newest query (so its attention never relies on the slots' order),
        and every per-slot statistic covering every slot."""
        st, p = self._stack, self.policy
        if st is None or rows is not None or src is not dst or dst is not self.layers or p.stochastic \
                or p.queries > 1:
            return 0
        n = dst[0].kept()
        for layer, bufs in zip(dst, st[4]):
            if layer._bufs is not bufs or layer._views is None or layer.kept() != n \
                    or any(a is not b for a, b in zip((layer.keys, layer.values, layer.positions, layer.valid),
                                                      layer._views)) \
                    or any(torch.is_tensor(v) and v.ndim == 3 and v.shape[-1] != n for v in layer.state.values()):
                return 0
        return n if n >= 2 else 0

    def _swap_out(self, dst: list[EvictingLayer], score: torch.Tensor, pos: torch.Tensor, n: int) -> None:
        """Evict one token per (layer, row, KV head) — the lowest score, the oldest among equals, the token the
        sort in ``_select`` drops — by moving the newest slot into its place: five small copies over all layers
        instead of gathering every kept slot again. The kept set is the same; the slots are no longer in
        sequence order, which the attention of one new query does not depend on (``_swappable``)."""
        low = score.amin(-1, keepdim=True)
        j = torch.where(score == low, pos, torch.iinfo(pos.dtype).max).argmin(-1, keepdim=True)  # (L, B, H', 1)
        keys, values, positions, valid, per_layer = self._stack
        L, B, H = positions.shape[:3]
        j = j.expand(L, B, H, 1)
        for t in (keys, values):
            t.scatter_(3, j[..., None].expand(L, B, H, 1, t.shape[-1]), t[:, :, :, n - 1:n].clone())
        for t in (positions, valid):
            t.scatter_(3, j, t[..., n - 1:n].clone())
        for i, (layer, bufs) in enumerate(zip(dst, per_layer)):
            layer.keys, layer.values, layer.positions, layer.valid = layer._views = tuple(b[:, :, :n - 1] for b in bufs)
            layer.state = {k: (v.scatter(-1, j[i], v[..., n - 1:n])[..., :n - 1]
                               if torch.is_tensor(v) and v.ndim == 3 else v) for k, v in layer.state.items()}

    def before_forward(self, q_len: int, batch: int, attention_mask: torch.Tensor | None):
        """Called before every forward of the model: evict if this moment and budget say so, then return
        the 2-D padding mask the model must see (one column per kept slot, then the new tokens)."""
        layer0 = self.layers[0]
        if attention_mask is not None and attention_mask.ndim != 2:
            return attention_mask  # a 4-D mask made by the caller is used as it is
        new_valid = attention_mask[:, -q_len:].bool() if attention_mask is not None else None
        for layer in self.layers:
            layer.pending_valid = new_valid
        if layer0.kept() == 0:
            return attention_mask
        if self.budget is not None and not self.policy.keeps_everything:
            device = layer0.positions.device
            budgets, alive = self.row_budgets(batch, device), self.alive()
            if self.moment == "prompt":
                if not self.compressed and q_len == 1:
                    self.compressed, self.capturing = True, False
                    if bool((alive > budgets).any()):
                        self._evict(torch.minimum(alive, budgets))
            elif bool((alive + q_len > budgets).any()):
                reserve = max(q_len, self.evict_every)
                floor = torch.tensor([self.policy.floor(int(b)) for b in budgets], device=device)
                # a row over its budget is cut so that the next `reserve` tokens fit; the others keep all.
                # (A chunk too large for the budget can only be cut down to the floor: generate() refuses those.)
                target = torch.maximum(budgets - reserve, torch.minimum(floor, budgets - 1))
                self._evict(torch.where(alive + q_len > budgets, target, alive))
        valid = layer0.valid[:, 0]
        if new_valid is None and bool(valid.all()):
            return attention_mask
        new = new_valid.long() if new_valid is not None else valid.new_ones(batch, q_len, dtype=torch.long)
        return torch.cat([new.new_ones(batch, layer0.seen - layer0.kept()), valid.long(), new], 1)

    def kept_positions(self) -> torch.Tensor:
        """(layers, B, H_kv, kept) full-sequence positions of the kept slots (unused slots included: see
        ``kept_valid``)."""
        return torch.stack([layer.positions for layer in self.layers])

    def kept_valid(self) -> torch.Tensor:
        return torch.stack([layer.valid for layer in self.layers])


def _check_model(model: nn.Module):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers is not None and len(layers) else None
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "head_dim")):
        raise ValueError(f"{type(model).__name__} has no Llama-style attention layout (model.model.layers[i]."
                         "self_attn with q_proj/k_proj/v_proj): KV eviction supports Llama, Mistral, Qwen2 and the like.")
    return base, layers


@contextmanager
def _hooks(model: nn.Module, cache: EvictingCache) -> Iterator[None]:
    """The model's hooks for ``cache``: before each forward, eviction and the rebuilt padding mask; on each
    layer's ``q_proj``, the rotated query (buffered while ``cache.capturing``). Removed on exit, also on error."""
    _, layers = _check_model(model)
    handles, rope = [], {}

    def pre_model(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        mask = cache.before_forward(x.shape[1], x.shape[0], kwargs.get("attention_mask"))
        if mask is not kwargs.get("attention_mask"):
            kwargs = dict(kwargs, attention_mask=mask)
            return args, kwargs
        return None

    handles.append(model.register_forward_pre_hook(pre_model, with_kwargs=True))
    for i, layer in enumerate(layers):
        attn = layer.self_attn

        def pre_attn(_m, args, kwargs, i=i):
            rope[i] = kwargs.get("position_embeddings")

        def on_q(m, _inp, out, i=i, attn=attn):
            if not cache.capturing:
                return
            b, q = out.shape[:2]
            qs = out.view(b, q, -1, attn.head_dim).transpose(1, 2)
            cos, sin = rope[i]
            cache.layers[i].pending_q = (qs * cos[:, None] + _rotate_half(qs) * sin[:, None]).detach()

        handles.append(attn.register_forward_pre_hook(pre_attn, with_kwargs=True))
        handles.append(attn.q_proj.register_forward_hook(on_q))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def evicting(model: nn.Module, policy="full", budget: int | Sequence[int] | None = None, moment: str = "decode", *,
             evict_every: int | None = None, record: bool = False) -> Iterator[EvictingCache]:
    """Hooks on ``model`` and a fresh ``EvictingCache`` to pass as ``past_key_values``.

    ``budget`` is in tokens here, one for every row or one per row (``generate`` resolves fractions).
    ``evict_every`` defaults to the policy's (1: every step; LazyEviction: its observation window).
    The hooks capture each layer's rotated query (only when the policy needs queries) and rebuild the
    padding mask; they are removed when the block ends, also on error.
    """
    policy = get_policy(policy)
    if moment not in MOMENTS:
        raise ValueError(f"moment={moment!r}: choose 'prompt' (compress the prompt once) or 'decode' (never exceed "
                         "the budget).")
    every = policy.evict_every if evict_every is None else evict_every
    if budget is not None:
        per_row = isinstance(budget, (list, tuple))
        for b in (list(budget) if per_row else [budget]):
            _check_tokens(b)
        budget = [int(b) for b in budget] if per_row else int(budget)
        for b in (budget if per_row else [budget]):
            plan_budget(policy, b, context=0, moment=moment, chunk=1, evict_every=every)
    base, layers = _check_model(model)
    cache = EvictingCache(len(layers), policy, budget, moment, every if moment == "decode" else 1, record)
    with _hooks(model, cache):
        yield cache


# --------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """What one generation produced: new token ids per row, and what the cache did."""

    tokens: torch.Tensor  # (B, new)
    kv_bytes: int  # bytes of keys+values held at the end
    peak_kv_bytes: int
    evictions: int
    seconds_prefill: float
    seconds_decode: float
    budget: list[int] | None  # token budget per row (None: full cache)
    free_slots: list[int] | None = None  # per row: what the policy chose among (see ``free_slots``)
    prefill_chunk: int | None = None
    events: list = field(default_factory=list, repr=False)
    logprobs: torch.Tensor | None = None  # (B, N) log p of the forced tokens, with ``force``
    kept: torch.Tensor | None = field(default=None, repr=False)  # (L, B, H, S) positions kept at the end (record)
    kept_valid: torch.Tensor | None = field(default=None, repr=False)
    argmax: torch.Tensor | None = field(default=None, repr=False)  # (steps, L, B, Hq) most attended position
    # per row: share of (layer, KV head) whose cache still holds the row's first real token at the end (an
    # evicted token never comes back, so 1.0 = the attention sink was never evicted anywhere)
    first_token_kept: list[float] | None = None


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) chunks of ``n`` tokens aligned to the end (the first one is the short one), so that
    left-padded rows are cut exactly where each row alone would be."""
    ends = list(range(n, 0, -chunk))[::-1]
    return list(zip([0] + ends[:-1], ends))


def _argmax_positions(cache: EvictingCache) -> torch.Tensor:
    """(L, B, Hq) full-sequence position of the key each query head attends to most, for the latest query."""
    out = []
    for layer in cache.layers:
        q = layer.queries[:, :, -1]  # (B, Hq, D)
        hkv = layer.keys.shape[1]
        k = layer.keys.repeat_interleave(q.shape[1] // hkv, dim=1)  # (B, Hq, S, D)
        logits = torch.einsum("bhd,bhsd->bhs", q.float(), k.float())
        valid = layer.valid.repeat_interleave(q.shape[1] // hkv, dim=1)
        best = logits.masked_fill(~valid, -math.inf).argmax(-1)
        out.append(layer.positions.repeat_interleave(q.shape[1] // hkv, dim=1).gather(-1, best[..., None])[..., 0])
        layer.queries, layer.query_pos = layer.queries[:, :, -1:], layer.query_pos[-1:]
    return torch.stack(out)


def _decode(model, cache: EvictingCache, logits: torch.Tensor, mask: torch.Tensor, last_pos: torch.Tensor, steps: int,
            force: torch.Tensor | None, argmax: bool, eos_token_id: int | None, device) -> dict:
    """The greedy loop after the prompt: ``steps`` tokens (or forced ones), all rows aligned."""
    out_tokens, logprobs, maxes, peak = [], [], [], cache_bytes(cache)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    if argmax:
        maxes.append(_argmax_positions(cache))
    for i in range(steps):
        greedy = logits.argmax(-1, keepdim=True)
        out_tokens.append(greedy)
        nxt = greedy
        if force is not None:
            nxt = force[:, i:i + 1].to(device)
            logprobs.append(torch.log_softmax(logits, -1).gather(-1, nxt))
        if eos_token_id is not None:
            done |= greedy[:, 0] == eos_token_id
            if bool(done.all()):
                break
        if i == steps - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=last_pos, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        peak = max(peak, cache_bytes(cache))
        if argmax:
            maxes.append(_argmax_positions(cache))
    return {"tokens": torch.cat(out_tokens, 1).cpu(), "peak": peak,
            "logprobs": torch.cat(logprobs, 1).cpu() if force is not None else None,
            "argmax": torch.stack(maxes).cpu() if argmax else None}


class Prefill:
    """A batch of prompts read once with the full cache, for prompt compression by many settings.

    ``Prefill(model, input_ids, attention_mask, policies=[...])`` runs the prompt through the model (in
    chunks of ``chunk`` tokens) and, on the way, feeds every query's attention to the policies that
    accumulate statistics (H2O, LazyEviction); it keeps the latest queries the others score with
    (SnapKV's window, TOVA's last query). ``generate(..., moment="prompt", prefill=pf)`` then cuts a copy
    of this cache for one policy and budget and decodes: the prefill is shared, the shared tensors are
    never modified. Each policy's scores are computed once and reused for every budget.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 policies: Sequence = (), chunk: int = 256):
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be (batch, tokens) with at least one token.")
        self.policies = [get_policy(p) for p in policies]
        device = next(model.parameters()).device
        self.input_ids = input_ids.to(device)
        self.mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(self.input_ids)
        _, layers = _check_model(model)
        self.num_layers = len(layers)
        self.cache = EvictingCache(len(layers), FullCache(), None, "prompt")
        self.cache.capturing = True
        self.states = [[{} for _ in layers] for _ in self.policies]
        self._scores: dict[int, torch.Tensor] = {}
        keep_q = max([p.queries for p in self.policies] + [1])
        observers = [(i, p) for i, p in enumerate(self.policies) if p.observes]
        pos_all = (self.mask.long().cumsum(-1) - 1).clamp(min=0)
        t0 = time.perf_counter()
        with torch.inference_mode(), _hooks(model, self.cache):
            for s, e in _chunks(self.input_ids.shape[1], chunk):
                out = model(input_ids=self.input_ids[:, s:e], attention_mask=self.mask[:, :e],
                            position_ids=pos_all[:, s:e], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
                for li, layer in enumerate(self.cache.layers):
                    if observers:  # one attention computation per chunk, shared by every observing policy
                        full = any(not p.observes_sum for _, p in observers)
                        new_q, new_pos = layer.queries[:, :, layer.observed:], layer.query_pos[layer.observed:]
                        attn = group_attention(new_q, new_pos, layer.keys, layer.positions, layer.valid,
                                               sum_queries=not full)
                        for i, p in observers:
                            p.observe(self.states[i][li], attn, layer.positions, new_pos, layer.valid)
                    n = layer.queries.shape[2]
                    layer.queries, layer.query_pos = layer.queries[:, :, max(0, n - keep_q):], layer.query_pos[max(0, n - keep_q):]
                    layer.observed = layer.queries.shape[2]  # the queries kept for scoring are observed already
        self.logits = out.logits[:, -1].float()
        self.seconds = time.perf_counter() - t0
        self.last_pos = pos_all[:, -1:]

    def real_tokens(self) -> list[int]:
        return self.mask.sum(1).tolist()

    def scores(self, policy: Policy) -> torch.Tensor:
        """(L, B, H, S) scores of one of the prefill's policies (computed once)."""
        i = next((j for j, p in enumerate(self.policies) if p is policy), None)
        kept_q = self.cache.layers[0].queries.shape[2]
        if i is None and (policy.observes or policy.queries > kept_q):
            raise ValueError(f"{policy.name} was not among the policies this Prefill was read for (it needs statistics "
                             "gathered while reading): pass it in Prefill(..., policies=[...]).")
        if i is None:  # a policy that scores from positions (or the latest queries) alone: nothing to cache
            self.policies.append(policy)
            self.states.append([{} for _ in self.cache.layers])
            i = len(self.policies) - 1
        if i not in self._scores or policy.stochastic:
            out = []
            with torch.inference_mode():
                for li, layer in enumerate(self.cache.layers):
                    attn = None
                    if policy.queries > 0:
                        n = min(policy.queries, layer.queries.shape[2])
                        attn = group_attention(layer.queries[:, :, -n:], layer.query_pos[-n:], layer.keys,
                                               layer.positions, layer.valid)
                    out.append(policy.score(self.states[i][li], attn, layer.positions).float())
            if policy.stochastic:
                return torch.stack(out)
            self._scores[i] = torch.stack(out)
        return self._scores[i]

    def compressed(self, policy: Policy, budgets: list[int] | None, draws: int = 1) -> EvictingCache:
        """A new cache holding what ``policy`` keeps of this prefill at ``budgets`` (one per row), each row
        repeated ``draws`` times (adjacent). The prefill's own tensors are left untouched."""
        b = self.input_ids.shape[0]
        rows = torch.arange(b, device=self.input_ids.device).repeat_interleave(draws) if draws > 1 else None
        row_budgets = None if budgets is None else [x for x in budgets for _ in range(draws)]
        cache = EvictingCache(self.num_layers, policy, row_budgets, "prompt")
        cache.compressed, cache.capturing = True, False
        src = self.cache.layers
        alive = self.cache.alive()
        if rows is not None:
            alive = alive[rows]
        if budgets is None or policy.keeps_everything:
            keep = alive
        else:
            keep = torch.minimum(alive, cache.row_budgets(len(alive), alive.device))
        if rows is None and bool((keep == alive).all()):  # nothing to cut: share the tensors (appends copy them)
            for s, d in zip(src, cache.layers):
                d.keys, d.values, d.positions, d.valid = s.keys, s.values, s.positions, s.valid
                d.seen, d.is_initialized, d.dtype, d.device = s.seen, True, s.dtype, s.device
                d.queries, d.query_pos = s.queries, s.query_pos
            return cache
        if policy.stochastic:
            pos = torch.stack([layer.positions for layer in src])
            scores = torch.stack([policy.score({}, None, pos[i] if rows is None else pos[i][rows]) for i in range(len(src))])
        elif policy.keeps_everything:
            scores = torch.stack([layer.positions.float() for layer in src])
        else:
            scores = self.scores(policy)
        cache._select(src, cache.layers, keep, scores=scores, rows=rows)
        for s, d in zip(src, cache.layers):  # the latest query, for the attention arg-max of the first step
            d.queries = s.queries if rows is None else s.queries[rows]
            d.query_pos = s.query_pos
        return cache


def _pad_front(t: torch.Tensor, f: int) -> torch.Tensor:
    """``f`` zero (for ``valid``: False) slots before the kept ones, along the slot dimension (2)."""
    if not f:
        return t
    shape = list(t.shape)
    shape[2] = f
    return torch.cat([t.new_zeros(shape), t], 2)


def _merge(caches: list[EvictingCache]) -> EvictingCache:
    """One cache holding the rows of several compressed caches of one prefill, for one decoding loop: each is
    padded to the largest with unused slots at the front (masked like padding), then the rows are stacked."""
    n = max(c.layers[0].kept() for c in caches)
    out = EvictingCache(len(caches[0].layers), FullCache(), None, "prompt")
    out.compressed, out.capturing = True, False
    for li, layer in enumerate(out.layers):
        parts = [c.layers[li] for c in caches]
        for name in ("keys", "values", "positions", "valid"):
            setattr(layer, name, torch.cat([_pad_front(getattr(p, name), n - p.kept()) for p in parts]))
        layer.seen, layer.is_initialized = parts[0].seen, True
        layer.dtype, layer.device = parts[0].dtype, parts[0].device
    return out


@torch.inference_mode()
def generate_compressed(model: nn.Module, prefill: Prefill, settings: Sequence[tuple], *, max_new_tokens: int,
                        max_rows: int = 32, record: bool = False) -> list[Generation]:
    """Prompt compression for many ``settings`` — (policy, budget, draws) — from one ``Prefill``, answered in
    shared decoding loops: the compressed caches of consecutive settings with the same budget are stacked
    (up to ``max_rows`` rows per loop), so that the weights are read once per step for all of them. Every row
    gives what ``generate(..., moment="prompt", prefill=prefill)`` gives alone (tested). Returns one
    ``Generation`` per setting; with ``record``, ``kept`` holds the prompt positions each row kept."""
    _check_steps(max_new_tokens, "max_new_tokens")
    real = prefill.real_tokens()
    plans = []
    for p, budget, draws in settings:  # every setting checked before any model work
        pol = get_policy(p)
        budgets = plan_budget(pol, budget, context=[r + max_new_tokens for r in real], moment="prompt")
        plans.append((pol, None if budgets is None or pol.keeps_everything else budgets, draws))
    device = prefill.input_ids.device
    out: list[Generation | None] = [None] * len(plans)
    groups, rows = [], 0
    for i, (pol, budgets, draws) in enumerate(plans):
        n = len(real) * draws
        key = None if budgets is None else max(budgets)
        if groups and rows + n <= max_rows and groups[-1][0] == key:
            groups[-1][1].append(i)
            rows += n
        else:
            groups.append((key, [i]))
            rows = n
    for _, members in groups:
        t0 = time.perf_counter()
        caches = [prefill.compressed(plans[i][0], plans[i][1], plans[i][2]) for i in members]
        meta = [dict(kept=c.layers[0].kept(), bytes=cache_bytes(c), evictions=c.evictions,
                     positions=c.kept_positions().to(torch.int32).cpu() if record else None,
                     valid=c.kept_valid().cpu() if record else None) for c in caches]
        merged = _merge(caches)
        del caches  # the merged cache holds the only copy while decoding
        reps = [plans[i][2] for i in members]
        logits = torch.cat([prefill.logits.repeat_interleave(r, 0) for r in reps])
        mask = torch.cat([prefill.mask.repeat_interleave(r, 0) for r in reps])
        last = torch.cat([prefill.last_pos.repeat_interleave(r, 0) for r in reps])
        with _hooks(model, merged):
            res = _decode(model, merged, logits, mask, last, max_new_tokens, None, False, None, device)
        seconds = time.perf_counter() - t0
        start = 0
        for i, m in zip(members, meta):
            pol, budgets, draws = plans[i]
            n = len(real) * draws
            per_slot = m["bytes"] // max(1, m["kept"])
            out[i] = Generation(tokens=res["tokens"][start:start + n], kv_bytes=per_slot * (m["kept"] + max_new_tokens - 1),
                                peak_kv_bytes=cache_bytes(prefill.cache), evictions=m["evictions"],
                                seconds_prefill=prefill.seconds, seconds_decode=seconds, budget=budgets,
                                free_slots=None if budgets is None else [free_slots(pol, b, "prompt") for b in budgets],
                                kept=m["positions"], kept_valid=m["valid"])
            start += n
    return out


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, *, policy="full", budget: float | int | None = None,
             moment: str = "decode", max_new_tokens: int = 32, attention_mask: torch.Tensor | None = None,
             prefill_chunk: int | None = None, evict_every: int | None = None, record: bool = False,
             force: torch.Tensor | None = None, prefill: Prefill | None = None, draws: int = 1,
             argmax: bool = False, eos_token_id: int | None = None) -> Generation:
    """Greedy decoding with an evicting cache, in a manual loop (positions of the full sequence).

    ``input_ids`` (B, T), left-padded with ``attention_mask`` for a batch. The budget (tokens, or a
    fraction of each row's real context) is resolved per row by ``plan_budget`` and checked before any
    model work. At ``moment="decode"`` the prompt is read in chunks of ``prefill_chunk`` tokens (default
    32) so that the cache stays within budget while reading it and the policy chooses among the tokens
    already read; at ``moment="prompt"`` it is read whole (or in ``prefill_chunk`` chunks, for memory)
    and cut once. ``prefill``: a ``Prefill`` of these ``input_ids`` to share (prompt moment only).
    ``draws``: each row is run that many times (a stochastic policy draws independently per row; rows of
    one prompt adjacent in ``tokens``). ``force`` (B, N): teacher forcing — the returned ``tokens`` are
    still the greedy choices and ``Generation.logprobs`` holds log p(force[:, i]). ``argmax``: record the
    most attended position of every query head at each step (for retrieval heads). Generation never
    stops early unless ``eos_token_id`` is given and every row has produced it, so rows stay aligned.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be (batch, tokens) with at least one token.")
    if force is None:
        _check_steps(max_new_tokens, "max_new_tokens")
    elif force.ndim != 2 or force.shape[1] == 0:
        raise ValueError("force must be (batch, tokens) with at least one token to teacher-force.")
    if not isinstance(budget, (list, tuple)):  # one value per row: plan_budget checks each
        check_budget_value(budget)
    steps = force.shape[1] if force is not None else int(max_new_tokens)
    if isinstance(draws, bool) or not isinstance(draws, numbers.Integral) or draws < 1:
        raise ValueError(f"draws={draws!r} must be an int >= 1.")
    pol = get_policy(policy)
    mask_in = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    real = mask_in.sum(1).tolist()
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and max(real) + steps > limit:
        raise ValueError(f"The prompt ({max(real)} tokens) plus {steps} new tokens exceeds the model's "
                         f"context of {limit} tokens: shorten the prompt or generate fewer tokens.")
    if moment == "decode":
        chunk = prefill_chunk or DECODE_CHUNK
    else:
        chunk = prefill_chunk or input_ids.shape[1]
    if chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1.")
    every = pol.evict_every if evict_every is None else evict_every
    budgets = plan_budget(pol, budget, context=[r + steps for r in real], moment=moment, chunk=chunk,
                          evict_every=every, prompt=real)
    budgets = None if budgets is None or pol.keeps_everything else budgets
    free = None if budgets is None else [free_slots(pol, b, moment, chunk if r > b else 1, every)
                                         for b, r in zip(budgets, real)]
    if prefill is not None:
        if moment != "prompt":
            raise ValueError("A shared Prefill serves prompt compression only (moment='prompt'): decode-time "
                             "eviction must read the prompt itself.")
        if not torch.equal(prefill.input_ids.cpu(), input_ids.cpu()):
            raise ValueError("The Prefill was read for other input_ids than these.")
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), mask_in.to(device)
    if force is not None and draws > 1:
        force = force.repeat_interleave(draws, 0)
    t0 = time.perf_counter()
    if prefill is not None:
        cache = prefill.compressed(pol, budgets, draws)
        cache.record, cache.capturing = record, argmax
        logits, last_pos = prefill.logits, prefill.last_pos
        if draws > 1:
            logits, last_pos = logits.repeat_interleave(draws, 0), last_pos.repeat_interleave(draws, 0)
            mask = mask.repeat_interleave(draws, 0)
        peak = cache_bytes(prefill.cache)
    else:
        if draws > 1:
            ids, mask = ids.repeat_interleave(draws, 0), mask.repeat_interleave(draws, 0)
        rows_budgets = None if budgets is None else [b for b in budgets for _ in range(draws)]
        _, layers = _check_model(model)
        cache = EvictingCache(len(layers), pol, rows_budgets, moment, every if moment == "decode" else 1, record)
        cache.capturing = cache.capturing or argmax
        peak = 0
    pos_all = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with _hooks(model, cache):
        if prefill is None:
            for s, e in _chunks(ids.shape[1], chunk):
                out = model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos_all[:, s:e],
                            past_key_values=cache, use_cache=True, logits_to_keep=1)  # only the last logits
                peak = max(peak, cache_bytes(cache))
                if argmax and pol.keeps_everything:  # only the latest query is needed for the arg-max
                    for layer in cache.layers:
                        layer.queries, layer.query_pos = layer.queries[:, :, -1:], layer.query_pos[-1:]
            logits, last_pos = out.logits[:, -1].float(), pos_all[:, -1:]
            if argmax and moment == "prompt":
                cache.before_forward(1, ids.shape[0], None)  # compress now, so the arg-max of step 0 sees the cut cache
                cache.capturing = True
        t1 = time.perf_counter()
        res = _decode(model, cache, logits, mask, last_pos, steps, force, argmax, eos_token_id, device)
        t2 = time.perf_counter()
    first = (mask.long().cumsum(-1) == 0).sum(-1)  # (B,) index of each row's first real token (after its padding)
    held = ((cache.kept_positions() == first[None, :, None, None]) & cache.kept_valid()).any(-1)  # (L, B, H)
    return Generation(tokens=res["tokens"], kv_bytes=cache_bytes(cache), peak_kv_bytes=max(peak, res["peak"]),
                      evictions=cache.evictions, seconds_prefill=(t1 - t0) + (prefill.seconds if prefill else 0.0),
                      seconds_decode=t2 - t1, budget=budgets, free_slots=free, prefill_chunk=chunk,
                      events=cache.events, logprobs=res["logprobs"],
                      kept=cache.kept_positions().to(torch.int32).cpu() if record else None,
                      kept_valid=cache.kept_valid().cpu() if record else None, argmax=res["argmax"],
                      first_token_kept=held.float().mean((0, 2)).tolist())


# --------------------------------------------------------------------------- analysis


@torch.inference_mode()
def record_attention(model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Greedy full-cache generation that records, at every decoding step, the attention of the step's
    query over all earlier tokens, per query head. ``input_ids`` (B, T), left-padded with
    ``attention_mask`` for a batch. Returns the generated ids (B, new), their log-probabilities (B, new),
    and per row a list of ``new`` tensors (layers, query heads, tokens so far — padding removed, so
    position 0 is the row's first real token) in float32."""
    if input_ids.ndim != 2:
        raise ValueError("record_attention takes input_ids of shape (batch, tokens).")
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens}: record at least one step.")
    _, layers = _check_model(model)
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(ids)
    pad = (mask.shape[1] - mask.sum(1)).tolist()
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = EvictingCache(len(layers), FullCache(), None, "decode")
    steps, logps, maps = [], [], [[] for _ in range(ids.shape[0])]
    with _hooks(model, cache):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache.capturing, last = True, pos[:, -1:]
        for _ in range(new_tokens):
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
            nxt = logp.argmax(-1, keepdim=True)
            steps.append(nxt)
            logps.append(logp.gather(-1, nxt))
            mask, last = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1), last + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=last, past_key_values=cache, use_cache=True)
            per_layer = []
            for layer in cache.layers:
                q = layer.queries[:, :, -1:]  # (B, Hq, 1, D)
                hkv, d = layer.keys.shape[1], q.shape[-1]
                k = layer.keys.repeat_interleave(q.shape[1] // hkv, dim=1)
                logits = (q.float() @ k.float().transpose(-1, -2))[:, :, 0] / math.sqrt(d)  # (B, Hq, S)
                valid = layer.valid.repeat_interleave(q.shape[1] // hkv, dim=1)
                per_layer.append(torch.softmax(logits.masked_fill(~valid, -math.inf), -1))
                layer.queries, layer.query_pos = None, None
            att = torch.stack(per_layer, 1).cpu()  # (B, L, Hq, S)
            for b in range(att.shape[0]):
                maps[b].append(att[b, :, :, pad[b]:])
    return torch.cat(steps, 1).cpu(), torch.cat(logps, 1).cpu(), maps


def _returns(top: torch.Tensor, below: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over steps (dim 0) of ``top`` (in the top-k) and ``below`` (ranked below the leave rank):
    a *return* at step t is a token in the top-k at t that was in the top-k before and has fallen below
    the leave rank since. Returns (gap of every return, per-(layer, head, token) count of returns)."""
    last = torch.full(top.shape[1:], -1, dtype=torch.long)
    left = torch.zeros(top.shape[1:], dtype=torch.bool)
    count = torch.zeros(top.shape[1:], dtype=torch.long)
    gaps = []
    for t in range(top.shape[0]):
        ret = top[t] & left & (last >= 0)
        if bool(ret.any()):
            gaps.append((t - last)[ret])
            count += ret
        left = (left | below[t]) & ~top[t]
        last = torch.where(top[t], t, last)
    return (torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.long)), count


def recurrence(maps: list[torch.Tensor], top_k: int = 16, leave_rank: int = 64, start: int = 0, shuffles: int = 8,
               seed: int = 0) -> dict:
    """Token Importance Recurrence from recorded attention (``record_attention``'s maps of one prompt).

    Per layer and query head, at each step the ``top_k`` most attended tokens are *important*. A token
    has *left* when it ranks below ``leave_rank`` (what a policy keeping ``leave_rank`` tokens by this
    attention would evict), and *returns* when it is important again. Only the steps from ``start`` on
    are analysed, over the tokens that exist at every one of them (positions before step ``start``'s
    context ends). The null: the same attention with its steps in random order (``shuffles`` times,
    seeded), which keeps each token's attention level and removes its timing.

    Returns counts (so that several prompts add up): ``ever`` (layer, head, token) triples ever
    important, ``recurring`` those that returned at least once, ``returns``, the gap histogram ``gaps``
    (index = steps between the last time in the top-k and the return), the same for the null
    (``null_recurring``, ``null_returns``: means over shuffles), and the fractions.
    """
    if len(maps) - start < 2:
        raise ValueError(f"{len(maps)} recorded steps from start={start}: record at least two steps to analyse.")
    if not 0 < top_k < leave_rank:
        raise ValueError(f"top_k={top_k} must be positive and below leave_rank={leave_rank}.")
    n = maps[start].shape[-1]
    att = torch.stack([m[..., :n] for m in maps[start:]])  # (T, L, H, n)
    rank = att.argsort(-1, descending=True).argsort(-1)  # 0 = most attended
    top, below = rank < top_k, rank >= leave_rank
    gaps, count = _returns(top, below)
    ever = top.any(0)
    g = torch.Generator().manual_seed(seed)
    null_rec, null_ret = [], []
    for _ in range(shuffles):
        perm = torch.randperm(top.shape[0], generator=g)
        _, c = _returns(top[perm], below[perm])
        null_rec.append(int(((c > 0) & ever).sum()))
        null_ret.append(int(c.sum()))
    n_ever = int(ever.sum())
    out = {"top_k": top_k, "leave_rank": leave_rank, "steps": int(top.shape[0]), "tokens": n,
           "ever": n_ever, "recurring": int(((count > 0) & ever).sum()), "returns": int(count.sum()),
           "gaps": torch.bincount(gaps, minlength=2).tolist() if gaps.numel() else [0, 0],
           "null_recurring": sum(null_rec) / max(1, shuffles), "null_returns": sum(null_ret) / max(1, shuffles)}
    out["fraction_recurring"] = out["recurring"] / max(1, n_ever)
    out["null_fraction_recurring"] = out["null_recurring"] / max(1, n_ever)
    return out


def retrieval_scores(argmax: torch.Tensor, tokens: torch.Tensor, input_ids: torch.Tensor,
                     needle: Sequence[tuple[int, int]], answer_tokens: Sequence[int]) -> torch.Tensor:
    """Wu et al.'s retrieval score of every (layer, query head), per row: (B, L, Hq).

    At each answer step, a head *copies* when its most attended key (``argmax``: (steps, L, B, Hq), from
    ``generate(argmax=True)``) lies in the row's ``needle`` span [a, b) of ``input_ids`` and holds the
    very token generated at that step (``tokens``: (B, steps)). The score is the number of copy events
    divided by ``answer_tokens`` (per row), the number of tokens the answer had to copy. With the span of
    the code's digits as the needle, a head that pointed at every digit as it was written scores 1.
    (Wu et al. take the whole needle sentence and divide by its length, as their needles are copied whole;
    ours is a sentence of which only the number is copied.)"""
    steps, L, B, H = argmax.shape
    idx = argmax.long().clamp(min=0)
    prompt = torch.cat([input_ids.cpu(), tokens.cpu()], 1)  # a head may attend to the answer written so far
    seen = torch.stack([prompt[b].gather(0, idx[:, :, b].reshape(-1)).view(steps, L, H) for b in range(B)], 2)
    spans = torch.tensor(list(needle))  # (B, 2)
    inside = (idx >= spans[None, None, :, None, 0]) & (idx < spans[None, None, :, None, 1])
    copied = inside & (seen == tokens.T[:steps, None, :, None])
    return copied.sum(0).permute(1, 0, 2).float() / torch.tensor(list(answer_tokens), dtype=torch.float)[:, None, None]


def eviction_map(events: list[dict], seen: int, layer: int = 0, head: int = 0, row: int = 0) -> torch.Tensor:
    """(evictions, positions) image of what ``layer``/``head`` holds after each eviction: 1 kept,
    0 evicted, NaN not yet read (events recorded with ``record=True``)."""
    img = torch.full((len(events), seen), float("nan"))
    for i, e in enumerate(events):
        img[i, :e["seen"]] = 0.0
        pos, ok = e["positions"][layer, row, head].long(), e["valid"][layer, row, head]
        img[i, pos[ok]] = 1.0
    return img


# --------------------------------------------------------------------------- the chapter's experiments


def _fact_kept(g: Generation, spans: list[tuple[int, int]], draws: int = 1) -> torch.Tensor:
    """(rows, layers) share of each row's ``spans`` tokens its cache kept at the end, mean over KV heads."""
    kept, ok = g.kept.long(), g.kept_valid  # (L, B', H, S)
    span = torch.tensor([s for s in spans for _ in range(draws)])  # (B', 2)
    inside = (kept >= span[None, :, None, None, 0]) & (kept < span[None, :, None, None, 1]) & ok
    n = (span[:, 1] - span[:, 0]).float()
    return (inside.sum(-1).float().mean(-1) / n[None]).T  # (B', L)


def retrieval_runs(model, tokenizer, items, settings: Sequence[tuple], *, answer_tokens: int = 6, batch_size: int = 8,
                   prefill_chunk: int = DECODE_CHUNK, draws: int = 8, decode_batch_size: int = 24,
                   progress: bool = True) -> dict:
    """Greedy answers to ``needle`` items under many (policy, budget, moment) ``settings``.

    Each batch of ``batch_size`` items is prefilled once: the full cache and every prompt-moment setting share
    that prefill (``Prefill``), and the prompt-moment settings are answered together (``generate_compressed``).
    Decode-moment settings read the prompts themselves in chunks of ``prefill_chunk``, ``decode_batch_size``
    items at a time (their caches stay within budget, so a large batch is cheap in memory). ``"oracle"`` as a
    policy keeps each item's fact tokens (a check of the mechanism). A stochastic policy (random) is run
    ``draws`` times per item; its per-item result is the share of draws answered (an estimate of the expected
    accuracy over draws). Budgets are token counts here; all are checked before any model work.

    Returns ``{"full": {...}, "runs": [...]}``; every run has ``policy, budget, moment, correct`` (per
    item: bool, or a share for a stochastic policy), ``answers``, ``accuracy``, ``free_slots``,
    ``kv_bytes`` (largest at the end of a batch), ``fact_kept`` (per item: share of the code's digit
    tokens kept, mean over layers and KV heads) and ``fact_kept_per_layer``. ``full`` adds the
    retrieval score of every head for every item (``head_scores``: items × layers × query heads).
    """
    if not len(items):
        raise ValueError("retrieval_runs needs at least one item (got none): build them with "
                         "needle.needle_items(...).")
    _check_steps(answer_tokens, "answer_tokens")
    settings = [(p, b, m) for p, b, m in settings]
    for p, b, m in settings:  # every setting is checked before any model work
        if p != "oracle":
            plan_budget(p, b, context=[it.n_tokens + answer_tokens for it in items], moment=m, chunk=prefill_chunk)
        elif m != "prompt" or isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise ValueError("The oracle runs at the prompt moment with a token budget.")
    # one instance per policy name (instances given are used as they are): the prefill computes each one's
    # statistics once, for every budget
    by_name: dict[str, Policy] = {}
    pols = [None if p == "oracle" else (by_name.setdefault(p, get_policy(p)) if isinstance(p, str) else p)
            for p, _, _ in settings]
    prompt_policies = list({id(p): p for p, (_, _, m) in zip(pols, settings) if p is not None and m == "prompt"}.values())
    prompt_ids = sorted((k for k, (_, _, m) in enumerate(settings) if m == "prompt"), key=lambda k: settings[k][1])
    decode_ids = [k for k, (_, _, m) in enumerate(settings) if m == "decode"]
    n = len(items)
    runs = [dict(policy=p if isinstance(p, str) else p.name, budget=b, moment=m, correct=[None] * n,
                 answers=[None] * n, fact_kept=[None] * n, fact_kept_per_layer=[None] * n, kv_bytes=0,
                 free_slots=None, draws=1) for p, b, m in settings]
    full = dict(correct=[None] * n, answers=[None] * n, kv_bytes=0, head_scores=[None] * n)
    batches = [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
    decode_batches = [list(range(i, min(n, i + decode_batch_size))) for i in range(0, n, decode_batch_size)]
    bar = None
    if progress:
        bar = tqdm(total=len(batches) + len(decode_batches) * len(decode_ids), desc="retrieval runs", leave=False)

    def spans(idx, enc):
        pad = (enc.attention_mask.shape[1] - enc.attention_mask.sum(1)).tolist()
        return ([(p + items[i].answer_span[0], p + items[i].answer_span[1]) for p, i in zip(pad, idx)],
                [(p + items[i].fact_span[0], p + items[i].fact_span[1]) for p, i in zip(pad, idx)])

    def fill(run, g, idx, reps, answer_spans):
        texts = tokenizer.batch_decode(g.tokens, skip_special_tokens=True)
        ok = [bool(is_correct(t, items[idx[k // reps]])) for k, t in enumerate(texts)]
        kept = _fact_kept(g, answer_spans, reps).view(len(idx), reps, -1).mean(1)
        for k, i in enumerate(idx):
            run["correct"][i] = sum(ok[k * reps:(k + 1) * reps]) / reps if reps > 1 else ok[k]
            run["answers"][i] = texts[k * reps]
            run["fact_kept"][i], run["fact_kept_per_layer"][i] = float(kept[k].mean()), kept[k].tolist()
        run["kv_bytes"] = max(run["kv_bytes"], g.kv_bytes // reps)
        free = None if g.free_slots is None else min(g.free_slots)
        run["free_slots"] = free if run["free_slots"] is None or free is None else min(free, run["free_slots"])
        run["draws"] = reps

    for idx in batches:
        enc = _batch(tokenizer, [items[i].prompt for i in idx])
        answer_spans, fact_spans = spans(idx, enc)
        pf = Prefill(model, enc.input_ids, enc.attention_mask, policies=prompt_policies)
        g = generate(model, enc.input_ids, attention_mask=enc.attention_mask, policy="full", moment="prompt",
                     max_new_tokens=answer_tokens, prefill=pf, argmax=True)
        texts = tokenizer.batch_decode(g.tokens, skip_special_tokens=True)
        heads = retrieval_scores(g.argmax, g.tokens, enc.input_ids, answer_spans, [b - a for a, b in answer_spans])
        for k, i in enumerate(idx):
            full["correct"][i], full["answers"][i] = bool(is_correct(texts[k], items[i])), texts[k]
            full["head_scores"][i] = heads[k]
        full["kv_bytes"] = max(full["kv_bytes"], g.kv_bytes)
        chosen = []
        for k in prompt_ids:
            pol = pols[k]
            if pol is None:  # the oracle: the fact sentence, per row
                pol = Oracle(positions=tuple(tuple(range(a, e)) for a, e in fact_spans))
            chosen.append((pol, settings[k][1], draws if pol.stochastic else 1))
        gens = generate_compressed(model, pf, chosen, max_new_tokens=answer_tokens, record=True)
        for k, (pol, _, reps), g in zip(prompt_ids, chosen, gens):
            fill(runs[k], g, idx, reps, answer_spans)
        del pf
        if bar:
            bar.update()
    for k in decode_ids:
        for idx in decode_batches:
            enc = _batch(tokenizer, [items[i].prompt for i in idx])
            answer_spans, _ = spans(idx, enc)
            reps = draws if pols[k].stochastic else 1
            g = generate(model, enc.input_ids, attention_mask=enc.attention_mask, policy=pols[k], budget=settings[k][1],
                         moment="decode", max_new_tokens=answer_tokens, prefill_chunk=prefill_chunk, draws=reps,
                         record=True)
            fill(runs[k], g, idx, reps, answer_spans)
            if bar:
                bar.update()
    if bar:
        bar.close()
    full["accuracy"] = sum(full["correct"]) / n
    full["head_scores"] = torch.stack(full["head_scores"])
    for run in runs:
        run["accuracy"] = sum(run["correct"]) / n
    return {"full": full, "runs": runs}


def retrieval_accuracy(model, tokenizer, items, *, policy="full", budget=None, moment="decode", answer_tokens: int = 6,
                       prefill_chunk: int = DECODE_CHUNK, batch_size: int = 8) -> dict:
    """Greedy answers to ``needle`` items under one policy/budget/moment: accuracy, per-item correctness,
    the answers, KV bytes at the end and the token budget of every item."""
    if not len(items):
        raise ValueError("retrieval_accuracy needs at least one item (got none): build them with "
                         "needle.needle_items(...).")
    _check_steps(answer_tokens, "answer_tokens")
    check_budget_value(budget)
    correct, answers, kv_bytes, budgets = [], [], 0, []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        enc = _batch(tokenizer, [it.prompt for it in chunk])
        g = generate(model, enc.input_ids, attention_mask=enc.attention_mask, policy=policy, budget=budget,
                     moment=moment, max_new_tokens=answer_tokens, prefill_chunk=prefill_chunk)
        texts = tokenizer.batch_decode(g.tokens, skip_special_tokens=True)
        answers += texts
        correct += [bool(is_correct(t, it)) for t, it in zip(texts, chunk)]
        kv_bytes = max(kv_bytes, g.kv_bytes)
        budgets += g.budget or [None] * len(chunk)
    return {"accuracy": sum(correct) / len(correct), "correct": correct, "answers": answers, "kv_bytes": kv_bytes,
            "budget_tokens": budgets}


@torch.inference_mode()
def continuation_nll(model, input_ids, attention_mask, reference: torch.Tensor, *, policy, budget, moment="decode",
                     prefill_chunk: int | None = None, record: bool = False) -> dict:
    """How well an evicting cache still predicts the full cache's own continuation: ``reference`` (B, N)
    teacher-forced through the evicting cache. Returns the mean negative log-likelihood per row (a
    sequence-level score: its exp is the perplexity of the continuation), the budgets, and the run."""
    g = generate(model, input_ids, attention_mask=attention_mask, policy=policy, budget=budget, moment=moment,
                 force=reference, prefill_chunk=prefill_chunk, record=record)
    nll = (-g.logprobs.double()).mean(1)
    return {"nll": nll.tolist(), "budget_tokens": g.budget, "free_slots": g.free_slots, "generation": g}


def reasoning_accuracy(model, tokenizer, prompts: Sequence[str], settings: Sequence[tuple], *,
                       check: Callable[[str, int], bool], max_new_tokens: int = 256, moment: str = "decode",
                       batch_size: int = 8, prefill_chunk: int | None = None, min_cot_tokens: int = 0,
                       max_problems: int | None = None, require_eos: bool = True, reference: dict | None = None,
                       progress: bool = True) -> dict:
    """Answer accuracy of decode-time eviction on long reasoning, paired per problem (LazyEviction's claim).

    ``prompts``: chat-formatted problems (text ready to tokenise without special tokens). ``check(text,
    i)``: whether the generated ``text`` answers problem ``i`` correctly (the caller's exact checker).
    ``settings``: (policy, budget) pairs; a float budget is a fraction of *each problem's* full-cache
    length (its prompt + the chain of thought the full cache wrote, up to its end-of-sequence token), an
    int a token count. The full cache runs first (greedy, stopping at the tokenizer's EOS), then every
    setting decodes the same problems with its own per-problem budgets (rows of a batch may differ).

    **Which problems.** Only problems on which the full cache *finished* its chain of thought (it wrote the EOS
    token within ``max_new_tokens``: the budget is a share of a length that exists; ``require_eos=False`` keeps
    unfinished ones too, their length counted as ``max_new_tokens``) and wrote at least
    ``min_cot_tokens`` tokens are kept, the first ``max_problems`` of them in the order given; the evicting runs
    decode only those, batched by the full run's length (the rows of a batch stop together). ``"selection"``
    counts what was dropped and why. ``reference``: an earlier result of this function on the same ``prompts``
    (same selection arguments); its selection and full-cache run are reused instead of decoding the candidates
    again, so more settings can be added to a finished study.

    Returns ``{"selection": {candidates, unfinished, short, kept (indices into prompts)}, "full": {correct, texts,
    cot_tokens, prompt_tokens, accuracy} (over the kept problems), "runs": [{policy, budget, budget_tokens (per
    problem), free_slots (per problem), correct, texts, cot_tokens, first_token_kept (per problem: the share of
    layer-heads still holding its first token at the end), accuracy, vs_full}]}`` where ``vs_full`` is
    ``stats.paired_binary(run, full)`` (exact McNemar) against the first full-cache run, which decoded the problems
    in other batches (other padding): a long greedy CoT can change with that alone, so put ``("full", 1.0)`` among
    the settings for a reference decoded in the same batches as every evicting run (notebook 04 does, and compares
    with it). Compare two runs with ``stats.paired_binary(a["correct"], b["correct"])``.
    """
    if not prompts:
        raise ValueError("reasoning_accuracy() needs at least one prompt.")
    _check_steps(max_new_tokens, "max_new_tokens")
    if isinstance(min_cot_tokens, bool) or not isinstance(min_cot_tokens, numbers.Integral) or min_cot_tokens < 0:
        raise ValueError(f"min_cot_tokens={min_cot_tokens!r} must be an int >= 0.")
    if min_cot_tokens >= max_new_tokens:
        raise ValueError(f"min_cot_tokens={min_cot_tokens} leaves no problem: the full cache writes at most "
                         f"max_new_tokens={max_new_tokens} tokens; raise max_new_tokens or lower min_cot_tokens.")
    if max_problems is not None and (isinstance(max_problems, bool) or not isinstance(max_problems, numbers.Integral)
                                     or max_problems < 1):
        raise ValueError(f"max_problems={max_problems!r} must be an int >= 1, or None for all.")
    for p, b in settings:
        get_policy(p)
        check_budget_value(b)  # a float is a fraction of each problem's full chain of thought
    eos = tokenizer.eos_token_id
    n_all = len(prompts)
    cand_batches = [list(range(i, min(n_all, i + batch_size))) for i in range(0, n_all, batch_size)]

    def texts_of(tokens):
        out, lengths, done = [], [], []
        for row in tokens.tolist():
            cut = row.index(eos) if eos is not None and eos in row else len(row)
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
            lengths.append(cut)
            done.append(cut < len(row))
        return out, lengths, done

    if reference is not None:
        sel = reference.get("selection", {})
        if sel.get("candidates") != n_all or sel.get("min_cot_tokens") != min_cot_tokens or \
                sel.get("require_eos") != bool(require_eos) or (max_problems is not None and len(sel["kept"]) > max_problems):
            raise ValueError(f"reference= was computed for {sel.get('candidates')} prompts with min_cot_tokens="
                             f"{sel.get('min_cot_tokens')}, require_eos={sel.get('require_eos')} ({len(sel.get('kept', []))} "
                             f"kept), not for these {n_all} with min_cot_tokens={min_cot_tokens}, require_eos={require_eos}, "
                             f"max_problems={max_problems}: pass the same prompts and selection arguments, or no reference.")
        cand_batches = []
    bar = tqdm(total=len(cand_batches), desc="reasoning: full cache", leave=False, disable=not progress or not cand_batches)
    cand = {k: [None] * n_all for k in ("correct", "texts", "cot_tokens", "prompt_tokens", "finished")}
    for idx in cand_batches:
        enc = _batch(tokenizer, [prompts[i] for i in idx])
        g = generate(model, enc.input_ids, attention_mask=enc.attention_mask, policy="full",
                     max_new_tokens=max_new_tokens, eos_token_id=eos)
        texts, lengths, done = texts_of(g.tokens)
        for k, i in enumerate(idx):
            cand["texts"][i], cand["cot_tokens"][i], cand["finished"][i] = texts[k], lengths[k], done[k]
            cand["prompt_tokens"][i] = int(enc.attention_mask[k].sum())
            cand["correct"][i] = bool(check(texts[k], i))
        bar.update()
    bar.close()
    if reference is not None:
        selection, full = reference["selection"], reference["full"]
        kept, n = selection["kept"], len(selection["kept"])
    else:
        eligible = [i for i in range(n_all) if cand["finished"][i] or not require_eos]
        kept = [i for i in eligible if cand["cot_tokens"][i] >= min_cot_tokens][:max_problems]
        selection = dict(candidates=n_all, unfinished=n_all - sum(cand["finished"]),
                         short=sum(cand["cot_tokens"][i] < min_cot_tokens for i in eligible), kept=kept,
                         min_cot_tokens=int(min_cot_tokens), require_eos=bool(require_eos))
        n = len(kept)
        full = {k: [cand[k][i] for i in kept] for k in ("correct", "texts", "cot_tokens", "prompt_tokens")}
        full["accuracy"] = sum(full["correct"]) / n if n else None
    if not settings or not n:
        return {"selection": selection, "full": full, "runs": []}
    # batches of similar full length (indices into `kept`): the rows of a batch decode until the last one stops
    order = sorted(range(n), key=lambda j: full["prompt_tokens"][j] + full["cot_tokens"][j])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    encs = [_batch(tokenizer, [prompts[kept[j]] for j in idx]) for idx in batches]
    # every budget resolved (and checked) before the evicting runs start
    plans = []
    for p, b in settings:
        frac = b is not None and not isinstance(b, numbers.Integral)
        per = [round(b * (full["prompt_tokens"][j] + full["cot_tokens"][j])) if frac else b for j in range(n)]
        for idx in batches:
            plan_budget(p, [per[j] for j in idx], context=[full["prompt_tokens"][j] + max_new_tokens for j in idx],
                        moment=moment, chunk=prefill_chunk or DECODE_CHUNK,
                        prompt=[full["prompt_tokens"][j] for j in idx])
        plans.append(per)
    bar = tqdm(total=len(batches) * len(settings), desc="reasoning: evicting runs", leave=False, disable=not progress)
    runs = []
    for (p, b), per in zip(settings, plans):
        run = dict(policy=p if isinstance(p, str) else p.name, budget=b, budget_tokens=per, free_slots=[None] * n,
                   correct=[None] * n, texts=[None] * n, cot_tokens=[None] * n, first_token_kept=[None] * n)
        for idx, enc in zip(batches, encs):
            g = generate(model, enc.input_ids, attention_mask=enc.attention_mask, policy=p, budget=[per[j] for j in idx],
                         moment=moment, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk, eos_token_id=eos)
            texts, lengths, _ = texts_of(g.tokens)
            for k, j in enumerate(idx):
                run["texts"][j], run["cot_tokens"][j] = texts[k], lengths[k]
                run["correct"][j] = bool(check(texts[k], kept[j]))
                run["free_slots"][j] = None if g.free_slots is None else g.free_slots[k]
                run["first_token_kept"][j] = g.first_token_kept[k]
            bar.update()
        run["accuracy"] = sum(run["correct"]) / n
        run["vs_full"] = paired_binary(run["correct"], full["correct"])
        runs.append(run)
    bar.close()
    return {"selection": selection, "full": full, "runs": runs}


# --------------------------------------------------------------------------- a run's rows, verdicts and words
# (what notebook 04 reads its tables and conclusions with: lookups and wording, no model work)

def run_of(runs: Sequence[dict], policy: str, moment: str, budget) -> dict | None:
    """The row of ``runs`` for (policy, moment, budget), or None."""
    return next((r for r in runs if (r["policy"], r["moment"], r["budget"]) == (policy, moment, budget)), None)


def paired_verdict(a: dict, b: dict, mask, test: Callable) -> dict:
    """``test`` (``stats.paired`` or ``stats.paired_binary``) of two rows' per-item ``retrieval_correct`` on
    the items where ``mask`` is True, as one verdict record (A = ``a``, B = ``b``)."""
    import numpy as np

    mask = np.asarray(mask, bool)
    x, y = np.array(a["retrieval_correct"], float)[mask], np.array(b["retrieval_correct"], float)[mask]
    v = test(x, y)
    return dict(a=a["policy"], a_moment=a["moment"], b=b["policy"], b_moment=b["moment"], budget=a.get("budget"),
                items=int(mask.sum()), verdict=v["verdict"], p_value=v["p_value"], test=v["test"],
                mean_difference=v["mean_difference"], a_only=v.get("a_only"), b_only=v.get("b_only"))


def find_verdict(verdicts: Sequence[dict], a: str, b: str, budget, a_moment: str = "prompt",
                 b_moment: str = "prompt") -> dict | None:
    """The verdict of ``a`` (at ``a_moment``) against ``b`` at ``budget``, or None."""
    key = (a, b, budget, a_moment, b_moment)
    return next((v for v in verdicts if (v["a"], v["b"], v["budget"], v["a_moment"], v["b_moment"]) == key), None)


def verdict_mark(v: dict) -> str:
    """A verdict in a table cell: "better (p = 0.002)", "worse", "within noise (p = 0.5)", "too few items"."""
    word = verdict_words(v, "better", "worse", too_few="too few items")
    p = v["p_value"]
    return f"{word} (p = {p:.2g})" if p is not None and p == p else word


def verdict_word(v: dict, a: str, b: str) -> str:
    """A verdict in a sentence, naming the better side: "<a> better", "<b> better", "within noise"."""
    return verdict_words(v, f"{a} better", f"{b} better", too_few="too few items to test")


def accuracy_cell(r: dict | None) -> str:
    """A row's accuracy on all items · on the facts outside the recency window, "(no room)" when it had none."""
    if r is None:
        return "—"
    out = f"{r['accuracy_outside']:.0%}" if r["accuracy_outside"] is not None else "—"
    s = f"{r['retrieval_accuracy']:.0%} · {out}"
    return s if r["room_to_choose"] else s + " (no room)"


def free_cell(policy, budget: int, moment: str, chunk: int = DECODE_CHUNK) -> str:
    """The free slots of ``policy`` at ``budget`` for a table, marked when under half the budget."""
    f = free_slots(policy, budget, moment, chunk=chunk)
    return f"{f}" if f >= budget / 2 else f"**{f}: no room to choose**"


def recurrence_words(v: dict) -> str:
    """What a paired test of recurrence against its time-shuffled null says, in words (with the test)."""
    words = verdict_words(v, "more returns than the shuffled null, so they are a matter of timing",
                          "fewer returns than the shuffled null: attention is persistent, and what returns is mostly "
                          "what a head attends to often",
                          noise="no different from the shuffled null", too_few="too few prompts to test")
    if v["verdict"] == "too few pairs":
        return words
    return words + f" (paired Student t over {v['n']} prompts, p = {v['p_value']:.2g})"
