"""pruning_lab.eval and pruning_lab.train: hand-computed perplexities, byte counts, the tensor-only loop."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pruning_lab import eval as ev
from pruning_lab.data import load_image_data
from pruning_lab.models import make_model, tiny_llama
from pruning_lab.train import TrainConfig, train


class TableLM(nn.Module):
    """A causal 'LM' whose next-token logits are a fixed function of the current token."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = TableLM(torch.zeros(7, 7))
    ids = torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(0))
    assert ev.perplexity(model, ids, seq_len=10) == pytest.approx(7.0, rel=1e-6)
    assert ev.perplexity(model, ids, seq_len=10, stride=3) == pytest.approx(7.0, rel=1e-6)


def test_perfect_and_hand_computed_bigram_perplexity():
    # tokens cycle 0,1,2,0,1,2,...: a model that puts all mass on (t+1)%3 is perfect
    ids = torch.arange(60) % 3
    perfect = torch.full((3, 3), -1e9)
    perfect[torch.arange(3), (torch.arange(3) + 1) % 3] = 0.0
    assert ev.perplexity(TableLM(perfect), ids, seq_len=6) == pytest.approx(1.0)
    # a model giving the right token probability 1/2 everywhere: perplexity 2
    half = torch.full((3, 3), math.log(0.25))
    half[torch.arange(3), (torch.arange(3) + 1) % 3] = math.log(0.5)
    assert ev.perplexity(TableLM(half), ids, seq_len=6, stride=2) == pytest.approx(2.0, rel=1e-6)


def test_sliding_window_scores_each_token_once_with_context():
    """With stride s, windows after the first score only their last s tokens: compare by hand."""
    model = tiny_llama(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    seq_len, stride = 16, 8
    nll, n = 0.0, 0
    with torch.no_grad():
        for w, start in enumerate(range(0, len(ids) - seq_len + 1, stride)):
            win = ids[start:start + seq_len][None]
            logp = model(input_ids=win).logits[0, :-1].log_softmax(-1)
            tok_nll = -logp.gather(1, win[0, 1:, None])[:, 0]
            keep = tok_nll if w == 0 else tok_nll[-stride:]
            nll += keep.double().sum().item()
            n += len(keep)
    expected = math.exp(nll / n)
    got = ev.perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_a_large_vocabulary_agrees_with_float64():
    """A 49,152-token vocabulary with peaked logits (SmolLM2's size): the mean log-likelihood agrees with a float64
    computation to 1e-6 nats per token. (The log-softmax over a strided vocabulary axis, as computed before, was
    off by 3.6e-6 here and by ~1e-4 on SmolLM2.)"""
    model = tiny_llama(seed=2, vocab_size=49152)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # tied with the embedding
    ids = torch.randint(0, 49152, (8 * 128,), generator=torch.Generator().manual_seed(2))
    windows = ids.view(8, 128)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].double()
    exact = torch.nn.functional.cross_entropy(logits.reshape(-1, 49152), windows[:, 1:].reshape(-1)).item()
    assert abs(math.log(ev.perplexity(model, ids, seq_len=128, batch_size=3)) - exact) < 1e-6


def test_perplexity_bad_input():
    model = TableLM(torch.zeros(5, 5))
    with pytest.raises(ValueError, match="at least seq_len"):
        ev.perplexity(model, torch.arange(5) % 5, seq_len=10)
    with pytest.raises(ValueError, match="stride"):
        ev.perplexity(model, torch.arange(50) % 5, seq_len=10, stride=20)
    with pytest.raises(ValueError, match="tokenizer"):
        ev.perplexity(model, "some text")


def test_bytes_and_parameter_counts_by_hand():
    lin = nn.Linear(3, 2)
    assert ev.model_bytes(lin) == (3 * 2 + 2) * 4
    assert ev.count_parameters(lin) == 8
    with torch.no_grad():
        lin.weight[0].zero_()
    assert ev.count_parameters(lin, nonzero=True) == 8 - 3 - (lin.bias == 0).sum().item()
    m = tiny_llama()
    # tied lm_head counted once
    assert ev.count_parameters(m) == sum(p.numel() for p in m.parameters())
    assert ev.count_parameters(m) < sum(p.numel() for p in m.state_dict().values())


def test_cache_bytes_of_a_real_kv_cache():
    m = tiny_llama()
    cfg = m.config
    out = m(input_ids=torch.arange(12)[None].repeat(2, 1), use_cache=True)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 12 * head_dim * 4  # k+v, fp32
    assert ev.cache_bytes(out.past_key_values) == expected
    assert ev.cache_bytes(None) == 0


def test_tokens_per_second_measures_both_phases():
    speed = ev.tokens_per_second(tiny_llama(), prompt_len=16, new_tokens=4, repeats=1)
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0


def test_tokens_per_second_prefills_as_generate_does_with_the_last_logits_only():
    model, seen = tiny_llama(), []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        ev.tokens_per_second(model, prompt_len=16, new_tokens=3, batch_size=2, repeats=2)
    finally:
        handle.remove()
    # warm-up, then per repeat one prefill and 3 decode steps: the output layer always sees one position per row
    assert len(seen) == 1 + 2 * (1 + 3) and set(seen) == {(2, 1, model.config.hidden_size)}


def test_lm_comparison_times_each_shape_once_right_after_the_dense_model():
    dense = tiny_llama()
    ids = torch.randint(0, dense.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    compare = ev.LMComparison(dense, ids, seq_len=16, batch_size=2, prompt_len=8, new_tokens=2, repeats=1)
    same_shape = tiny_llama(seed=1)  # other weights, same shapes: its speed is not measured again
    smaller = tiny_llama(intermediate_size=48)
    fake = {id(dense): (100.0, 10.0), id(same_shape): (50.0, 5.0), id(smaller): (150.0, 12.0)}
    timed = []

    def speed(m):  # a stand-in timer, so that the ratios are known exactly
        timed.append(m)
        return {"prefill_tokens_per_s": fake[id(m)][0], "decode_tokens_per_s": fake[id(m)][1]}

    compare.speed = speed
    row = compare.measure(smaller)
    assert timed == [dense, smaller]
    assert row["params"] == ev.count_parameters(smaller) < ev.count_parameters(dense)
    # perplexity by hand: 4 disjoint windows of 16 tokens, each position predicting the next one
    with torch.no_grad():
        windows = ids.view(4, 16)
        logp = torch.log_softmax(smaller(input_ids=windows).logits[:, :-1].double(), -1)
        nll = -logp.gather(-1, windows[:, 1:, None]).mean()
    assert row["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert (row["prefill_speedup"], row["decode_speedup"]) == (1.5, pytest.approx(1.2))
    assert compare.measure(dense)["prefill_speedup"] == 1.0
    assert timed == [dense, smaller, dense, dense]
    again = compare.measure(same_shape)
    assert timed == [dense, smaller, dense, dense]  # cached by shape: same ratios as the dense model's
    assert again["prefill_speedup"] == 1.0
    assert again["perplexity"] == ev.perplexity(same_shape, ids, seq_len=16, batch_size=2)  # always measured
    assert again["perplexity"] != compare.measure(dense)["perplexity"]
    real = ev.LMComparison(dense, ids, prompt_len=8, new_tokens=2, repeats=1).speed(dense)
    assert real["prefill_tokens_per_s"] > 0 and real["decode_tokens_per_s"] > 0


def test_eval_mode_restores_training_flag():
    m = make_model("lenet")
    m.train()
    ev.evaluate(m, torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    assert m.training


@pytest.fixture(scope="module")
def small_data():
    d = load_image_data(val_size=1000, seed=0)
    return d.__class__(**{**d.__dict__, "x_train": d.x_train[:6000], "y_train": d.y_train[:6000]})


def test_training_learns_and_is_reproducible(small_data):
    cfg = TrainConfig(iterations=200, eval_every=100, seed=0)
    a, b = make_model("lenet", seed=0), make_model("lenet", seed=0)
    ra = train(a, small_data, cfg, progress=False)
    rb = train(b, small_data, cfg, progress=False)
    assert ra.test_accuracy > 0.7  # far above chance (0.1) after 200 Adam steps
    assert [h["iteration"] for h in ra.history] == [100, 200]
    assert ra.early_stop_iteration in (100, 200)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ra.history == rb.history


def test_after_step_runs_every_step(small_data):
    calls = []
    train(make_model("lenet"), small_data, TrainConfig(iterations=7, eval_every=0), progress=False,
          after_step=lambda m: calls.append(1))
    assert len(calls) == 7


def test_training_steps_run_on_the_configured_threads_and_restore_torchs(small_data):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        for threads, expect in ((1, 1), (None, 2), (2, 2)):
            seen.clear()
            train(make_model("lenet"), small_data, TrainConfig(iterations=3, eval_every=0, threads=threads),
                  progress=False, after_step=lambda m: seen.append(torch.get_num_threads()))
            assert seen == [expect] * 3, threads
            assert torch.get_num_threads() == 2  # restored
        with pytest.raises(RuntimeError):  # restored when a step fails too
            train(make_model("lenet"), small_data, TrainConfig(iterations=3, eval_every=0),
                  progress=False, after_step=lambda m: (_ for _ in ()).throw(RuntimeError("boom")))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bad_training_config():
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(iterations=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"):
            TrainConfig(threads=bad)


def test_eval_compares_with_the_one_noise_test_of_stats():
    # eval re-exports stats' names: no second rule anywhere (the old one called 2 standard errors "beyond noise")
    from pruning_lab import stats

    assert (ev.paired, ev.paired_text, ev.mean_std) == (stats.paired, stats.paired_text, stats.mean_std)
    # differences 0.6, 0.7, 0.2 points: mean 0.5 = 3.3 standard errors, p = 0.08 with 2 degrees of freedom
    r = ev.paired([85.6, 86.3, 85.9], [85.0, 85.6, 85.7])
    assert r["mean_difference"] == pytest.approx(0.5) and r["verdict"] == "within noise"
    assert r["p_value"] == pytest.approx(0.0822, abs=1e-3)
    assert ev.paired_text(r, "A", "B", scale=1) == "+0.50 ± 0.26 pts, within noise (p = 0.082)"
    p = ev.paired([0.80, 0.82, 0.84], [0.78, 0.79, 0.80])  # differences 0.02, 0.03, 0.04: t = 5.2, p = 0.035
    assert ev.paired_text(p, "ticket", "dense") == "+3.00 ± 1.00 pts, ticket better (p = 0.035)"
    assert ev.paired_text(p, marks=True) == "+3.00 ± 1.00 **+**"
    q = ev.paired([1.0, 2.0], [1.5, 1.5])  # two pairs: no verdict at all
    assert q["verdict"] == "too few pairs" and ev.paired_text(q, "x", "y", scale=1, digits=1, unit="") == "+0.0 ± 0.7, n = 2, no test"
    assert ev.paired_text(ev.paired([0.5], [0.4]), marks=True) == "+10.00 ·"  # one pair: single-seed, no spread
    assert ev.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and ev.mean_std([5.0, None]) == (5.0, 0.0)


def test_next_token_loss_by_hand():
    # the table LM predicts token (t + 1) mod 3 with logits [log 2, 0, 0] shifted: p(right) = 1/2 every position
    table = torch.full((3, 3), 0.0)
    for t in range(3):
        table[t, (t + 1) % 3] = math.log(2.0)
    lm = TableLM(table)
    ids = torch.tensor([[0, 1, 2, 0], [2, 0, 1, 2]])
    assert ev.next_token_loss(lm, ids).item() == pytest.approx(math.log(2))  # every next token is the predicted one
    wrong = torch.tensor([[0, 0, 0]])  # predicted 1, got 0: p = 1/4
    assert ev.next_token_loss(lm, wrong).item() == pytest.approx(math.log(4))


def test_lm_comparison_record_keeps_what_the_model_is_beside_its_measurements():
    table = torch.zeros(7, 7)
    table[torch.arange(7), (torch.arange(7) + 1) % 7] = math.log(6.0)  # right token: prob 6/12 = 1/2
    ids = torch.arange(70) % 7
    compare = ev.LMComparison(TableLM(table), ids, seq_len=10, batch_size=2)
    row = compare.record(TableLM(table), speed=False, method="hand", ratio=0.5)
    assert row == {"method": "hand", "ratio": 0.5, "params": 49, "perplexity": pytest.approx(2.0)}
    assert compare.rows == [row] and "prefill_speedup" not in row
