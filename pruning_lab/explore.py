"""Result explorers: widgets that redraw a chapter's figure from its *recorded* results (nothing is rerun).

Each explorer is a figure function (testable without a browser) and a small ``interact`` around it, for
JupyterLab: ``lottery_levels(summary)`` for chapter 2, ``structured_runs(runs, dense)`` for chapter 3.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

# chapter 2: the four networks of every IMP level (keys of the recorded level rows)
LOTTERY_KINDS = (("ticket", "winning ticket", "C0", "o-"), ("random_reinit", "random re-init", "C1", "s--"),
                 ("random_mask", "random mask", "C2", "^--"), ("one_shot", "one-shot", "C3", "d:"))


def lottery_figure(summary: dict, seed="mean", level: int | None = None, final: bool = False):
    """Test accuracy vs weights remaining for one seed (or the mean over seeds), the chosen level marked.

    ``summary``: chapter 2's recorded results (``levels`` with ``<kind>_accuracy[_per_seed]`` and ``seeds``);
    ``final=True`` shows the accuracy at the end of training instead of at the early-stop iteration.
    """
    levels, seeds = summary["levels"], list(summary["seeds"])
    if seed != "mean" and seed not in seeds:
        raise ValueError(f"seed={seed!r} is not one of the recorded seeds {seeds} (or 'mean').")
    level = levels[-1]["level"] if level is None else level
    chosen = next((lv for lv in levels if lv["level"] == level), None)
    if chosen is None:
        raise ValueError(f"level={level} was not recorded: levels {[lv['level'] for lv in levels]}.")
    suffix = "final_accuracy" if final else "accuracy"

    def value(lv, kind):
        if seed == "mean":
            return lv.get(f"{kind}_{suffix}")
        return lv.get(f"{kind}_{suffix}_per_seed", [None] * len(seeds))[seeds.index(seed)]

    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = [100 * lv["weights_remaining"] for lv in levels]
    for kind, label, color, style in LOTTERY_KINDS:
        pts = [(xi, 100 * v) for xi, lv in zip(x, levels) if (v := value(lv, kind)) is not None]
        if pts:
            ax.plot(*zip(*pts), style, color=color, label=label)
    ax.axvline(100 * chosen["weights_remaining"], color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)" + (" at the end" if final else " at early stop"))
    here = ", ".join(f"{label} {100 * v:.1f}" for kind, label, _, _ in LOTTERY_KINDS
                     if (v := value(chosen, kind)) is not None)
    ax.set_title(f"{'mean of seeds' if seed == 'mean' else f'seed {seed}'} — level {level} "
                 f"({100 * chosen['weights_remaining']:.1f}% left)\n{here}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lottery_levels(summary: dict):
    """Chapter 2's explorer: a seed (or the mean), an IMP level, early-stop or final accuracy."""
    from ipywidgets import Checkbox, Dropdown, SelectionSlider, interact

    def show(seed, level, final):
        lottery_figure(summary, seed, level, final)
        plt.show()

    levels = [lv["level"] for lv in summary["levels"]]
    return interact(show, seed=Dropdown(options=["mean"] + list(summary["seeds"]), value="mean"),
                    level=SelectionSlider(options=levels, value=levels[-1], description="level"),
                    final=Checkbox(value=False, description="final instead of early-stop accuracy"))


def main_runs(runs: list[dict]) -> list[dict]:
    """Chapter 3's main sweep: the first row recorded per (method, allocation, ratio) of head+MLP pruning
    without LoRA (later rows are the bias on/off and LoRA sections)."""
    seen, out = set(), []
    for r in runs:
        key = (r["method"], r["allocation"], r["ratio"])
        if r["structure"] == "heads+mlp" and not r["lora"] and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def structured_figure(runs: list[dict], dense: dict, method: str, ratio: float):
    """Left: perplexity vs share of parameters removed for ``method`` (each allocation), ``ratio`` marked.
    Right: at ``ratio``, the parameters each allocation keeps, labelled with its perplexity."""
    rows = [r for r in main_runs(runs) if r["method"] == method]
    if not rows:
        raise ValueError(f"method={method!r} has no recorded runs: {sorted({r['method'] for r in main_runs(runs)})}.")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    allocations = sorted({r["allocation"] for r in rows})
    for i, alloc in enumerate(allocations):
        pts = sorted((r["ratio"], r["perplexity"]) for r in rows if r["allocation"] == alloc)
        ax1.plot([0.0] + [p[0] for p in pts], [dense["perplexity"]] + [p[1] for p in pts], "o-", color=f"C{i}",
                 label=alloc)
    ax1.axvline(ratio, color="k", lw=0.8, ls=":")
    ax1.set_yscale("log")
    ax1.set_xlabel("share of parameters removed")
    ax1.set_ylabel("held-out perplexity")
    ax1.set_title(method, fontsize=10)
    ax1.legend(fontsize=8)
    here = [("dense", dense)] if ratio == 0 else [(r["allocation"], r) for r in rows if r["ratio"] == ratio]
    bars = ax2.bar([name for name, _ in here], [100 * r["params"] / dense["params"] for _, r in here],
                   color=["k"] if ratio == 0 else [f"C{allocations.index(n)}" for n, _ in here])
    for bar, (_, r) in zip(bars, here):
        ax2.annotate(f"ppl {r['perplexity']:,.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=9)
    ax2.set_ylim(0, 115)
    ax2.set_ylabel("parameters kept (% of dense)")
    ax2.set_title(f"{ratio:.0%} removed", fontsize=10)
    fig.tight_layout()
    return fig


def structured_runs(runs: list[dict], dense: dict):
    """Chapter 3's explorer: a metric and a ratio (0 = the dense model) from the recorded runs."""
    from ipywidgets import Dropdown, SelectionSlider, interact

    methods = list(dict.fromkeys(r["method"] for r in main_runs(runs)))
    ratios = [0.0] + sorted({r["ratio"] for r in main_runs(runs)})

    def show(method, ratio):
        structured_figure(runs, dense, method, ratio)
        plt.show()

    return interact(show, method=Dropdown(options=methods, value="flap" if "flap" in methods else methods[0]),
                    ratio=SelectionSlider(options=ratios, value=ratios[-1], description="removed"))
