"""The result explorers draw exactly the recorded numbers (hand-made results), and refuse what was not recorded."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from pruning_lab import explore  # noqa: E402


def level(i, left, ticket, reinit=None):
    row = {"level": i, "weights_remaining": left, "ticket_accuracy": sum(ticket) / 2, "ticket_accuracy_per_seed": ticket,
           "ticket_final_accuracy": 0.5, "ticket_final_accuracy_per_seed": [0.4, 0.6]}
    if reinit:
        row |= {"random_reinit_accuracy": sum(reinit) / 2, "random_reinit_accuracy_per_seed": reinit}
    return row


SUMMARY = {"seeds": [3, 7], "levels": [level(0, 1.0, [0.9, 0.8]), level(1, 0.5, [0.7, 0.6], [0.5, 0.4])]}


def lines(fig):
    return {ln.get_label(): (list(ln.get_xdata()), [round(y, 6) for y in ln.get_ydata()])
            for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}


def test_lottery_figure_draws_the_chosen_seed_or_the_mean():
    got = lines(explore.lottery_figure(SUMMARY, seed=7, level=1))
    assert got["winning ticket"] == ([100.0, 50.0], [80.0, 60.0])  # seed 7 is the second per-seed value
    assert got["random re-init"] == ([50.0], [40.0])  # level 0 has no baselines
    assert "random mask" not in got
    mean = lines(explore.lottery_figure(SUMMARY, seed="mean", level=0))
    assert mean["winning ticket"] == ([100.0, 50.0], [85.0, 65.0])
    final = lines(explore.lottery_figure(SUMMARY, seed=3, level=0, final=True))
    assert final["winning ticket"] == ([100.0, 50.0], [40.0, 40.0])
    plt.close("all")


def test_lottery_figure_refuses_what_was_not_recorded():
    with pytest.raises(ValueError, match="seed=5"):
        explore.lottery_figure(SUMMARY, seed=5)
    with pytest.raises(ValueError, match="level=4"):
        explore.lottery_figure(SUMMARY, level=4)


RUNS = [dict(method="flap", allocation="uniform", ratio=0.2, structure="heads+mlp", lora=False, params=80, perplexity=30.0),
        dict(method="flap", allocation="adaptive", ratio=0.2, structure="heads+mlp", lora=False, params=81, perplexity=20.0),
        # later sections: bias off (same key: not the main sweep), LoRA, whole layers
        dict(method="flap", allocation="adaptive", ratio=0.2, structure="heads+mlp", lora=False, params=81, perplexity=99.0),
        dict(method="flap", allocation="uniform", ratio=0.2, structure="heads+mlp", lora=True, params=80, perplexity=9.0),
        dict(method="block-influence", allocation="global", ratio=0.2, structure="layers", lora=False, params=79,
             perplexity=50.0)]
DENSE = {"params": 100, "perplexity": 10.0}


def test_structured_figure_draws_the_main_sweep_rows():
    assert [r["perplexity"] for r in explore.main_runs(RUNS)] == [30.0, 20.0]
    fig = explore.structured_figure(RUNS, DENSE, "flap", 0.2)
    got = lines(fig)
    assert got["adaptive"] == ([0.0, 0.2], [10.0, 20.0]) and got["uniform"] == ([0.0, 0.2], [10.0, 30.0])
    bars = {t.get_text(): p.get_height() for t, p in zip(fig.axes[1].get_xticklabels(), fig.axes[1].patches)}
    assert bars == {"adaptive": pytest.approx(81.0), "uniform": pytest.approx(80.0)}
    dense = explore.structured_figure(RUNS, DENSE, "flap", 0.0)
    assert [p.get_height() for p in dense.axes[1].patches] == [100.0]
    with pytest.raises(ValueError, match="method='taylor'"):
        explore.structured_figure(RUNS, DENSE, "taylor", 0.2)
    plt.close("all")
