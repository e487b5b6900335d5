"""pruning_lab.kv_eviction: hand-computed choices, exactness with a large budget, positions and masks
against an independent masked full-sequence forward, real memory savings, padding, bad input."""

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

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


def test_tova_evicts_what_the_latest_query_ignores():
    cache, layer = _layer(list(range(6)))
    cache.policy, cache.budget = kv.TOVA(), 3
    score = cache.policy.score({}, torch.tensor([[[[0.9, 0.0, 0.0, 0.0, 0.0, 0.1],
                                                   [0.0, 0.2, 0.05, 0.5, 0.05, 0.2]]]]), layer.positions)
    assert score[0, 0].tolist() == pytest.approx([0.0, 0.2, 0.05, 0.5, 0.05, 0.2])  # only the last query counts
    top = score.topk(3, -1).indices.sort(-1).values
    assert top[0, 0].tolist() == [1, 3, 5]


def test_snapkv_keeps_the_top_k_of_its_pooled_window_scores():
    torch.manual_seed(0)
    attn = torch.rand(1, 1, 4, 12).softmax(-1)  # 4 window queries over 12 keys
    score = kv.SnapKV(window=4, kernel_size=3).score({}, attn, torch.arange(12)[None, None])
    votes = attn[0, 0].sum(0)
    by_hand = torch.tensor([(votes[max(0, i - 1):i + 2]).mean() for i in range(12)])  # avg pool, edges not padded
    assert torch.allclose(score[0, 0], by_hand)
    cache, layer = _layer(list(range(12)))
    cache.policy, cache.budget = kv.SnapKV(window=4, kernel_size=3), 7
    layer.queries = torch.zeros(1, 1, 4, 2)  # stand-ins: score() gets our attention through a patched observe
    layer.query_pos = torch.arange(8, 12)
    cache._observe = lambda _layer: attn
    cache._evict(7)
    expected = sorted(set(range(8, 12)) | set(by_hand[:8].topk(3).indices.tolist()))  # window + top-3 of the rest
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


def test_lazy_eviction_evicts_only_at_window_boundaries(tiny):
    ids = _ids(60)
    with kv.evicting(tiny, "lazy_eviction", 40, "decode", record=True) as cache:
        _feed(tiny, ids, cache, prompt=20)
    seen = [e["seen"] for e in cache.events]
    assert cache.evict_every == 16 and len(seen) >= 2
    assert all(b - a == 16 for a, b in zip(seen, seen[1:]))  # one eviction per observation window
    assert all(e["kept"] == 40 - 1 - 15 for e in cache.events)
    assert max(layer.kept() for layer in cache.layers) <= 40


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
    (Q, K) key positions by a 4-D mask, positions untouched."""
    mask = allowed[None, None]
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
    # the same run without full-sequence positions (keys re-numbered 0..kept) is measurably different
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


def test_kv_memory_really_shrinks(tiny):
    from pruning_lab.eval import cache_bytes

    ids = _ids(64)
    full = DynamicCache()
    _feed(tiny, ids, full, prompt=32)
    with kv.evicting(tiny, "h2o", 16, "decode") as cache:
        _feed(tiny, ids, cache, prompt=16)
    for layer in cache.layers:
        assert layer.keys.shape[-2] <= 16 and layer.values.shape[-2] <= 16
        assert layer.keys.is_contiguous() and layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 4
    assert cache_bytes(cache) <= cache_bytes(full) * 16 / 64
    assert cache.get_seq_length() == 64  # positions keep counting the tokens seen


def test_per_head_choices_differ_and_groups_share_one_choice(tiny):
    with kv.evicting(tiny, "tova", 12, "decode") as cache:
        _feed(tiny, _ids(40, seed=9), cache, prompt=20)
    pos = cache.kept_positions()  # (layers, B, H_kv, kept)
    assert pos.shape == (2, 1, 2, pos.shape[-1]) and pos.shape[-1] <= 12
    assert not torch.equal(pos[:, :, 0], pos[:, :, 1])  # each KV head chose its own tokens


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


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny):
    a, b = _ids(30, seed=11), _ids(22, seed=12)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    for policy, moment in (("h2o", "decode"), ("snapkv", "prompt"), ("streaming_llm", "decode"), ("tova", "decode")):
        budget = 70 if policy == "snapkv" else 12
        together = kv.generate(tiny, batch, attention_mask=mask, policy=policy, budget=budget, moment=moment,
                               max_new_tokens=6, force=_ids(6, seed=13, batch=2), prefill_chunk=5)
        for row, single in ((0, a), (1, b)):
            alone = kv.generate(tiny, single, policy=policy, budget=budget, moment=moment, max_new_tokens=6,
                                force=_ids(6, seed=13, batch=2)[row:row + 1], prefill_chunk=5)
            assert torch.allclose(together.logprobs[row], alone.logprobs[0], atol=1e-4), (policy, row)


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
    small = kv.generate(tiny, ids, policy="h2o", budget=16, moment="decode", max_new_tokens=8)
    assert small.peak_kv_bytes <= 16 * 2 * 2 * 8 * 4 * 2 and small.prefill_chunk <= 8


def test_budget_fraction_is_of_the_full_context(tiny):
    g = kv.generate(tiny, _ids(30), policy="tova", budget=0.5, max_new_tokens=10)
    assert g.budget == 20


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_generation(tiny):
    ids = _ids(20)
    with pytest.raises(ValueError, match="Unknown KV policy"):
        kv.generate(tiny, ids, policy="h3o", budget=8)
    with pytest.raises(ValueError, match=">= 2"):
        kv.generate(tiny, ids, policy="h2o", budget=0)
    with pytest.raises(ValueError, match="fraction"):
        kv.generate(tiny, ids, policy="h2o", budget=1.5)
    with pytest.raises(ValueError, match="no room.*sink"):
        kv.generate(tiny, ids, policy="streaming_llm", budget=4)
    with pytest.raises(ValueError, match="moment"):
        kv.generate(tiny, ids, policy="h2o", budget=8, moment="later")
    with pytest.raises(ValueError, match="context of 256"):
        kv.generate(tiny, _ids(250), policy="h2o", budget=8, max_new_tokens=10)
    with pytest.raises(ValueError, match="Llama-style attention"):
        with kv.evicting(torch.nn.Linear(2, 2), "h2o", 8):
            pass
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
        with pytest.raises(ValueError, match=msg):
            kv.generate(None, _ids(10), policy="h2o", budget=budget)
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


# --------------------------------------------------------------------------- the notebook


def test_notebook_smoke_run(smoke_runs):
    results, nb_path = smoke_runs("04_kv_eviction")
    assert results["full"]["retrieval_accuracy"] == 1.0  # the one smoke item, answered from the full cache
    assert results["full"]["kv_bytes"] > 0 and results["full"]["decode_tokens_per_s"] > 0
    runs = results["runs"]
    keys = {"policy", "moment", "budget", "retrieval_accuracy", "reasoning_agreement", "continuation_perplexity",
            "kv_bytes_ratio", "decode_speed_ratio"}
    assert {(r["policy"], r["moment"]) for r in runs} == {(p, m) for p in ("streaming_llm", "h2o", "lazy_eviction")
                                                          for m in ("prompt", "decode")}
    for r in runs:
        assert keys <= set(r) and r["budget"] == 0.7
        if r["retrieval_accuracy"] is not None:
            assert 0 < r["kv_bytes_ratio"] < 0.85  # a 70% budget really holds less than the full cache
            assert r["continuation_perplexity"] >= 1.0 and 0 <= r["reasoning_agreement"] <= 1
    assert any(r["decode_speed_ratio"] for r in runs if r["moment"] == "decode")
    rec = results["recurrence"]
    assert sum(rec["gap_histogram"]) == rec["returns"] and 0 <= rec["fraction_recurring"] <= 1
    assert results["retrieval_heads"]["total_heads"] == 270  # 30 layers x 9 query heads
    assert (nb_path.parent / "results" / "figures" / "04_kv_eviction" / "eviction_maps.png").is_file()


def test_readme_quotes_the_committed_chapter_4_run():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "04_kv_eviction.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    n = len(r["oracle"]["correct"])
    assert r["full"]["retrieval_accuracy"] == 1.0 and f"the full cache answers {n}/{n} items" in readme
    assert r["oracle"]["accuracy"] == 1.0 and f"answers {n}/{n} with {r['oracle']['budget']:.0%} of the cache" in readme
    best = {b: max(x["retrieval_accuracy"] for x in r["runs"] if x["budget"] == b and x["retrieval_accuracy"] is not None)
            for b in (0.15, 0.5)}
    assert f"answer at most {best[0.15]:.0%} at 15%" in readme and f"at 50% the best reach {best[0.5]:.0%}" in readme
    assert f"{r['recurrence']['fraction_recurring']:.0%} of the tokens that were once among" in readme
    assert f"{r['retrieval_heads']['heads_over_half']} of {r['retrieval_heads']['total_heads']} query heads" in readme
    assert f"~{r['params']['context_tokens']}-token passages" in readme
