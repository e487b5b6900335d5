"""Chapter 3's recorded runs, read back: the table a student reads and the lookups its conclusions use.

Notebook 03 records every pruned model as a row of ``runs`` (method, ratio, structure, allocation, layer
span, bias compensation, LoRA, parameters, perplexity, and speed for the timed ones) and the 3-seed
variant study as ``flap_seeds_runs``. ``StructuredResults`` reads those rows back by recipe, so the
rendered conclusion and the tests that pin it against ``results/03_structured_llm.json`` look numbers up
the same way. ``loss_gap`` reads the LoRA control's training curves.
"""

from __future__ import annotations

from .stats import paired
from .structured import layer_range


def span(layers: range) -> list[int]:
    """A layer range as it is recorded: ``[start, stop]``."""
    return [layers.start, layers.stop]


def span_text(layers, n_layers: int) -> str:
    """``"every layer"`` or ``"layers 4-27"`` for a recorded ``[start, stop]``."""
    start, stop = layers
    return "every layer" if (start, stop) == (0, n_layers) else f"layers {start}-{stop - 1}"


def number(x, spec: str) -> str:
    """``format(x, spec)``, or ``"n/a"`` for a number the results file holds as null (NaN is written as null)."""
    return "n/a" if x is None or x != x else format(x, spec)


def runs_table(rows: list[dict], dense_params: int) -> str:
    """The recorded runs as a fixed-width table: method, layers, allocation, bias compensation, ratio,
    parameters as a share of dense, perplexity, and the speed-ups where the run was timed."""
    lines = [f"{'method':<16}{'layers':>7}{'alloc':>10}{'bias':>5}{'ratio':>7}{'params':>8}{'ppl':>11}"
             f"{'prefill':>9}{'decode':>8}"]
    for r in rows:
        speed = (f"{r['prefill_speedup']:>8.2f}x{r['decode_speedup']:>7.2f}x" if "prefill_speedup" in r
                 else f"{'-':>9}{'-':>8}")
        lay = f"{r['layers'][0]}-{r['layers'][1] - 1}" if "layers" in r else "-"
        lines.append(f"{r['method']:<16}{lay:>7}{r.get('allocation', ''):>10}"
                     f"{'on' if r.get('bias_compensation') else 'off':>5}{r['ratio']:>7.2f}"
                     f"{r['params'] / dense_params:>7.3f}x{r['perplexity']:>11.1f}{speed}")
    return "\n".join(lines)


class StructuredResults:
    """Lookups over notebook 03's recorded results (``Recorder.data`` or the JSON file) for a model of
    ``n_layers`` decoder layers."""

    def __init__(self, data: dict, n_layers: int):
        self.data, self.n_layers = data, n_layers
        self.grid = {(r["method"], r["allocation"], r["bias_compensation"], tuple(r["layers"]), r["ratio"]):
                     r["perplexity"] for r in data.get("runs", []) if r["structure"] == "heads+mlp" and not r["lora"]}
        self.layer_removal = {r["ratio"]: r["perplexity"] for r in data.get("runs", []) if r["structure"] == "layers"}
        by_seed: dict[tuple[str, float], dict[int, float]] = {}
        for r in data.get("flap_seeds_runs", []):
            got = by_seed.setdefault((r["variant"], r["ratio"]), {})
            if r["seed"] in got:
                raise ValueError(f"flap_seeds_runs holds {r['variant']!r} at {r['ratio']} twice for seed {r['seed']}.")
            got[r["seed"]] = r["perplexity"]
        seed_sets = {tuple(sorted(v)) for v in by_seed.values()}
        if len(seed_sets) > 1:
            raise ValueError(f"The variant study's configurations ran on different seeds {sorted(seed_sets)}: "
                             "pairing by seed needs the same seeds everywhere (a run stopped half-way?).")
        self.seeds = list(next(iter(seed_sets), ()))
        # (variant, ratio) -> perplexities in seed order: two lists pair seed by seed
        self.seed_perplexities = {k: [v[s] for s in self.seeds] for k, v in by_seed.items()}

    def perplexity(self, method: str, allocation: str, ratio: float, layers="paper", bias: bool | None = None) -> float:
        """The one-seed grid's perplexity of ``method`` with ``allocation`` at ``ratio`` on ``layers`` (as
        ``structured.layer_range`` reads it: "paper", "all", a range or a pair) with bias compensation
        ``bias`` (default: on for FLAP, off for the rest, the papers' recipes); NaN when not run."""
        rng = span(layer_range(self.n_layers, layers, method))
        bias = method == "flap" if bias is None else bias
        return self.grid.get((method, allocation, bias, tuple(rng), ratio), float("nan"))

    def pair(self, name: str, ratio: float) -> dict:
        """The recorded paired comparison ``name`` (e.g. "clipped vs adaptive") at ``ratio``."""
        rows = self.data["flap_standardize"]["paired"][name]
        found = [x for x in rows if x["ratio"] == ratio]
        if not found:
            raise KeyError(f"{name!r} was not compared at ratio {ratio}: it was at {[x['ratio'] for x in rows]}.")
        return found[0]

    def seed_spread(self) -> float:
        """The largest ratio of highest to lowest perplexity over calibration seeds that one configuration
        of the variant study showed (1.0 with one seed)."""
        return max((max(v) / min(v) for v in self.seed_perplexities.values() if len(v) > 1), default=1.0)

    def lowest_at(self, ratio: float, seed: int) -> list[tuple[float, str]]:
        """Everything measured at ``ratio`` on calibration seed ``seed`` — every grid cell (metric, allocation,
        bias setting, layer range) and the variant study's own variants — as (perplexity, name), lowest first."""
        out = [(v, f"{m} {al}{' + bias' if b else ''}, {span_text(lay, self.n_layers)}")
               for (m, al, b, lay, r), v in self.grid.items() if r == ratio]
        out += [(x["perplexity"], f"FLAP {x['variant']} (section 7), every layer")
                for x in self.data.get("flap_seeds_runs", []) if x["seed"] == seed and x["ratio"] == ratio
                and x["variant"] in ("adaptive-units", "adaptive, clipped")]
        return sorted(out)


def loss_gap(pruned: list[list[float]], dense: list[list[float]]) -> dict:
    """The LoRA control's training-loss gap, pruned − dense, step by step on the same batches (one curve
    per seed in each list, the same seeds in the same order): what is left of the pruning loss, with the
    batch-to-batch noise cancelled.

    Returns ``per_seed`` (the gap curves), ``mean_gap`` (their mean, per step), ``by_quarter`` (its mean over each quarter of
    the steps) and ``last_quarter``: ``stats.paired`` over seeds of each seed's mean gap in the third
    quarter against the fourth — "A better" (the third higher) means the gap still falls at the end of
    training at the test's level; "within noise" means no further fall is shown (which with few seeds
    does not prove it has stopped); "too few pairs" below 3 seeds or 4 steps.
    """
    if len(pruned) != len(dense) or any(len(a) != len(b) for a, b in zip(pruned, dense)):
        raise ValueError("loss_gap() needs the pruned and dense curves of the same seeds, step for step.")
    gaps = [[a - b for a, b in zip(p, d)] for p, d in zip(pruned, dense)]
    mean_gap = [sum(col) / len(col) for col in zip(*gaps)]
    q = max(len(mean_gap) // 4, 1)
    by_quarter = [sum(mean_gap[i:i + q]) / len(mean_gap[i:i + q]) for i in range(0, q * 4, q) if mean_gap[i:i + q]]
    whole = [g for g in gaps if len(g) >= 4]
    third = [sum(g[2 * q:3 * q]) / q for g in whole]
    fourth = [sum(g[3 * q:4 * q]) / q for g in whole]
    return {"per_seed": gaps, "mean_gap": mean_gap, "by_quarter": by_quarter, "last_quarter": paired(third, fourth)}
