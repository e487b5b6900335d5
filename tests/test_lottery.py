"""Lottery tickets: IMP levels, reset/rewind, baselines, instability, resumable runs (tiny, CPU)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pruning_lab import lottery
from pruning_lab.data import load_image_data
from pruning_lab.lottery import (DataHparams, LotteryHparams, LotteryRun, ModelHparams, PruningHparams,
                                 TrainHparams, chord_barrier, error_barrier, imp_step, interpolate, one_shot_masks, reset_to,
                                 summarize)
from pruning_lab.magnitude import prunable_parameters, prune_remaining
from pruning_lab.models import make_model
from pruning_lab.train import TrainConfig, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets train faster on one thread, and a shared 2-core machine does not slow them 5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    d = load_image_data("fashion-mnist", val_size=1000, seed=0)
    return replace(d, x_test=d.x_test[:2000], y_test=d.y_test[:2000])


def tiny_hp(**changes) -> LotteryHparams:
    hp = LotteryHparams(data=DataHparams(val_size=1000, train_size=3000),
                        train=TrainHparams(iterations=40, eval_every=10),
                        pruning=PruningHparams(rate=0.5, output_rate=0.25))
    return hp.with_(**changes)


def run(tmp_path, data, hp=None, name="run", **kwargs):
    return LotteryRun(hp or tiny_hp(), run_dir=tmp_path / name, data=data, progress=False, **kwargs)


def strip_times(obj):
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if "wall_time" not in k}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- hand-computed


def test_prune_remaining_hand_computed():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.5, 0.3, 0.0], [2.0, -0.05, 0.7, 0.2]]))
    masks = {"weight": torch.tensor([[True, True, True, False], [True, False, True, True]])}
    # survivors 0.1 0.5 0.3 2.0 0.7 0.2: half of them (3) go: 0.1, 0.2, 0.3; pruned ones stay pruned
    want = torch.tensor([[False, True, False, False], [True, False, True, False]])
    assert torch.equal(prune_remaining(lin, masks, 0.5)["weight"], want)
    assert torch.equal(prune_remaining(lin, masks, 0.5, scope="global")["weight"], want)
    # the already-pruned -0.05 and 0.0 never compete: pruning 1 of 6 removes 0.1
    one = prune_remaining(lin, masks, 1 / 6)["weight"]
    assert int(one.sum()) == 5 and not one[0, 0] and not one[0, 3] and not one[1, 1]


def test_error_barrier_and_interpolation_endpoints():
    assert error_barrier([0.1, 0.3, 0.2]) == pytest.approx(0.3 - 0.15)
    assert chord_barrier([0.1, 0.3, 0.2]) == pytest.approx(0.3 - 0.15)
    # a monotone path: the paper's definition reports the endpoint gap, the chord version 0
    assert error_barrier([0.2, 0.15, 0.1]) == pytest.approx(0.05)
    assert chord_barrier([0.2, 0.15, 0.1]) == 0.0
    assert chord_barrier([0.2, 0.2, 0.1]) == pytest.approx(0.05)
    a, b = make_model("lenet", 0).state_dict(), make_model("lenet", 1).state_dict()
    for n, t in interpolate(a, b, 0.0).items():
        assert torch.equal(t, a[n])
    for n, t in interpolate(a, b, 1.0).items():
        assert torch.equal(t, b[n])
    mid = interpolate(a, b, 0.5)
    assert torch.allclose(mid["fc1.weight"], (a["fc1.weight"] + b["fc1.weight"]) / 2)


# --------------------------------------------------------------------------- IMP mechanics


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_pruning_rate_per_level_gives_expected_fraction(scope):
    model = make_model("lenet", 0)
    pr = PruningHparams(rate=0.2, output_rate=0.1, scope=scope)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    hidden = ["fc1.weight", "fc2.weight"]
    kept = {n: masks[n].numel() for n in masks}
    for level in range(1, 6):
        masks = imp_step(model, masks, pr)
        # exact counts: each level removes round(rate * remaining) of every layer (or of the hidden group)
        if scope == "layerwise":
            for n in hidden:
                kept[n] -= round(0.2 * kept[n])
                assert int(masks[n].sum()) == kept[n]
                assert kept[n] / masks[n].numel() == pytest.approx(0.8 ** level, abs=level / masks[n].numel())
        else:
            total = sum(masks[n].numel() for n in hidden)
            assert sum(int(masks[n].sum()) for n in hidden) / total == pytest.approx(0.8 ** level, abs=level / total)
        kept["fc3.weight"] -= round(0.1 * kept["fc3.weight"])
        assert int(masks["fc3.weight"].sum()) == kept["fc3.weight"]
        # with the same weights, IMP's survivors are nested in the previous level's survivors
        with torch.no_grad():
            for n, p in prunable_parameters(model).items():
                p.mul_(masks[n]).add_(torch.randn_like(p) * masks[n] * 1e-3)


def test_one_shot_masks_match_per_layer_counts():
    model = make_model("lenet", 0)
    pr = PruningHparams(rate=0.2, output_rate=0.1)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    for _ in range(3):
        masks = imp_step(model, masks, pr)
    other = make_model("lenet", 5)
    for scope in ("layerwise", "global"):
        one = one_shot_masks(other, masks, PruningHparams(rate=0.2, output_rate=0.1, scope=scope))
        if scope == "layerwise":
            assert {n: int(m.sum()) for n, m in one.items()} == {n: int(m.sum()) for n, m in masks.items()}
        else:
            assert sum(int(one[n].sum()) for n in ("fc1.weight", "fc2.weight")) == \
                sum(int(masks[n].sum()) for n in ("fc1.weight", "fc2.weight"))
            assert int(one["fc3.weight"].sum()) == int(masks["fc3.weight"].sum())


def test_reset_restores_theta_k_on_survivors_and_zero_on_pruned(tmp_path, data):
    hp = tiny_hp(**{"pruning.rewind_iteration": 7})
    r = run(tmp_path, data, hp)
    r.run(1, baselines=())
    theta_k = r.rewind_state()
    # θ_k really is the dense net after k iterations of the same data order
    ref = make_model("lenet", hp.seed)
    train(ref, r.data, TrainConfig(iterations=7, eval_every=0, seed=hp.seed), progress=False)
    for n, t in ref.state_dict().items():
        assert torch.equal(t, theta_k[n]), n
    # reset: survivors take θ_k exactly, pruned weights are exactly zero, biases are θ_k
    masks = r.masks(1)
    model = make_model("lenet", 123)
    reset_to(model, theta_k, masks)
    state = model.state_dict()
    for n, m in masks.items():
        assert torch.equal(state[n][m], theta_k[n][m])
        assert torch.count_nonzero(state[n][~m]) == 0
        assert 0 < int(m.sum()) < m.numel()
    assert torch.equal(state["fc1.bias"], theta_k["fc1.bias"])
    # and the level's trained weights kept the pruned ones at zero through Adam
    final = r.final_state(1)
    for n, m in masks.items():
        assert torch.count_nonzero(final[n][~m]) == 0


def test_early_stop_accuracy_is_that_of_the_early_stop_weights(tmp_path, data):
    hp = tiny_hp(**{"train.iterations": 60})
    r = run(tmp_path, data, hp)
    dense = r.run(1, baselines=())[0]["ticket"]
    stop = dense["early_stop_iteration"]
    seen = []
    ref = make_model("lenet", hp.seed)
    res = train(ref, r.data, TrainConfig(iterations=stop, eval_every=10, seed=hp.seed), progress=False,
                on_eval=lambda it, m, entry: seen.append((it, entry["val_loss"])))
    assert res.test_accuracy == dense["early_stop_test_accuracy"]
    assert [it for it, _ in seen] == [h["iteration"] for h in res.history] == list(range(10, stop + 1, 10))
    assert dense["history"][: len(seen)] == res.history  # same weights at every shared evaluation


def test_baselines_keep_per_layer_sparsity(tmp_path, data):
    r = run(tmp_path, data)
    rows = r.run(2)
    for row in rows[1:]:
        for b in ("random_reinit", "random_mask", "one_shot"):
            assert row[b]["layer_remaining"] == row["layer_remaining"], b
            assert 0.0 <= row[b]["test_accuracy"] <= 1.0
    # rate 0.5 on hidden layers: 0.5^level of each hidden layer is left
    assert rows[2]["layer_remaining"]["fc1.weight"] == pytest.approx(0.25)
    assert rows[2]["layer_remaining"]["fc3.weight"] == pytest.approx(0.5625, abs=1e-3)
    s = summarize([r])
    assert s["dense_accuracy"] == rows[0]["ticket"]["early_stop_test_accuracy"]
    assert s["dense_final_accuracy"] == rows[0]["ticket"]["test_accuracy"]
    assert [lv["weights_remaining"] for lv in s["levels"]] == [row["weights_remaining"] for row in rows]
    for lv, row in zip(s["levels"], rows):  # one seed: every mean is that seed's value, a missing net is None
        assert lv["ticket_accuracy"] == row["ticket"]["early_stop_test_accuracy"]
        assert lv["random_mask_final_accuracy"] == (row["random_mask"]["test_accuracy"] if "random_mask" in row else None)
        assert lv["one_shot_early_stop_iteration"] == (row["one_shot"]["early_stop_iteration"] if "one_shot" in row
                                                       else None)
    assert "random_mask" not in rows[0] and "random_mask" in rows[1]


def test_conv_net_runs_with_the_output_rate_on_its_last_layer(tmp_path, data):
    hp = tiny_hp(model=ModelHparams(name="conv2", width=0.125), **{"train.iterations": 20})
    rows = run(tmp_path, data, hp).run(1)
    layers = rows[1]["layer_remaining"]
    assert set(layers) == {"features.0.weight", "features.2.weight", "fc1.weight", "fc2.weight", "fc3.weight"}
    assert layers["features.0.weight"] == pytest.approx(0.5, abs=0.01)  # 72 weights: round(0.5 * 72)
    assert layers["fc3.weight"] == pytest.approx(0.75, abs=0.01)
    for b in ("random_reinit", "random_mask", "one_shot"):
        assert rows[1][b]["layer_remaining"] == layers


# --------------------------------------------------------------------------- resumable runs


class Interrupt(Exception):
    pass


def test_kill_and_resume_is_bit_identical(tmp_path, data):
    straight = run(tmp_path, data, name="straight")
    ref = straight.run(3)

    def kill_after_level_1(level, row):
        if level == 1:
            raise Interrupt

    resumed = run(tmp_path, data, name="resumed")
    with pytest.raises(Interrupt):
        resumed.run(3, after_level=kill_after_level_1)
    # a second kill inside level 2: its tensors are on disk but metrics.json (written last) is not
    part = run(tmp_path, data, name="resumed")
    part.run(2)
    (part.level_dir(2) / "metrics.json").unlink()
    level0 = (part.level_dir(0) / "final.safetensors").stat().st_mtime_ns
    again = run(tmp_path, data, name="resumed").run(3)
    assert (part.level_dir(0) / "final.safetensors").stat().st_mtime_ns == level0  # not recomputed
    assert strip_times(again) == strip_times(ref)
    for level in range(4):
        for name in ("masks", "final"):
            a = load_file(str(straight.level_dir(level) / f"{name}.safetensors"))
            b = load_file(str(part.level_dir(level) / f"{name}.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (level, name)
    # continuing to more levels reuses the finished ones
    t0 = (straight.level_dir(3) / "metrics.json").stat().st_mtime_ns
    more = run(tmp_path, data, name="straight").run(4, baselines=())
    assert (straight.level_dir(3) / "metrics.json").stat().st_mtime_ns == t0
    assert strip_times(more[3]["ticket"]) == strip_times(ref[3]["ticket"])


def test_seeds_trained_in_worker_processes_give_the_numbers_of_one_after_another(tmp_path):
    hp = tiny_hp()
    one = lottery.run_seeds(hp, [0, 1], 1, baselines=("random_reinit",), root=tmp_path / "a", progress=False)
    two = lottery.run_seeds(hp, [0, 1], 1, baselines=("random_reinit",), root=tmp_path / "b", workers=2,
                            progress=False)
    levels = lambda runs: [{k: strip_times(v) for k, v in r.levels.items()} for r in runs]  # noqa: E731
    assert levels(two) == levels(one)
    assert one[0].levels[1]["ticket"] != one[1].levels[1]["ticket"]  # two seeds, two different runs
    with pytest.raises(ValueError, match="workers=0"):
        lottery.run_seeds(hp, [0], 1, root=tmp_path / "c", workers=0)


def test_corrupt_level_is_reported_and_only_it_recomputed(tmp_path, data):
    r = run(tmp_path, data)
    ref = r.run(2, baselines=())
    (r.level_dir(1) / "final.safetensors").write_bytes(b"garbage")
    stamp0 = (r.level_dir(0) / "metrics.json").stat().st_mtime_ns
    stamp2 = (r.level_dir(2) / "metrics.json").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="Level 1 .* corrupt.*recomputing level 1 only"):
        again = run(tmp_path, data).run(2, baselines=())
    assert (r.level_dir(0) / "metrics.json").stat().st_mtime_ns == stamp0
    assert (r.level_dir(2) / "metrics.json").stat().st_mtime_ns == stamp2
    assert strip_times(again) == strip_times(ref)
    # a metrics.json that is not JSON is also a corrupt level
    (r.level_dir(2) / "metrics.json").write_text("{not json")
    with pytest.warns(UserWarning, match="Level 2"):
        assert strip_times(run(tmp_path, data).run(2, baselines=())) == strip_times(ref)


def test_folder_from_other_hyperparameters_is_refused(tmp_path, data):
    run(tmp_path, data).run(1, baselines=())
    with pytest.raises(ValueError, match=r"train.iterations: folder has 40, you asked 50"):
        run(tmp_path, data, tiny_hp(**{"train.iterations": 50}))
    assert json.loads((tmp_path / "run" / "hparams.json").read_text())["train"]["iterations"] == 40
    # the default folder is named by the hash, so different hyperparameters never meet
    a = LotteryRun(tiny_hp(), root=tmp_path / "root", data=data, progress=False)
    b = LotteryRun(tiny_hp(seed=1), root=tmp_path / "root", data=data, progress=False)
    assert a.dir != b.dir and a.dir.parent == b.dir.parent


def test_bad_input_is_refused(tmp_path, data):
    r = run(tmp_path, data)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="levels"):
            r.run(bad)
    for rate in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            PruningHparams(rate=rate)
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            PruningHparams(output_rate=rate)
    with pytest.raises(ValueError, match="beyond the training length"):
        tiny_hp(**{"pruning.rewind_iteration": 41})
    with pytest.raises(ValueError, match="baselines"):
        r.run(1, baselines=("lucky",))
    with pytest.raises(ValueError, match="has not been run"):
        r.instability(1)
    with pytest.raises(ValueError, match="validation split"):
        run(tmp_path, replace(data, x_val=None, y_val=None), name="noval")
    with pytest.raises(ValueError, match="hp.data.name"):
        run(tmp_path, replace(data, name="digits"), name="otherdata")
    assert not (r.dir / "level_0").exists()  # nothing was trained by the refused calls


def test_a_data_fallback_is_refused_not_mixed_into_the_run(tmp_path, data, monkeypatch):
    import pruning_lab.lottery as lottery

    monkeypatch.setattr(lottery, "load_image_data", lambda *a, **k: replace(data, name="digits"))
    r = LotteryRun(tiny_hp(), run_dir=tmp_path / "fb", progress=False)
    with pytest.raises(ValueError, match="fell back to 'digits'"):
        r.run(1)
    assert not (r.dir / "level_0").exists()


# --------------------------------------------------------------------------- stability


def test_instability_endpoints_and_cache(tmp_path, data):
    r = run(tmp_path, data)
    r.run(1, baselines=())
    out = r.instability(1, alphas=3)
    assert out["alpha"] == [0.0, 0.5, 1.0]
    # Independently: train the two copies of m ⊙ θ_k on the documented data orders, average them by hand,
    # and evaluate the three points of the path ourselves.
    masks, ends = r.masks(1), []
    for s in (10_007 + 2 * r.hp.seed, 10_008 + 2 * r.hp.seed):
        model = r.new_model(r.hp.seed)
        reset_to(model, r.rewind_state(), masks)
        r._train(model, masks, s, "test")
        ends.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert not all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])  # two data orders, two networks
    errors = []
    for state in (ends[0], {k: (ends[0][k] + ends[1][k]) / 2 for k in ends[0]}, ends[1]):
        model = r.new_model(r.hp.seed)
        model.load_state_dict(state)
        with torch.no_grad():
            errors.append(float((model(data.x_test).argmax(1) != data.y_test).float().mean()))
    assert out["test_error"] == pytest.approx(errors, abs=1e-3)  # 2 of 2,000 images may flip on rounding
    assert out["barrier"] == pytest.approx(max(errors) - (errors[0] + errors[2]) / 2, abs=1e-3)
    assert r.instability(1, alphas=3) == out  # cached
    (r.dir / "instability_level_1.json").write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        assert r.instability(1, alphas=3)["test_error"] == out["test_error"]  # recomputed, same numbers


# --------------------------------------------------------------------------- the notebook


def test_notebook_smoke_run(smoke_runs):
    results, nb_path = smoke_runs("02_lottery_tickets")
    assert results["seeds"] == [0]
    levels = results["levels"]
    assert len(levels) == 3  # dense + 2 IMP levels
    assert results["dense_accuracy"] == levels[0]["ticket_accuracy"]
    # rate 0.36 per level on hidden layers (0.64^n left), 0.19 on the output layer
    for n, lv in enumerate(levels):
        assert lv["layer_remaining"]["fc1.weight"] == pytest.approx(0.64 ** n, abs=1e-4)
        assert lv["layer_remaining"]["fc3.weight"] == pytest.approx(0.81 ** n, abs=2e-3)
    for lv in levels[1:]:
        for key in ("ticket_accuracy", "random_reinit_accuracy", "random_mask_accuracy", "one_shot_accuracy"):
            # far above chance (0.1): LeNet on Fashion-MNIST at these smoke settings reaches 0.76-0.81
            assert 0.6 < lv[key] <= 1.0, key
            assert lv[f"{key}_per_seed"] == [lv[key]]
        for key in ("ticket_early_stop_iteration", "random_reinit_early_stop_iteration"):
            assert 25 <= lv[key] <= 100 and lv[key] % 25 == 0
        assert lv["ticket_wall_time_s"] > 0 and lv["baselines_wall_time_s"] > 0
    assert [p["rewind_iteration"] for p in results["rewind"]["points"]] == [0, 10]
    assert results["rewind"]["points"][0]["ticket_accuracy"] == levels[1]["ticket_accuracy"]  # k=0 is the main run
    for name in ("dense", "ticket"):
        inst = results["instability"][name]
        assert len(inst["test_error"]) == 3 and inst["alpha"] == [0.0, 0.5, 1.0]
        assert inst["barrier"] == pytest.approx(error_barrier(inst["test_error"]))
    assert results["instability"]["ticket"]["weights_remaining"] == pytest.approx(levels[1]["weights_remaining"])
    assert (nb_path.parent / "results" / "figures" / "02_lottery_tickets" / "lth_accuracy_and_early_stop.png").is_file()


def test_notebook_draws_its_figure_from_a_sweep_summary(smoke_runs, tmp_path):
    """sweep_summary: the figure and the paired comparisons come from a finished sweep's runs (here three
    copies of the smoke run's levels under seeds 0, 1, 2, shifted by 0, +1 and +2 points)."""
    from pruning_lab.workbook import run_notebook

    results, _ = smoke_runs("02_lottery_tickets")
    rows = []
    for seed in (0, 1, 2):
        levels = json.loads(json.dumps(results["levels"]))
        for lv in levels:
            for k in list(lv):
                if k.endswith("accuracy_per_seed") and lv[k] and lv[k][0] is not None:
                    lv[k] = [v + 0.01 * seed * (k.startswith("ticket") and lv["level"] > 0) for v in lv[k]]
        rows.append({"id": f"seeds=[{seed}]", "params": {"seeds": [seed]},
                     "results": {"seeds": [seed], "levels": levels, "dense_accuracy": levels[0]["ticket_accuracy"]}})
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "summary.json").write_text(json.dumps({"rows": rows, "aggregate": []}))
    run_notebook("02_lottery_tickets", "smoke", {"sweep_summary": str(tmp_path / "sweep")}, out_dir=tmp_path / "out")
    r = json.loads((tmp_path / "out" / "results" / "02_lottery_tickets.json").read_text())
    assert r["seeds"] == [0, 1, 2] and r["sweep_summary"] == str(tmp_path / "sweep")
    lv = r["levels"][1]
    assert lv["ticket_accuracy_per_seed"] == pytest.approx([results["levels"][1]["ticket_accuracy"] + d
                                                            for d in (0, 0.01, 0.02)])
    (vs_dense,) = [c for c in r["paired"]["ticket − dense"] if c["level"] == 1]
    assert vs_dense["n"] == 3
    assert vs_dense["mean_difference"] == pytest.approx(results["levels"][1]["ticket_accuracy"]
                                                        - results["dense_accuracy"] + 0.01)


def test_committed_run_matches_its_rendered_conclusion():
    """The conclusion of notebooks/02 is rendered from the run; this checks the committed run has >= 3 seeds,
    that its recorded paired comparisons are those of its per-seed numbers, and that the committed
    notebook's rendered conclusion says what they say."""
    from pruning_lab.lottery import paired_by_level

    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "02_lottery_tickets.json").read_text())
    assert r["params"]["seeds"] == r["seeds"] and len(r["seeds"]) >= 3 and len(r["rewind"]["seeds"]) >= 3
    summary = {"levels": r["levels"]}
    for name, (a, b, col) in {"ticket − dense": ("ticket", "dense", "accuracy"),
                              "ticket − re-init": ("ticket", "random_reinit", "accuracy"),
                              "early stop: ticket − dense (iterations)": ("ticket", "dense", "early_stop_iteration")}.items():
        recomputed = paired_by_level(summary, a, b, col)
        assert [c["verdict"] for c in r["paired"][name]] == [c["verdict"] for c in recomputed]
        assert [c["mean_difference"] for c in r["paired"][name]] == pytest.approx([c["mean_difference"] for c in recomputed])
    nb = json.loads((root / "notebooks" / "02_lottery_tickets.ipynb").read_text())
    rendered = [o["data"]["text/markdown"] for c in nb["cells"] if c["cell_type"] == "code"
                for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    text = "".join(next("".join(t) for t in rendered if "Ticket vs dense net" in "".join(t)))
    assert f"({len(r['seeds'])} seeds," in text
    better = [f"{100 * c['weights_remaining']:.1f}%" for c in r["paired"]["ticket − dense"] if c["verdict"] == "A better"]
    line = next(x for x in text.splitlines() if "Ticket vs dense net" in x)
    assert line.split("higher at the 5% level at ")[1].split(";")[0] == (", ".join(better) or "no level")
    assert all(c["test"] == "paired Student t, two-sided" for rows in r["paired"].values() for c in rows)
    assert {p["rewind_iteration"] for p in r["rewind"]["points"]} == set(r["params"]["rewind_iterations"])
    assert all(w["ticket_s"] > 0 for w in r["wall_time_s"]["per_level_mean_over_seeds"])


def _one_seed_summary(seed, accs, left=(1.0, 0.5)):
    levels = []
    for level, (acc, w) in enumerate(zip(accs, left)):
        row = {"level": level, "weights_remaining": w, "layer_remaining": {"fc.weight": w}}
        for name, v in (("ticket_accuracy", acc), ("ticket_final_accuracy", acc - 0.01),
                        ("random_reinit_accuracy", None if level == 0 else acc - 0.1)):
            row[name], row[f"{name}_std"], row[f"{name}_per_seed"] = v, 0.0, [v]
        levels.append(row)
    return {"seeds": [seed], "dense_accuracy": accs[0], "dense_accuracy_per_seed": [accs[0]],
            "dense_final_accuracy": accs[0] - 0.01, "levels": levels}


def test_merge_summaries_by_hand_and_from_a_sweep(tmp_path):
    from pruning_lab.lottery import merge_summaries, summary_from_sweep

    m = merge_summaries([_one_seed_summary(0, [0.8, 0.9]), _one_seed_summary(1, [0.6, 0.7])])
    assert m["seeds"] == [0, 1] and m["dense_accuracy_per_seed"] == [0.8, 0.6]
    assert m["dense_accuracy"] == pytest.approx(0.7) and m["levels"][0]["ticket_accuracy_std"] == pytest.approx(0.1414213, abs=1e-6)
    lv = m["levels"][1]
    assert lv["ticket_accuracy"] == pytest.approx(0.8) and lv["ticket_accuracy_std"] == pytest.approx(0.1414213, abs=1e-6)
    assert lv["random_reinit_accuracy_per_seed"] == pytest.approx([0.8, 0.6])
    assert m["levels"][0]["random_reinit_accuracy"] is None
    with pytest.raises(ValueError, match="differ by seed"):
        merge_summaries([_one_seed_summary(0, [0.8, 0.9]), _one_seed_summary(1, [0.6, 0.7], left=(1.0, 0.4))])
    # a sweep's summary.json: one row per run, its results holding that run's seeds and levels
    rows = [{"id": f"seeds=[{s}]", "params": {"seeds": [s]}, "results": _one_seed_summary(s, a)}
            for s, a in ((0, [0.8, 0.9]), (1, [0.6, 0.7]))]
    (tmp_path / "summary.json").write_text(json.dumps({"rows": rows, "aggregate": []}))
    assert summary_from_sweep(tmp_path) == m
    for r in rows:
        del r["results"]["levels"]
    (tmp_path / "summary.json").write_text(json.dumps({"rows": rows, "aggregate": []}))
    with pytest.raises(ValueError, match="keys"):
        summary_from_sweep(tmp_path)


def test_paired_by_level_compares_seed_by_seed():
    from pruning_lab.lottery import merge_summaries, paired_by_level

    m = merge_summaries([_one_seed_summary(s, [0.80 + d, 0.82 + d + e]) for s, (d, e) in
                         enumerate([(0.0, 0.01), (0.05, 0.02), (-0.04, 0.015)])])
    (row,) = paired_by_level(m, "ticket", "dense")
    assert row["n"] == 3 and row["mean_difference"] == pytest.approx(0.035)  # 0.02 + mean(0.01, 0.02, 0.015)
    assert row["verdict"] == "A better"  # the seeds' own offsets cancel in the pairs (unpaired: within noise)
    (row,) = paired_by_level(m, "ticket", "random_reinit")
    assert row["mean_difference"] == pytest.approx(0.1) and row["verdict"] == "A better"
    assert paired_by_level(m, "one_shot", "dense") == []  # not measured: left out


def test_levels_with_and_difference_range_by_hand():
    from pruning_lab.lottery import difference_range, levels_with

    rows = [{"weights_remaining": 0.641, "mean_difference": -0.0005, "verdict": "within noise"},
            {"weights_remaining": 0.411, "mean_difference": 0.0065, "verdict": "A better"},
            {"weights_remaining": 0.108, "mean_difference": 0.0079, "verdict": "A better"}]
    assert levels_with(rows, "A better") == "41.1%, 10.8%" and levels_with(rows, "B better") == "no level"
    assert difference_range(rows) == "-0.05 to +0.79" and difference_range([]) == "–"


def test_readme_quotes_the_committed_chapter_2_run():
    """The README's chapter-2 paragraph names exactly the verdicts with p < 0.01 of results/02_lottery_tickets.json
    (those a rerun on another machine should keep) and calls the ones with 0.01 <= p < 0.05 fragile."""
    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "02_lottery_tickets.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    assert f"committed run ({len(r['seeds'])} seeds)" in readme and len(r["seeds"]) >= 8

    def firm(name, verdict):
        return [round(100 * c["weights_remaining"]) for c in r["paired"][name] if c["verdict"] == verdict and c["p_value"] < 0.01]

    def fragile(name, verdict):
        return [round(100 * c["weights_remaining"]) for c in r["paired"][name]
                if c["verdict"] == verdict and 0.01 <= c["p_value"] < 0.05]

    assert firm("ticket − dense", "A better") == [41, 26, 17, 11] and "above the dense net at 41%, 26%, 17% and 11%" in readme
    assert firm("ticket − re-init", "A better") == [17, 11] and "random re-initialisation at 17% and 11%" in readme
    assert firm("ticket − random mask", "A better") == [26, 17, 11] and "per-layer sizes from 26% down" in readme
    assert firm("early stop: ticket − dense (iterations)", "B better") == [26, 17] and "dense net at 26% and 17%" in readme
    rw = r["rewind"]["paired_vs_first_k"][0]
    assert rw["early_stop"]["verdict"] == "A better" and rw["early_stop"]["p_value"] < 0.01
    assert f"rewinding to k = {rw['k']} beats k = 0 at early stop" in readme
    assert fragile("ticket − dense", "A better") == [64] and fragile("ticket − re-init", "A better") == [26]
    assert fragile("ticket − one-shot", "B better") == [17] and "below one-shot pruning at 17%" in readme
    assert "those may turn on a rerun" in readme
