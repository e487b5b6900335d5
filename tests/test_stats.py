"""The workbook's noise test, by hand first, then against scipy's own implementations."""

from __future__ import annotations

import math

import pytest

from pruning_lab import stats


def test_paired_t_by_hand():
    # differences 0.02, 0.03, 0.04: mean 0.03, sd 0.01, se 0.01/sqrt(3); t = 3*sqrt(3) = 5.196 with 2 df.
    # For 2 df the t tail has a closed form: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2.
    r = stats.paired([0.80, 0.82, 0.84], [0.78, 0.79, 0.80])
    t = 3 * math.sqrt(3)
    assert r["t"] == pytest.approx(t)
    assert r["p_value"] == pytest.approx(1 - t / math.sqrt(t * t + 2))  # = 0.0351
    half = 4.302653 * 0.01 / math.sqrt(3)  # t_{0.975, 2} = 4.3027
    assert r["ci"] == pytest.approx([0.03 - half, 0.03 + half], abs=1e-6)
    assert r["verdict"] == "A better"


def test_two_standard_errors_is_not_enough_with_three_pairs():
    # differences 1.0, 1.5, 0.5: mean 1, sd 0.5, mean = 3.46 standard errors -- the old "> 2 SE" rule said
    # "A better"; with 2 df that is p = 1 - 3.464/sqrt(14) = 0.074, so within noise at 5%
    r = stats.paired([2.0, 2.5, 1.5], [1.0, 1.0, 1.0])
    assert r["mean_difference"] == pytest.approx(1.0) and r["std_difference"] == pytest.approx(0.5)
    assert r["p_value"] == pytest.approx(1 - math.sqrt(12) / math.sqrt(14))
    assert r["verdict"] == "within noise"
    assert stats.paired([0.5, 0.4, 0.6], [0.9, 0.8, 0.95])["verdict"] == "B better"


def test_paired_edges():
    assert stats.paired([2, 3, 4, 5], [1, 2, 3, 4])["verdict"] == "A better"  # every difference +1, sd 0: p = 0
    z = stats.paired([1, 2, 3], [1, 2, 3])
    assert z["verdict"] == "within noise" and z["p_value"] == 1.0
    for few in (([1, 2], [0, 0]), ([0.5], [0.4])):
        assert stats.paired(*few)["verdict"] == "too few pairs"
    with pytest.raises(ValueError, match="equal length"):
        stats.paired([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="level"):
        stats.paired([1, 2, 3], [0, 0, 0], level=5)


def test_paired_matches_scipy():
    from scipy.stats import ttest_rel

    import numpy as np

    rng = np.random.default_rng(0)
    for n in (3, 5, 20):
        a, b = rng.normal(size=n), rng.normal(0.3, size=n)
        ours, ref = stats.paired(a, b), ttest_rel(a, b)
        assert ours["t"] == pytest.approx(ref.statistic) and ours["p_value"] == pytest.approx(ref.pvalue)
        ci = ttest_rel(a, b).confidence_interval(0.95)
        assert ours["ci"] == pytest.approx([ci.low, ci.high])


def test_exact_mcnemar_by_hand():
    # 6 items only A answers, none only B: p = 2 * (1/2)^6 = 0.031 -> A better
    a = [1] * 6 + [1, 0] * 5
    b = [0] * 6 + [1, 0] * 5
    r = stats.paired_binary(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (6, 0, 16)
    assert r["p_value"] == pytest.approx(2 / 64) and r["verdict"] == "A better"
    assert r["mean_difference"] == pytest.approx(6 / 16)
    # 5 to 0 is not enough: p = 2/32 = 0.0625; 7 to 1: p = 2 * (1 + 8) / 256 = 0.070
    assert stats.paired_binary([1] * 5, [0] * 5)["p_value"] == pytest.approx(0.0625)
    assert stats.paired_binary([1] * 5, [0] * 5)["verdict"] == "within noise"
    r = stats.paired_binary([1] * 7 + [0], [0] * 7 + [1])
    assert r["p_value"] == pytest.approx(18 / 256) and r["verdict"] == "within noise"
    same = stats.paired_binary([True, False, True], [True, False, True])
    assert same["p_value"] == 1.0 and same["verdict"] == "within noise"
    assert stats.paired_binary([0, 1], [1, 1])["verdict"] == "too few pairs"
    with pytest.raises(ValueError, match="yes/no"):
        stats.paired_binary([0.5, 1, 1], [1, 1, 1])


def test_exact_mcnemar_matches_scipy_binomtest():
    from scipy.stats import binomtest

    for k, m in [(0, 4), (1, 9), (3, 10), (10, 20), (2, 25)]:
        a = [1] * k + [0] * (m - k)
        b = [0] * k + [1] * (m - k)
        assert stats.paired_binary(a, b)["p_value"] == pytest.approx(binomtest(k, m, 0.5).pvalue)


def test_mean_std_and_text_by_hand():
    assert stats.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and stats.mean_std([5.0]) == (5.0, 0.0)
    assert stats.mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(2 ** 0.5))  # None skipped
    with pytest.raises(ValueError):
        stats.mean_std([None])
    p = stats.paired([0.80, 0.82, 0.84], [0.78, 0.79, 0.80])
    assert stats.paired_text(p, "ticket", "dense") == "+3.00 ± 1.00 pts, ticket better (p = 0.035)"
    assert stats.paired_text(p, marks=True) == "+3.00 ± 1.00 **+**"
    q = stats.paired([1.0, 2.0], [1.5, 1.5])
    assert stats.paired_text(q, "x", "y", scale=1, digits=1, unit="") == "+0.0 ± 0.7, n = 2, no test"
    assert stats.paired_text(stats.paired([0.5], [0.4]), marks=True) == "+10.00 ·"


def test_paired_lower_on_log_values_by_hand():
    # a is exactly half of b on every seed: log differences all equal -> a certain difference, ratio 0.5
    r = stats.paired_lower([10.0, 20.0, 40.0], [20.0, 40.0, 80.0])
    assert r["verdict"] == "A better" and r["p_value"] < 1e-12 and r["value_ratio"] == pytest.approx(0.5)
    # ratios 0.5, 1, 2: the log differences -log2, 0, log2 have mean 0 -> geometric mean ratio 1, within noise
    r = stats.paired_lower([5.0, 10.0, 40.0], [10.0, 10.0, 20.0])
    assert r["value_ratio"] == pytest.approx(1.0) and r["verdict"] == "within noise"
    # the same test as paired() on -log, by hand: d = log(b/a) = log 2, log 4, log 2 -> mean log(2^(4/3))
    a, b = [10.0, 10.0, 10.0], [20.0, 40.0, 20.0]
    r, q = stats.paired_lower(a, b), stats.paired([-math.log(x) for x in a], [-math.log(x) for x in b])
    assert r["value_ratio"] == pytest.approx(2 ** (-4 / 3)) and r["p_value"] == pytest.approx(q["p_value"])
    assert stats.paired_lower([1.0, 2.0], [2.0, 3.0])["verdict"] == "too few pairs"
    with pytest.raises(ValueError, match="positive"):
        stats.paired_lower([1.0, 0.0, 2.0], [1.0, 1.0, 1.0])


def test_ratio_text_by_hand():
    p = {"n": 3, "verdict": "A better", "p_value": 0.0031, "value_ratio": 0.934, "level": 0.05}
    assert stats.ratio_text(p) == "×0.93 (lower at the 5% level, p = 0.0031)"
    assert stats.ratio_text({**p, "verdict": "B better"}, "a", "adaptive higher") == \
        "×0.93 (adaptive higher at the 5% level, p = 0.0031)"
    assert stats.ratio_text({**p, "verdict": "within noise", "p_value": 0.42}) == "×0.93 (within noise, p = 0.42)"
    assert stats.ratio_text({**p, "n": 1, "verdict": "too few pairs"}) == "×0.93 (1 seed(s): no test)"


def test_verdict_words_is_the_one_mapping_and_refuses_an_unknown_verdict():
    words = [stats.verdict_words({"verdict": v}, "ticket better", "re-init better") for v in stats.VERDICTS]
    assert words == ["ticket better", "re-init better", "within noise", "too few pairs to test"]
    assert stats.verdict_words("within noise", "a", "b", noise="≈") == "≈"
    assert stats.verdict_words({"verdict": "too few pairs"}, "a", "b", too_few="·") == "·"
    with pytest.raises(ValueError, match="Unknown verdict 'A wins'"):
        stats.verdict_words({"verdict": "A wins"}, "a", "b")
    # every caller goes through it: a verdict the mapping does not know is refused there too
    from pruning_lab import kv_eviction as kv
    for f in (lambda v: stats.paired_text({**v, "mean_difference": 0.1, "std_difference": 0.1, "n": 3, "p_value": 0.5}),
              lambda v: stats.ratio_text({**v, "value_ratio": 1.0, "n": 3, "p_value": 0.5}),
              lambda v: kv.verdict_mark({**v, "p_value": 0.5}), lambda v: kv.verdict_word(v, "a", "b"),
              lambda v: kv.recurrence_words({**v, "n": 3, "p_value": 0.5})):
        with pytest.raises(ValueError, match="Unknown verdict"):
            f({"verdict": "A wins"})


def test_binary_text_and_paired_text_words_by_hand():
    v = stats.paired_binary([1] * 9 + [0] * 2 + [1] * 9, [0] * 9 + [1] * 2 + [1] * 9)  # 9 vs 2 discordant
    # p = 2 * P(Bin(11, 1/2) <= 2) = 2 * (1 + 11 + 55) / 2048 = 0.0654
    assert stats.binary_text(v, "the CoT", "answer only") == (
        "+35 pts (9 right only with the CoT, 2 only with answer only; exact McNemar p = 0.065: within noise)")
    t = stats.paired([10, 12, 14, 11], [20, 23, 25, 21])  # a writes 10.5 fewer tokens, every time
    text = stats.paired_text(t, "asap", "unpruned", scale=1, digits=0, unit=" tokens", words=("asap longer", "asap shorter"))
    assert text.startswith("-10 ± 1 tokens, asap shorter (p = ")
