"""pruning_lab.kv_eviction: hand-computed choices; decode-time prompt reading, SnapKV and TOVA against
independent computations (a plain-python simulation from the layer's own weights, eager attention
weights, eager masked forwards); exactness with a large budget; per-row budgets and padding against one
row at a time; the shared prefill against separate runs; bad input refused before any model work."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pruning_lab import kv_eviction as kv
from pruning_lab.models import tiny_llama


def _ids(n=40, seed=0, batch=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(0)  # 2 layers, 6 query heads sharing 2 KV heads, head_dim 8


def _feed(model, ids, cache, prompt):
    """Prefill ``prompt`` tokens, then one token at a time; all logits (B, T, V)."""
    with torch.no_grad():
        outs = [model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True).logits]
        for t in range(prompt, ids.shape[1]):
            outs.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


# --------------------------------------------------------------------------- hand-computed choices


def _layer(positions, keys=None, seen=None):
    """A one-layer cache holding the given positions (B=1, H=1)."""
    cache = kv.EvictingCache(1, kv.FullCache(), None, "decode")
    layer = cache.layers[0]
    n = len(positions)
    layer.positions = torch.tensor(positions)[None, None]
    layer.valid = torch.ones(1, 1, n, dtype=torch.bool)
    layer.keys = keys if keys is not None else torch.arange(n, dtype=torch.float)[None, None, :, None].repeat(1, 1, 1, 2)
    layer.values = layer.keys.clone()
    layer.seen = seen if seen is not None else max(positions) + 1
    layer.is_initialized = True
    return cache, layer


def test_streaming_llm_keeps_exactly_the_sinks_and_the_window():
    cache, layer = _layer(list(range(20)))
    cache.policy, cache.budget = kv.StreamingLLM(sinks=4), 10
    cache._evict(10)
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]
    assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]  # the keys moved with them
    cache, layer = _layer(list(range(20)))
    cache.policy, cache.budget = kv.Recency(), 10
    cache._evict(10)
    assert layer.positions[0, 0].tolist() == list(range(10, 20))  # recency: the last 10, no sinks


def test_oracle_keeps_its_positions_then_the_most_recent():
    cache, layer = _layer(list(range(12)))
    cache.policy, cache.budget = kv.Oracle(positions=(2, 5)), 5
    cache._evict(5)
    assert layer.positions[0, 0].tolist() == [2, 5, 9, 10, 11]


def test_h2o_keeps_heavy_hitters_and_the_recent_half():
    # 8 tokens, budget 4: recent half = positions 6, 7; heavy hitters among 0..5 by accumulated attention.
    cache, layer = _layer(list(range(8)))
    cache.policy, cache.budget = kv.H2O(), 4
    attn = torch.tensor([[0.1, 0.5, 0.0, 0.3, 0.05, 0.05, 0.0, 0.0],
                         [0.0, 0.1, 0.0, 0.6, 0.1, 0.1, 0.05, 0.05]])  # two queries' attention (H=1)
    cache.policy.observe(layer.state, attn[None, None], layer.positions, torch.tensor([6, 7]))
    assert torch.allclose(layer.state["acc"][0, 0], attn.sum(0))
    cache._evict(4)  # accumulated: 0.1, 0.6, 0, 0.9, 0.15, 0.15, (6, 7 recent)
    assert layer.positions[0, 0].tolist() == [1, 3, 6, 7]
    assert torch.allclose(layer.state["acc"][0, 0], attn.sum(0)[[1, 3, 6, 7]])  # statistics follow the kept slots


def test_tova_evicts_what_the_latest_query_ignores_one_set_per_layer_by_default():
    assert kv.TOVA().per_head is False and kv.TOVA(per_head=True).per_head
    score = kv.TOVA().score({}, torch.tensor([[[[0.9, 0.0, 0.0, 0.0, 0.0, 0.1],
                                                [0.0, 0.2, 0.05, 0.5, 0.05, 0.2]]]]), torch.arange(6)[None, None])
    assert score[0, 0].tolist() == pytest.approx([0.0, 0.2, 0.05, 0.5, 0.05, 0.2])  # only the last query counts
    # two KV heads that disagree: the paper's TOVA keeps the top of their mean in both; the variant lets each choose
    last = torch.tensor([[0.5, 0.0, 0.3, 0.0, 0.2, 0.0],
                         [0.0, 0.4, 0.0, 0.35, 0.0, 0.25]])  # (H=2, S=6): mean = .25 .2 .15 .175 .1 .125
    for per_head, expected in ((False, [[0, 1, 3]] * 2), (True, [[0, 2, 4], [1, 3, 5]])):
        cache = kv.EvictingCache(1, kv.TOVA(per_head=per_head), 3, "decode")
        layer = cache.layers[0]
        layer.positions = torch.arange(6).expand(1, 2, 6)
        layer.valid = torch.ones(1, 2, 6, dtype=torch.bool)
        layer.keys = layer.values = torch.zeros(1, 2, 6, 4)
        layer.seen, layer.is_initialized = 6, True
        cache._observe = lambda _layer, last=last: last[None, :, None, :]
        cache._evict(3)
        assert layer.positions[0].tolist() == expected, per_head


def test_snapkv_pools_the_window_votes_over_the_keys_before_the_window_as_kvpress():
    torch.manual_seed(0)
    attn = torch.rand(1, 1, 4, 12).softmax(-1)  # 4 window queries (positions 8..11) over 12 keys
    score = kv.SnapKV(window=4, kernel_size=3).score({}, attn, torch.arange(12)[None, None])
    votes = attn[0, 0, :, :8].mean(0)  # kvpress: the keys before the window only, mean over the window
    padded = torch.cat([torch.zeros(1), votes, torch.zeros(1)])  # avg_pool1d's zero padding, counted
    by_hand = torch.tensor([padded[i:i + 3].sum() / 3 for i in range(8)])
    assert torch.allclose(score[0, 0, :8], by_hand)
    assert score[0, 0, 7] < (votes[6] + votes[7] + attn[0, 0, :, 8].mean()) / 3  # the window lends nothing
    cache, layer = _layer(list(range(12)))
    cache.policy, cache.budget = kv.SnapKV(window=4, kernel_size=3), 7
    layer.queries = torch.zeros(1, 1, 4, 2)  # stand-ins: score() gets our attention through a patched observe
    layer.query_pos = torch.arange(8, 12)
    cache._observe = lambda _layer: attn
    cache._evict(7)
    expected = sorted(set(range(8, 12)) | set(by_hand.topk(3).indices.tolist()))  # window + top-3 of the rest
    assert layer.positions[0, 0].tolist() == expected


def test_lazy_eviction_tracks_recurrence_and_keeps_a_token_due_back():
    p = kv.LazyEviction(observation_window=2, threshold=1.0)
    state, key_pos = {}, torch.arange(4)[None, None]
    # steps 4..9 over 4 keys (uniform share 1/4): token 0 attended at 4 and 7 (interval 3); token 1 only at 4;
    # token 2 at 5, 6, 7, 8, 9 (every step); token 3 never after its birth.
    hits = {4: [0, 1], 5: [2], 6: [2], 7: [0, 2], 8: [2], 9: [2]}
    attn = torch.zeros(1, 1, 6, 4)
    for i, (t, toks) in enumerate(hits.items()):
        attn[0, 0, i, toks] = 1.0 / len(toks)
    p.observe(state, attn, key_pos, torch.arange(4, 10))
    assert state["last"][0, 0].tolist() == [7, 4, 9, 3]
    assert state["mri"][0, 0].tolist() == [4, 3, 3, 0]  # token 0: born 0 -> 4 (4), 4 -> 7 (3); token 1: 1 -> 4
    score = p.score(state, None, key_pos)[0, 0]
    # now = 9: token 0 silent 2 steps < MRI 4 -> expected back (score 2); token 1 silent 5 > 3 (-2)
    assert score.tolist() == [2.0, -2.0, 3.0, -6.0]
    assert score.topk(2).indices.sort().values.tolist() == [0, 2]  # kept: the recurring token and the hot one


def test_random_keeps_its_fixed_parts_and_draws_the_rest_uniformly():
    p = kv.Random(sinks=2, window=3, seed=1)
    assert p.floor(10) == 5 and p.fixed_parts(10) == {"sinks": 2, "recent": 3}
    counts = torch.zeros(40)
    for _ in range(400):
        cache, layer = _layer(list(range(40)))
        cache.policy, cache.budget = p, 10
        cache._evict(10)
        kept = layer.positions[0, 0]
        assert {0, 1, 37, 38, 39} <= set(kept.tolist()) and len(kept) == 10
        counts[kept] += 1
    share = counts[2:37] / 400  # 5 free slots among 35 tokens: 1/7 each
    assert share.mean() == pytest.approx(5 / 35, abs=1e-6) and share.min() > 0.08 and share.max() < 0.21


def test_lazy_eviction_evicts_only_at_window_boundaries(tiny):
    ids = _ids(60)
    with kv.evicting(tiny, "lazy_eviction", 40, "decode", record=True) as cache:
        _feed(tiny, ids, cache, prompt=20)
    seen = [e["seen"] for e in cache.events]
    assert cache.evict_every == 16 and len(seen) >= 2
    assert all(b - a == 16 for a, b in zip(seen, seen[1:]))  # one eviction per observation window
    assert all(e["kept"] == [40 - 16] for e in cache.events)
    assert max(layer.kept() for layer in cache.layers) <= 40


# --------------------------------------------------------------------------- what the mechanism asks the policy


def test_the_mechanism_asks_the_policy_not_its_type():
    import inspect
    import re

    src = inspect.getsource(kv)
    names = "|".join(c.__name__ for c in (*kv.POLICIES.values(), kv.Oracle))
    assert not re.findall(rf"type\([^)]*\) is|isinstance\([^)]*, \(?({names})\b", src)
    assert kv.FullCache.keeps_everything and not kv.H2O.keeps_everything
    assert kv.H2O().floor(128) == 64 and kv.H2O(recent_ratio=0.25).floor(128) == 32
    assert kv.SnapKV().floor(128) == 64 and kv.StreamingLLM().floor(128) == 4 and kv.TOVA().floor(128) == 0
    assert kv.LazyEviction().evict_every == 16 and kv.H2O().evict_every == 1
    assert kv.SnapKV().fixed_parts(128) == {"observation window": 64}
    # free slots: the budget minus what the policy always keeps, minus the next chunk at decode time
    assert kv.free_slots("h2o", 128, "prompt") == 64 and kv.free_slots("h2o", 128, "decode", chunk=32) == 32
    assert kv.free_slots("lazy_eviction", 128, "decode", chunk=8) == 128 - 16 - 16
    assert kv.free_slots("full", 128, "decode") is None


# --------------------------------------------------------------------------- the mechanism on a real model


@pytest.mark.parametrize("moment", kv.MOMENTS)
@pytest.mark.parametrize("policy", sorted(kv.POLICIES))
def test_budget_above_the_length_is_bit_identical_to_the_full_cache(tiny, policy, moment):
    ids = _ids(40)
    ref = _feed(tiny, ids, DynamicCache(), prompt=30)
    with kv.evicting(tiny, policy, 100, moment) as cache:
        assert torch.equal(_feed(tiny, ids, cache, prompt=30), ref)
    assert not any(h for h in tiny._forward_pre_hooks.values())  # hooks removed


def _masked_reference(model, ids, allowed):
    """Independent computation: the full sequence in one forward, each query restricted to ``allowed``
    (Q, K) or (H, Q, K) key positions by a 4-D mask, positions untouched."""
    mask = allowed[None, None] if allowed.ndim == 2 else allowed[None]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_decode_eviction_matches_a_masked_full_forward_with_full_sequence_positions():
    # One layer: its keys do not depend on what earlier steps could see, so evicting StreamingLLM equals the
    # full sequence with a sink + sliding-window mask. A shifted RoPE position or a wrong mask would differ.
    model = tiny_llama(1, num_hidden_layers=1)
    ids, budget, sinks = _ids(48, seed=3), 12, 2
    with kv.evicting(model, kv.StreamingLLM(sinks=sinks), budget, "decode") as cache:
        got = _feed(model, ids, cache, prompt=8)
        assert cache.layers[0].seen == 48 and cache.layers[0].kept() <= budget
    n = ids.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    # step t attends to itself, the sinks and the most recent budget - 1 - sinks tokens before it
    allowed = (k <= q) & ((k < sinks) | (k > q - (budget - sinks)))
    allowed[:8, :8] = torch.tril(torch.ones(8, 8, dtype=torch.bool))  # the prompt was prefilled whole
    ref = _masked_reference(model, ids, allowed)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert cache.layers[0].positions.max() == n - 1


def test_prompt_compression_matches_a_masked_full_forward():
    # Prompt compression: every kept key was computed with the whole prompt; after it, decoding attends only
    # to the kept prompt tokens + the generated ones. StreamingLLM keeps the same set in every layer and head.
    model = tiny_llama(2)
    ids, prompt, budget = _ids(36, seed=5), 30, 10
    with kv.evicting(model, kv.StreamingLLM(sinks=4), budget, "prompt") as cache:
        got = _feed(model, ids, cache, prompt=prompt)
        kept = cache.layers[0].positions[0, 0].tolist()
    assert kept[:10] == [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]
    n = ids.shape[1]
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for t in range(prompt, n):
        allowed[t, 4:24] = False
    ref = _masked_reference(model, ids, allowed)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def _qk_from_weights(model, ids):
    """Rotated queries (Hq, T, D) and keys (Hkv, T, D) of a one-layer Llama, computed from its weights with
    transformers' own rotary function: nothing of kv_eviction's hooks."""
    layer = model.model.layers[0]
    a = layer.self_attn
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
        t, d = ids.shape[1], a.head_dim
        q = a.q_proj(x).view(1, t, -1, d).transpose(1, 2)
        k = a.k_proj(x).view(1, t, -1, d).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q[0], k[0]


def _simulate(q, k, policy, budget, prompt, chunk):
    """Plain-python decode-time eviction: the prompt read in chunks aligned to its end, then one token at a
    time; before each forward of n tokens, a cache over budget is cut to budget - n by the policy's rule,
    scoring only the tokens already read. Returns the kept sets (one list per KV head) after every
    eviction, and for every query the set of keys it saw (per KV head)."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    kept = [[] for _ in range(hkv)]
    acc = [dict() for _ in range(hkv)]  # H2O: attention accumulated per key
    last_attn = None  # TOVA: the latest query's attention, per query head
    ends = list(range(prompt, 0, -chunk))[::-1]
    forwards = list(zip([0] + ends[:-1], ends)) + [(i, i + 1) for i in range(prompt, t - 1)]  # as generate(force)
    events, seen_by = [], {}
    for s, e in forwards:
        n = e - s
        if len(kept[0]) + n > budget and len(kept[0]):
            target = budget - n
            for h in range(hkv):
                recent = int(budget * policy.recent_ratio) if policy.name == "h2o" else 0
                protected = [p for p in kept[h] if p >= s - recent]
                if policy.name == "h2o":
                    score = {p: acc[h][p] for p in kept[h]}
                else:  # TOVA: the mean over all query heads of the latest query's attention, one set per layer
                    score = {p: sum(last_attn[j][p] for j in range(hq)) / hq for p in kept[h]}
                others = sorted((p for p in kept[h] if p not in protected), key=lambda p: -score[p])
                kept[h] = sorted(protected + others[:target - len(protected)])
            events.append([list(x) for x in kept])
        for h in range(hkv):
            kept[h] += list(range(s, e))
        last_attn = {}
        for i in range(s, e):  # each new query attends to the kept keys up to itself
            for j in range(hq):
                h = j // g
                keys = [p for p in kept[h] if p <= i]
                w = torch.softmax(torch.stack([q[j, i] @ k[h, p] / math.sqrt(d) for p in keys]), 0)
                seen_by[(i, h)] = keys
                if policy.name == "h2o":
                    for p, x in zip(keys, w.tolist()):
                        acc[h][p] = acc[h].get(p, 0.0) + x / g
                if i == e - 1:
                    last_attn[j] = dict(zip(keys, w.tolist()))
    return events, seen_by


@pytest.mark.parametrize("policy", [kv.H2O(recent_ratio=0.25), kv.TOVA()])
def test_decode_time_prompt_reading_leaves_a_choice_and_matches_a_plain_simulation(policy):
    # The bug this replaces: at decode time the prompt chunk ate the budget and every eviction cut the cache
    # to the policy's floor (H2O kept 0 heavy hitters; TOVA emptied its cache before each chunk). Now a cache
    # over budget is cut to budget - chunk, chosen among the tokens read so far, exactly as a plain-python
    # simulation (queries and keys from the layer's weights) chooses; the logits equal an eager forward masked
    # with what each query saw.
    model = tiny_llama(4, num_hidden_layers=1)
    prompt, steps, budget, chunk = 44, 6, 16, 4
    ids = _ids(prompt + steps, seed=21)
    g = kv.generate(model, ids[:, :prompt], policy=policy, budget=budget, moment="decode", prefill_chunk=chunk,
                    force=ids[:, prompt:], record=True)
    q, k = _qk_from_weights(model, ids)
    events, seen_by = _simulate(q, k, policy, budget, prompt, chunk)
    ours = [[sorted(e["positions"][0, 0, h][e["valid"][0, 0, h]].tolist()) for h in range(2)] for e in g.events]
    assert len(ours) == len(events) > 5 and ours == events
    during_prompt = [e for e in g.events if e["seen"] < prompt]
    assert len(during_prompt) > 3 and all(e["kept"] == [budget - chunk] for e in during_prompt)  # not the floor
    # the policy really chose: some kept token is older than what recency would have kept
    assert any(min(kept[h]) < e["seen"] - (budget - chunk) for kept, e in zip(events, g.events) for h in range(2))
    assert g.free_slots == [budget - policy.floor(budget) - chunk]
    n = prompt + steps
    allowed = torch.zeros(6, n, n, dtype=torch.bool)
    allowed[:, n - 1] = torch.arange(n) < n  # the last token is never a query of the forced run
    for (i, h), keys in seen_by.items():
        allowed[3 * h:3 * h + 3, i, keys] = True
    ref = torch.log_softmax(_masked_reference(model, ids, allowed)[0, prompt - 1:n - 1], -1)
    ref = ref.gather(-1, ids[0, prompt:, None])[:, 0]
    assert torch.allclose(g.logprobs[0], ref, atol=1e-5), (g.logprobs[0] - ref).abs().max()


def _eager(model):
    import copy

    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m


def test_snapkv_prompt_compression_keeps_what_kvpress_would():
    # kvpress's recipe written out from the model's eager attention weights: the window's rows over the keys
    # before it, mean over the window, avg_pool1d (padding k//2, zeros counted), mean over each KV group, top-k
    # of the rest + the window. Our scores come from hooked queries and our own softmax.
    model = tiny_llama(6, max_position_embeddings=512)
    ids, window, kernel, budget = _ids(120, seed=8), 16, 5, 40
    with torch.no_grad():
        att = _eager(model)(ids, output_attentions=True).attentions
    g = kv.generate(model, ids, policy=kv.SnapKV(window=window, kernel_size=kernel), budget=budget, moment="prompt",
                    max_new_tokens=2, record=True)  # the cut comes before the first decoding step
    for layer, a in enumerate(att):
        w = a[0, :, -window:, :-window].mean(1)  # (Hq, T - window)
        pooled = F.avg_pool1d(w[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        per_kv = pooled.view(2, 3, -1).mean(1)
        for h in range(2):
            expected = sorted(per_kv[h].topk(budget - window).indices.tolist() + list(range(120 - window, 120)))
            assert g.kept[layer, 0, h, :budget].tolist() == expected, (layer, h)


def test_tova_prompt_compression_keeps_what_the_papers_code_would():
    # The TOVA authors' cache: the last query's attention averaged over all heads, top-k, one set per layer.
    model = tiny_llama(7, max_position_embeddings=512)
    ids, budget = _ids(80, seed=9), 20
    with torch.no_grad():
        att = _eager(model)(ids, output_attentions=True).attentions
    g = kv.generate(model, ids, policy="tova", budget=budget, moment="prompt", max_new_tokens=2, record=True)
    variant = kv.generate(model, ids, policy=kv.TOVA(per_head=True), budget=budget, moment="prompt",
                          max_new_tokens=2, record=True)
    for layer, a in enumerate(att):
        expected = sorted(a[0, :, -1].mean(0).topk(budget).indices.tolist())
        assert g.kept[layer, 0, 0, :budget].tolist() == expected and g.kept[layer, 0, 1, :budget].tolist() == expected
        per_kv = a[0, :, -1].view(2, 3, -1).mean(1)
        for h in range(2):
            assert variant.kept[layer, 0, h, :budget].tolist() == sorted(per_kv[h].topk(budget).indices.tolist())


def test_kv_memory_really_shrinks(tiny):
    from pruning_lab.eval import cache_bytes

    ids = _ids(64)
    full = DynamicCache()
    _feed(tiny, ids, full, prompt=32)
    with kv.evicting(tiny, "h2o", 16, "decode") as cache:
        _feed(tiny, ids, cache, prompt=16)
    storages = {}  # every byte the cache's keys and values hold, buffers included (all layers may share one)
    for layer in cache.layers:
        assert layer.keys.shape[-2] <= 16 and layer.values.shape[-2] <= 16
        for t in (layer.keys, layer.values):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert sum(storages.values()) == cache_bytes(cache) <= cache_bytes(full) * 16 / 64
    assert cache.get_seq_length() == 64  # positions keep counting the tokens seen


def test_per_head_choices_differ_unless_the_policy_keeps_one_set_per_layer(tiny):
    for policy, differ in ((kv.TOVA(per_head=True), True), (kv.TOVA(), False)):
        g = kv.generate(tiny, _ids(40, seed=9), policy=policy, budget=12, moment="decode", prefill_chunk=2,
                        max_new_tokens=4, record=True)
        pos = g.kept  # (layers, B, H_kv, kept)
        assert pos.shape[:3] == (2, 1, 2) and pos.shape[-1] <= 12
        assert (not torch.equal(pos[:, :, 0], pos[:, :, 1])) == differ, policy


def test_group_attention_matches_eager_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 3, 8), torch.randn(1, 2, 10, 8)
    qpos, kpos = torch.tensor([7, 8, 9]), torch.arange(10)[None, None].expand(1, 2, 10)
    got = kv.group_attention(q, qpos, k, kpos, torch.ones(1, 2, 10, dtype=torch.bool))
    full = torch.softmax(q @ k.repeat_interleave(3, 1).transpose(-1, -2) / math.sqrt(8)
                         + torch.where(kpos[0, 0][None, :] <= qpos[:, None], 0.0, -math.inf), -1)
    assert torch.allclose(got, full.view(1, 2, 3, 3, 10).mean(2), atol=1e-6)


def test_group_attention_of_an_early_chunk_and_its_query_sum():
    # queries at 3..5 over 10 cached keys (as when the prompt is observed chunk by chunk): the unseen tail
    # (cut before the matmul) comes back as zeros, and padding slots get nothing, as in the eager softmax
    torch.manual_seed(1)
    q, k = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 10, 8)
    qpos, kpos = torch.tensor([3, 4, 5]), torch.arange(10)[None, None].expand(2, 2, 10)
    valid = torch.ones(2, 2, 10, dtype=torch.bool)
    valid[1, :, :2] = False  # row 1 is left-padded by two slots
    bias = torch.where((kpos[:, :, None, :] <= qpos[None, None, :, None]) & valid[:, :, None, :], 0.0, -math.inf)
    full = torch.softmax(q @ k.repeat_interleave(3, 1).transpose(-1, -2) / math.sqrt(8)
                         + bias.repeat_interleave(3, 1), -1).view(2, 2, 3, 3, 10).mean(2)
    got = kv.group_attention(q, qpos, k, kpos, valid)
    assert got.shape == (2, 2, 3, 10) and torch.allclose(got, full, atol=1e-6)
    assert got[..., 6:].abs().max() == 0 and got[1, :, :, :2].abs().max() == 0
    summed = kv.group_attention(q, qpos, k, kpos, valid, sum_queries=True)
    assert summed.shape == (2, 2, 1, 10) and torch.allclose(summed[:, :, 0], full.sum(2), atol=1e-6)


def test_group_attention_of_the_newest_query_builds_no_mask_and_gives_the_same_numbers():
    # one query at position 9 over keys 0..9 (a decoding step): every key is visible, so newest=True skips the
    # masks; the numbers are bitwise those of the general path, also for a padded batch (which takes the general
    # path) and for the summed form
    torch.manual_seed(2)
    q, k = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 10, 8)
    qpos, kpos = torch.tensor([9]), torch.arange(10)[None, None].expand(2, 2, 10)
    full = torch.softmax(q @ k.repeat_interleave(3, 1).transpose(-1, -2) / math.sqrt(8), -1).view(2, 2, 3, 1, 10).mean(2)
    padded = torch.ones(2, 2, 10, dtype=torch.bool)
    padded[1, :, :3] = False
    for valid in (torch.ones(2, 2, 10, dtype=torch.bool), padded):
        for summed in (False, True):
            fast = kv.group_attention(q, qpos, k, kpos, valid, sum_queries=summed, newest=True)
            assert torch.equal(fast, kv.group_attention(q, qpos, k, kpos, valid, sum_queries=summed))
    assert torch.allclose(kv.group_attention(q, qpos, k, kpos, torch.ones(2, 2, 10, dtype=torch.bool), newest=True),
                          full, atol=1e-6)
    assert kv.group_attention(q, qpos, k, kpos, padded, newest=True)[1, :, :, :3].abs().max() == 0


def _padded(*rows):
    n = max(r.shape[1] for r in rows)
    batch = torch.cat([torch.cat([torch.zeros(1, n - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = torch.stack([torch.arange(n) >= n - r.shape[1] for r in rows]).long()
    return batch, mask


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny):
    a, b = _ids(30, seed=11), _ids(22, seed=12)
    batch, mask = _padded(a, b)
    force = _ids(6, seed=13, batch=2)
    for policy, moment, budget in (("h2o", "decode", 12), ("snapkv", "prompt", 70), ("streaming_llm", "decode", 12),
                                   ("tova", "decode", 12), ("lazy_eviction", "decode", 40), ("snapkv", "prompt", 80)):
        together = kv.generate(tiny, batch, attention_mask=mask, policy=policy, budget=budget, moment=moment,
                               max_new_tokens=6, force=force, prefill_chunk=5)
        for row, single in ((0, a), (1, b)):
            alone = kv.generate(tiny, single, policy=policy, budget=budget, moment=moment, max_new_tokens=6,
                                force=force[row:row + 1], prefill_chunk=5)
            assert torch.allclose(together.logprobs[row], alone.logprobs[0], atol=1e-4), (policy, row)


def test_each_row_keeps_its_own_budget_resolved_from_its_real_tokens(tiny):
    # A fraction resolves per row from its unpadded length (+ new tokens), not from the padded batch; rows with
    # different budgets in one batch give what each gives alone (its unused slots are masked like padding).
    a, b = _ids(50, seed=14), _ids(30, seed=15)
    batch, mask = _padded(a, b)
    force = _ids(8, seed=16, batch=2)
    for policy, moment, budget in (("h2o", "decode", 0.5), ("tova", "prompt", 0.3), ("lazy_eviction", "decode", 0.9),
                                   ("snapkv", "prompt", [40, 24]), ("tova", "decode", [20, 36])):
        together = kv.generate(tiny, batch, attention_mask=mask, policy=kv.get_policy(policy) if policy != "snapkv"
                               else kv.SnapKV(window=8), budget=budget, moment=moment, force=force, prefill_chunk=4)
        expected = budget if isinstance(budget, list) else [round(budget * 58), round(budget * 38)]
        assert together.budget == expected, (policy, together.budget)
        for row, single in ((0, a), (1, b)):
            alone = kv.generate(tiny, single, policy=kv.get_policy(policy) if policy != "snapkv" else kv.SnapKV(window=8),
                                budget=expected[row], moment=moment, force=force[row:row + 1], prefill_chunk=4)
            assert torch.allclose(together.logprobs[row], alone.logprobs[0], atol=1e-4), (policy, moment, row)
    # fits() and generate() share the resolution: the shorter row's budget is the one that is too small
    assert kv.plan_budget("h2o", 0.3, context=[58, 38], moment="prompt") == [17, 11]
    assert not kv.fits("snapkv", 0.5, "prompt", context=[150, 60]) and kv.fits("snapkv", 0.5, "prompt", context=[150])
    with pytest.raises(ValueError, match="budget=30 tokens leaves snapkv no room"):
        kv.generate(tiny, torch.cat([_ids(140), _ids(140)]), attention_mask=torch.cat(
            [torch.ones(1, 140, dtype=torch.long), (torch.arange(140) >= 90).long()[None]]),
            policy="snapkv", budget=0.5, moment="prompt", max_new_tokens=10)


def _cat_append(self, k, v, pos, valid):  # the straightforward append: a new tensor at every step
    self.keys, self.values = torch.cat([self.keys, k], -2), torch.cat([self.values, v], -2)
    self.positions, self.valid = torch.cat([self.positions, pos], -1), torch.cat([self.valid, valid], -1)


@pytest.mark.parametrize("moment", ["prompt", "decode"])
def test_appending_in_place_keeps_what_concatenating_keeps(tiny, moment, monkeypatch):
    a, b = _ids(40, seed=21), _ids(29, seed=22)
    batch, mask = _padded(a, b)
    policies = [kv.H2O(), kv.TOVA(), kv.SnapKV(window=8), kv.LazyEviction(observation_window=4), kv.StreamingLLM(),
                kv.FullCache()]

    def runs():
        out = []
        for p in policies:
            for budget in (12, 24):
                if not kv.fits(p, budget, moment, chunk=4):
                    continue
                g = kv.generate(tiny, batch, attention_mask=mask, policy=p, budget=budget, moment=moment,
                                max_new_tokens=9, prefill_chunk=4, record=True)
                out.append((p.name, budget, g.tokens, g.kept, g.kept_valid, [e["kept"] for e in g.events]))
        return out

    fast = runs()
    monkeypatch.setattr(kv.EvictingLayer, "_append", _cat_append)
    plain = runs()
    assert len(fast) == len(plain) >= 8

    def in_order(kept, valid):  # the swap path (decoding, one token evicted per step) permutes the slots
        order = torch.where(valid, kept, -1).argsort(dim=-1, stable=True)
        return kept.gather(-1, order), valid.gather(-1, order)

    for x, y in zip(fast, plain):
        (kx, vx), (ky, vy) = in_order(x[3], x[4]), in_order(y[3], y[4])
        assert x[:2] == y[:2] and torch.equal(x[2], y[2]) and torch.equal(kx, ky) and torch.equal(vx, vy)
        assert x[5] == y[5], x[:2]
    with kv.evicting(tiny, "tova", 12, "decode") as cache:  # decode-time: never more storage than the budget
        _feed(tiny, _ids(30), cache, prompt=8)
    for layer in cache.layers:
        b_, h_, _, d_ = layer.keys.shape
        assert layer.keys.untyped_storage().nbytes() <= 12 * b_ * h_ * d_ * layer.keys.element_size()


def test_a_shared_prefill_gives_what_separate_runs_give(tiny):
    a, b = _ids(40, seed=17), _ids(33, seed=18)
    batch, mask = _padded(a, b)
    policies = [kv.H2O(), kv.TOVA(), kv.SnapKV(window=8), kv.LazyEviction(observation_window=4), kv.StreamingLLM()]
    pf = kv.Prefill(tiny, batch, mask, policies=policies)  # one chunk: the same float sums as a separate run
    chunked = kv.Prefill(tiny, batch, mask, policies=policies, chunk=16)  # statistics gathered chunk by chunk
    for p in policies:
        assert torch.allclose(chunked.scores(p), pf.scores(p), atol=1e-5), p.name
    before = [layer.keys.clone() for layer in pf.cache.layers]
    for p in policies:
        for budget in (12, 24, 100):
            shared = kv.generate(tiny, batch, attention_mask=mask, policy=p, budget=budget, moment="prompt",
                                 max_new_tokens=5, prefill=pf, record=True)
            alone = kv.generate(tiny, batch, attention_mask=mask, policy=p, budget=budget, moment="prompt",
                                max_new_tokens=5, record=True)
            assert torch.equal(shared.tokens, alone.tokens), (p.name, budget)
            assert torch.equal(shared.kept, alone.kept) and torch.equal(shared.kept_valid, alone.kept_valid)
    # answered together in shared loops (rows of different budgets stacked, unused slots masked): the same tokens
    settings = [(p, budget, 1) for budget in (24, 12, 100) for p in policies]
    together = kv.generate_compressed(tiny, pf, settings, max_new_tokens=5, max_rows=6, record=True)
    for (p, budget, _), g in zip(settings, together):
        alone = kv.generate(tiny, batch, attention_mask=mask, policy=p, budget=budget, moment="prompt",
                            max_new_tokens=5, prefill=pf, record=True)
        assert torch.equal(g.tokens, alone.tokens), (p.name, budget)
        assert g.free_slots == alone.free_slots and g.budget == alone.budget
    assert all(torch.equal(x, layer.keys) for x, layer in zip(before, pf.cache.layers))  # the prefill is untouched
    with pytest.raises(ValueError, match="prompt compression only"):
        kv.generate(tiny, batch, attention_mask=mask, policy="h2o", budget=12, moment="decode", prefill=pf,
                    prefill_chunk=2)
    with pytest.raises(ValueError, match="not among the policies"):
        kv.generate(tiny, batch, attention_mask=mask, policy=kv.H2O(), budget=12, moment="prompt", prefill=pf)


def test_draws_of_a_random_policy_differ_and_a_deterministic_policy_repeats(tiny):
    ids = _ids(40, seed=19)
    pf = kv.Prefill(tiny, ids, policies=[kv.Random(window=4)])
    g = kv.generate(tiny, ids, policy=pf.policies[0], budget=12, moment="prompt", max_new_tokens=3, prefill=pf,
                    draws=6, record=True)
    assert g.tokens.shape == (6, 3) and len({tuple(x) for x in g.kept[0, :, 0].tolist()}) == 6
    same = kv.generate(tiny, ids, policy="h2o", budget=12, moment="decode", max_new_tokens=3, draws=3, record=True,
                       prefill_chunk=2)
    assert torch.equal(same.tokens[0], same.tokens[2]) and torch.equal(same.kept[:, 0], same.kept[:, 1])


def test_generate_with_chunked_prefill_and_model_generate(tiny):
    ids = _ids(40)
    whole = kv.generate(tiny, ids, policy="full", max_new_tokens=8)
    chunked = kv.generate(tiny, ids, policy="full", max_new_tokens=8, prefill_chunk=7)
    assert torch.equal(whole.tokens, chunked.tokens)
    ref = tiny.generate(ids, max_new_tokens=8, do_sample=False)[:, 40:]
    assert torch.equal(whole.tokens, ref)
    with kv.evicting(tiny, "h2o", 16, "decode") as cache:
        out = tiny.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 48) and max(layer.kept() for layer in cache.layers) <= 16
    small = kv.generate(tiny, ids, policy="h2o", budget=16, moment="decode", max_new_tokens=8, prefill_chunk=4)
    assert small.peak_kv_bytes <= 16 * 2 * 2 * 8 * 4 * 2 and small.prefill_chunk == 4
    assert small.free_slots == [16 - 8 - 4]


def test_budget_fraction_is_of_the_real_context(tiny):
    g = kv.generate(tiny, _ids(30), policy="tova", budget=0.5, max_new_tokens=10, prefill_chunk=4)
    assert g.budget == [20]


# --------------------------------------------------------------------------- analysis


def test_retrieval_scores_count_copies_of_the_needle_by_hand():
    # one row, prompt of 6 tokens, needle at [2, 5) holding tokens 7 8 9; the answer wrote 7 then 9
    ids = torch.tensor([[1, 2, 7, 8, 9, 3]])
    tokens = torch.tensor([[7, 9]])
    argmax = torch.zeros(2, 1, 1, 3, dtype=torch.long)  # (steps, layers, rows, heads)
    argmax[0, 0, 0] = torch.tensor([2, 3, 2])  # head 0 and 2 look at the 7 while writing 7; head 1 at the 8
    argmax[1, 0, 0] = torch.tensor([4, 4, 6])  # heads 0, 1 look at the 9 while writing 9; head 2 at the new 7
    s = kv.retrieval_scores(argmax, tokens, ids, [(2, 5)], [2])
    assert s.shape == (1, 1, 3) and s[0, 0].tolist() == [1.0, 0.5, 0.5]


def test_recurrence_counts_returns_after_leaving_and_a_shuffled_null():
    # 3 tokens, 1 layer, 1 head; top-1 is important, below rank 2 (the last) has left
    order = [0, 1, 2, 1, 0, 0]  # the most attended token at each step
    maps = []
    for t in order:
        m = torch.full((1, 1, 3), 0.1)
        m[0, 0, t] = 0.8
        m[0, 0, (t + 1) % 3] = 0.15  # rank 1: still "kept" at leave_rank 2
        maps.append(m)
    r = kv.recurrence(maps, top_k=1, leave_rank=2, shuffles=4)
    # ranks per step (token 0, 1, 2): (0 1 2) (2 0 1) (1 2 0) (2 0 1) (0 1 2) (0 1 2).
    # token 0: top at 0, last at 1 (left), top again at 4: a return after 4 steps.
    # token 1: top at 1, last at 2 (left), top at 3: a return after 2 steps.
    # token 2: last at 0 but never top before; top at 2, never back: no return.
    assert (r["ever"], r["recurring"], r["returns"]) == (3, 2, 2) and r["gaps"] == [0, 0, 1, 0, 1]
    assert r["fraction_recurring"] == pytest.approx(2 / 3)
    assert 0 <= r["null_fraction_recurring"] <= 1 and r["steps"] == 6 and r["tokens"] == 3
    with pytest.raises(ValueError, match="below leave_rank"):
        kv.recurrence(maps, top_k=2, leave_rank=2)


# --------------------------------------------------------------------------- item 7's machinery


def test_reasoning_accuracy_pairs_problems_under_per_problem_budgets():
    from transformers import AutoTokenizer

    from pruning_lab.models import embedded_model_folder

    tok = AutoTokenizer.from_pretrained(embedded_model_folder())
    model = tiny_llama(5, vocab_size=len(tok), max_position_embeddings=512)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {a}?"}], tokenize=False,
                                       add_generation_prompt=True) for a in (3, 14, 159, 2653)]
    reference = {}

    def check(text, i):  # the tiny random model "solves" a problem when it writes what the full cache wrote
        return reference.setdefault(i, text) == text

    r = kv.reasoning_accuracy(model, tok, prompts, [("full", 1.0), ("lazy_eviction", 0.5), ("h2o", 0.5),
                                                    ("streaming_llm", 64)],
                              check=check, max_new_tokens=200, batch_size=3, require_eos=False, progress=False)
    assert r["selection"]["kept"] == [0, 1, 2, 3] and r["full"]["accuracy"] == 1.0 and all(0 < n <= 200 for n in r["full"]["cot_tokens"])
    by = {x["policy"]: x for x in r["runs"]}
    assert by["full"]["correct"] == [True] * 4 and by["full"]["texts"] == r["full"]["texts"]
    lazy = by["lazy_eviction"]
    assert lazy["budget_tokens"] == [round(0.5 * (p + n)) for p, n in zip(r["full"]["prompt_tokens"],
                                                                           r["full"]["cot_tokens"])]
    assert lazy["vs_full"]["test"].startswith("exact McNemar") and lazy["vs_full"]["n"] == 4
    assert lazy["vs_full"]["b_only"] == 4 - sum(lazy["correct"])
    assert by["streaming_llm"]["budget_tokens"] == [64] * 4 and min(len(t) for t in lazy["texts"]) > 0
    with pytest.raises(ValueError, match="no room"):
        kv.reasoning_accuracy(model, tok, prompts, [("snapkv", 0.1)], check=check, max_new_tokens=200,
                              require_eos=False, progress=False)


def test_reasoning_accuracy_keeps_only_finished_long_chains(monkeypatch):
    """By hand: four candidates whose full cache stops after 5 tokens, never, after 250 and after 300 tokens. With
    min_cot_tokens=200 the first is short and the second unfinished; max_problems=1 keeps the third alone, and the
    evicting run decodes only it, at half of its own prompt + CoT."""
    from types import SimpleNamespace

    eos, calls = 0, []
    stops = {"p0": 5, "p1": None, "p2": 250, "p3": 300}

    class Tok:
        eos_token_id = eos

        def decode(self, ids, skip_special_tokens=True):
            return f"{len(ids)} tokens"

    def fake_batch(tok, texts):  # notes the prompts it encodes: generate() decodes them in that order
        calls_texts.append(list(texts))
        ids = torch.ones(len(texts), 10, dtype=torch.long)
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    def fake_generate(model, input_ids, *, attention_mask, policy, max_new_tokens, eos_token_id, budget=None,
                      moment="decode", prefill_chunk=None):
        texts = calls_texts.pop(0)
        calls.append((policy if isinstance(policy, str) else policy.name, texts, budget))
        rows = []
        for t in texts:
            stop = stops[t] if policy == "full" else 3
            rows.append([7] * max_new_tokens if stop is None else [7] * stop + [eos] * (max_new_tokens - stop))
        return SimpleNamespace(tokens=torch.tensor(rows), free_slots=None if policy == "full" else [1] * len(texts),
                               first_token_kept=[1.0] * len(texts))

    calls_texts = []
    monkeypatch.setattr(kv, "_batch", fake_batch)
    monkeypatch.setattr(kv, "generate", fake_generate)
    r = kv.reasoning_accuracy(None, Tok(), ["p0", "p1", "p2", "p3"], [("tova", 0.5)], check=lambda t, i: i == 2,
                              max_new_tokens=320, min_cot_tokens=200, max_problems=1, batch_size=4, progress=False)
    assert r["selection"] == dict(candidates=4, unfinished=1, short=1, kept=[2], min_cot_tokens=200, require_eos=True)
    assert r["full"]["cot_tokens"] == [250] and r["full"]["prompt_tokens"] == [10] and r["full"]["accuracy"] == 1.0
    (run,) = r["runs"]
    assert run["budget_tokens"] == [130] and calls[-1] == ("tova", ["p2"], [130])  # round(0.5 * (10 + 250))
    assert run["correct"] == [True] and run["vs_full"]["n"] == 1
    # reference=: the same selection and full-cache run, reused; only the new setting decodes (one call, problem 2)
    n_calls = len(calls)
    again = kv.reasoning_accuracy(None, Tok(), ["p0", "p1", "p2", "p3"], [("h2o", 0.3)], check=lambda t, i: False,
                                  max_new_tokens=320, min_cot_tokens=200, max_problems=1, batch_size=4, progress=False,
                                  reference=r)
    assert calls[n_calls:] == [("h2o", ["p2"], [78])]  # round(0.3 * (10 + 250)); no full-cache candidate run
    assert again["selection"] == r["selection"] and again["full"] == r["full"]
    assert again["runs"][0]["correct"] == [False] and again["runs"][0]["first_token_kept"] == [1.0]
    with pytest.raises(ValueError, match="reference= was computed for 4 prompts"):
        kv.reasoning_accuracy(None, Tok(), ["p0", "p1"], [("h2o", 0.3)], check=lambda t, i: False, max_new_tokens=320,
                              min_cot_tokens=200, max_problems=1, progress=False, reference=r)
    with pytest.raises(ValueError, match="min_cot_tokens=400 leaves no problem"):
        kv.reasoning_accuracy(None, Tok(), ["p0"], [], check=lambda t, i: True, max_new_tokens=320, min_cot_tokens=400)
    with pytest.raises(ValueError, match="max_problems=0"):
        kv.reasoning_accuracy(None, Tok(), ["p0"], [], check=lambda t, i: True, max_problems=0)


def test_gather_rows_copies_exactly_what_an_elementwise_gather_would():
    """``_gather_rows`` copies whole rows through a strided view: on views of longer buffers (the cache's layout),
    contiguous tensors, several rows mapped from one (``rows``), and 3-D state tensors, it equals torch's gather."""
    g = torch.Generator().manual_seed(0)
    for b, h, s, d, cap in [(1, 3, 50, 8, 50), (2, 3, 40, 8, 64), (3, 2, 30, 4, 35)]:
        t = torch.randn(b, h, cap, d, generator=g)[:, :, :s]
        idx = torch.stack([torch.randperm(s, generator=g)[:s - 5].sort().values for _ in range(b * h)]).view(b, h, s - 5)
        want = t.gather(2, idx[..., None].expand(-1, -1, -1, d))
        assert torch.equal(kv._gather_rows(t, idx, None), want)
        assert torch.equal(kv._gather_rows(t.contiguous(), idx, None), want)
        rows = torch.tensor([b - 1, 0, b - 1])
        heads = torch.arange(h)[None, :, None]
        assert torch.equal(kv._gather_rows(t, idx[rows], rows), t[rows[:, None, None], heads, idx[rows]])
        state = t[..., 0]
        assert torch.equal(kv._gather_rows(state, idx, None), state.gather(2, idx))
        bases = {}  # calls over one layout share their row offsets: the second call reuses the first's
        assert torch.equal(kv._gather_rows(t, idx, None, bases), want) and len(bases) == 1
        assert torch.equal(kv._gather_rows(t, idx.flip(-1), None, bases), want.flip(-2)) and len(bases) == 1


def test_decoding_appends_in_place_after_an_eviction_and_decodes_the_same(tiny, monkeypatch):
    """After an eviction at decode time the kept slots sit in buffers with room for the next tokens, so the next
    steps append in place (the cache is not copied again); the tokens and log-probabilities equal those of
    decoding with the eviction's output copied into new buffers at the next append (the layout before), the
    log-probabilities up to the order of the attention's sums."""
    ids = torch.cat([_ids(40, seed=1), _ids(40, seed=2)])
    force = _ids(12, seed=3, batch=2)
    for policy in (kv.H2O(), kv.TOVA(), kv.LazyEviction(observation_window=4)):
        appends = []
        orig_append = kv.EvictingLayer._append

        def counting(self, *a, _orig=orig_append):  # did this append allocate new buffers (copy the cache)?
            before = self._bufs
            _orig(self, *a)
            appends.append(self._bufs is not before)

        monkeypatch.setattr(kv.EvictingLayer, "_append", counting)
        g = kv.generate(tiny, ids, policy=policy, budget=24, moment="decode", force=force, prefill_chunk=8)
        monkeypatch.undo()
        assert g.evictions > 0 and appends and not any(appends[len(appends) // 2:]), policy  # decoding: in place
        orig_select = kv.EvictingCache._select

        def unbuffered(self, src, dst, *a, **k):  # no capacity: the eviction's output is copied at the next append
            for layer in dst:
                layer.capacity = None
            return orig_select(self, src, dst, *a, **k)

        monkeypatch.setattr(kv.EvictingCache, "_select", unbuffered)
        ref = kv.generate(tiny, ids, policy=policy, budget=24, moment="decode", force=force, prefill_chunk=8)
        monkeypatch.undo()
        # the same tokens; log-probabilities equal up to the order of the attention's sums (after the swaps of
        # _swap_out the slots are not in sequence order: test_swapping_decodes_like_gathering)
        assert torch.equal(g.tokens, ref.tokens), policy
        torch.testing.assert_close(g.logprobs, ref.logprobs, rtol=0, atol=1e-5)


def test_swap_out_by_hand():
    """One layer, one row, two KV heads, 5 slots (positions 0-4, stacked buffers as after a decode-time gather):
    head 0's lowest score is shared by positions 1 and 3 (the oldest, 1, goes: the sort's tie rule), head 1's lowest
    is the newest slot itself (it goes and nothing moves). The newest slot moves into the hole; the per-slot
    statistic moves with it."""
    cache = kv.EvictingCache(1, kv.H2O(), 8, "decode")
    layer = cache.layers[0]
    keys = torch.zeros(1, 1, 2, 8, 3)  # (L, B, H, cap, D)
    keys[..., :5, :] = torch.arange(5.0)[:, None]  # slot i holds the key i
    values, pos = keys + 10, torch.zeros(1, 1, 2, 8, dtype=torch.long)
    pos[..., :5] = torch.arange(5)
    valid = torch.zeros(1, 1, 2, 8, dtype=torch.bool)
    valid[..., :5] = True
    bufs = [keys[0], values[0], pos[0], valid[0]]
    cache._stack = (keys, values, pos, valid, [bufs])
    layer._bufs, layer._capacity = bufs, 8
    layer.keys, layer.values, layer.positions, layer.valid = layer._views = tuple(b[:, :, :5] for b in bufs)
    layer.state = {"acc": torch.tensor([[[5.0, 1.0, 3.0, 1.0, 7.0], [4.0, 6.0, 5.0, 8.0, 0.5]]])}
    assert cache._swappable(cache.layers, cache.layers, None) == 5
    score = layer.state["acc"][None].clone()
    cache._swap_out(cache.layers, score, pos[..., :5], 5)
    assert layer.positions.tolist() == [[[0, 4, 2, 3], [0, 1, 2, 3]]]
    assert layer.keys[0, 0, :, 0].tolist() == [0, 4, 2, 3] and layer.values[0, 1, :, 0].tolist() == [10, 11, 12, 13]
    assert layer.state["acc"].tolist() == [[[5.0, 7.0, 3.0, 1.0], [4.0, 6.0, 5.0, 8.0]]]
    assert layer._views[0] is layer.keys and layer._bufs is bufs  # the next token appends in place at slot 4


def test_swapping_decodes_like_gathering(tiny, monkeypatch):
    """Decoding one token at a time with eviction, H2O (per KV head), TOVA (one set per layer) and StreamingLLM take
    the swap path (asserted), and keep the same positions in every layer and head as the same run with every eviction
    gathered in sequence order, write the same tokens, and give log-probabilities equal up to the order of the
    attention's sums (the slots are permuted)."""
    ids = torch.cat([_ids(40, seed=1), _ids(40, seed=2)])
    force = _ids(16, seed=3, batch=2)
    for policy in (kv.H2O(), kv.TOVA(), kv.StreamingLLM(sinks=2)):
        swaps = []
        orig = kv.EvictingCache._swap_out

        def counting(self, *a, _orig=orig):
            swaps.append(1)
            return _orig(self, *a)

        monkeypatch.setattr(kv.EvictingCache, "_swap_out", counting)
        g = kv.generate(tiny, ids, policy=policy, budget=24, moment="decode", force=force, prefill_chunk=8,
                        record=True)
        monkeypatch.undo()
        monkeypatch.setattr(kv.EvictingCache, "_swappable", lambda *a: 0)
        ref = kv.generate(tiny, ids, policy=policy, budget=24, moment="decode", force=force, prefill_chunk=8,
                          record=True)
        monkeypatch.undo()
        assert len(swaps) >= 14, policy  # every decoding step but the first evictions
        assert torch.equal(g.kept.sort(-1).values, ref.kept.sort(-1).values) and bool(g.kept_valid.all()), policy
        assert not torch.equal(g.kept, ref.kept), policy  # the slots were permuted
        assert torch.equal(g.tokens, ref.tokens), policy
        torch.testing.assert_close(g.logprobs, ref.logprobs, rtol=0, atol=1e-5)


def test_first_token_kept_follows_the_sink_of_each_padded_row(tiny):
    """A 40- and a 30-token prompt (the second left-padded by 10), decoded with a 16-token cache: Recency (no sinks)
    must have evicted each row's first real token in every layer and head (0.0), StreamingLLM (4 sinks) holds it
    everywhere (1.0), and so does the full cache. A count taken at slot 0 instead of each row's first real token would
    give 0.0 for the padded row under StreamingLLM."""
    ids = torch.cat([_ids(40, seed=1), torch.cat([torch.zeros(1, 10, dtype=torch.long), _ids(30, seed=2)], 1)])
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    kept = {}
    for name in ("recency", "streaming_llm", "full"):
        g = kv.generate(tiny, ids, attention_mask=mask, policy=name, budget=None if name == "full" else 16,
                        moment="decode", max_new_tokens=4, prefill_chunk=4)
        kept[name] = g.first_token_kept
    assert kept == {"recency": [0.0, 0.0], "streaming_llm": [1.0, 1.0], "full": [1.0, 1.0]}


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_any_model_work(tiny):
    ids = _ids(20)
    calls = []
    handle = tiny.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="Unknown KV policy"):
            kv.generate(tiny, ids, policy="h3o", budget=8)
        with pytest.raises(ValueError, match=">= 2"):
            kv.generate(tiny, ids, policy="h2o", budget=0)
        with pytest.raises(ValueError, match=r"ambiguous: 1 token or 100%"):
            kv.generate(tiny, ids, policy="h2o", budget=1)
        with pytest.raises(ValueError, match=r"a fraction of the context, and must be in \(0, 1\]"):
            kv.generate(tiny, ids, policy="h2o", budget=1.5)
        with pytest.raises(ValueError, match="is a string"):
            kv.generate(tiny, ids, policy="h2o", budget="0.5")
        with pytest.raises(ValueError, match="is a string"):  # one budget per row: each is checked
            kv.generate(tiny, ids, policy="h2o", budget=["0.5"])
        with pytest.raises(ValueError, match=r"no room to choose: it always keeps 4 sinks \(4 tokens\)"):
            kv.generate(tiny, ids, policy="streaming_llm", budget=4, moment="prompt")
        with pytest.raises(ValueError, match=r"snapkv no room to choose: it always keeps 64 observation window"):
            kv.generate(tiny, _ids(100), policy="snapkv", budget=64, moment="prompt")
        with pytest.raises(ValueError, match="room for the next 32 new tokens"):
            kv.generate(tiny, _ids(100), policy="h2o", budget=60, moment="decode")
        with pytest.raises(ValueError, match="moment"):
            kv.generate(tiny, ids, policy="h2o", budget=8, moment="later")
        with pytest.raises(ValueError, match="max_new_tokens=0: give an int >= 1"):
            kv.generate(tiny, ids, policy="h2o", budget=8, max_new_tokens=0)
        with pytest.raises(ValueError, match="context of 256"):
            kv.generate(tiny, _ids(250), policy="h2o", budget=8, max_new_tokens=10)
        with pytest.raises(ValueError, match=r"at least one item \(got none\)"):
            kv.retrieval_accuracy(tiny, None, [])
        with pytest.raises(ValueError, match=r"at least one item \(got none\)"):
            kv.retrieval_runs(tiny, None, [], [])
        with pytest.raises(ValueError, match="Llama-style attention"):
            with kv.evicting(torch.nn.Linear(2, 2), "h2o", 8):
                pass
        assert not calls  # nothing reached the model
    finally:
        handle.remove()
    assert not any(tiny._forward_pre_hooks.values())



def test_retrieval_accuracy_without_items_says_how_to_build_them():
    with pytest.raises(ValueError, match=r"at least one item \(got none\).*needle\.needle_items"):
        kv.retrieval_accuracy(None, None, [])  # refused before the model or the tokenizer is touched


def test_max_new_tokens_below_one_is_refused_before_the_model():
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"max_new_tokens={n}: give an int >= 1"):
            kv.generate(None, _ids(10), max_new_tokens=n)  # no model: the check comes first
    with pytest.raises(ValueError, match="answer_tokens=0: give an int >= 1"):
        kv.retrieval_accuracy(None, None, [object()], answer_tokens=0)


def test_string_bool_nan_and_one_token_budgets_are_refused_before_the_model():
    cases = [("0.5", r"is a string: give a number of tokens \(int >= 2\) or a fraction of the context in \(0, 1\]"),
             (True, "is a bool"), (False, "is a bool"), (float("nan"), "budget=nan"),
             (1, "1 token.*give 1.0 to keep the whole context"), (0, "must be >= 2"), (-4, "must be >= 2"),
             (0.0, r"must be in \(0, 1\]"), (1.5, r"fraction of the context, and must be in \(0, 1\]\.$"),
             (16.0, "give the int 16"), (float("inf"), r"must be in \(0, 1\]\.$"), ([8], "is not a number")]
    for budget, msg in cases:
        with pytest.raises(ValueError, match=msg):
            kv.resolve_budget(budget, 30)
        with pytest.raises(ValueError, match=msg):  # generate also takes one budget per row: each is checked
            kv.generate(None, _ids(10), policy="h2o", budget=[budget] if isinstance(budget, list) else budget)
        with pytest.raises(ValueError, match=msg):
            kv.retrieval_accuracy(None, None, [object()], policy="h2o", budget=budget)
    for bad in ("16", True, 0.5):  # these take tokens: an int
        with pytest.raises(ValueError, match="not a number of tokens: give an int"):
            kv.fits("h2o", bad, "decode")
        with pytest.raises(ValueError, match="not a number of tokens: give an int"):
            with kv.evicting(None, "h2o", bad, "prompt"):
                pass
    # valid budgets keep their meaning: ints count tokens, floats are fractions of the context
    assert [kv.resolve_budget(b, 30) for b in (None, 16, 2, 0.5, 1.0, 0.01)] == [None, 16, 2, 15, 30, 1]
    assert kv.resolve_budget(np.int64(16), 30) == 16 and kv.resolve_budget(np.float64(0.5), 30) == 15
    assert kv.fits("h2o", np.int64(16), "decode") == kv.fits("h2o", 16, "decode")


def test_every_policy_has_its_own_colour_and_marker():
    named = [n for n in kv.POLICIES if n != "full"] + ["oracle"]
    assert set(kv.POLICY_STYLES) == set(kv.POLICIES) | {"oracle"}
    looks = [(kv.POLICY_STYLES[n]["color"], kv.POLICY_STYLES[n]["marker"]) for n in named]
    assert len({c for c, _ in looks}) == len(named) and len({m for _, m in looks}) == len(named)
    assert kv.POLICY_STYLES["tova"]["color"] != kv.POLICY_STYLES["tova_per_head"]["color"]


def test_the_notebooks_lookups_and_words_by_hand():
    from pruning_lab.stats import paired_binary

    runs = [dict(policy="tova", moment="prompt", budget=128, retrieval_correct=[1, 1, 1, 1, 1, 1, 0, 1],
                 retrieval_accuracy=0.875, accuracy_outside=None, room_to_choose=True),
            dict(policy="recency", moment="prompt", budget=128, retrieval_correct=[0, 0, 0, 0, 0, 0, 0, 1],
                 retrieval_accuracy=0.125, accuracy_outside=0.0, room_to_choose=False)]
    assert kv.run_of(runs, "tova", "prompt", 128) is runs[0] and kv.run_of(runs, "tova", "decode", 128) is None
    # 6 items only tova answers, none only recency: exact McNemar p = 2 * 0.5**6 = 0.03125
    v = kv.paired_verdict(runs[0], runs[1], [True] * 8, paired_binary)
    assert (v["a"], v["b"], v["budget"], v["items"], v["a_only"], v["b_only"]) == ("tova", "recency", 128, 8, 6, 0)
    assert v["verdict"] == "A better" and v["p_value"] == 0.03125 and v["mean_difference"] == 0.75
    w = kv.paired_verdict(runs[0], runs[1], [True] * 6 + [False] * 2, paired_binary)  # the mask picks the items
    assert w["items"] == 6 and w["a_only"] == 6 and w["p_value"] == 0.03125
    assert kv.find_verdict([w, v], "tova", "recency", 128) is w and kv.find_verdict([v], "tova", "random", 128) is None
    assert kv.find_verdict([v], "tova", "recency", 128, a_moment="decode") is None
    assert kv.verdict_mark(v) == "better (p = 0.031)"
    assert kv.verdict_mark(dict(verdict="B better", p_value=0.002)) == "worse (p = 0.002)"
    assert kv.verdict_mark(dict(verdict="too few pairs", p_value=float("nan"))) == "too few items"
    assert kv.verdict_word(v, "tova", "recency") == "tova better"
    assert kv.verdict_word(dict(verdict="B better"), "decode-time", "prompt compression") == "prompt compression better"
    assert kv.accuracy_cell(runs[0]) == "88% · —" and kv.accuracy_cell(runs[1]) == "12% · 0% (no room)"
    assert kv.accuracy_cell(None) == "—"
    # H2O with a quarter recent (no sinks): 128 - 32 recent = 96 free at the prompt moment; at decode time
    # 128 - 32 - a 32-token chunk = 64, exactly half (room); 96 - 24 - 32 = 40, under half of 96 (no room)
    h2o = kv.H2O(recent_ratio=0.25)
    assert kv.free_cell(h2o, 128, "prompt") == "96" and kv.free_cell(h2o, 128, "decode", chunk=32) == "64"
    assert kv.free_cell(h2o, 96, "decode", chunk=32) == "**40: no room to choose**"
    assert kv.recurrence_words(dict(verdict="B better", n=3, p_value=0.0123)).endswith(
        "(paired Student t over 3 prompts, p = 0.012)")
    assert kv.recurrence_words(dict(verdict="too few pairs")) == "too few prompts to test"


# --------------------------------------------------------------------------- the notebook


def test_notebook_smoke_run(smoke_runs):
    import yaml

    from pruning_lab.workbook import NOTEBOOKS

    results, nb_path = smoke_runs("04_kv_eviction")
    smoke = yaml.safe_load((NOTEBOOKS / "params" / "04_kv_eviction.smoke.yaml").read_text())
    assert results["full"]["retrieval_accuracy"] == 1.0  # the one smoke item, answered from the full cache
    assert results["full"]["kv_bytes"] > 0 and results["full"]["n_items"] == 1
    runs = results["runs"]
    expected = {(p, "prompt", b) for p in smoke["policies"] for b in smoke["budgets"]}
    expected |= {(p, "decode", b) for p in smoke["decode_policies"] for b in smoke["decode_budgets"]}
    expected |= {("oracle", "prompt", min(smoke["budgets"]))}
    assert {(r["policy"], r["moment"], r["budget"]) for r in runs} == expected
    for r in runs:  # every row records what the policy chose among, and the fact it kept
        if r["policy"] != "oracle":
            assert r["free_slots"] is not None and r["room_to_choose"] == (r["free_slots"] >= r["budget"] / 2)
        assert 0 < r["kv_bytes_ratio"] < 1 and 0 <= r["fact_kept"] <= 1 and len(r["fact_kept_per_layer"]) == 30
        assert r["draws"] == (smoke["random_draws"] if r["policy"] == "random" else 1)
    oracle = next(r for r in runs if r["policy"] == "oracle")
    assert oracle["fact_kept"] == 1.0 and oracle["retrieval_accuracy"] == 1.0  # the mechanism check
    assert results["verdicts"] and all(v["verdict"] == "too few pairs" for v in results["verdicts"])  # one item
    rec = results["recurrence"]
    assert sum(rec["gap_histogram"]) == rec["returns"] and 0 <= rec["fraction_recurring"] <= 1
    assert rec["steps"] == smoke["reasoning_tokens"] - smoke["recurrence_start"]
    heads = results["retrieval_heads"]
    assert heads["total_heads"] == 270 and 0 <= max(max(row) for row in heads["score"]) <= 1
    assert {r["policy"] for r in results["reasoning"]["runs"]} == set(smoke["reasoning_policies"])
    assert "What this run shows" in results["conclusion"] and "LazyEviction on long reasoning" in results["conclusion"]
    lr = results["long_reasoning"]  # section 6 on the smoke reasoner: every policy at every budget, per problem
    n = smoke["lazy_problems"]
    assert lr["selection"]["kept"] == list(range(n)) and len(lr["full"]["correct"]) == n
    assert {(r["policy"], r["budget"]) for r in lr["runs"]} == {(p, b) for p in ["lazy_eviction"] + smoke["lazy_rivals"]
                                                                 for b in smoke["lazy_budgets"]}
    ls = results["lazy_sinks"]  # the sink diagnosis: plain LazyEviction again, and with sinks at every budget
    assert len(ls["rerun"]["correct"]) == n and [x["budget"] for x in ls["runs"]] == smoke["lazy_budgets"]
    assert all(x["first_token_kept"] == [1.0] * n for x in ls["runs"])
    for r in lr["runs"]:
        assert r["budget_tokens"] == [round(r["budget"] * (p + c)) for p, c in zip(lr["full"]["prompt_tokens"],
                                                                                    lr["full"]["cot_tokens"])]
        assert r["room_to_choose"] == all(f >= b / 2 for f, b in zip(r["free_slots"], r["budget_tokens"]))
    figures = nb_path.parent / "results" / "figures" / "04_kv_eviction"
    for name in ("retrieval_accuracy", "fact_tokens_kept", "recurrence", "eviction_maps", "retrieval_heads",
                 "long_reasoning"):
        assert (figures / f"{name}.png").is_file(), name


def _committed():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "04_kv_eviction.json").read_text())
    nb = json.loads((root / "notebooks" / "04_kv_eviction.ipynb").read_text())
    return root, r, nb


def _policies_of(p):
    return dict(recency=kv.Recency(), random=kv.Random(window=p["random_window"]), streaming_llm=kv.StreamingLLM(),
                h2o=kv.H2O(recent_ratio=p["h2o_recent_ratio"]), tova=kv.TOVA(), tova_per_head=kv.TOVAPerHead(),
                snapkv=kv.SnapKV(window=p["snapkv_window"]),
                lazy_eviction=kv.LazyEviction(observation_window=p["lazy_window"]))


def test_committed_run_matches_its_rendered_conclusion():
    """notebooks/04's conclusions are rendered from its results; this checks the committed run: >= 24 independent
    items the full cache answers (>= 90%), budgets in tokens with the free slots each policy really had, every
    verdict equal to the one its per-item outcomes give, and the rendered text saying what the verdicts say."""
    import numpy as np

    from pruning_lab.stats import paired, paired_binary

    _, r, nb = _committed()
    p = r["params"]
    items = r["items"]
    assert len(items) >= 24 and r["full"]["n_items"] == len(items) and r["full"]["retrieval_accuracy"] >= 0.9
    assert all(isinstance(b, int) and b >= 128 for b in p["budgets"]) and p["context_tokens"] >= 1000
    after = np.array([it["tokens_after_answer"] for it in items])
    make = _policies_of(p)
    runs = {(x["policy"], x["moment"], x["budget"]): x for x in r["runs"]}
    for x in r["runs"]:
        if x["policy"] == "oracle":
            continue
        assert x["free_slots"] == kv.free_slots(make[x["policy"]], x["budget"], x["moment"], chunk=p["prefill_chunk"])
        assert x["room_to_choose"] == (x["free_slots"] >= x["budget"] / 2)
        out = after >= x["budget"]
        assert x["n_outside"] == int(out.sum())
        c = np.array(x["retrieval_correct"], float)
        assert x["retrieval_accuracy"] == pytest.approx(c.mean())
        assert x["accuracy_outside"] is None or x["accuracy_outside"] == pytest.approx(c[out].mean())
    assert runs[("random", "prompt", p["budgets"][0])]["draws"] == p["random_draws"] >= 8
    full = np.array(r["full"]["correct"], float)
    for v in r["verdicts"]:
        a = np.array(runs[(v["a"], v["a_moment"], v["budget"])]["retrieval_correct"], float)
        b = full if v["b"] == "full" else np.array(runs[(v["b"], v["b_moment"], v["budget"])]["retrieval_correct"], float)
        mask = after >= v["budget"] if v["subset"] == "outside" else np.ones(len(items), bool)
        test = paired_binary if v["test"].startswith("exact McNemar") else paired
        w = test(a[mask], b[mask])
        assert (w["verdict"], v["items"]) == (v["verdict"], int(mask.sum())), v
        assert w["p_value"] == pytest.approx(v["p_value"], nan_ok=True)
    text = "".join(next("".join(o["data"]["text/markdown"]) for c in nb["cells"] if c["cell_type"] == "code"
                        for o in c.get("outputs", []) if "What this run shows" in "".join(o.get("data", {}).get("text/markdown", ""))))
    assert " ".join(text.split()) == " ".join(r["conclusion"].split())
    lines = text.splitlines()
    n_ok = int(full.sum())
    assert f"the full cache answers **{n_ok}/{len(items)}** items" in text
    for b in p["budgets"]:
        line = next(x for x in lines if x.startswith(f"- Prompt compression to **{b} tokens**"))
        beyond = line.split("beyond recency: ")[1].split(";")[0] if "beyond recency: " in line else ""
        for name in p["policies"]:
            if name in ("recency", "random") or not runs[(name, "prompt", b)]["room_to_choose"]:
                continue
            v = next(x for x in r["verdicts"] if (x["a"], x["b"], x["budget"], x["a_moment"]) == (name, "recency", b, "prompt"))
            acc = runs[(name, "prompt", b)]["accuracy_outside"]
            assert (f"{name} {acc:.0%}" in beyond) == (v["verdict"] == "A better"), (b, name)
    for b in p["decode_budgets"]:
        line = next(x for x in lines if x.startswith(f"- **Decode-time eviction at {b} tokens**"))
        for name in p["decode_policies"]:
            assert f"{name} {runs[(name, 'decode', b)]['retrieval_accuracy']:.0%}" in line
    rec = r["recurrence"]
    assert rec["steps"] >= 128 and rec["prompts"] >= 3 and f"{rec['fraction_recurring']:.0%} of the (layer, head, token)" in text
    heads = r["retrieval_heads"]
    assert f"{heads['heads_over_threshold']} of {heads['total_heads']} query heads score above {heads['threshold']}" in text
    assert all(x["budget"] > max(r["reasoning"]["prompt_tokens"]) for x in r["reasoning"]["runs"])


def test_committed_long_reasoning_run_is_lazy_evictions_claim_tested():
    """Item 7: >= 30 problems with full-cache CoTs of >= 200 tokens, decode-time eviction at 50% and 30% of each
    problem's own length, LazyEviction paired against the full cache and against StreamingLLM, H2O and TOVA at the same
    budgets; every recorded verdict is the one its per-problem outcomes give, and the conclusion says it."""
    import numpy as np

    from pruning_lab.stats import paired_binary

    _, r, nb = _committed()
    lr, p = r["long_reasoning"], r["params"]
    full = lr["full"]
    n = len(full["correct"])
    assert n >= 30 and len(lr["selection"]["kept"]) == n and min(full["cot_tokens"]) >= 200
    assert sorted(p["lazy_budgets"]) == [0.3, 0.5] and {"streaming_llm", "h2o", "tova"} <= set(p["lazy_rivals"])
    runs = {(x["policy"], x["budget"]): x for x in lr["runs"]}
    assert set(runs) == {(a, b) for a in ["lazy_eviction"] + p["lazy_rivals"] for b in p["lazy_budgets"]}
    make = _policies_of(p)
    for x in lr["runs"]:
        bt = np.array(x["budget_tokens"])
        assert x["budget_tokens"] == [round(x["budget"] * (a + c)) for a, c in zip(full["prompt_tokens"], full["cot_tokens"])]
        assert x["room_to_choose"] and all(f >= b / 2 for f, b in zip(x["free_slots"], bt))  # every problem had room
        pol = make[x["policy"]]
        chunks = [p["prefill_chunk"] if t > b else 1 for t, b in zip(full["prompt_tokens"], bt)]  # a prompt that fits: 1
        assert x["free_slots"] == [kv.free_slots(pol, int(b), "decode", c) for b, c in zip(bt, chunks)]
        assert x["accuracy"] == pytest.approx(np.mean(x["correct"]))
    for v in lr["verdicts"]:
        a = runs[(v["a"], v["budget"])]["correct"]
        b = lr["full_again"]["correct"] if v["b"] == "full" else runs[(v["b"], v["budget"])]["correct"]
        w = paired_binary(a, b)
        assert (w["verdict"], w["a_only"], w["b_only"]) == (v["verdict"], v["a_only"], v["b_only"]), v
    text = " ".join(r["conclusion"].split())
    assert f"{n} problems, full-cache CoTs of {min(full['cot_tokens'])}–{max(full['cot_tokens'])} tokens" in text
    again = lr["full_again"]
    assert f"writing the same CoT on only {again['same_text']})" in text and len(again["correct"]) == n
    for b in p["lazy_budgets"]:
        assert f"at {b:.0%} of each problem's tokens LazyEviction solves {runs[('lazy_eviction', b)]['accuracy']:.0%}" in text
        for name in p["lazy_rivals"]:
            v = next(x for x in lr["verdicts"] if (x["a"], x["b"], x["budget"]) == ("lazy_eviction", name, b))
            assert f"{name} {runs[(name, b)]['accuracy']:.0%} (LazyEviction against it: {kv.verdict_mark(v)})" in text
        vf = next(x for x in lr["verdicts"] if (x["a"], x["b"], x["budget"]) == ("lazy_eviction", "full", b))
        assert f"(against the full cache: {kv.verdict_mark(vf)})" in text


def test_committed_lazy_sink_diagnosis_is_tested():
    """Section 6's diagnosis: plain LazyEviction run again at the smaller budget, and LazyEviction with ``lazy_sinks``
    sinks at every budget, on the same problems. With sinks the first token is held in every layer and head of every
    problem (the mechanism protects it); every verdict is the one the per-problem outcomes give; the conclusion says it."""
    from pruning_lab.stats import paired_binary

    _, r, _ = _committed()
    lr, ls, p = r["long_reasoning"], r["lazy_sinks"], r["params"]
    n = len(lr["full"]["correct"])
    runs = {(x["policy"], x["budget"]): x for x in lr["runs"]}
    low = min(p["lazy_budgets"])
    assert ls["sinks"] == p["lazy_sinks"] >= 1 and ls["rerun"]["budget"] == low
    assert sorted(x["budget"] for x in ls["runs"]) == sorted(p["lazy_budgets"])
    rerun = ls["rerun"]
    assert len(rerun["correct"]) == n and 0 <= min(rerun["first_token_kept"]) and max(rerun["first_token_kept"]) <= 1
    w = paired_binary(rerun["correct"], runs[("lazy_eviction", low)]["correct"])
    assert (w["verdict"], w["a_only"], w["b_only"]) == (rerun["vs_first_run"]["verdict"], rerun["vs_first_run"]["a_only"],
                                                        rerun["vs_first_run"]["b_only"])
    for x in ls["runs"]:
        assert x["first_token_kept"] == [1.0] * n  # protected sinks are never evicted
        assert x["budget_tokens"] == runs[("lazy_eviction", x["budget"])]["budget_tokens"]  # the same budgets
        assert x["accuracy"] == pytest.approx(np.mean(x["correct"]))
    by_budget = {x["budget"]: x for x in ls["runs"]}
    for v in ls["verdicts"]:
        b = lr["full_again"]["correct"] if v["b"] == "full" else runs[(v["b"], v["budget"])]["correct"]
        w = paired_binary(by_budget[v["budget"]]["correct"], b)
        assert (w["verdict"], w["a_only"], w["b_only"]) == (v["verdict"], v["a_only"], v["b_only"]), v
    assert {(v["b"], v["budget"]) for v in ls["verdicts"]} >= {(b, x) for b in ("full", "lazy_eviction", "streaming_llm")
                                                               for x in p["lazy_budgets"]}
    text = " ".join(r["conclusion"].split())
    lost = 1 - np.mean(rerun["first_token_kept"])
    assert f"had evicted the prompt's first token in {lost:.0%} of the (layer, KV head) caches" in text
    for x in ls["runs"]:
        v = next(v for v in ls["verdicts"] if (v["b"], v["budget"]) == ("lazy_eviction", x["budget"]))
        assert f"{x['accuracy']:.0%} at {x['budget']:.0%} (against LazyEviction without sinks: {kv.verdict_mark(v)}" in text


def test_readme_quotes_the_committed_chapter_4_run():
    root, r, _ = _committed()
    readme = " ".join((root / "README.md").read_text().split())
    n = r["full"]["n_items"]
    runs = {(x["policy"], x["moment"], x["budget"]): x for x in r["runs"]}
    verdict = {(v["a"], v["a_moment"], v["b"], v["b_moment"], v["budget"]): v["verdict"] for v in r["verdicts"]}
    assert f"the full cache answers {sum(r['full']['correct'])}/{n}" in readme and f"{n} items, each with its own" in readme
    b0 = min(r["params"]["budgets"])
    oracle = runs[("oracle", "prompt", b0)]
    assert f"an oracle keeping the fact's tokens {round(oracle['retrieval_accuracy'] * n)}/{n} at {b0} tokens" in readme
    tova = {b: runs[("tova", "prompt", b)]["accuracy_outside"] for b in (256, 512)}
    assert f"TOVA answers {tova[512]:.0%} of the facts outside the recency window at 512 tokens and {tova[256]:.0%} at 256" in readme
    assert all(verdict[("tova", "prompt", "recency", "prompt", b)] == "A better" for b in (256, 512))
    assert f"against recency's {runs[('recency', 'prompt', 512)]['accuracy_outside']:.0%}" in readme
    dec, pro = runs[("tova", "decode", 256)], runs[("tova", "prompt", 256)]
    assert f"TOVA answers {dec['retrieval_accuracy']:.0%} against {pro['retrieval_accuracy']:.0%} with prompt compression" in readme
    assert verdict[("tova", "decode", "tova", "prompt", 256)] == "B better" and "(worse beyond noise, p = " in readme
    rec = r["recurrence"]
    assert f"{rec['fraction_recurring']:.0%} of the tokens once among a head's {rec['top_k']} most attended" in readme
    assert f"fewer than the {rec['null_fraction_recurring']:.0%} with the steps shuffled" in readme and rec["verdict"] == "B better"
    lr = r["long_reasoning"]  # LazyEviction's claim on long reasoning (item 7)
    full, again = lr["full"], lr["full_again"]
    n = len(full["correct"])
    assert (f"on {n} held-out problems whose full-cache CoTs run {min(full['cot_tokens'])}–{max(full['cot_tokens'])} tokens, "
            f"the full cache solves {full['accuracy']:.0%}") in readme
    assert f"same CoT on only {again['same_text']} of them and solves {sum(again['correct']) / n:.0%}" in readme
    lruns = {(x["policy"], x["budget"]): x for x in lr["runs"]}
    names = {"streaming_llm": "StreamingLLM", "h2o": "H2O", "tova": "TOVA"}
    for v in lr["verdicts"]:
        b = v["budget"]
        words = {"A better": f"LazyEviction better", "within noise": "within noise",
                 "B better": "the full cache better" if v["b"] == "full" else f"{names[v['b']]} better"}[v["verdict"]]
        if v["b"] == "full":
            quoted = f"at {b:.0%} of each problem's tokens LazyEviction solves {lruns[('lazy_eviction', b)]['accuracy']:.0%} ({words}, p = {v['p_value']:.2g})"
        else:
            quoted = f"{names[v['b']]} {lruns[(v['b'], b)]['accuracy']:.0%} ({words}, p = {v['p_value']:.2g})"
        if v["a"] == "lazy_eviction":
            assert quoted in readme, quoted
    low = min(r["params"]["lazy_budgets"])
    limit = r["params"]["lazy_max_new_tokens"]
    loops = sum(c >= limit for c in lruns[("lazy_eviction", low)]["cot_tokens"])
    assert f"{loops} of its {n} CoTs there run to the {limit}-token limit" in readme
    ls = r["lazy_sinks"]  # the sink diagnosis
    assert f"the prompt's first token in {1 - np.mean(ls['rerun']['first_token_kept']):.0%} of the (layer, KV head)" in readme
    assert f"With {ls['sinks']} sinks protected and nothing else changed" in readme
    full_words = {"within noise": "within noise of the full cache", "B better": "below the full cache", "A better": "above the full cache"}
    sl_words = {"within noise": "within noise of StreamingLLM", "B better": "below StreamingLLM", "A better": "above StreamingLLM"}
    for x in ls["runs"]:
        b = x["budget"]
        v = {w["b"]: w for w in ls["verdicts"] if w["budget"] == b}
        plain = {"within noise": "within noise", "A better": "better", "B better": "worse"}[v["lazy_eviction"]["verdict"]]
        quoted = (f"{x['accuracy']:.0%} at {b:.0%} ({lruns[('lazy_eviction', b)]['accuracy']:.0%} without: {plain}, "
                  f"p = {v['lazy_eviction']['p_value']:.2g}; {full_words[v['full']['verdict']]}, p = {v['full']['p_value']:.2g}; "
                  f"{sl_words[v['streaming_llm']['verdict']]}, p = {v['streaming_llm']['p_value']:.2g})")
        assert quoted in readme, quoted
    if any(w["verdict"] != "A better" for w in ls["verdicts"] if w["b"] == "lazy_eviction" and w["budget"] == low):
        assert f"a candidate cause that {n} problems do not show beyond noise" in readme
    heads = r["retrieval_heads"]
    assert f"{heads['heads_over_threshold']} of {heads['total_heads']} query heads are retrieval heads" in readme
    assert f"~{r['params']['context_tokens']:,}-token passages" in readme
