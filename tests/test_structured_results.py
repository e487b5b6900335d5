"""pruning_lab.structured_results: chapter 3's recorded runs read back, on a hand-made results dict."""

import math

import pytest

from pruning_lab import structured_results as sr

RUN = dict(structure="heads+mlp", lora=False, allocation="uniform", bias_compensation=False, ratio=0.2, params=80)
DATA = {
    "runs": [dict(RUN, method="taylor", layers=[4, 28], perplexity=40.0),
             dict(RUN, method="taylor", layers=[0, 30], perplexity=90.0),
             dict(RUN, method="flap", layers=[0, 30], allocation="adaptive", bias_compensation=True, perplexity=30.0,
                  prefill_speedup=1.2, decode_speedup=1.1),
             dict(RUN, method="flap", layers=[0, 30], allocation="adaptive", perplexity=35.0),
             dict(RUN, method="taylor", layers=[4, 28], lora=True, perplexity=20.0),
             dict(method="block-influence", structure="layers", allocation="global", ratio=0.2, lora=False, params=81,
                  perplexity=300.0)],
    "flap_seeds_runs": [dict(seed=s, variant=v, ratio=0.2, perplexity=p) for v, ps in
                        (("adaptive", (30.0, 33.0, 31.0)), ("adaptive, clipped", (29.0, 30.0, 30.0)),
                         ("adaptive + floor", (50.0, 50.0, 50.0))) for s, p in enumerate(ps)],
    "flap_standardize": {"paired": {"clipped vs adaptive": [{"ratio": 0.2, "verdict": "A better"},
                                                            {"ratio": 0.3, "verdict": "within noise"}]}},
}


def test_lookups_by_recipe_by_hand():
    R = sr.StructuredResults(DATA, n_layers=30)
    assert R.perplexity("taylor", "uniform", 0.2) == 40.0            # LLM-Pruner's recipe: layers 4-27, no bias
    assert R.perplexity("taylor", "uniform", 0.2, "all") == 90.0
    assert R.perplexity("flap", "adaptive", 0.2) == 30.0             # FLAP's recipe: every layer, bias on
    assert R.perplexity("flap", "adaptive", 0.2, "all", bias=False) == 35.0
    assert math.isnan(R.perplexity("flap", "uniform", 0.2))          # not run
    assert R.layer_removal == {0.2: 300.0}                           # LoRA rows and layer removal are not grid cells
    assert R.pair("clipped vs adaptive", 0.3)["verdict"] == "within noise"
    with pytest.raises(KeyError, match=r"at \[0.2, 0.3\]"):
        R.pair("clipped vs adaptive", 0.5)
    assert R.seed_spread() == pytest.approx(33.0 / 30.0)             # adaptive's seeds: the widest of the three
    assert R.lowest_at(0.2, seed=0) == [(29.0, "FLAP adaptive, clipped (section 7), every layer"),
                                         (30.0, "flap adaptive + bias, every layer"),
                                         (35.0, "flap adaptive, every layer"), (40.0, "taylor uniform, layers 4-27"),
                                         (90.0, "taylor uniform, every layer")]


def test_span_number_and_table_by_hand():
    assert sr.span(range(4, 28)) == [4, 28] and sr.span_text([4, 28], 30) == "layers 4-27"
    assert sr.span_text([0, 30], 30) == "every layer"
    assert sr.number(None, ".2f") == "n/a" and sr.number(float("nan"), ".2f") == "n/a" and sr.number(0.5, ".2f") == "0.50"
    lines = sr.runs_table(DATA["runs"][2:4] + DATA["runs"][5:], dense_params=100).splitlines()
    assert lines[0].split() == ["method", "layers", "alloc", "bias", "ratio", "params", "ppl", "prefill", "decode"]
    assert lines[1].split() == ["flap", "0-29", "adaptive", "on", "0.20", "0.800x", "30.0", "1.20x", "1.10x"]
    assert lines[2].split() == ["flap", "0-29", "adaptive", "off", "0.20", "0.800x", "35.0", "-", "-"]
    assert lines[3].split() == ["block-influence", "-", "global", "off", "0.20", "0.810x", "300.0", "-", "-"]


def test_seed_perplexities_pair_by_seed_whatever_the_recorded_order():
    rows = [dict(seed=s, variant=v, ratio=0.2, perplexity=p) for s, v, p in
            ((2, "a", 12.0), (0, "a", 10.0), (1, "b", 21.0), (1, "a", 11.0), (0, "b", 20.0), (2, "b", 22.0))]
    R = sr.StructuredResults({"flap_seeds_runs": rows}, n_layers=30)
    assert R.seeds == [0, 1, 2]
    assert R.seed_perplexities == {("a", 0.2): [10.0, 11.0, 12.0], ("b", 0.2): [20.0, 21.0, 22.0]}
    with pytest.raises(ValueError, match="different seeds"):
        sr.StructuredResults({"flap_seeds_runs": rows[:-1]}, n_layers=30)
    with pytest.raises(ValueError, match="twice for seed 2"):
        sr.StructuredResults({"flap_seeds_runs": rows + rows[:1]}, n_layers=30)


def test_loss_gap_by_hand():
    # 8 steps, quarters of 2 steps; seed gaps (pruned - dense): 4,4,3,3,2,2,1,1 / 4,4,3,3,2,2,2,2 / 5,5,3,3,2,2,1.5,1.5
    dense = [[1.0] * 8] * 3
    pruned = [[5, 5, 4, 4, 3, 3, 2, 2], [5, 5, 4, 4, 3, 3, 3, 3], [6, 6, 4, 4, 3, 3, 2.5, 2.5]]
    g = sr.loss_gap(pruned, dense)
    assert g["per_seed"][1] == [4, 4, 3, 3, 2, 2, 2, 2]
    assert g["mean_gap"][:2] == pytest.approx([13 / 3, 13 / 3]) and g["by_quarter"] == pytest.approx([13 / 3, 3, 2, 1.5])
    lq = g["last_quarter"]  # third - fourth quarter per seed: 1, 0, 0.5 -> mean 0.5, sd 0.5, t = 1.73, p = 0.23
    assert lq["mean_difference"] == pytest.approx(0.5) and lq["verdict"] == "within noise"
    assert lq["p_value"] == pytest.approx(0.2254, abs=1e-4)
    # every seed falls by 1 in the last quarter: a certain fall
    assert sr.loss_gap([[5, 5, 4, 4, 3, 3, 2, 2]] * 3, dense)["last_quarter"]["verdict"] == "A better"
    assert sr.loss_gap([[2.0]], [[1.0]])["last_quarter"]["verdict"] == "too few pairs"  # one step, one seed
    with pytest.raises(ValueError, match="same seeds"):
        sr.loss_gap([[2.0, 1.0]], [[1.0]])
