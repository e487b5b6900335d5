"""Magnitude pruning (chapter 01), in the workbook's one mask vocabulary (``masks``: parameter name ->
bool tensor, ``True`` = kept; its names are re-exported here, so ``magnitude.apply_masks`` still works).

- ``global_magnitude_masks``: one threshold over every selected weight (Global MP), with an
  optional minimum fraction kept per layer (Gupta et al.'s "MT", which prevents layer collapse).
- ``layerwise_magnitude_masks``: the same sparsity in every layer (the uniform baseline).
- ``erk_masks``: Erdős–Rényi-kernel densities per layer, magnitude within each layer.
- ``prune_remaining``: prune a fraction of the weights a mask still keeps (iterative pruning, LTH).
- ``apply_masks`` zeros pruned weights in place (baking them in); ``keep_masked`` is the
  ``after_step`` hook that keeps them exactly zero while an optimiser (Adam!) trains.
- ``cubic_sparsity``: Zhu & Gupta's gradual schedule.

Exact counts: pruning a fraction ``s`` of ``N`` weights prunes ``round(s * N)`` of them, like
``torch.nn.utils.prune``; ties at the threshold are broken in parameter order, then index order.
The global threshold is found by a two-pass radix select on the float bit patterns of ``|w|``,
tensor by tensor, so no concatenated copy of the scores is ever made; the per-tensor work is spread
over single-threaded workers, which keeps it fast when another process is using a core.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Mapping

import torch
from torch import nn

from .eval import accuracy
from .masks import (PRUNABLE_TYPES, Include, Masks, _check_masks, apply_masks, keep_masked,  # noqa: F401 (re-exported)
                    plot_sparsity, prunable_parameters, random_masks, sparsity, sparsity_report)
from .train import intra_op_threads, train

# --------------------------------------------------------------------------- which weights


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be a fraction in [0, 1): 0.9 prunes 90% of the weights.")


# --------------------------------------------------------------------------- exact selection
#
# The k-th smallest |w| over many tensors without a global copy or a sort: a two-pass radix select on
# the float32 bit patterns of |w| (for non-negative floats, the order of the bit patterns is the order
# of the values). Pass 1 histograms the top 16 bits (sign cleared: exponent and 7 mantissa bits) of
# every weight; the bucket holding the k-th value is then resolved by a histogram of the low 16 bits
# of that bucket's few members. Each tensor costs five whole-tensor operations: its high bits, their
# histogram (``bincount`` reads int16 as it is, after scanning its min and max), then ``hi > hb`` (the mask)
# and ``hi == hb`` (the bucket's members, found eight flags at a time by ``_sparse_nonzero``). The bucket
# is resolved once for all tensors (ties at the k-th value ranked by one cumsum), and how many weights each
# mask keeps is read from the histograms, not from another pass over the masks. A tensor's high bits are
# freed as soon as its mask is built.
#
# Threads. On a laptop something else always wants a core. Many short parallel regions (one per op and
# per layer, each ending in a barrier) then wait for a thread the scheduler has parked: 210 layers took
# 30-60x longer beside one busy process. So the per-tensor work runs with one intra-op thread and the
# tensors are spread over a small pool of worker threads (as many as torch had intra-op threads): a
# worker that is parked delays only its own tensor while the other keeps taking work, and no barrier
# waits on it. The intra-op thread count is restored on exit.


@contextmanager
def _tensor_workers():
    """Yield ``pmap(fn, items) -> list``: ``fn`` over ``items`` on a pool of single-threaded workers
    (CPU), or in order on this thread (CUDA, or torch set to one thread)."""
    n = torch.get_num_threads()
    if n <= 1:
        yield lambda fn, items: [fn(x) for x in items]
        return
    with intra_op_threads(1), ThreadPoolExecutor(max_workers=n, thread_name_prefix="pruning_lab-masks") as pool:
        def pmap(fn, items):
            items = list(items)
            if len(items) < 2 or any(_is_cuda(x) for x in items[:1]):
                return [fn(x) for x in items]
            return list(pool.map(fn, items))

        yield pmap


def _is_cuda(x) -> bool:
    t = x[0] if isinstance(x, (tuple, list)) else x
    return isinstance(t, torch.Tensor) and t.is_cuda


def _as_float32(w: torch.Tensor) -> torch.Tensor:
    f = w.detach().reshape(-1)
    return f if f.dtype == torch.float32 else f.float()


def _high_bits(w: torch.Tensor) -> torch.Tensor:
    """Top 16 bits of |w|'s float32 bit pattern as int16 in [0, 32767], flattened."""
    f = _as_float32(w)
    if sys.byteorder == "little":  # the high half of each float32 is its second int16: no shift, one pass
        return f.view(torch.int16)[1::2] & 0x7FFF
    return ((f.view(torch.int32) >> 16) & 0x7FFF).to(torch.int16)


def _sparse_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """``flags.nonzero().view(-1)`` for a flat bool tensor with few ``True``: the flags are read eight at a
    time as int64 words, and only the nonzero words are expanded (5x faster than ``nonzero`` on the
    bucket's members, which are about one weight in 6,000)."""
    n8 = flags.numel() // 8 * 8
    if n8 == 0 or flags.storage_offset() % 8:
        return flags.nonzero().view(-1)
    words = flags[:n8].view(torch.int64).nonzero().view(-1)
    cand = (words.unsqueeze(1) * 8 + torch.arange(8, device=flags.device)).view(-1)
    idx = cand[flags[cand]]
    if n8 < flags.numel():
        idx = torch.cat([idx, flags[n8:].nonzero().view(-1) + n8])
    return idx


def _select(tensors: list[torch.Tensor], n_prune: int, pmap) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``_prune_smallest``'s masks and how many weights each keeps (a tensor of counts, read from the
    histograms instead of another pass over the masks)."""
    if n_prune <= 0 or n_prune >= sum(w.numel() for w in tensors):
        keep = n_prune <= 0
        masks = [torch.full_like(w, keep, dtype=torch.bool) for w in tensors]
        return masks, torch.tensor([w.numel() if keep else 0 for w in tensors])

    # pass 1, per tensor: the high 16 bits of |w| and their histogram
    def pass1(w):
        hi = _high_bits(w)
        return [w, hi, torch.bincount(hi, minlength=1 << 15)]

    slots = pmap(pass1, tensors)
    total = slots[0][2].clone()
    for s in slots[1:]:
        total += s[2]
    cum = total.cumsum(0)
    hb = int(torch.searchsorted(cum, torch.tensor(n_prune, device=cum.device)))  # bucket of the k-th smallest
    below = int(cum[hb - 1]) if hb > 0 else 0
    del total, cum

    # pass 2, per tensor: the mask above the bucket, the bucket's members and their low 16 bits; the high bits
    # and the histogram of a tensor are released as soon as its mask is built
    def pass2(slot):
        w, hi, hist = slot
        slot.clear()
        keep = hi > hb
        idx = _sparse_nonzero(hi == hb)
        lows = _as_float32(w.detach().reshape(-1)[idx]).view(torch.int32) & 0xFFFF  # members only: no fp32 copy of w
        return keep, idx, lows, hist[hb + 1:].sum()

    out = pmap(pass2, slots)
    del slots
    masks = [m for m, _, _, _ in out]
    idx = [i for _, i, _, _ in out]
    lows = torch.cat([lo for _, _, lo, _ in out])
    above = torch.stack([a for _, _, _, a in out])
    del out

    # the bucket, resolved at once: members above the k-th value stay, ties at it go in order up to the quota
    cum_lo = torch.bincount(lows, minlength=1 << 16).cumsum(0)
    lb = int(torch.searchsorted(cum_lo, torch.tensor(n_prune - below, device=cum_lo.device)))
    quota = n_prune - below - (int(cum_lo[lb - 1]) if lb > 0 else 0)  # ties at the threshold still to prune
    tie = lows == lb
    stay = (lows > lb) | (tie & (tie.cumsum(0) > quota))
    counts = [len(i) for i in idx]
    for m, i, s in zip(masks, idx, stay.split(counts)):
        m[i[s]] = True
    owner = torch.repeat_interleave(torch.arange(len(tensors), device=stay.device),
                                    torch.tensor(counts, device=stay.device))
    kept = above + torch.zeros_like(above).index_add_(0, owner, stay.to(above.dtype))
    return [m.view(w.shape) for m, w in zip(masks, tensors)], kept


def _prune_smallest(tensors: list[torch.Tensor], n_prune: int, pmap=None) -> list[torch.Tensor]:
    """Keep-masks that prune exactly the ``n_prune`` smallest |w| over ``tensors`` (ties at the threshold
    pruned in tensor order, then index order). ``pmap`` spreads the per-tensor work (``_tensor_workers``)."""
    if pmap is None:
        with _tensor_workers() as pm:
            return _select(tensors, n_prune, pm)[0]
    return _select(tensors, n_prune, pmap)[0]


# --------------------------------------------------------------------------- mask makers


def global_magnitude_masks(module: nn.Module, sparsity: float, *, min_per_layer: float | int = 0.0,
                           include: Include = None) -> Masks:
    """Global MP: prune the ``round(sparsity * N)`` smallest-magnitude weights over all layers.

    ``min_per_layer`` is Gupta et al.'s minimum threshold ("MT"): a float in [0, 1] is the
    fraction of every layer that must survive (``ceil(f * n)`` weights), an int >= 1 a number of
    weights per layer (capped at the layer's size; the paper's form). Layers that global MP would
    cut below their floor keep their largest weights up to it, and the rest of the budget is pruned
    globally among the other layers, so the total stays exact. Raises ``ValueError`` if the floors
    make the target unreachable. Returns ``{name: BoolTensor}``, ``True`` = kept; the module is
    not changed.
    """
    _check_sparsity(sparsity)
    if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, (int, float)) or min_per_layer < 0 or (
            isinstance(min_per_layer, float) and min_per_layer > 1.0):
        raise ValueError(f"min_per_layer={min_per_layer!r} must be a fraction in [0, 1] (float) "
                         "or a number of weights per layer (int >= 0).")
    params = prunable_parameters(module, include)
    sizes = {n: p.numel() for n, p in params.items()}
    total = sum(sizes.values())
    n_prune = round(sparsity * total)
    if n_prune >= total:
        raise ValueError(f"sparsity={sparsity} rounds to pruning all {total:,} weights (round({sparsity} * {total:,}) = "
                         f"{n_prune:,}), which leaves no network; keep at least one: sparsity <= {(total - 1) / total:.7g}.")
    if isinstance(min_per_layer, int):
        floors = {n: min(min_per_layer, s) for n, s in sizes.items()}
    else:
        floors = {n: math.ceil(min_per_layer * s) for n, s in sizes.items()}
    if sum(floors.values()) > total - n_prune:
        raise ValueError(
            f"min_per_layer={min_per_layer} keeps at least {sum(floors.values()):,} weights, more than the "
            f"{total - n_prune:,} that sparsity={sparsity} leaves: lower one of them."
        )
    fixed: dict[str, torch.Tensor] = {}  # layers held at their floor
    with torch.no_grad(), _tensor_workers() as pmap:
        while True:
            free = [n for n in params if n not in fixed]
            budget = n_prune - sum(sizes[n] - floors[n] for n in fixed)
            masks, kept = _select([params[n] for n in free], budget, pmap) if free else ([], torch.zeros(0))
            masks = dict(zip(free, masks))
            violators = [n for n, k in zip(free, kept.tolist()) if k < floors[n]]
            if not violators:
                break
            for n in violators:
                fixed[n] = _prune_smallest([params[n]], sizes[n] - floors[n], pmap)[0]
    masks.update(fixed)
    return {n: masks[n] for n in params}


def masks_from_densities(module: nn.Module, densities: Mapping[str, float], include: Include = None) -> Masks:
    """Per-layer magnitude masks keeping ``round(density * n)`` largest weights of each layer."""
    params = prunable_parameters(module, include if include is not None else list(densities))
    return _per_tensor(params, lambda n, p: p.numel() - round(densities[n] * p.numel()))


def _per_tensor(params: Mapping[str, torch.Tensor], n_prune: Callable[[str, torch.Tensor], int]) -> Masks:
    """``_prune_smallest`` of each tensor alone (``n_prune(name, tensor)`` of its smallest), tensors spread
    over the workers."""
    def one(item):
        n, p = item
        return _prune_smallest([p], n_prune(n, p), _serial)[0]

    with torch.no_grad(), _tensor_workers() as pmap:
        return dict(zip(params, pmap(one, list(params.items()))))


def _serial(fn, items):
    return [fn(x) for x in items]


def layerwise_magnitude_masks(module: nn.Module, sparsity: float, *, include: Include = None) -> Masks:
    """Uniform baseline: prune ``round(sparsity * n)`` smallest weights in every layer."""
    _check_sparsity(sparsity)
    params = prunable_parameters(module, include)
    return _per_tensor(params, lambda n, p: round(sparsity * p.numel()))


def erk_densities(module: nn.Module, sparsity: float, *, include: Include = None) -> dict[str, float]:
    """Erdős–Rényi-kernel densities (Evci et al., RigL): density of a layer ∝ sum(shape)/prod(shape),
    scaled so the kept total is ``(1 - sparsity) * N``; layers that would exceed 1 stay dense."""
    _check_sparsity(sparsity)
    params = prunable_parameters(module, include)
    sizes = {n: p.numel() for n, p in params.items()}
    raw = {n: sum(p.shape) / p.numel() for n, p in params.items()}
    keep_total = (1 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        budget = keep_total - sum(sizes[n] for n in dense)
        denom = sum(raw[n] * sizes[n] for n in params if n not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [n for n in params if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else eps * raw[n] for n in params}


def erk_masks(module: nn.Module, sparsity: float, *, include: Include = None) -> Masks:
    """Magnitude masks with ERK per-layer densities."""
    return masks_from_densities(module, erk_densities(module, sparsity, include=include))


def prune_remaining(module: nn.Module, masks: Masks, fraction: float | Mapping[str, float], *,
                    scope: str = "layerwise") -> Masks:
    """Prune a further ``fraction`` of the weights that ``masks`` still keep (iterative pruning).

    Pruned weights stay pruned; among the survivors the ``round(fraction * kept)`` smallest |w|
    are removed, per layer (``scope="layerwise"``; ``fraction`` may then be a dict name -> fraction)
    or over all the masked layers at once (``scope="global"``, one float). Only the surviving
    values are ranked, so weights that were already pruned never compete. Returns new masks.
    """
    if scope not in ("layerwise", "global"):
        raise ValueError(f"scope={scope!r}: use 'layerwise' or 'global'.")
    if isinstance(fraction, Mapping):
        if scope == "global":
            raise ValueError("scope='global' prunes one fraction over all layers: pass a float.")
        missing = [n for n in masks if n not in fraction]
        if missing:
            raise ValueError(f"fraction has no entry for {missing[:5]}.")
        rates = {n: fraction[n] for n in masks}
    else:
        rates = {n: fraction for n in masks}
    for n, f in rates.items():
        if not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ValueError(f"fraction={f!r} for {n!r} must be in [0, 1): 0.2 prunes 20% of the remaining weights.")
    params = _check_masks(module, masks)
    with torch.no_grad():
        survivors = {n: params[n].detach()[masks[n].to(params[n].device)] for n in masks}
        if scope == "global":
            f = next(iter(rates.values()), 0.0)
            kept = _prune_smallest(list(survivors.values()), round(f * sum(s.numel() for s in survivors.values())))
            keep = dict(zip(survivors, kept))
        else:
            keep = {n: _prune_smallest([s], round(rates[n] * s.numel()))[0] for n, s in survivors.items()}
        out = {}
        for n, m in masks.items():
            new = m.clone()
            new[m] = keep[n].to(m.device)
            out[n] = new
    return out


# --------------------------------------------------------------------------- gradual pruning


def small_dense_widths(target_weights: int, widths: tuple[int, ...] = (300, 100), inputs: int = 784,
                       outputs: int = 10, min_units: int = 10) -> tuple[int, ...] | None:
    """Hidden widths of a narrower MLP with at most ``target_weights`` weights (biases not counted): every
    hidden layer of ``widths`` scaled by one factor, none below ``min_units`` (Zhu & Gupta's small-dense
    model of the same size as a large-sparse one). ``None`` when even ``min_units`` per layer is too many."""
    def count(hidden):
        sizes = (inputs, *hidden, outputs)
        return sum(a * b for a, b in zip(sizes, sizes[1:]))

    for per_mille in range(1000, 0, -1):
        hidden = tuple(max(min_units, round(w * per_mille / 1000)) for w in widths)
        if count(hidden) <= target_weights:
            return hidden
    return None


def cubic_sparsity(step: int, final_sparsity: float, *, initial_sparsity: float = 0.0, start: int = 0,
                   n_prunes: int = 10, frequency: int = 100) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3, held at s_i before t0
    and at s_f after t0 + n Δt."""
    _check_sparsity(final_sparsity)
    if n_prunes < 1 or frequency < 1:
        raise ValueError(f"n_prunes={n_prunes} and frequency={frequency} must be positive.")
    progress = min(max((step - start) / (n_prunes * frequency), 0.0), 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


MASK_MAKERS: dict[str, Callable[..., Masks]] = {
    "global": global_magnitude_masks,
    "layerwise": layerwise_magnitude_masks,
    "erk": erk_masks,
}


def magnitude_masks(module: nn.Module, sparsity: float, method: str = "global", **kwargs) -> Masks:
    """Dispatch by name: ``"global"``, ``"layerwise"`` (uniform) or ``"erk"``."""
    if method not in MASK_MAKERS:
        raise ValueError(f"Unknown magnitude method {method!r}: choose one of {sorted(MASK_MAKERS)}.")
    return MASK_MAKERS[method](module, sparsity, **kwargs)


def gradual_magnitude_pruning(model: nn.Module, data, cfg, final_sparsity: float, *, start: int = 0,
                              n_prunes: int = 10, frequency: int = 100, method: str = "global",
                              progress: bool = True, **mask_kwargs):
    """Zhu & Gupta's prune-while-training: every ``frequency`` steps from ``start``, recompute
    magnitude masks at the cubic schedule's sparsity and apply them; in between keep them.

    Pruned weights are zero, hence smallest, so each new mask contains the previous one.
    ``cfg`` is a ``TrainConfig`` whose ``iterations`` should exceed ``start + n_prunes * frequency``
    so the network recovers after the last pruning step. Returns ``(TrainResult, masks)``.
    """
    _check_sparsity(final_sparsity)
    end = start + n_prunes * frequency
    if end > cfg.iterations:
        raise ValueError(f"The schedule ends at step {end} but training has only {cfg.iterations} "
                         "iterations: raise iterations or lower start/n_prunes/frequency.")
    magnitude_masks(model, 0.0, method, **mask_kwargs)  # validates method and kwargs before training
    state = {"step": 0, "masks": None, "hook": None}

    def after_step(m: nn.Module) -> None:
        state["step"] += 1
        t = state["step"]
        if start <= t <= end and (t - start) % frequency == 0:
            s = cubic_sparsity(t, final_sparsity, start=start, n_prunes=n_prunes, frequency=frequency)
            state["masks"] = magnitude_masks(m, s, method, **mask_kwargs)
            state["hook"] = keep_masked(m, state["masks"])
        if state["hook"] is not None:
            state["hook"](m)

    result = train(model, data, cfg, after_step=after_step, progress=progress, desc=f"gradual {method}")
    return result, state["masks"]


def prune_and_finetune(model: nn.Module, data, masks: Masks, cfg, *, progress: bool = False):
    """One-shot pruning: apply ``masks``, measure test accuracy, then fine-tune with the masks held
    (``keep_masked``). Returns ``(accuracy_before_finetune, TrainResult)``; ``model`` is changed."""
    apply_masks(model, masks)
    before = accuracy(model, data.x_test, data.y_test)
    return before, train(model, data, cfg, after_step=keep_masked(model, masks), progress=progress, desc="fine-tune")
