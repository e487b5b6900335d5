"""The workbook's one noise test: when may a chapter say that A beats B?

Every comparison in the workbook is *paired*: two methods measured on the same seeds, items or
prompts. The rule, stated once here and in notebook 00:

- **Numbers** (accuracy per seed, log perplexity per calibration seed): a two-sided paired
  **Student t** test on the differences ``a − b`` at the **5% level** (``LEVEL``). The verdict is
  "A better" / "B better" when the 95% confidence interval of the mean difference,
  ``mean ± t_{0.975, n−1} · sd/√n``, excludes 0; otherwise "within noise". With n = 3 seeds the
  critical value is 4.30 standard errors, not 2 (2 standard errors is p ≈ 0.18 at n = 3).
- **Yes/no outcomes** (a retrieval item answered or not, a problem solved or not): the **exact
  McNemar** test, i.e. a two-sided sign test on the discordant items (A right and B wrong, or the
  reverse), at the same level.
- Fewer than ``MIN_PAIRS`` (3) pairs draw **no verdict**: "too few pairs" (a single-seed grid cell
  is reported as single-seed, never as a difference).

``paired_lower`` is ``paired`` for positive numbers where lower is better (perplexity): the test on
log values, the difference read as a ratio. ``paired_text`` and ``ratio_text`` write a result for a
reader; ``mean_std`` is the one mean ± sample-std helper.
"""

from __future__ import annotations

import math

import torch

LEVEL = 0.05  # two-sided
MIN_PAIRS = 3
NOISE_TEST = "paired two-sided Student t (numbers) or exact McNemar (yes/no), 5% level; fewer than 3 pairs: no verdict"

VERDICTS = ("A better", "B better", "within noise", "too few pairs")


def _as_1d(a, b, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{what}() needs two 1-D sequences of equal length (one value per pair), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}.")
    return a, b


def t_critical(n: int, level: float = LEVEL) -> float:
    """Two-sided Student-t critical value for ``n`` pairs (n − 1 degrees of freedom)."""
    from scipy.stats import t

    if n < 2:
        return float("inf")
    return float(t.ppf(1 - level / 2, n - 1))


def paired(a, b, *, level: float = LEVEL, min_n: int = MIN_PAIRS) -> dict:
    """Paired two-sided Student t test of ``a − b`` (same seeds/items in the same order).

    Returns ``n``, ``mean_difference``, ``std_difference`` (n − 1), ``ci`` (the ``1 − level``
    confidence interval of the mean difference), ``t``, ``p_value``, ``level``, ``test`` and
    ``verdict``: "A better" / "B better" when ``p_value < level`` (the interval excludes 0),
    "within noise" otherwise, "too few pairs" below ``min_n`` pairs. Equal, non-zero differences
    (standard deviation 0) are a certain difference (p = 0); all-zero differences are p = 1.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.05.")
    a, b = _as_1d(a, b, "paired")
    d = a - b
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    std = float(d.std()) if n > 1 else float("nan")
    out = {"n": n, "mean_difference": mean, "std_difference": std, "ci": [float("nan"), float("nan")],
           "t": float("nan"), "p_value": float("nan"), "level": level, "test": "paired Student t, two-sided"}
    if n < max(min_n, 2):
        return {**out, "verdict": "too few pairs"}
    from scipy.stats import t as student

    se = std / math.sqrt(n)
    if se == 0:
        tval, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    else:
        tval = mean / se
        p = float(2 * student.sf(abs(tval), n - 1))
    half = t_critical(n, level) * se
    verdict = "within noise" if p >= level else ("A better" if mean > 0 else "B better")
    return {**out, "ci": [mean - half, mean + half], "t": tval, "p_value": p, "verdict": verdict}


def paired_lower(a, b, *, level: float = LEVEL, min_n: int = MIN_PAIRS) -> dict:
    """``paired`` for positive numbers where lower is better (perplexity per calibration seed):
    the Student t test runs on ``−log a`` against ``−log b``, so "A better" means ``a`` is *lower*,
    and a difference is a ratio. Adds ``value_ratio`` = exp(mean of log a − log b), the geometric
    mean of ``a / b`` over the pairs (0.9: ``a`` 10% lower)."""
    a, b = _as_1d(a, b, "paired_lower")
    if not bool((a > 0).all() and (b > 0).all()):
        raise ValueError("paired_lower() compares positive numbers on a log scale (perplexities); "
                         "use paired() for numbers that can be zero or negative.")
    p = paired(-a.log(), -b.log(), level=level, min_n=min_n)
    return {**p, "value_ratio": math.exp(-p["mean_difference"]) if len(a) else float("nan")}


def paired_binary(a, b, *, level: float = LEVEL, min_n: int = MIN_PAIRS) -> dict:
    """Exact McNemar test for yes/no outcomes of two methods on the same items.

    ``a`` and ``b`` are per-item booleans (or 0/1). Only discordant items carry information: ``a_only``
    (A right, B wrong) and ``b_only``; under "no difference" each discordant item is a fair coin, so
    the two-sided p-value is ``min(1, 2 · P(Binomial(a_only + b_only, ½) ≤ min(a_only, b_only)))``
    (1 when no item is discordant). Verdict as in ``paired``; ``mean_difference`` is the difference
    in accuracy.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.05.")
    a, b = _as_1d(a, b, "paired_binary")
    if not bool(((a == 0) | (a == 1)).all() and ((b == 0) | (b == 1)).all()):
        raise ValueError("paired_binary() takes yes/no outcomes (booleans or 0/1); use paired() for numbers.")
    n = len(a)
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    out = {"n": n, "a_only": a_only, "b_only": b_only,
           "accuracy_a": float(a.mean()) if n else float("nan"), "accuracy_b": float(b.mean()) if n else float("nan"),
           "mean_difference": float((a - b).mean()) if n else float("nan"), "p_value": float("nan"),
           "level": level, "test": "exact McNemar (two-sided sign test on discordant items)"}
    if n < min_n:
        return {**out, "verdict": "too few pairs"}
    k, m = min(a_only, b_only), a_only + b_only
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    verdict = "within noise" if p >= level else ("A better" if a_only > b_only else "B better")
    return {**out, "p_value": p, "verdict": verdict}


def mean_std(xs, *, allow_empty: bool = False) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1; 0 for one value) of numbers; ``None`` values are skipped.
    With no number left it refuses, or gives ``(None, None)`` when ``allow_empty`` (a summary row no seed
    reached). Plain left-to-right float sums, as the lottery and sweep summaries always computed them."""
    xs = [x for x in xs if x is not None]
    if not xs:
        if allow_empty:
            return None, None
        raise ValueError("mean_std() needs at least one value (None values are skipped).")
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def verdict_words(v: dict, a: str, b: str, *, noise: str = "within noise", too_few: str = "too few pairs to test") -> str:
    """The one place a test's verdict becomes words: ``a`` when "A better", ``b`` when "B better", ``noise`` when
    "within noise", ``too_few`` when "too few pairs" (the callers choose the words, e.g. "ticket better" or
    "lower at the 5% level"). An unknown verdict is refused rather than shown as something else."""
    verdict = v["verdict"] if isinstance(v, dict) else v
    words = dict(zip(VERDICTS, (a, b, noise, too_few)))
    if verdict not in words:
        raise ValueError(f"Unknown verdict {verdict!r}: a paired test returns one of {', '.join(VERDICTS)}.")
    return words[verdict]


def paired_text(p: dict, a: str = "A", b: str = "B", *, scale: float = 100.0, digits: int = 2, unit: str = " pts",
                marks: bool = False, words: tuple[str, str] | None = None) -> str:
    """``paired``'s result for a reader: ``"+0.65 ± 0.29 pts, ticket better (p = 0.012)"`` — the mean
    difference ± its sample standard deviation — or with ``marks`` the compact table form
    ``"+0.65 ± 0.29 **+**"``: **+** / **−** a difference at the 5% level, ≈ within noise, · too few pairs.
    ``words`` replaces "<a> better" / "<b> better" where higher is not better (e.g. ("a longer", "a shorter"))."""
    sd = "" if p["std_difference"] != p["std_difference"] else f" ± {scale * p['std_difference']:.{digits}f}"
    number = f"{scale * p['mean_difference']:+.{digits}f}{sd}"
    if marks:
        return f"{number} " + verdict_words(p, "**+**", "**−**", noise="≈", too_few="·")
    word = verdict_words(p, *(words or (f"{a} better", f"{b} better")), too_few=f"n = {p['n']}, no test")
    pv = "" if p.get("p_value") != p.get("p_value") or p.get("p_value") is None else f" (p = {p['p_value']:.2g})"
    return f"{number}{unit}, {word}{pv}"


def binary_text(v: dict, a: str = "A", b: str = "B") -> str:
    """``paired_binary``'s result for a reader: ``"+12 pts (9 right only with a, 2 only with b; exact McNemar
    p = 0.065: within noise)"``."""
    p = "" if v["p_value"] != v["p_value"] else f"; exact McNemar p = {v['p_value']:.2g}"
    word = verdict_words(v, f"{a} better", f"{b} better", too_few=f"n = {v['n']}, no test")
    return (f"{100 * v['mean_difference']:+.0f} pts ({v['a_only']} right only with {a}, {v['b_only']} only with "
            f"{b}{p}: {word})")


def ratio_text(p: dict, lower: str = "lower", higher: str = "higher") -> str:
    """``paired_lower``'s result for a reader: ``"×0.93 (lower at the 5% level, p = 0.0031)"`` — the ratio
    of A to B, then the verdict in the caller's words (``lower``: A lower at the test's level) and p."""
    pct = f"{100 * p.get('level', LEVEL):g}%"
    word = verdict_words(p, f"{lower} at the {pct} level", f"{higher} at the {pct} level",
                         too_few=f"{p['n']} seed(s): no test")
    pv = "" if p["verdict"] == "too few pairs" else f", p = {p['p_value']:.2g}"
    return f"×{p['value_ratio']:.2f} ({word}{pv})"
