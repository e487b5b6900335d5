"""The Lottery Ticket Hypothesis: iterative magnitude pruning (IMP) with rewinding, its baselines,
instability analysis, and resumable runs.

Frankle & Carbin (2019): train a dense net from θ_0, prune p% of the remaining weights (20% of
each hidden layer, 10% of the output layer), reset the survivors to θ_0, repeat. The sparse
subnetwork m ⊙ θ_0 is a *winning ticket* if it trains to the dense accuracy at least as fast.
Frankle et al. (2019, 2020) reset to θ_k, the weights after k iterations ("rewinding"), and
link tickets to *stability*: two copies of θ_k trained on different data orders end in one
linearly connected basin (no error barrier on the straight line between them).

Baselines at every level, all trained exactly like the ticket:

- ``random_reinit``: the ticket's mask on a fresh random initialisation (LTH, Figure 4);
- ``random_mask``: a random mask with the ticket's per-layer counts on the ticket's θ_k;
- ``one_shot``: the trained dense net pruned once to the level's per-layer counts, reset to θ_k.

A run lives in a folder named by a hash of its hyperparameters (open_lth style)::

    <root>/<hash>/hparams.json
    <root>/<hash>/level_0/{rewind,final,masks}.safetensors, metrics.json
    <root>/<hash>/level_3/random_mask/{masks.safetensors, metrics.json}
    <root>/<hash>/instability_level_3.json

Every file is written atomically; ``metrics.json`` is written last and holds the SHA-256 of the
level's tensors, so a level is either complete and verified, or recomputed (a corrupt one is
reported). The number of levels is not a hyperparameter: running 3 levels and later 6 reuses
the first 3. Randomness per level comes from seeds derived from ``(seed, level)`` (recorded in
each level's ``metrics.json``), so a resumed run ends bit-for-bit like an uninterrupted one.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import default_device
from ._io import atomic_path, file_sha256, read_json, read_json_in, write_json
from .data import ImageData, cache_dir, load_image_data
from .eval import evaluate
from .magnitude import global_magnitude_masks, masks_from_densities, prune_remaining
from .masks import Masks, apply_masks, keep_masked, prunable_parameters, random_masks
from .models import make_model
from .runs import claim_folder, digest
from .stats import mean_std, paired
from .train import TrainConfig, train

BASELINES = ("random_reinit", "random_mask", "one_shot")


# --------------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class DataHparams:
    name: str = "fashion-mnist"  # "fashion-mnist", "mnist" (needs root) or "digits"
    val_size: int = 5000  # validation split carved from the training set (early stopping)
    train_size: int = 0  # use only the first n training examples (0: all)
    split_seed: int = 0

    def __post_init__(self):
        if self.val_size < 1 or self.train_size < 0:
            raise ValueError(f"val_size must be positive and train_size >= 0 (0 = all): {self}")


@dataclass(frozen=True)
class ModelHparams:
    name: str = "lenet"  # "lenet", "conv2", "conv4", "conv6"
    width: float = 1.0  # channel/hidden multiplier of the conv nets (ignored by LeNet)

    def __post_init__(self):
        if self.name not in ("lenet", "conv2", "conv4", "conv6"):
            raise ValueError(f"model {self.name!r}: use 'lenet', 'conv2', 'conv4' or 'conv6'.")
        if self.width <= 0:
            raise ValueError(f"width={self.width} must be positive.")


@dataclass(frozen=True)
class TrainHparams:
    iterations: int = 50_000
    batch_size: int = 60
    lr: float = 1.2e-3
    optimizer: str = "adam"
    eval_every: int = 100  # early-stop resolution

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(iterations=self.iterations, batch_size=self.batch_size, lr=self.lr,
                           optimizer=self.optimizer, eval_every=self.eval_every, seed=seed)

    def __post_init__(self):
        self.config(0)  # TrainConfig validates the values


@dataclass(frozen=True)
class PruningHparams:
    rate: float = 0.2  # fraction of the remaining weights pruned per level (hidden layers)
    output_rate: float = 0.1  # the same for the output layer
    scope: str = "layerwise"  # "layerwise" or "global" (hidden layers share one threshold)
    rewind_iteration: int = 0  # k: reset survivors to θ_k (0 = the original LTH)

    def __post_init__(self):
        for name in ("rate", "output_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ValueError(f"{name}={v!r} must be in (0, 1): 0.2 prunes 20% of the remaining weights per level.")
        if self.scope not in ("layerwise", "global"):
            raise ValueError(f"scope={self.scope!r}: use 'layerwise' or 'global'.")
        if not isinstance(self.rewind_iteration, int) or self.rewind_iteration < 0:
            raise ValueError(f"rewind_iteration={self.rewind_iteration!r} must be an integer >= 0.")


@dataclass(frozen=True)
class LotteryHparams:
    """Everything that determines a run's numbers. Its hash names the run folder."""

    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    train: TrainHparams = field(default_factory=TrainHparams)
    pruning: PruningHparams = field(default_factory=PruningHparams)
    seed: int = 0  # initialisation and data order

    def __post_init__(self):
        if self.pruning.rewind_iteration > self.train.iterations:
            raise ValueError(f"rewind_iteration={self.pruning.rewind_iteration} is beyond the training length "
                             f"({self.train.iterations} iterations): choose k <= iterations.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LotteryHparams":
        return cls(data=DataHparams(**d["data"]), model=ModelHparams(**d["model"]),
                   train=TrainHparams(**d["train"]), pruning=PruningHparams(**d["pruning"]), seed=d["seed"])

    @property
    def hash(self) -> str:
        return digest(self.to_dict())

    def with_(self, **changes) -> "LotteryHparams":
        """A copy with changed fields, by dotted name: ``hp.with_(**{"pruning.rewind_iteration": 100})``."""
        groups: dict[str, dict] = {}
        top = {}
        for key, value in changes.items():
            group, _, name = key.partition(".")
            if name:
                groups.setdefault(group, {})[name] = value
            else:
                top[group] = value
        for group, values in groups.items():
            top[group] = replace(getattr(self, group), **values)
        return replace(self, **top)


# --------------------------------------------------------------------------- small tools


def level_seeds(seed: int, level: int) -> dict[str, int]:
    """The seeds a level uses (recorded in its metrics.json). The ticket keeps the run's data order."""
    return {"init_seed": seed, "data_order_seed": seed,
            "reinit_seed": 1_000_003 * (seed + 1) + level, "random_mask_seed": 2_000_003 * (seed + 1) + level}


def prune_rates(model: nn.Module, pr: PruningHparams, masks: Masks) -> dict[str, float]:
    """The per-layer rate of one IMP level: ``rate`` for hidden layers, ``output_rate`` for the output."""
    out_name = f"{getattr(model, 'output_layer', '')}.weight"
    return {n: pr.output_rate if n == out_name else pr.rate for n in masks}


def imp_step(model: nn.Module, masks: Masks, pr: PruningHparams) -> Masks:
    """One IMP pruning step on trained weights: prune the rates of the *remaining* weights.

    ``scope="global"`` ranks all hidden layers together and the output layer on its own.
    """
    rates = prune_rates(model, pr, masks)
    if pr.scope == "layerwise":
        return prune_remaining(model, masks, rates)
    out = {}
    for rate in sorted(set(rates.values())):
        group = {n: m for n, m in masks.items() if rates[n] == rate}
        out.update(prune_remaining(model, group, rate, scope="global"))
    return {n: out[n] for n in masks}


def one_shot_masks(trained: nn.Module, like: Masks, pr: PruningHparams) -> Masks:
    """One-shot magnitude pruning of ``trained`` to the same per-layer counts as ``like``
    (layer-wise), or to the same counts per rate group with one global threshold (global)."""
    if pr.scope == "layerwise":
        return masks_from_densities(trained, {n: int(m.sum()) / m.numel() for n, m in like.items()})
    rates = prune_rates(trained, pr, like)
    out = {}
    for rate in sorted(set(rates.values())):
        names = [n for n in like if rates[n] == rate]
        total = sum(like[n].numel() for n in names)
        kept = sum(int(like[n].sum()) for n in names)
        out.update(global_magnitude_masks(trained, (total - kept) / total, include=names))
    return {n: out[n] for n in like}


@torch.no_grad()
def reset_to(model: nn.Module, state: dict[str, torch.Tensor], masks: Masks) -> nn.Module:
    """Load ``state`` (θ_k) into ``model`` and zero the pruned weights: m ⊙ θ_k."""
    model.load_state_dict(state)
    return apply_masks(model, masks)


def interpolate(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], alpha: float) -> dict:
    """(1 - α)·a + α·b for every tensor (exactly a at α=0 and exactly b at α=1)."""
    if state_a.keys() != state_b.keys():
        raise ValueError("The two states have different parameter names; interpolate models of one architecture.")
    return {n: torch.lerp(state_a[n].float(), state_b[n].float(), alpha).to(state_a[n].dtype) for n in state_a}


def error_barrier(errors: list[float]) -> float:
    """Frankle et al. (2020): max error on the path minus the mean of the two endpoints' errors.

    Positive whenever the endpoints differ, even on a path without any bump; see ``chord_barrier``."""
    return max(errors) - 0.5 * (errors[0] + errors[-1])


def chord_barrier(errors: list[float]) -> float:
    """Largest rise of the error above the straight chord between the endpoints' errors (points are
    equally spaced in α); 0 when the path never rises above the chord."""
    n = len(errors) - 1
    return max(max(e - ((n - i) * errors[0] + i * errors[-1]) / n for i, e in enumerate(errors)), 0.0)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in model.state_dict().items()}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    with atomic_path(path) as tmp:
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp))
    return file_sha256(path)


def _count_kept(masks: Masks) -> dict:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {"weights_remaining": kept / total,
            "layer_remaining": {n: int(m.sum()) / m.numel() for n, m in masks.items()}}


class CorruptCheckpoint(Exception):
    pass


# --------------------------------------------------------------------------- one run


class LotteryRun:
    """IMP with rewinding and baselines for one ``LotteryHparams`` (one seed), resumable.

    ``run(levels)`` trains level 0 (dense) then IMP levels 1..levels; finished levels found in the
    folder are verified and skipped. ``data`` may be any ``ImageData`` (e.g. your CIFAR-10);
    by default it is loaded from ``hp.data``.
    """

    def __init__(self, hp: LotteryHparams, root: str | Path | None = None, *, run_dir: str | Path | None = None,
                 data: ImageData | None = None, device: str | torch.device | None = None, progress: bool = True,
                 data_root: str | Path | None = None):
        self.hp = hp
        self.dir = Path(run_dir) if run_dir is not None else Path(root or cache_dir("lottery")) / hp.hash
        self.progress = progress
        self.device = torch.device(device) if device else default_device()
        if data is not None and getattr(data, "x_val", None) is None:
            raise ValueError("data has no validation split (x_val): the early-stop iteration needs one. Load it with "
                             "load_image_data(..., val_size=5000) or set x_val/y_val carved from the training set.")
        if data is not None and data.name != hp.data.name:
            raise ValueError(f"data is {data.name!r} but hp.data.name is {hp.data.name!r}: set "
                             f"DataHparams(name={data.name!r}) so the run folder's hash tells the data sets apart.")
        self._check_folder()
        self._data, self._data_ready = data, False
        self._data_root = data_root
        self.levels: dict[int, dict] = {}

    # ----------------------------------------------------------------- folder
    def _check_folder(self) -> None:
        claim_folder(self.dir, self.hp.to_dict())

    @property
    def data(self) -> ImageData:
        if not self._data_ready:
            d = self.hp.data
            data = self._data or load_image_data(d.name, val_size=d.val_size, seed=d.split_seed, root=self._data_root)
            if data.name != d.name:  # load_image_data fell back to another data set
                raise ValueError(f"{d.name} is not available here (the loader fell back to {data.name!r}). Install it, "
                                 f"or run on {data.name!r} explicitly (DataHparams(name={data.name!r}), the notebook's "
                                 "dataset parameter) so those runs get their own folders.")
            if d.train_size and len(data.x_train) > d.train_size:
                data = replace(data, x_train=data.x_train[:d.train_size], y_train=data.y_train[:d.train_size])
            self._data, self._data_ready = data.to(self.device), True
        return self._data

    def new_model(self, seed: int) -> nn.Module:
        m = self.hp.model
        shape = tuple(self.data.x_train.shape[1:])
        if m.name == "lenet":
            kwargs = {"in_features": math.prod(shape), "num_classes": len(self.data.classes)}
        else:
            kwargs = {"width": m.width, "in_shape": shape, "num_classes": len(self.data.classes)}
        return make_model(m.name, seed, **kwargs).to(self.device)

    def level_dir(self, level: int) -> Path:
        return self.dir / f"level_{level}"

    # ----------------------------------------------------------------- checkpoints
    def _load_level(self, level: int) -> dict | None:
        """The verified metrics of a finished level, None if absent; raises CorruptCheckpoint."""
        path = self.level_dir(level) / "metrics.json"
        if not path.is_file():
            return None
        try:
            metrics = read_json(path)
            for name, expected in metrics["files"].items():
                f = self.level_dir(level) / name
                if not f.is_file() or file_sha256(f) != expected:
                    raise CorruptCheckpoint(f"{f} is missing or does not match its checksum")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpoint(f"{path} is unreadable ({e})") from e
        return metrics

    def _tensors(self, level: int, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.level_dir(level) / f"{name}.safetensors"), device=str(self.device))
        except (OSError, SafetensorError) as e:
            raise CorruptCheckpoint(f"{self.level_dir(level) / name}.safetensors: {e}") from e

    def masks(self, level: int) -> Masks:
        return self._tensors(level, "masks")

    def final_state(self, level: int) -> dict[str, torch.Tensor]:
        return self._tensors(level, "final")

    def rewind_state(self) -> dict[str, torch.Tensor]:
        return self._tensors(0, "rewind")

    # ----------------------------------------------------------------- training
    def _train(self, model: nn.Module, masks: Masks | None, seed: int, desc: str,
               on_step: Callable[[int, nn.Module], None] | None = None) -> dict:
        """``pruning_lab.train.train`` with the mask kept, plus the LTH's measures: the early-stop
        iteration (minimum validation loss) and the *test* accuracy of the weights at that iteration
        (a copy is kept whenever the validation loss improves; the test set is used once)."""
        keep = keep_masked(model, masks) if masks is not None else None
        if on_step is None:
            hook = keep
        else:
            counter = [0]

            def hook(m: nn.Module) -> None:
                if keep is not None:
                    keep(m)
                counter[0] += 1
                on_step(counter[0], m)

        params = list(model.parameters())
        best = {"loss": math.inf, "weights": [p.detach().clone() for p in params]}

        @torch.no_grad()
        def on_eval(it: int, m: nn.Module, entry: dict) -> None:
            if entry["val_loss"] < best["loss"]:  # first minimum wins, like TrainResult.early_stop_iteration
                best["loss"] = entry["val_loss"]
                torch._foreach_copy_(best["weights"], [p.detach() for p in params])

        t0 = time.perf_counter()
        res = train(model, self.data, self.hp.train.config(seed), after_step=hook, on_eval=on_eval,
                    progress=self.progress, desc=desc)
        stop = min(res.history, key=lambda h: h["val_loss"])
        final = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, best["weights"])
            early_test = evaluate(model, self.data.x_test, self.data.y_test)[1]
            torch._foreach_copy_(params, final)
        return {"test_accuracy": res.test_accuracy, "early_stop_test_accuracy": early_test,
                "best_val_accuracy": res.best_val_accuracy, "early_stop_iteration": res.early_stop_iteration,
                "early_stop_val_accuracy": stop["val_accuracy"], "history": res.history,
                "wall_time_s": time.perf_counter() - t0}

    def _dense_level(self) -> dict:
        hp, k = self.hp, self.hp.pruning.rewind_iteration
        seeds = level_seeds(hp.seed, 0)
        model = self.new_model(seeds["init_seed"])
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
        captured = {0: _state(model)} if k == 0 else {}

        def capture(it: int, m: nn.Module) -> None:
            if it == k:
                captured[k] = _state(m)

        metrics = self._train(model, None, seeds["data_order_seed"], "level 0 (dense)",
                              on_step=capture if k > 0 else None)
        d = self.level_dir(0)
        files = {"rewind.safetensors": _save_tensors(d / "rewind.safetensors", captured[k]),
                 "final.safetensors": _save_tensors(d / "final.safetensors", _state(model)),
                 "masks.safetensors": _save_tensors(d / "masks.safetensors", masks)}
        return {"level": 0, **_count_kept(masks), "seeds": seeds, "rewind_iteration": k,
                "ticket": metrics, "files": files}

    def _imp_level(self, level: int) -> dict:
        hp = self.hp
        seeds = level_seeds(hp.seed, level)
        model = self.new_model(seeds["init_seed"])
        model.load_state_dict(self.final_state(level - 1))
        masks = imp_step(model, self.masks(level - 1), hp.pruning)
        reset_to(model, self.rewind_state(), masks)
        metrics = self._train(model, masks, seeds["data_order_seed"], f"level {level} ticket")
        d = self.level_dir(level)
        files = {"final.safetensors": _save_tensors(d / "final.safetensors", _state(model)),
                 "masks.safetensors": _save_tensors(d / "masks.safetensors", masks)}
        return {"level": level, **_count_kept(masks), "seeds": seeds, "rewind_iteration": hp.pruning.rewind_iteration,
                "ticket": metrics, "files": files}

    def _baseline(self, level: int, name: str) -> dict:
        """Train one baseline at ``level`` (cached in level_<n>/<name>/metrics.json)."""
        path = self.level_dir(level) / name / "metrics.json"
        if path.is_file():
            try:
                return read_json(path)
            except (OSError, ValueError) as e:
                warnings.warn(f"{path} is corrupt ({e}); recomputing this baseline.", stacklevel=3)
        seeds = level_seeds(self.hp.seed, level)
        masks = self.masks(level)
        if name == "random_reinit":
            model = self.new_model(seeds["reinit_seed"])
            apply_masks(model, masks)
        elif name == "random_mask":
            masks = random_masks({n: m.cpu() for n, m in masks.items()}, seeds["random_mask_seed"])
            masks = {n: m.to(self.device) for n, m in masks.items()}
            model = self.new_model(seeds["init_seed"])
            reset_to(model, self.rewind_state(), masks)
        elif name == "one_shot":
            model = self.new_model(seeds["init_seed"])
            model.load_state_dict(self.final_state(0))
            masks = one_shot_masks(model, masks, self.hp.pruning)
            reset_to(model, self.rewind_state(), masks)
        else:
            raise ValueError(f"Unknown baseline {name!r}: choose from {BASELINES}.")
        metrics = self._train(model, masks, seeds["data_order_seed"], f"level {level} {name}")
        out = {"level": level, "baseline": name, **_count_kept(masks), "seeds": seeds, **metrics}
        write_json(path, out)
        return out

    def run(self, levels: int, baselines: Iterable[str] = BASELINES, *,
            after_level: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Level 0 (dense) and IMP levels 1..``levels``, each with ``baselines``; resumes from the folder.

        Returns one dict per level: ``ticket`` metrics and one entry per baseline. ``after_level``
        is called after each level is saved (tests use it to interrupt a run).
        """
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels={levels!r} must be a positive integer (IMP rounds after the dense level 0).")
        baselines = tuple(baselines)
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"Unknown baselines {unknown}: choose from {BASELINES}.")
        out = []
        bar = tqdm(range(levels + 1), desc="IMP levels", disable=not self.progress, leave=False)
        for level in bar:
            try:
                metrics = self._load_level(level)
                if metrics is not None:
                    self.masks(level), self.final_state(level)  # loadable, not only checksummed
            except CorruptCheckpoint as e:
                warnings.warn(f"Level {level} of {self.dir} is corrupt ({e}); recomputing level {level} only.",
                              stacklevel=2)
                metrics = None
            if metrics is None:
                t0 = time.perf_counter()
                metrics = self._dense_level() if level == 0 else self._imp_level(level)
                metrics["wall_time_s"] = time.perf_counter() - t0
                write_json(self.level_dir(level) / "metrics.json", metrics)  # last: marks the level complete
            row = dict(metrics)
            if level > 0:
                t0 = time.perf_counter()
                for b in baselines:
                    row[b] = self._baseline(level, b)
                row["baselines_wall_time_s"] = sum(row[b]["wall_time_s"] for b in baselines)
            self.levels[level] = row
            out.append(row)
            if after_level is not None:
                after_level(level, row)
        return out

    # ----------------------------------------------------------------- stability
    def instability(self, level: int, *, seeds: tuple[int, int] | None = None, alphas: int = 11) -> dict:
        """Train two copies of m ⊙ θ_k (level 0: the dense θ_k) on two data orders (default seeds
        derived from the run's seed, distinct from the ticket's), evaluate the test error along the
        straight line between them; cached as ``instability_level_<n>.json``."""
        seeds = tuple(seeds) if seeds is not None else (10_007 + 2 * self.hp.seed, 10_008 + 2 * self.hp.seed)
        if len(seeds) != 2 or seeds[0] == seeds[1]:
            raise ValueError(f"seeds={seeds!r} must be two different data-order seeds.")
        if alphas < 2:
            raise ValueError(f"alphas={alphas} must be at least 2 (the two endpoints).")
        path = self.dir / f"instability_level_{level}.json"
        key = {"level": level, "seeds": list(seeds), "alphas": alphas}
        if path.is_file():
            try:
                cached = read_json(path)
                if {k: cached.get(k) for k in key} == key:
                    return cached
            except (OSError, ValueError) as e:
                warnings.warn(f"{path} is corrupt ({e}); recomputing.", stacklevel=2)
        if self._load_level(level) is None:
            raise ValueError(f"Level {level} has not been run in {self.dir}: call run(levels>={level}) first.")
        masks = self.masks(level)
        ends = []
        for s in seeds:
            model = self.new_model(self.hp.seed)
            reset_to(model, self.rewind_state(), masks)
            self._train(model, masks if level > 0 else None, s, f"instability level {level} seed {s}")
            ends.append(_state(model))
        grid = [i / (alphas - 1) for i in range(alphas)]
        errors = []
        model = self.new_model(self.hp.seed)
        for a in grid:
            model.load_state_dict(interpolate(ends[0], ends[1], a))
            errors.append(1.0 - evaluate(model, self.data.x_test, self.data.y_test)[1])
        out = {**key, **_count_kept(masks), "alpha": grid, "test_error": errors, "barrier": error_barrier(errors),
               "chord_barrier": chord_barrier(errors),
               "rewind_iteration": self.hp.pruning.rewind_iteration}
        write_json(path, out)
        return out


# --------------------------------------------------------------------------- many seeds


def _train_seed(hp: LotteryHparams, seed: int, levels: int, baselines: tuple, root, kwargs: dict) -> None:
    """One seed's IMP run in a worker process of ``run_seeds`` (one thread, like the notebook's default)."""
    torch.set_num_threads(1)
    LotteryRun(hp.with_(seed=seed), root, **kwargs).run(levels, baselines)


def run_seeds(hp: LotteryHparams, seeds: Iterable[int], levels: int, baselines: Iterable[str] = BASELINES,
              root: str | Path | None = None, workers: int = 1, **kwargs) -> list[LotteryRun]:
    """One ``LotteryRun`` per seed (each in its own hash folder), run to ``levels``.

    ``workers`` > 1 trains that many seeds at once, each in its own process with one thread. A seed's run
    depends only on its hyperparameters and seed, and is written to its own folder, so the numbers are those
    of training the seeds one after another; the runs are then read back from their folders (finished
    levels are never retrained).
    """
    seeds = list(seeds)
    if workers < 1:
        raise ValueError(f"workers={workers}: give 1 (seeds one after another) or more processes.")
    baselines = tuple(baselines)
    if workers > 1 and len(seeds) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        quiet = dict(kwargs, progress=False)
        with ProcessPoolExecutor(min(workers, len(seeds)), mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(_train_seed, hp, s, levels, baselines, root, quiet) for s in seeds]
            for job in tqdm(jobs, desc=f"seeds ({workers} processes)", disable=not kwargs.get("progress", True),
                            leave=False):
                job.result()
    runs = []
    for s in tqdm(seeds, desc="seeds", disable=not kwargs.get("progress", True) or workers > 1, leave=False):
        run = LotteryRun(hp.with_(seed=s), root, **kwargs)
        run.run(levels, baselines)
        runs.append(run)
    return runs


def summarize(runs: list[LotteryRun]) -> dict:
    """Seed-averaged numbers per level (with the per-seed values and sample std alongside).

    ``<net>_accuracy`` is the test accuracy at the early-stop iteration (the LTH paper's measure);
    ``<net>_final_accuracy`` the test accuracy after the last iteration. ``<net>`` is ``ticket`` or
    a baseline name; level 0 (the dense net) has only ``ticket_*``.
    """
    if not runs:
        raise ValueError("summarize() needs at least one run.")
    n_levels = min(len(r.levels) for r in runs)
    rows = []
    for level in range(n_levels):
        per = [r.levels[level] for r in runs]
        row = {"level": level, "weights_remaining": per[0]["weights_remaining"],
               "layer_remaining": per[0]["layer_remaining"]}
        cols = {"ticket_wall_time_s": lambda p: p["wall_time_s"],
                "baselines_wall_time_s": lambda p: p.get("baselines_wall_time_s", 0.0)}
        for net in ("ticket",) + BASELINES:
            for col, key in (("accuracy", "early_stop_test_accuracy"), ("final_accuracy", "test_accuracy"),
                             ("early_stop_iteration", "early_stop_iteration")):
                cols[f"{net}_{col}"] = lambda p, net=net, key=key: p[net][key] if net in p else None
        for name, getter in cols.items():
            vals = [getter(p) for p in per]
            row[name], row[f"{name}_std"] = mean_std(vals, allow_empty=True)
            row[f"{name}_per_seed"] = vals
        rows.append(row)
    return {"seeds": [r.hp.seed for r in runs], "dense_accuracy": rows[0]["ticket_accuracy"],
            "dense_accuracy_per_seed": rows[0]["ticket_accuracy_per_seed"],
            "dense_final_accuracy": rows[0]["ticket_final_accuracy"], "levels": rows}


def rewind_sweep(hp: LotteryHparams, ks: Iterable[int], level: int, seeds: Iterable[int],
                 root: str | Path | None = None, **kwargs) -> list[dict]:
    """Ticket accuracy at IMP ``level`` when rewinding to each k in ``ks`` (one IMP run per k and
    seed, no baselines). k = 0 reuses the main experiment's folder when the hyperparameters match."""
    out = []
    for k in ks:
        runs = run_seeds(hp.with_(**{"pruning.rewind_iteration": k}), seeds, level, baselines=(), root=root, **kwargs)
        accs = [r.levels[level]["ticket"]["early_stop_test_accuracy"] for r in runs]
        finals = [r.levels[level]["ticket"]["test_accuracy"] for r in runs]
        stops = [r.levels[level]["ticket"]["early_stop_iteration"] for r in runs]
        (acc, acc_std), (final, final_std) = mean_std(accs, allow_empty=True), mean_std(finals, allow_empty=True)
        out.append({"rewind_iteration": k, "level": level, "weights_remaining": runs[0].levels[level]["weights_remaining"],
                    "ticket_accuracy": acc, "ticket_accuracy_std": acc_std, "ticket_accuracy_per_seed": accs,
                    "ticket_final_accuracy": final, "ticket_final_accuracy_std": final_std,
                    "ticket_final_accuracy_per_seed": finals,
                    "ticket_early_stop_iteration": mean_std(stops, allow_empty=True)[0],
                    "ticket_early_stop_iteration_per_seed": stops})
    return out


def merge_summaries(summaries: list[dict]) -> dict:
    """One ``summarize``-shaped summary from several (e.g. one per seed, run by a sweep): the per-seed
    values are concatenated and the means and sample stds recomputed. The runs must share their pruning
    schedule (the same fraction of weights left at every level); only the seed may differ."""
    if not summaries:
        raise ValueError("merge_summaries() needs at least one summary.")
    n_levels = min(len(s["levels"]) for s in summaries)
    rows = []
    for level in range(n_levels):
        per = [s["levels"][level] for s in summaries]
        left = {round(p["weights_remaining"], 6) for p in per}
        if len(left) > 1:
            raise ValueError(f"Level {level} leaves {sorted(left)} of the weights in different runs: merge only runs "
                             "that differ by seed (the same prune rates, model and data).")
        row = {k: per[0][k] for k in ("level", "weights_remaining", "layer_remaining")}
        for key in per[0]:
            if key.endswith("_per_seed"):
                vals = [v for p in per for v in p[key]]
                name = key.removesuffix("_per_seed")
                row[name], row[f"{name}_std"] = mean_std(vals, allow_empty=True)
                row[key] = vals
        rows.append(row)
    return {"seeds": [x for s in summaries for x in s["seeds"]], "dense_accuracy": rows[0]["ticket_accuracy"],
            "dense_accuracy_per_seed": rows[0]["ticket_accuracy_per_seed"],
            "dense_final_accuracy": rows[0]["ticket_final_accuracy"], "levels": rows}


def summary_from_sweep(path: str | Path) -> dict:
    """The lottery summary of a finished ``workbook sweep`` of this chapter (its folder or summary.json),
    merged over its runs (``merge_summaries``): the figure of notebook 02 with the sweep's seeds."""
    s = read_json_in(path, "summary.json", what="sweep summary", how="run `python -m pruning_lab sweep ...` first")
    rows = [r["results"] for r in s["rows"]]
    if not rows:
        raise ValueError(f"The sweep at {path} has no finished run yet: run it (or rerun it to retry failures).")
    missing = [k for k in ("seeds", "levels") if any(k not in r for r in rows)]
    if missing:
        raise ValueError(f"The sweep at {path} did not keep {missing} in its summary: add them to the sweep file's "
                         "'keys' (e.g. keys: [seeds, levels, dense_accuracy]) and rerun the sweep (finished runs are "
                         "not repeated).")
    return merge_summaries(rows)


def paired_by_level(summary: dict, a: str = "ticket", b: str = "dense", column: str = "accuracy") -> list[dict]:
    """Per pruned level, the workbook's noise test (``stats.paired``: paired two-sided Student t at 5%,
    no verdict below 3 seeds) of ``a`` against ``b`` seed by seed (the same seed's runs share θ_0 and
    the data order): ``a``/``b`` are ``ticket``, a baseline name, or ``dense`` (level 0's ticket);
    ``column`` is ``accuracy`` (at early stop), ``final_accuracy`` or ``early_stop_iteration``.
    Levels where either side was not measured are left out. ``level`` is the IMP level; the test's
    significance level is ``alpha``."""
    dense = summary["levels"][0][f"ticket_{column}_per_seed"]
    out = []
    for lv in summary["levels"][1:]:
        xa = dense if a == "dense" else lv.get(f"{a}_{column}_per_seed")
        xb = dense if b == "dense" else lv.get(f"{b}_{column}_per_seed")
        if not xa or not xb or None in xa or None in xb:
            continue
        test = paired(xa, xb)
        test["alpha"] = test.pop("level")  # the test's significance level; "level" is the IMP level
        out.append({**test, "level": lv["level"], "weights_remaining": lv["weights_remaining"]})
    return out


def levels_with(rows: list[dict], verdict: str) -> str:
    """The weights left (``"41.1%, 16.9%"``) of ``paired_by_level`` rows with this verdict, or ``"no level"``."""
    return ", ".join(f"{100 * r['weights_remaining']:.1f}%" for r in rows if r["verdict"] == verdict) or "no level"


def difference_range(rows: list[dict], scale: float = 100.0, digits: int = 2) -> str:
    """``"-0.05 to +0.79"``: the smallest and largest mean difference of ``paired_by_level`` rows."""
    d = [scale * r["mean_difference"] for r in rows]
    return f"{min(d):+.{digits}f} to {max(d):+.{digits}f}" if d else "–"
