"""KV-cache eviction during generation: StreamingLLM, H2O, TOVA, SnapKV and LazyEviction (chapter 04).

A decoder keeps the keys and values of every token it has seen. Eviction keeps only ``budget`` of
them per layer and KV head. The policies differ only in *which* tokens they keep, so each is one
small dataclass with one ``score()`` (higher = keep) over one shared mechanism:

- ``EvictingCache`` is a ``transformers`` ``Cache`` whose layers (``EvictingLayer``) count the tokens
  they have seen, remember the full-sequence position of every kept slot, and store only compact
  tensors. It plugs into ``model.generate(..., past_key_values=cache)`` and into a manual decode loop.
- ``evicting(model, policy, budget, moment)`` is the context manager that creates the cache and the
  hooks: the query of every layer (rotated like the keys) is captured from ``q_proj`` and the rotary
  ``position_embeddings``, so the attention a policy needs is computed from the current queries and
  the cached keys, with the model's default (SDPA) attention left as it is. The hooks are removed in
  ``finally``.

Two moments to evict, for every policy:

- ``moment="prompt"``: prompt compression (SnapKV, kvpress). The prompt is prefilled whole; before
  the first decoding step the cache is cut to ``budget`` tokens; decoding then grows it again.
- ``moment="decode"``: the cache never holds more than ``budget`` keys, including the tokens being
  processed (StreamingLLM, H2O, TOVA, LazyEviction). Before each forward the cache is cut so that
  the new tokens fit; to amortise scoring it is cut ``evict_every - 1`` tokens deeper, so scores are
  computed once every ``evict_every`` steps (1 = every step, the papers' setting).

The budget is the number of tokens each KV head of each layer keeps (an int), or a fraction of the
full context (prompt + new tokens, resolved by ``generate``). Each KV head chooses its own tokens;
the query heads that share a KV head (GQA) are averaged. The same number of tokens is kept in every
layer: transformers builds one causal mask for all layers from layer 0's sizes, so per-layer budgets
(PyramidKV-style) would need a mask per layer; they are left out.

Positions: new tokens get the positions of the full sequence (``get_seq_length`` is the number of
tokens seen, not kept), and the attention mask covers exactly the kept slots (``get_mask_sizes``).
Left padding: padding slots get the lowest score, so they are evicted before any real token and
kept only while a row has fewer real tokens than the budget; with the slots kept in sequence order
the padding mask then still lines up (tested against one prompt at a time).
"""

from __future__ import annotations

import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

MOMENTS = ("prompt", "decode")


# --------------------------------------------------------------------------- policies


@dataclass
class FullCache:
    """The reference: keep everything (never evicts, whatever the budget)."""

    name = "full"
    sinks: int = 0
    queries: int = 0  # how many of the latest queries ``score`` needs (their attention is computed)
    observes: bool = False  # whether every query's attention must pass through ``observe`` once
    observes_sum: bool = False  # ``observe`` needs only the sum over queries: one (B, H, 1, S) row may stand for many

    def recent(self, budget: int) -> int:
        return 0

    def observe(self, state: dict, attn: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor) -> None:
        """Update running statistics from the attention (B, H, Q, S) of new queries; default: none."""

    def score(self, state: dict, attn: torch.Tensor | None, key_pos: torch.Tensor) -> torch.Tensor:
        return key_pos.float()


@dataclass
class StreamingLLM(FullCache):
    """Xiao et al. 2024: keep the first ``sinks`` tokens (attention sinks) and the most recent ones."""

    name = "streaming_llm"
    sinks: int = 4

    def score(self, state, attn, key_pos):
        return key_pos.float()  # the most recent win; the sinks are protected by the mechanism


@dataclass
class H2O(FullCache):
    """Zhang et al. 2023: heavy hitters (largest attention accumulated over all queries so far) plus
    the most recent tokens, ``recent_ratio`` of the budget (half and half, as published)."""

    name = "h2o"
    recent_ratio: float = 0.5
    observes: bool = True  # every query's attention is accumulated once
    observes_sum: bool = True  # ... and only its sum over queries matters

    def recent(self, budget):
        return int(budget * self.recent_ratio)

    def observe(self, state, attn, key_pos, query_pos):
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
class TOVA(FullCache):
    """Oren et al. 2024: evict the tokens the current (latest) query attends to least."""

    name = "tova"
    queries: int = 1

    def score(self, state, attn, key_pos):
        return attn[:, :, -1]


@dataclass
class SnapKV(FullCache):
    """Li et al. 2024: attention of the last ``window`` queries (the observation window), summed and
    smoothed by average pooling with ``kernel_size``; the window itself is always kept (kvpress's
    defaults: window 64, kernel 5, average pooling)."""

    name = "snapkv"
    window: int = 64
    kernel_size: int = 5

    def __post_init__(self):
        self.queries = self.window

    def recent(self, budget):
        return self.window

    def score(self, state, attn, key_pos):
        votes = attn.sum(2)  # (B, H, S)
        b, h, s = votes.shape
        pooled = F.avg_pool1d(votes.reshape(b * h, 1, s), self.kernel_size, stride=1,
                              padding=self.kernel_size // 2, count_include_pad=False)
        return pooled.reshape(b, h, s)


@dataclass
class LazyEviction(FullCache):
    """Zhang et al. 2025 (our reading of the paper's description): evict lazily, once per
    ``observation_window`` decoding steps, and rank tokens by their recurrence. A token is *attended*
    at a step when its attention is at least ``threshold`` × the uniform share 1/n. For each token we
    track the last step it was attended and its maximum recurrence interval (MRI: the longest gap
    between two attended steps seen so far). Score = MRI − (steps since last attended): a token that
    usually comes back after k steps is kept until it has been silent for longer than k; tokens never
    attended twice rank by how recently they were attended. The most recent ``observation_window``
    tokens are always kept. Defaults: window 16 and threshold 1.0 are ours — the paper's exact values
    could not be read here; the notebook says so."""

    name = "lazy_eviction"
    observation_window: int = 16
    threshold: float = 1.0
    observes: bool = True

    def recent(self, budget):
        return self.observation_window

    def observe(self, state, attn, key_pos, query_pos):
        s = attn.shape[-1]
        n = (key_pos[:, :, None, :] <= query_pos[None, None, :, None]).sum(-1, keepdim=True).clamp(min=1)
        hit = attn * n >= self.threshold  # (B, H, Q, S): attended at that step
        last, mri = state.get("last"), state.get("mri")
        if last is None:
            last = key_pos.float().clone()  # a token counts as attended when it is born
            mri = torch.zeros_like(last)
        elif last.shape[-1] < s:
            new = key_pos[..., last.shape[-1]:].float()
            last, mri = torch.cat([last, new], -1), torch.cat([mri, torch.zeros_like(new)], -1)
        steps = torch.where(hit, query_pos.float()[None, None, :, None], -math.inf)  # (B, H, Q, S)
        # last attended step before each query: running max over the window, seeded with `last`
        prev = torch.cat([last[:, :, None, :], steps], 2).cummax(2).values  # (B, H, Q+1, S)
        gaps = torch.where(hit, steps - prev[:, :, :-1], -math.inf)
        state["mri"] = torch.maximum(mri, gaps.amax(2).clamp(min=0))
        state["last"] = prev[:, :, -1]
        state["now"] = float(query_pos[-1])

    def score(self, state, attn, key_pos):
        return state["mri"] - (state["now"] - state["last"])


@dataclass
class Oracle(FullCache):
    """Not a paper's policy but a control: keeps the given full-sequence ``positions`` (e.g. the inserted fact)
    before anything else, then the most recent tokens. If the model answers under this policy at a budget
    where the others fail, the failures come from their choices, not from the eviction mechanism."""

    name = "oracle"
    positions: tuple[int, ...] = ()

    def score(self, state, attn, key_pos):
        wanted = torch.isin(key_pos, torch.tensor(self.positions, dtype=key_pos.dtype, device=key_pos.device))
        return key_pos.float() + 1e9 * wanted


POLICIES = {p.name: p for p in (FullCache, StreamingLLM, H2O, TOVA, SnapKV, LazyEviction)}


def get_policy(policy) -> FullCache:
    """A policy instance from a name (``"h2o"``) or an instance."""
    if isinstance(policy, FullCache):
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]()
    raise ValueError(f"Unknown KV policy {policy!r}: choose one of {sorted(POLICIES)} or pass a policy instance.")


# --------------------------------------------------------------------------- the cache


class EvictingLayer(DynamicLayer):
    """One layer's compact keys/values, the full-sequence position of every kept slot, and the
    policy's running statistics. ``get_seq_length`` is the number of tokens seen."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.positions: torch.Tensor | None = None  # (B, H, S) long
        self.valid: torch.Tensor | None = None  # (B, H, S) bool: False for padding
        self.queries: torch.Tensor | None = None  # (B, Hq, Q, D) buffered rotated queries
        self.query_pos: torch.Tensor | None = None  # (Q,) their positions
        self.observed = 0  # queries already passed to policy.observe
        self.state: dict = {}
        self.pending_q: torch.Tensor | None = None
        self.pending_valid: torch.Tensor | None = None

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
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, pos], -1)
            self.valid = torch.cat([self.valid, valid], -1)
        if self.pending_q is not None:
            qpos = torch.arange(self.seen, self.seen + q, device=key_states.device)
            self.queries = self.pending_q if self.queries is None else torch.cat([self.queries, self.pending_q], 2)
            self.query_pos = qpos if self.query_pos is None else torch.cat([self.query_pos, qpos])
            self.pending_q = None
        self.seen += q
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def kept(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
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
                    valid: torch.Tensor, sum_queries: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ/√d) of each buffered query over the cached keys, causal by full-sequence position,
    padding masked, averaged over the query heads that share a KV head: (B, H_kv, Q, S).
    ``sum_queries=True`` returns its sum over the queries instead, as one row (B, H_kv, 1, S).

    Kept slots are in sequence order, so the keys no query can see yet (positions after the last query)
    form a tail of every row: it is cut before the matmul and comes back as zeros, and the causal mask is
    applied only where some query can see a key that another cannot (the diagonal block)."""
    b, hq, q, d = queries.shape
    s, hkv = keys.shape[-2], keys.shape[1]
    g = hq // hkv
    n = int((key_pos <= query_pos[-1]).sum(-1).max())  # slots some query can see: a prefix of every row
    keys, key_pos, valid = keys[:, :, :n], key_pos[..., :n], valid[..., :n]
    # one batched matmul per KV head over its g query heads (scaled queries: no pass over the scores)
    scaled = queries.float().reshape(b, hkv, g * q, d) * (1 / math.sqrt(d))
    logits = torch.matmul(scaled, keys.float().transpose(-1, -2)).view(b, hkv, g, q, n)
    m = 0 if not bool(valid.all()) else int((key_pos < query_pos[0]).sum(-1).min())  # all queries see [0, m)
    allowed = (key_pos[:, :, None, m:] <= query_pos[None, None, :, None]) & valid[:, :, None, m:]  # (B, H, Q, n-m)
    logits[..., m:].masked_fill_(~allowed[:, :, None], -math.inf)
    probs = torch.softmax(logits, -1)
    if bool(torch.isnan(probs[..., 0]).any()):  # a query (a padding slot) that sees no key at all: NaN row
        probs = probs.nan_to_num_(0.0)
    if sum_queries:  # a matmul with ones: the sum over g·q rows without a slow middle-dimension reduction
        out = torch.matmul(probs.new_full((1, g * q), 1.0 / g), probs.view(b, hkv, g * q, n))
    else:  # the group mean as g - 1 contiguous adds (a reduction over a middle dimension is slow on CPU)
        out = probs[:, :, 0].clone()
        for j in range(1, g):
            out += probs[:, :, j]
        out /= g
    return F.pad(out, (0, s - n)) if n < s else out


class EvictingCache(Cache):
    """A ``transformers`` cache of ``EvictingLayer`` s driven by one policy and one budget."""

    def __init__(self, num_layers: int, policy: FullCache, budget: int | None, moment: str, evict_every: int = 1,
                 record: bool = False):
        super().__init__(layers=[EvictingLayer() for _ in range(num_layers)])
        self.policy, self.budget, self.moment, self.evict_every = policy, budget, moment, evict_every
        self.compressed = False
        self.record = record
        self.events: list[dict] = []  # one per eviction: step, tokens seen, kept positions per layer (if record)
        self.evictions = 0
        self.scoring_seconds = 0.0

    # -- the shared mechanism: score, protect, select, gather into compact tensors
    def _observe(self, layer: EvictingLayer, chunk: int = 256) -> torch.Tensor | None:
        """Pass the queries not yet observed to ``policy.observe`` (in chunks, in time order), and return
        the attention of the latest ``policy.queries`` queries over the current keys (for ``score``)."""
        p = self.policy
        if layer.queries is None:
            return None
        total = layer.queries.shape[2]
        if p.observes:
            for a in range(layer.observed, total, chunk):
                qs, qp = layer.queries[:, :, a:a + chunk], layer.query_pos[a:a + chunk]
                attn = group_attention(qs, qp, layer.keys, layer.positions, layer.valid, sum_queries=p.observes_sum)
                p.observe(layer.state, attn, layer.positions, qp)
        attn = None
        if p.queries > 0:
            need = min(p.queries, total)
            attn = group_attention(layer.queries[:, :, total - need:], layer.query_pos[total - need:],
                                   layer.keys, layer.positions, layer.valid)
        keep = min(max(p.queries, 0), total)  # the buffer keeps what the next scoring may need again
        layer.queries = layer.queries[:, :, total - keep:] if keep else None
        layer.query_pos = layer.query_pos[total - keep:] if keep else None
        layer.observed = keep
        return attn

    def _evict(self, target: int) -> None:
        """Cut every layer holding more than ``target`` slots to ``target``. Scores come per layer (each has
        its own queries and keys); protection, the top-k and the sort run once over all layers stacked
        (every layer holds the same number of slots, as the budget is the same), then each layer's compact
        keys, values, positions and statistics are gathered."""
        t0 = time.perf_counter()
        layers = [layer for layer in self.layers if layer.kept() > target]
        if not layers:
            return
        sizes = {layer.kept() for layer in layers}
        if len(sizes) > 1:  # not reached by generate(); a cache filled by hand may differ per layer
            for layer in layers:
                self._select([layer], target)
        else:
            self._select(layers, target)
        self.scoring_seconds += time.perf_counter() - t0
        ev = {"seen": self.layers[0].seen, "kept": target}
        if self.record:
            ev["positions"] = torch.stack([layer.positions for layer in self.layers]).to(torch.int32).cpu()
        self.events.append(ev)

    def _select(self, layers: list[EvictingLayer], target: int) -> None:
        p = self.policy
        score = torch.stack([p.score(layer.state, self._observe(layer), layer.positions).float() for layer in layers])
        pos = torch.stack([layer.positions for layer in layers])  # (L, B, H, S)
        valid = torch.stack([layer.valid for layer in layers])
        seen = layers[0].seen
        recent_from = seen - min(p.recent(self.budget), target)
        first_real = torch.where(valid, pos, seen).amin(-1, keepdim=True)  # sinks: the first real tokens
        protect = (pos >= recent_from) | ((pos - first_real < p.sinks) & valid)
        score = torch.where(protect, math.inf, score)
        # padding: lowest of all, below every real token (-inf is taken by nothing else)
        score = torch.where(valid, score.nan_to_num(neginf=-1e30), -math.inf)
        idx = score.topk(target, dim=-1, sorted=False).indices.sort(-1).values  # kept slots in sequence order
        self.evictions += (pos.shape[-1] - target) * len(layers)
        pos, valid = pos.gather(-1, idx), valid.gather(-1, idx)
        for i, layer in enumerate(layers):
            k = idx[i][..., None]
            layer.keys = layer.keys.gather(2, k.expand(-1, -1, -1, layer.keys.shape[-1])).contiguous()
            layer.values = layer.values.gather(2, k.expand(-1, -1, -1, layer.values.shape[-1])).contiguous()
            layer.positions, layer.valid = pos[i], valid[i]
            for key in ("acc", "last", "mri"):
                if key in layer.state:
                    layer.state[key] = layer.state[key].gather(2, idx[i])

    def before_forward(self, q_len: int, attention_mask: torch.Tensor | None) -> None:
        """Called before every forward of the model: evict if this moment and budget say so."""
        layer0 = self.layers[0]
        if attention_mask is not None and attention_mask.ndim == 2:
            valid = attention_mask[:, -q_len:].bool()
        else:
            valid = None
        for layer in self.layers:
            layer.pending_valid = valid
        if self.budget is None or type(self.policy) is FullCache:
            return
        if self.moment == "prompt":
            if not self.compressed and layer0.seen > 0 and q_len == 1:
                self.compressed = True
                if layer0.kept() > self.budget:
                    self._evict(self.budget)
        elif layer0.kept() + q_len > self.budget:
            self._evict(max(self.budget - q_len - (self.evict_every - 1), self._floor()))

    def _floor(self) -> int:
        return min(self.policy.sinks + self.policy.recent(self.budget), self.budget - 1)

    def kept_positions(self) -> torch.Tensor:
        """(layers, B, H_kv, kept) full-sequence positions of the kept tokens."""
        return torch.stack([layer.positions for layer in self.layers])


def _check_model(model: nn.Module):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers is not None and len(layers) else None
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "head_dim")):
        raise ValueError(f"{type(model).__name__} has no Llama-style attention layout (model.model.layers[i]."
                         "self_attn with q_proj/k_proj/v_proj): KV eviction supports Llama, Mistral, Qwen2 and the like.")
    return base, layers


def _check_tokens(value, name: str = "budget") -> None:
    """Refuse a token budget that is not an int (``evicting``, ``check_budget`` and ``fits`` take tokens)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} is not a number of tokens: give an int here (for a fraction of the "
                         "context give round(fraction * context), or pass the fraction to generate).")


def check_budget(policy: FullCache, budget: int | None) -> None:
    if budget is None:
        return
    _check_tokens(budget)
    if type(policy) is FullCache:
        return
    if budget <= 0:
        raise ValueError(f"budget={budget}: give a positive number of tokens (or a fraction in (0, 1]).")
    need = policy.sinks + policy.recent(budget)
    if budget <= need:
        raise ValueError(f"budget={budget} tokens leaves no room to choose for {policy.name}: it always keeps "
                         f"{policy.sinks} sink(s) + {policy.recent(budget)} recent tokens. Give a budget above {need}.")


@contextmanager
def evicting(model: nn.Module, policy="full", budget: int | None = None, moment: str = "decode", *,
             evict_every: int | None = None, record: bool = False) -> Iterator[EvictingCache]:
    """Hooks on ``model`` and a fresh ``EvictingCache`` to pass as ``past_key_values``.

    ``budget`` is in tokens here (``generate`` resolves fractions). ``evict_every`` defaults to 1 (the
    papers' per-step eviction) and to the observation window for LazyEviction. The hooks capture each
    layer's rotated query (only when the policy needs queries) and the padding mask; they are removed
    when the block ends, also on error.
    """
    policy = get_policy(policy)
    if moment not in MOMENTS:
        raise ValueError(f"moment={moment!r}: choose 'prompt' (compress the prompt once) or 'decode' (never exceed "
                         "the budget).")
    check_budget(policy, budget)
    if evict_every is None:
        evict_every = policy.observation_window if isinstance(policy, LazyEviction) else 1
    if evict_every < 1:
        raise ValueError(f"evict_every={evict_every} must be >= 1.")
    if moment == "decode" and budget is not None and type(policy) is not FullCache:
        floor = policy.sinks + policy.recent(budget)
        if budget - evict_every <= floor:
            raise ValueError(f"budget={budget} is too small to evict every {evict_every} step(s) with {policy.name}: "
                             f"after each eviction {evict_every} new tokens must fit beside the {floor} it always "
                             f"keeps. Give a budget above {floor + evict_every}, or a smaller evict_every.")
    base, layers = _check_model(model)
    cache = EvictingCache(len(layers), policy, budget, moment, evict_every if moment == "decode" else 1, record)
    handles, rope = [], {}

    def pre_model(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        q_len = (ids if ids is not None else emb).shape[1]
        cache.before_forward(q_len, kwargs.get("attention_mask"))

    handles.append(model.register_forward_pre_hook(pre_model, with_kwargs=True))
    if policy.queries != 0 or policy.observes:
        for i, layer in enumerate(layers):
            attn = layer.self_attn

            def pre_attn(_m, args, kwargs, i=i):
                rope[i] = kwargs.get("position_embeddings")

            def on_q(m, _inp, out, i=i, attn=attn):
                b, q = out.shape[:2]
                qs = out.view(b, q, -1, attn.head_dim).transpose(1, 2)
                cos, sin = rope[i]
                cache.layers[i].pending_q = (qs * cos[:, None] + _rotate_half(qs) * sin[:, None]).detach()

            handles.append(attn.register_forward_pre_hook(pre_attn, with_kwargs=True))
            handles.append(attn.q_proj.register_forward_hook(on_q))
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()


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
    budget: int | None
    prefill_chunk: int | None = None
    events: list = field(default_factory=list, repr=False)
    logprobs: torch.Tensor | None = None  # (B, N) log p of the forced tokens, with ``force``


_BUDGET_KINDS = "give a number of tokens (int >= 2) or a fraction of the context in (0, 1]"


def check_budget_value(budget) -> None:
    """Refuse, before any model work, a budget that is not ``None``, a token count (an int >= 2) or a
    fraction of the context (a float in (0, 1]). The type decides: ints count tokens, floats are
    fractions, so ``1.0`` is the whole context and ``1`` (one token, never a usable cache) is refused."""
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
            raise ValueError("budget=1 is an int, i.e. 1 token (ints count tokens, floats are fractions of the "
                             "context): give 1.0 to keep the whole context, None for no eviction, or >= 2 tokens.")
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


def resolve_budget(budget: float | int | None, context: int) -> int | None:
    """``None`` (keep all), a token count (int ≥ 2), or a fraction in (0, 1] of ``context`` tokens."""
    check_budget_value(budget)
    if budget is None:
        return None
    if isinstance(budget, numbers.Integral):
        return int(budget)
    return max(1, round(float(budget) * context))


def _check_steps(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r}: give an int >= 1 (the number of tokens to generate; the first is "
                         "the prompt's next token).")


def _kv_bytes(cache) -> int:
    from .eval import cache_bytes

    return cache_bytes(cache)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, *, policy="full", budget: float | int | None = None,
             moment: str = "decode", max_new_tokens: int = 32, attention_mask: torch.Tensor | None = None,
             prefill_chunk: int | None = None, evict_every: int | None = None, record: bool = False,
             force: torch.Tensor | None = None) -> Generation:
    """Greedy decoding with an evicting cache, in a manual loop (positions of the full sequence).

    ``input_ids`` (B, T), left-padded with ``attention_mask`` for a batch. ``prefill_chunk`` feeds the
    prompt in chunks (decode-time eviction then keeps the cache within budget during the prompt too),
    counted from the prompt's end so that every left-padded row is cut exactly as it would be alone.
    ``force`` (B, N): teacher forcing — feed these tokens instead of the greedy ones; the returned
    ``tokens`` are still the greedy choices at each step and ``Generation.logprobs`` holds
    log p(force[:, i]). Generation never stops early, so the rows of a batch stay aligned.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be (batch, tokens) with at least one token.")
    if force is None:
        _check_steps(max_new_tokens, "max_new_tokens")
    elif force.ndim != 2 or force.shape[1] == 0:
        raise ValueError("force must be (batch, tokens) with at least one token to teacher-force.")
    check_budget_value(budget)
    steps = force.shape[1] if force is not None else max_new_tokens
    context = input_ids.shape[1] + steps
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ValueError(f"The prompt ({input_ids.shape[1]} tokens) plus {steps} new tokens exceeds the model's "
                         f"context of {limit} tokens: shorten the prompt or generate fewer tokens.")
    tokens_budget = resolve_budget(budget, context)
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(ids)
    pos_all = (mask.long().cumsum(-1) - 1).clamp(min=0)
    chunk = prefill_chunk or ids.shape[1]
    pol = get_policy(policy)
    if moment == "decode" and tokens_budget is not None and type(pol) is not FullCache:
        # the cache may not exceed the budget while reading the prompt either: chunks must fit beside
        # the tokens the policy always keeps
        room = tokens_budget - (pol.sinks + pol.recent(tokens_budget))
        chunk = max(1, min(chunk, room))
    out_tokens, logprobs, peak = [], [], 0
    with evicting(model, pol, tokens_budget, moment, evict_every=evict_every, record=record) as cache:
        t0 = time.perf_counter()
        # chunks aligned to the prompt's end, so left-padded rows are cut where each row alone would be
        ends = list(range(ids.shape[1], 0, -chunk))[::-1]
        for s, e in zip([0] + ends[:-1], ends):
            out = model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos_all[:, s:e],
                        past_key_values=cache, use_cache=True, logits_to_keep=1)  # only the last position's logits
            peak = max(peak, _kv_bytes(cache))
        t1 = time.perf_counter()
        last_pos = pos_all[:, -1:]
        for i in range(steps):
            logits = out.logits[:, -1].float()
            greedy = logits.argmax(-1, keepdim=True)
            out_tokens.append(greedy)
            nxt = greedy
            if force is not None:
                nxt = force[:, i:i + 1].to(device)
                logprobs.append(torch.log_softmax(logits, -1).gather(-1, nxt))
            if i == steps - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            last_pos = last_pos + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=last_pos, past_key_values=cache,
                        use_cache=True)
            peak = max(peak, _kv_bytes(cache))
        t2 = time.perf_counter()
        gen = Generation(tokens=torch.cat(out_tokens, 1).cpu(), kv_bytes=_kv_bytes(cache), peak_kv_bytes=peak,
                         evictions=cache.evictions, seconds_prefill=t1 - t0, seconds_decode=t2 - t1,
                         budget=tokens_budget, prefill_chunk=chunk, events=cache.events)
        if force is not None:
            gen.logprobs = torch.cat(logprobs, 1).cpu()
    return gen


# --------------------------------------------------------------------------- analysis


@torch.inference_mode()
def record_attention(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list]:
    """Greedy full-cache generation of one prompt that records, at every decoding step, the attention
    of the step's query over all earlier tokens, per query head: returns the generated ids (new,) and
    a list of ``new`` tensors (layers, query heads, tokens so far) in float32."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError("record_attention takes one prompt: input_ids of shape (1, tokens).")
    base, layers = _check_model(model)
    steps, ids, maps = [], input_ids.to(next(model.parameters()).device), []
    with evicting(model, TOVA(), None, "decode") as cache:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(int(nxt))
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            per_layer = []
            for layer in cache.layers:
                q = layer.queries[:, :, -1:]  # (1, Hq, 1, D)
                hkv, d = layer.keys.shape[1], q.shape[-1]
                k = layer.keys.repeat_interleave(q.shape[1] // hkv, dim=1)
                per_layer.append(torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d), -1)[0, :, 0])
                layer.queries, layer.query_pos = layer.queries[:, :, -1:], layer.query_pos[-1:]
            maps.append(torch.stack(per_layer).cpu())
    return torch.tensor(steps), maps


def recurrence(maps: list[torch.Tensor], top_k: int = 16, start: int = 0) -> dict:
    """Token Importance Recurrence from recorded attention (``record_attention``'s maps).

    Per layer and query head, at each step the ``top_k`` most attended tokens are "important". For
    every token (position < ``start`` excluded) we count how often it drops out of the top-k and comes
    back, and after how many steps. Returns ``{"gaps": histogram of return intervals (list of counts,
    index = interval in steps), "returns_per_token": mean number of returns of tokens ever important,
    "fraction_recurring": share of ever-important (head, token) pairs that return at least once}``.
    Vectorised over layers, heads and tokens; one pass over steps.
    """
    if not maps:
        raise ValueError("No recorded steps: record at least two decoding steps.")
    n = maps[-1].shape[-1]
    L, H = maps[0].shape[:2]
    top = torch.zeros(len(maps), L, H, n, dtype=torch.bool)
    for t, m in enumerate(maps):
        k = min(top_k, m.shape[-1])
        top[t].scatter_(-1, m.topk(k, -1).indices, True)
    top = top[..., start:]
    # a "return" at step t: important at t, not at t-1, and important at some step before
    steps = torch.arange(len(maps))[:, None, None, None].expand_as(top)
    last = torch.where(top, steps, -1).cummax(0).values  # last important step up to t
    prev_last = torch.cat([torch.full_like(last[:1], -1), last[:-1]])
    ret = top & ~torch.cat([torch.zeros_like(top[:1]), top[:-1]]) & (prev_last >= 0)
    gaps = (steps - prev_last)[ret]
    ever = top.any(0)
    hist = torch.bincount(gaps, minlength=2).tolist() if gaps.numel() else [0, 0]
    return {"gaps": hist, "returns": int(ret.sum()), "top_k": top_k,
            "returns_per_token": float(ret.sum(0)[ever].float().mean()) if ever.any() else 0.0,
            "fraction_recurring": float((ret.sum(0) > 0)[ever].float().mean()) if ever.any() else 0.0}


def retrieval_heads(maps: list[torch.Tensor], span: tuple[int, int]) -> torch.Tensor:
    """Per (layer, query head): the share of steps whose most attended token lies in ``span`` = [a, b)
    (e.g. the inserted fact while the model writes the answer). The Retrieval Head paper's copy score,
    simplified: attention's arg-max on the fact instead of an exact copy."""
    a, b = span
    hits = torch.stack([((m.argmax(-1) >= a) & (m.argmax(-1) < b)).float() for m in maps])
    return hits.mean(0)


# --------------------------------------------------------------------------- the chapter's experiments


from .data import left_padded as _batch  # noqa: E402  (the notebook calls kv._batch)


def retrieval_accuracy(model, tokenizer, items, *, policy="full", budget=None, moment="decode", answer_tokens: int = 6,
                       prefill_chunk: int | None = 64, batch_size: int = 8) -> dict:
    """Greedy answers to ``needle`` items under one policy/budget/moment: accuracy, per-item
    correctness, the answers, KV bytes at the end and the budget in tokens (per batch)."""
    from .needle import is_correct

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
        budgets.append(g.budget)
    return {"accuracy": sum(correct) / len(correct), "correct": correct, "answers": answers, "kv_bytes": kv_bytes,
            "budget_tokens": budgets}


def continuation_check(model, input_ids, attention_mask, reference: torch.Tensor, *, policy, budget, moment,
                       prefill_chunk: int | None = 64) -> dict:
    """How far a policy strays from the full cache on a long generation: ``agreement`` = share of the
    greedy tokens equal to the full-cache ``reference`` tokens (position by position, per row), and
    ``perplexity`` of the reference continuation when it is teacher-forced through the evicting cache."""
    n = reference.shape[1]
    free = generate(model, input_ids, attention_mask=attention_mask, policy=policy, budget=budget, moment=moment,
                    max_new_tokens=n, prefill_chunk=prefill_chunk)
    forced = generate(model, input_ids, attention_mask=attention_mask, policy=policy, budget=budget, moment=moment,
                      force=reference, prefill_chunk=prefill_chunk)
    agree = (free.tokens == reference).float().mean(1)
    return {"agreement": agree.tolist(), "perplexity": math.exp(-float(forced.logprobs.double().mean())),
            "perplexity_per_row": (-forced.logprobs.double().mean(1)).exp().tolist(), "budget_tokens": free.budget,
            "kv_bytes": free.kv_bytes, "tokens": free.tokens}


def fits(policy, budget_tokens: int, moment: str) -> bool:
    """Whether ``policy`` can run at this budget (its sinks and always-kept window leave room)."""
    _check_tokens(budget_tokens, "budget_tokens")
    p = get_policy(policy)
    if type(p) is FullCache:
        return True
    floor = p.sinks + p.recent(budget_tokens)
    every = (p.observation_window if isinstance(p, LazyEviction) else 1) if moment == "decode" else 0
    return budget_tokens > floor + every


def decode_speed(model, input_ids, *, policy="full", budget=None, moment="decode", new_tokens: int = 32,
                 repeats: int = 2, prefill_chunk: int | None = 256) -> dict:
    """Decode tokens/s (best of ``repeats``) and KV bytes after a prompt, for one policy and budget."""
    best = None
    for _ in range(repeats):
        g = generate(model, input_ids, policy=policy, budget=budget, moment=moment, max_new_tokens=new_tokens + 1,
                     prefill_chunk=prefill_chunk)
        if best is None or g.seconds_decode < best.seconds_decode:
            best = g
    return {"decode_tokens_per_s": new_tokens * input_ids.shape[0] / best.seconds_decode,
            "prefill_seconds": best.seconds_prefill, "kv_bytes": best.kv_bytes, "budget_tokens": best.budget}


def eviction_map(events: list[dict], seen: int, layer: int = 0, head: int = 0, row: int = 0) -> torch.Tensor:
    """(evictions, positions) image of what ``layer``/``head`` holds after each eviction: 1 kept,
    0 evicted, NaN not yet read (events recorded with ``record=True``)."""
    img = torch.full((len(events), seen), float("nan"))
    for i, e in enumerate(events):
        img[i, :e["seen"]] = 0.0
        img[i, e["positions"][layer, row, head].long()] = 1.0
    return img
