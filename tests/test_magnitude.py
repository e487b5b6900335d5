"""pruning_lab.magnitude: hand-computed masks first, then the peer (torch.nn.utils.prune), then the rest."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from pruning_lab import magnitude as mg
from pruning_lab.models import make_model, tiny_llama


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=True)
        self.b = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[0.5, -0.1, 2.0], [-0.3, 0.05, 1.0]]))
            self.b.weight.copy_(torch.tensor([[0.2, -4.0], [0.3, 0.01]]))


def test_hand_computed_global_and_layerwise_masks():
    m = TwoLayer()
    # |w| sorted over both layers: .01 .05 .1 .2 .3 .3 .5 1 2 4 -> 50% prunes the five smallest,
    # the tie at 0.3 is broken in parameter order (a before b)
    g = mg.global_magnitude_masks(m, 0.5)
    assert g["a.weight"].tolist() == [[True, False, True], [False, False, True]]
    assert g["b.weight"].tolist() == [[False, True], [True, False]]
    # layer-wise 50%: a prunes round(3) of 6, b prunes 2 of 4
    lw = mg.layerwise_magnitude_masks(m, 0.5)
    assert lw["a.weight"].tolist() == [[True, False, True], [False, False, True]]
    assert lw["b.weight"].tolist() == [[False, True], [True, False]]
    assert set(g) == {"a.weight", "b.weight"}  # biases are not pruned


def test_ties_are_pruned_in_order_to_the_exact_count():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 2.0], [1.0, 3.0, 1.0, 0.5]]))
    masks = mg.global_magnitude_masks(lin, 0.5)  # 0.5 and three of the five 1.0s go
    assert masks["weight"].tolist() == [[False, False, False, True], [True, True, True, False]]
    zeros = nn.Linear(10, 10, bias=False)
    nn.init.zeros_(zeros.weight)
    for s in (0.0, 0.33, 0.5, 0.99):
        assert int((~mg.global_magnitude_masks(zeros, s)["weight"]).sum()) == round(s * 100)


def test_kept_counts_and_ties_across_tensors_by_hand():
    # the 0.5 goes first, then the 1.0s in tensor order, then index order: a's three, then b's first
    a, b = torch.tensor([1.0, 1.0, 1.0, 2.0]), torch.tensor([1.0, 3.0, -1.0, 0.5])
    for n_prune, keep_a, keep_b in ((4, [False, False, False, True], [True, True, True, False]),
                                    (5, [False, False, False, True], [False, True, True, False]),
                                    (6, [False, False, False, True], [False, True, False, False])):
        masks, kept = mg._select([a, b], n_prune, mg._serial)
        assert masks[0].tolist() == keep_a and masks[1].tolist() == keep_b, n_prune
        assert kept.tolist() == [sum(keep_a), sum(keep_b)]  # read from the histograms, not from the masks


def test_sparse_nonzero_finds_the_same_positions_as_nonzero_by_hand():
    # 19 flags: words of eight are [0..7] (flags at 2 and 7), [8..15] (none), then a tail of three (flag at 17)
    flags = torch.zeros(19, dtype=torch.bool)
    flags[[2, 7, 17]] = True
    assert mg._sparse_nonzero(flags).tolist() == [2, 7, 17]
    assert mg._sparse_nonzero(torch.ones(16, dtype=torch.bool)).tolist() == list(range(16))
    assert mg._sparse_nonzero(torch.zeros(5, dtype=torch.bool)).tolist() == []
    assert mg._sparse_nonzero(torch.zeros(0, dtype=torch.bool)).tolist() == []
    assert mg._sparse_nonzero(flags[3:]).tolist() == [4, 14]  # a view whose words do not start at 8-byte steps
    g = torch.Generator().manual_seed(0)
    for n in (1, 8, 9, 64, 1001):
        for p in (0.0, 0.01, 0.5, 1.0):
            f = torch.rand(n, generator=g) < p
            assert torch.equal(mg._sparse_nonzero(f), f.nonzero().view(-1)), (n, p)


def _reference_masks(tensors, n_prune):
    """Brute force: a stable sort of every |w| in tensor order, then index order; the first n_prune go."""
    flat = torch.cat([t.detach().float().abs().reshape(-1) for t in tensors])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:n_prune]] = False
    return [m.view(t.shape) for m, t in zip(keep.split([t.numel() for t in tensors]), tensors)]


@pytest.mark.parametrize("threads", [1, 2])
def test_radix_select_equals_a_stable_sort_with_many_ties(threads):
    # values on a coarse grid (as dequantised 4-bit weights are): thousands of exact ties at any threshold;
    # tensors large enough that the worker pool takes them in parallel, plus fp16 and bf16 ones
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randint(-40, 41, shape, generator=g).float() / 16 for shape in [(300, 400), (7,), (256, 513)]]
    tensors += [(torch.randint(-40, 41, (200, 300), generator=g) / 16).to(torch.float16),
                (torch.randint(-40, 41, (100, 90), generator=g) / 16).to(torch.bfloat16)]
    total = sum(t.numel() for t in tensors)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for frac in (0.0, 0.001, 0.37, 0.5, 0.999):
            n = round(frac * total)
            ours = mg._prune_smallest(tensors, n)
            assert torch.get_num_threads() == threads  # the call restores the thread count
            for a, b in zip(ours, _reference_masks(tensors, n)):
                assert torch.equal(a, b), frac
            _, kept = mg._select(tensors, n, mg._serial)
            assert kept.tolist() == [int(m.sum()) for m in ours], frac
    finally:
        torch.set_num_threads(prev)


def test_thread_count_is_restored_when_selection_fails(monkeypatch):
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(mg, "_high_bits", lambda w: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            mg.global_magnitude_masks(TwoLayer(), 0.5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.9, 0.97])
def test_equal_to_torch_prune_global_unstructured(sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 50), nn.Linear(50, 10))
    ours = mg.global_magnitude_masks(model, sparsity)
    peer = copy.deepcopy(model)
    targets = [(peer[0], "weight"), (peer[3], "weight"), (peer[4], "weight")]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for (mod, _), name in zip(targets, ["0.weight", "3.weight", "4.weight"]):
        assert torch.equal(ours[name], mod.weight_mask.bool()), name


def test_exact_counts_on_a_real_net():
    m = make_model("lenet", seed=3)
    n = sum(p.numel() for p in mg.prunable_parameters(m).values())
    for s in (0.1, 0.5, 0.875, 0.99):
        for method in ("global", "layerwise", "erk"):
            masks = mg.magnitude_masks(m, s, method)
            pruned = sum(int((~x).sum()) for x in masks.values())
            assert abs(pruned - round(s * n)) <= (0 if method == "global" else len(masks)), (s, method)


@pytest.mark.parametrize("floor", [0.01, 0.002, 25])
def test_min_per_layer_holds_for_every_layer_and_total_stays_exact(floor):
    m = make_model("lenet", seed=0)
    n = sum(p.numel() for p in mg.prunable_parameters(m).values())
    plain = mg.global_magnitude_masks(m, 0.985)
    assert int(plain["fc1.weight"].sum()) == 0  # global MP empties fc1 of this untrained net: collapse
    masks = mg.global_magnitude_masks(m, 0.985, min_per_layer=floor)
    for name, mask in masks.items():
        need = floor if isinstance(floor, int) else -(-floor * mask.numel() // 1)
        assert int(mask.sum()) >= min(need, mask.numel()), name
    assert sum(int((~x).sum()) for x in masks.values()) == round(0.985 * n)
    # layers that were above their floor keep exactly their own largest weights
    w = m.fc3.weight.abs()
    kept = w[masks["fc3.weight"]]
    assert kept.min() >= w[~masks["fc3.weight"]].max()


def test_bad_input_is_refused_and_the_model_is_unchanged():
    m = TwoLayer()
    before = copy.deepcopy(m.state_dict())
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            mg.global_magnitude_masks(m, bad)
    n = sum(p.numel() for p in mg.prunable_parameters(m).values())
    with pytest.raises(ValueError, match=f"rounds to pruning all {n} weights"):
        mg.global_magnitude_masks(m, 1 - 0.4 / n)  # below 1.0, yet round(s * n) == n: nothing would be kept
    assert sum(int(x.sum()) for x in mg.global_magnitude_masks(m, 1 - 1 / n).values()) == 1  # one weight kept
    with pytest.raises(ValueError, match="min_per_layer"):
        mg.global_magnitude_masks(m, 0.9, min_per_layer=0.5)  # floors keep 5, 0.9 leaves 1
    with pytest.raises(ValueError, match="min_per_layer"):
        mg.global_magnitude_masks(m, 0.5, min_per_layer=1.5)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        mg.global_magnitude_masks(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), 0.5)
    with pytest.raises(ValueError, match="matches no parameter"):
        mg.global_magnitude_masks(m, 0.5, include="nothing_like_this")
    with pytest.raises(ValueError, match="Unknown magnitude method"):
        mg.magnitude_masks(m, 0.5, "random")
    bad_masks = {"a.weight": torch.ones(2, 3, dtype=torch.bool), "b.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="shape"):
        mg.apply_masks(m, bad_masks)
    for k, v in before.items():  # nothing changed, not even the first, valid mask
        assert torch.equal(m.state_dict()[k], v)


def test_include_selects_by_regex_names_or_function():
    m = TwoLayer()
    assert set(mg.prunable_parameters(m, include=r"^b\.")) == {"b.weight"}
    assert set(mg.prunable_parameters(m, include=["a.bias"])) == {"a.bias"}
    assert set(mg.prunable_parameters(m, include=lambda n, p: p.ndim == 2)) == {"a.weight", "b.weight"}
    with pytest.raises(ValueError, match="do not exist"):
        mg.prunable_parameters(m, include=["zzz"])


def test_masked_weights_stay_zero_under_adam():
    torch.manual_seed(0)
    m = make_model("lenet", seed=0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    for _ in range(3):  # Adam builds moments on every weight first
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    masks = mg.global_magnitude_masks(m, 0.8)
    mg.apply_masks(m, masks)
    hook = mg.keep_masked(m, masks)
    naive = copy.deepcopy(m)
    naive_opt = torch.optim.Adam(naive.parameters(), lr=1e-2)
    naive_opt.load_state_dict(opt.state_dict())
    for _ in range(5):
        for model, o, after in ((m, opt, hook), (naive, naive_opt, None)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
            if after:
                after(model)
    params = dict(m.named_parameters())
    assert all(int((params[n][~k] != 0).sum()) == 0 for n, k in masks.items())
    # without re-applying the mask, Adam's moments regrow the pruned weights (the classic bug)
    naive_params = dict(naive.named_parameters())
    assert sum(int((naive_params[n][~k] != 0).sum()) for n, k in masks.items()) > 1000


def test_works_on_a_transformer():
    llm = tiny_llama()
    masks = mg.global_magnitude_masks(llm, 0.5)
    assert "lm_head.weight" not in masks and "model.embed_tokens.weight" not in masks  # tied embedding
    assert len(masks) == 7 * llm.config.num_hidden_layers
    mg.apply_masks(llm, masks)
    assert mg.sparsity(masks) == pytest.approx(0.5, abs=1e-6)
    assert torch.isfinite(llm(input_ids=torch.arange(5)[None]).logits).all()


def test_erk_densities_hit_the_budget_and_cap_at_one():
    m = make_model("lenet")
    d = mg.erk_densities(m, 0.9)
    sizes = {n: p.numel() for n, p in mg.prunable_parameters(m).items()}
    kept = sum(d[n] * sizes[n] for n in d)
    assert kept == pytest.approx(0.1 * sum(sizes.values()), rel=1e-9)
    assert d["fc3.weight"] == 1.0 and d["fc1.weight"] < d["fc2.weight"] < 1.0
    # ERK: density ∝ (n_in + n_out) / (n_in * n_out) among the uncapped layers
    assert d["fc1.weight"] / d["fc2.weight"] == pytest.approx((1084 / 235200) / (400 / 30000))


def test_random_masks_keep_per_layer_counts():
    m = make_model("lenet")
    masks = mg.global_magnitude_masks(m, 0.9)
    r = mg.random_masks(masks, seed=1)
    assert {n: int(x.sum()) for n, x in r.items()} == {n: int(x.sum()) for n, x in masks.items()}
    assert not torch.equal(r["fc1.weight"], masks["fc1.weight"])


def test_cubic_schedule_endpoints_and_monotonicity():
    kw = dict(initial_sparsity=0.1, start=100, n_prunes=10, frequency=50)
    assert mg.cubic_sparsity(0, 0.9, **kw) == pytest.approx(0.1)
    assert mg.cubic_sparsity(100, 0.9, **kw) == pytest.approx(0.1)
    assert mg.cubic_sparsity(600, 0.9, **kw) == pytest.approx(0.9)
    assert mg.cubic_sparsity(10_000, 0.9, **kw) == pytest.approx(0.9)
    # halfway: s_f + (s_i - s_f) * 0.5^3
    assert mg.cubic_sparsity(350, 0.9, **kw) == pytest.approx(0.9 - 0.8 / 8)
    values = [mg.cubic_sparsity(t, 0.9, **kw) for t in range(0, 700, 10)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    steps = [b - a for a, b in zip(values[10:60], values[11:61])]
    assert steps[0] > steps[-1]  # prunes fast first, slowly at the end
    with pytest.raises(ValueError):
        mg.cubic_sparsity(0, 0.9, n_prunes=0)


def test_gradual_pruning_reaches_the_target_with_nested_masks(monkeypatch):
    from pruning_lab.data import load_image_data
    from pruning_lab.train import TrainConfig

    d = load_image_data(val_size=500)
    d = d.__class__(**{**d.__dict__, "x_train": d.x_train[:3000], "y_train": d.y_train[:3000]})
    m = make_model("lenet", seed=0)
    seen = []
    orig = mg.magnitude_masks

    def spy(module, s, method="global", **kw):
        seen.append(s)
        return orig(module, s, method, **kw)

    monkeypatch.setattr(mg, "magnitude_masks", spy)
    result, masks = mg.gradual_magnitude_pruning(m, d, TrainConfig(iterations=120, eval_every=0), 0.9,
                                                 start=20, n_prunes=4, frequency=20, progress=False)
    assert seen[1:] == pytest.approx([mg.cubic_sparsity(t, 0.9, start=20, n_prunes=4, frequency=20)
                                      for t in (20, 40, 60, 80, 100)])
    assert mg.sparsity(masks) == pytest.approx(0.9, abs=1e-5)
    params = dict(m.named_parameters())
    assert all(int((params[n][~k] != 0).sum()) == 0 for n, k in masks.items())
    with pytest.raises(ValueError, match="schedule ends"):
        mg.gradual_magnitude_pruning(m, d, TrainConfig(iterations=50), 0.9, start=20, n_prunes=4, frequency=20)


def test_notebook_smoke_run_records_its_numbers(smoke_runs):
    results, _ = smoke_runs("01_global_magnitude")
    assert results["mask_agreement_vs_torch_prune"] == 1.0  # continuous trained weights: no ties
    assert 0.5 < results["dense_accuracy"] <= 1.0
    curves = results["accuracy_vs_sparsity"]
    assert set(curves) == {"global", "layerwise", "erk"}
    for rows in curves.values():
        assert [r["sparsity"] for r in rows] == [0.0, 0.9]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # at sparsity 0 every method is the same dense network fine-tuned the same way
    assert len({rows[0]["accuracy"] for rows in curves.values()}) == 1
    assert 5 < results["dense_perplexity"] < 100
    ppl = results["llm_perplexity_vs_sparsity"]["global"]
    assert [r["sparsity"] for r in ppl] == [0.5] and ppl[0]["perplexity"] > results["dense_perplexity"]
    assert results["gradual_vs_oneshot"][0]["achieved_sparsity"] == pytest.approx(0.9, abs=1e-5)
    assert results["layer_collapse"]["min_per_layer"] == 200
    assert results["layer_collapse"]["kept_per_layer_global"]["fc1.weight"] == 0  # collapsed at init
    assert min(results["layer_collapse"]["kept_per_layer_global_mt"].values()) >= 200
    assert results["params"]["seeds"] == [0] and len(results["dense_accuracy_per_seed"]) == 1
    (small,) = results["large_sparse_vs_small_dense"]  # at 90%: a (33, 11) net, both layers >= 10 units
    assert small["small_dense_hidden"] == [33, 11] and small["small_dense_weights"] <= small["large_sparse_weights"]
    assert small["large_minus_small"]["n"] == 1 and small["large_minus_small"]["verdict"] == "too few pairs"  # one seed


def test_committed_notebook_results_tell_the_story():
    """The committed classroom run (results/01_global_magnitude.json): >= 3 seeds, every paired comparison
    recomputable from its per-seed numbers, small-dense nets of >= 10 units per hidden layer, and the
    rendered findings table of the committed notebook saying what those comparisons say."""
    import json
    from pathlib import Path

    from pruning_lab.stats import paired, paired_text

    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "results" / "01_global_magnitude.json").read_text())
    seeds = saved["params"]["seeds"]
    assert len(seeds) >= 3 and len(saved["dense_accuracy_per_seed"]) == len(seeds)
    assert saved["mask_agreement_vs_torch_prune"] == 1.0
    for key in ("accuracy_vs_sparsity", "dense_accuracy", "llm_perplexity_vs_sparsity", "dense_perplexity"):
        assert key in saved
    collapse = saved["layer_collapse"]
    assert min(collapse["kept_per_layer_global_mt"].values()) >= collapse["min_per_layer"]
    # an empty first layer makes the output constant: exactly chance on the balanced test set, for every seed
    assert collapse["kept_per_layer_global"]["fc1.weight"] == 0 and collapse["global_accuracy_per_seed"] == [0.1] * len(seeds)
    assert collapse["mt_minus_global"] == paired(collapse["global_mt_accuracy_per_seed"], collapse["global_accuracy_per_seed"])
    for r in saved["gradual_vs_oneshot"]:
        assert r["gradual_minus_oneshot"] == paired(r["gradual_accuracy_per_seed"], r["oneshot_accuracy_per_seed"])
    gradual = {r["sparsity"]: r for r in saved["gradual_vs_oneshot"]}
    for r in saved["large_sparse_vs_small_dense"]:
        assert min(r["small_dense_hidden"]) >= saved["params"]["small_dense_min_units"]
        assert r["large_minus_small"] == paired(gradual[r["sparsity"]]["gradual_accuracy_per_seed"],
                                                r["small_dense_accuracy_per_seed"])
    nb = json.loads((root / "notebooks" / "01_global_magnitude.ipynb").read_text())
    table = next("".join(o["data"]["text/markdown"]) for c in nb["cells"] if c["cell_type"] == "code"
                 for o in c.get("outputs", []) if "Large-sparse beats small-dense" in "".join(o.get("data", {}).get("text/markdown", "")))
    for r in saved["gradual_vs_oneshot"]:
        d = r["gradual_minus_oneshot"]
        assert (f"{r['sparsity']}: gradual {r['gradual_accuracy']:.3f} vs one-shot {r['oneshot_accuracy']:.3f} "
                f"({paired_text(d, 'gradual', 'one-shot')})") in table
        assert d["test"] == "paired Student t, two-sided" and d["level"] == 0.05  # the workbook's one noise test
    for other, rows in saved["global_vs_other_allocations"].items():
        curves = saved["accuracy_vs_sparsity"]
        for row in rows:
            i = [c["sparsity"] for c in curves["global"]].index(row["sparsity"])
            assert row["verdict"] == paired(curves["global"][i]["accuracy_per_seed"],
                                            curves[other][i]["accuracy_per_seed"])["verdict"]
    assert f"{len(seeds)} seeds, paired" in table and "single run" in table


def test_prune_and_finetune_keeps_the_mask_and_reports_both_accuracies():
    from pruning_lab.data import load_image_data
    from pruning_lab.eval import accuracy
    from pruning_lab.train import TrainConfig

    d = load_image_data(val_size=500)
    d = d.__class__(**{**d.__dict__, "x_train": d.x_train[:2000], "y_train": d.y_train[:2000]})
    m = make_model("lenet", seed=0)
    masks = mg.global_magnitude_masks(m, 0.9)
    expected_before = accuracy(mg.apply_masks(copy.deepcopy(m), masks), d.x_test, d.y_test)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    before, run = mg.prune_and_finetune(m, d, masks, TrainConfig(iterations=30, eval_every=0))
    assert before == expected_before and run.test_accuracy == accuracy(m, d.x_test, d.y_test)
    # it really fine-tuned: the kept weights moved, and 30 Adam steps lift a random 90%-sparse net far above chance
    assert all(not torch.equal(p[masks[n]], start[n][masks[n]]) for n, p in m.named_parameters() if n in masks)
    assert before < 0.25 and run.test_accuracy > before + 0.25
    params = dict(m.named_parameters())
    assert all(int((params[n][~k] != 0).sum()) == 0 for n, k in masks.items())


def test_small_dense_widths_by_hand():
    # 10% of LeNet-300-100's 266,200 weights: (33, 11) has 784*33 + 33*11 + 11*10 = 26,345 <= 26,620; (34, 11) 27,140
    assert mg.small_dense_widths(26_620) == (33, 11)
    # 5%: the second layer would shrink to 6 units; held at 10, the first gets what is left: 784*16 + 160 + 100
    assert mg.small_dense_widths(13_310) == (16, 10)
    # 2%: even 10 + 10 units need 784*10 + 100 + 100 = 8,040 weights
    assert mg.small_dense_widths(5_324) is None
    assert mg.small_dense_widths(8_040) == (10, 10) and mg.small_dense_widths(266_200) == (300, 100)


def test_readme_quotes_the_committed_chapter_1_run():
    """The README's chapter-1 paragraph says what results/01_global_magnitude.json says, in words that a rerun on
    another machine should keep: it names only differences with p < 0.01."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "01_global_magnitude.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    assert f"with {len(r['params']['seeds'])} seeds" in readme and len(r["params"]["seeds"]) >= 5
    called = [x for rows in r["global_vs_other_allocations"].values() for x in rows] + \
        [x["gradual_minus_oneshot"] for x in r["gradual_vs_oneshot"]] + \
        [x["large_minus_small"] for x in r["large_sparse_vs_small_dense"]] + [r["layer_collapse"]["mt_minus_global"]]
    assert "every difference the notebook calls has p < 0.01" in readme
    assert all(x["p_value"] < 0.01 for x in called if x["verdict"] in ("A better", "B better"))
    verdicts = {m: {x["sparsity"]: x["verdict"] for x in rows} for m, rows in r["global_vs_other_allocations"].items()}
    assert "global beats layer-wise at every sparsity from 80%" in readme
    assert set(verdicts["layerwise"].values()) == {"A better"} and min(verdicts["layerwise"]) == 0.8
    assert "ERK beats global from 95% (within noise at 90%)" in readme
    assert verdicts["erk"] == {0.8: "A better", 0.9: "within noise", 0.95: "B better", 0.98: "B better", 0.995: "B better"}
    erk80 = next(x for x in r["global_vs_other_allocations"]["erk"] if x["sparsity"] == 0.8)
    assert (f"at 80% global is ahead of ERK by {100 * erk80['mean_difference']:.2f} points (p = {erk80['p_value']:.1g})"
            in readme) and "found the two within noise (p = 0.32)" in readme  # the run before: fragile, and said so
    gradual = {x["sparsity"]: x for x in r["gradual_vs_oneshot"]}
    assert "gradual pruning beats one-shot + fine-tuning from 95% (within noise at 90%)" in readme
    assert {s: x["gradual_minus_oneshot"]["verdict"] for s, x in gradual.items()} == \
        {0.9: "within noise", 0.95: "A better", 0.98: "A better", 0.995: "A better"}
    assert (f"keeps {100 * gradual[0.995]['gradual_accuracy']:.1f}% accuracy at 99.5% sparsity where one-shot gets "
            f"{100 * gradual[0.995]['oneshot_accuracy']:.1f}%") in readme
    small = r["large_sparse_vs_small_dense"]
    assert [x["sparsity"] for x in small] == [0.9, 0.95] and "by about 2 points" in readme
    assert all(x["large_minus_small"]["verdict"] == "A better" and 0.015 < x["large_minus_small"]["mean_difference"] < 0.025
               for x in small)
    c = r["layer_collapse"]
    assert f"MT ({c['min_per_layer']} weights per layer) restores {100 * c['global_mt_accuracy']:.1f}%" in readme
    assert c["first_empty_layer_sparsity_trained"] is None and c["first_empty_layer_sparsity_at_init"] == 0.98
    assert f"held-out perplexity {r['dense_perplexity']:.1f}" in readme and "single run of one model" in readme
