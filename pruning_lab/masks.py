"""The workbook's one mask vocabulary, spoken by the magnitude, lottery and structured chapters.

A *mask* is ``dict[str, torch.BoolTensor]``: parameter name -> tensor of the parameter's shape, ``True`` = kept.

- ``prunable_parameters``: which weights a method may prune (Linear and Conv weights by default).
- ``apply_masks`` zeros pruned weights in place (baking them in); ``masked`` does it for a ``with`` block and
  restores them; ``keep_masked`` is the ``after_step`` hook that keeps them exactly zero while an optimiser trains.
- ``random_masks``: the same count kept per layer, at random (a baseline); ``sparsity``, ``sparsity_report``,
  ``plot_sparsity``: what a mask removed.

The methods that *make* masks live with their chapters: ``magnitude`` (global, layer-wise, ERK, gradual),
``lottery`` (iterative magnitude pruning with rewinding), ``structured`` (heads and channels of an LLM).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

Masks = dict[str, torch.Tensor]
Include = None | str | Iterable[str] | Callable[[str, nn.Parameter], bool]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(module: nn.Module, include: Include = None) -> dict[str, nn.Parameter]:
    """The weights to prune, by parameter name.

    By default the ``weight`` of every Linear and Conv layer (not biases, norms or embeddings; a
    Linear whose weight is tied to an embedding, like a tied ``lm_head``, is left out with it).
    ``include`` narrows or replaces the choice: a regular expression matched against parameter
    names, an iterable of exact names, or a function ``(name, parameter) -> bool`` over all
    parameters. Raises ``ValueError`` when nothing is selected.
    """
    named = dict(module.named_parameters())  # de-duplicates tied parameters
    if include is None:
        chosen = {}
        for mname, mod in module.named_modules():
            if isinstance(mod, PRUNABLE_TYPES):
                pname = f"{mname}.weight" if mname else "weight"
                if pname in named:
                    chosen[pname] = named[pname]
        if not chosen:
            raise ValueError(f"{type(module).__name__} has no Linear or Conv weights to prune; "
                             "pass include= to choose parameters by name.")
        return chosen
    if isinstance(include, str):
        pattern = re.compile(include)
        chosen = {n: p for n, p in named.items() if pattern.search(n)}
    elif callable(include):
        chosen = {n: p for n, p in named.items() if include(n, p)}
    else:
        names = list(include)
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"include names parameters that do not exist: {missing[:5]}")
        chosen = {n: named[n] for n in names}
    if not chosen:
        raise ValueError(f"include={include!r} matches no parameter of {type(module).__name__}.")
    return chosen


def random_masks(masks: Masks, seed: int = 0) -> Masks:
    """Random masks with exactly the same number kept in every layer as ``masks`` (a baseline)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in masks.items():
        order = torch.randperm(m.numel(), generator=g)
        r = torch.zeros(m.numel(), dtype=torch.bool)
        r[order[: int(m.sum())]] = True
        out[n] = r.view_as(m).to(m.device)
    return out


# --------------------------------------------------------------------------- applying masks


def _check_masks(module: nn.Module, masks: Masks) -> dict[str, nn.Parameter]:
    named = dict(module.named_parameters())
    for n, m in masks.items():
        if n not in named:
            raise ValueError(f"The mask names {n!r}, which is not a parameter of {type(module).__name__}.")
        if m.shape != named[n].shape or m.dtype != torch.bool:
            raise ValueError(f"The mask for {n!r} must be a bool tensor of shape {tuple(named[n].shape)}, "
                             f"got {m.dtype} {tuple(m.shape)}.")
    return {n: named[n] for n in masks}


def apply_masks(module: nn.Module, masks: Masks) -> nn.Module:
    """Zero the pruned weights in place (checks every mask before changing anything)."""
    params = _check_masks(module, masks)
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n].to(p.device, p.dtype))
    return module


def keep_masked(module: nn.Module, masks: Masks) -> Callable[[nn.Module], None]:
    """An ``after_step`` hook for ``train``: re-zeroes pruned weights after every optimiser step.

    Zeroing gradients is not enough: Adam's moments, built before pruning, would regrow the
    weights. One fused multiply over all masked tensors keeps them exactly zero.
    """
    params = _check_masks(module, masks)
    tensors = list(params.values())
    factors = [masks[n].to(p.device, p.dtype) for n, p in params.items()]

    def hook(_model: nn.Module) -> None:
        with torch.no_grad():
            torch._foreach_mul_(tensors, factors)

    return hook


def sparsity(masks: Masks) -> float:
    """Fraction pruned over all masks."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


def sparsity_report(masks: Masks) -> list[dict]:
    """One row per layer: name, size, kept, sparsity."""
    return [{"name": n, "shape": list(m.shape), "numel": m.numel(), "kept": int(m.sum()),
             "sparsity": 1.0 - int(m.sum()) / m.numel()} for n, m in masks.items()]


def plot_sparsity(report: list[dict] | Masks, ax=None, label: str | None = None, **bar_kwargs):
    """Bar plot of per-layer sparsity (accepts a report or masks)."""
    import matplotlib.pyplot as plt

    rows = sparsity_report(report) if isinstance(report, dict) else report
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4, 0.35 * len(rows) + 2), 3))
    ax.bar(range(len(rows)), [r["sparsity"] for r in rows], label=label, **bar_kwargs)
    ax.set_xticks(range(len(rows)), [r["name"].removesuffix(".weight") for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("sparsity (fraction pruned)")
    return ax


@contextmanager
def masked(model: nn.Module, masks: Masks) -> Iterator[nn.Module]:
    """Zero the masked weights of ``model`` in place for the ``with`` block, restoring them in
    ``finally`` (only the masked tensors are copied): a plan's effect without a pruned copy."""
    params = _check_masks(model, masks)
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        apply_masks(model, masks)
        yield model
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
