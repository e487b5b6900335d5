"""Structured pruning of a Llama-style LLM that really shrinks it.

Papers: Ma et al. 2023, "LLM-Pruner" (coupled structures, first-order Taylor importance, LoRA
recovery); An et al. 2024, "Fluctuation-based Adaptive Structured Pruning" (FLAP: fluctuation
metric, standardised scores with one global threshold, bias compensation); Wanda-sp (|W|·‖X‖ summed
per structure, as FLAP evaluates it); Men et al. 2024 / "ShortGPT" (layer removal by block
influence, BI = 1 − cos(input, output) of a decoder layer).

Structures of a decoder layer (``model.model.layers[i]``):

- **MLP channel** j: row j of ``gate_proj`` and ``up_proj`` and column j of ``down_proj``.
- **attention head**, GQA-aware. Query head h uses KV head ``h // n_rep``. ``head_mode="query"``
  removes the same number of query heads from every KV group (q_proj rows, o_proj columns);
  ``head_mode="group"`` removes whole KV groups (their query heads and the k/v rows). Either way
  the pruned attention computes exactly what the dense attention computes with those heads masked.
- **decoder layer**: removed whole (the residual stream passes through).

The pipeline, each step a small piece::

    cal  = calibrate(model, ids)                           # one batched pass, per-channel statistics
    plan = plan_structured(model, cal, ratio=0.2, metric="flap", allocation="adaptive")
    #   = check_request (options, layer range, budget; no calibration needed) -> score_units
    #     -> allocate_uniform / allocate_adaptive -> the plan
    small = prune_model(model, plan, calibration=cal, bias_compensation=True)   # a sliced copy
    save_pruned(small, "folder"); again = load_pruned("folder")                 # safetensors + JSON

This module decides *what* goes (calibration, metrics, plans, masks, the sliced copy); reading the Llama
layout, slicing a Linear, resizing a layer and saving/reloading a model of uneven widths live in ``llama``.

``ratio`` is always the fraction of the model's *total* parameters (embeddings included, tied
weights once) to remove, taken from attention and MLP only; LLM-Pruner and FLAP count it that way.
``layers`` limits pruning to a range of decoder layers (the others stay whole); each metric defaults
to its paper's recipe — LLM-Pruner (Taylor) leaves the first 4 and last 2 of LLaMA-7B's 32 layers
whole (scaled to the model: ``range(4, 28)`` of SmolLM2's 30), FLAP's code prunes FLAP, Wanda-sp and
magnitude-sp in every layer.
Calibration keeps running sums per input channel of ``o_proj`` and ``down_proj`` (count, Σx, Σx²),
never the activations themselves.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runs
from .eval import _takes_logits_to_keep, count_parameters, eval_mode, next_token_loss, perplexity
from .llama import (PROJECTIONS, LayerShape, decoder_layers, layer_shape, set_layer_sizes, sliced_linear,
                    update_config)
from .llama import load_pruned, save_pruned, structure_of  # noqa: F401 (re-exported: notebook 03 uses st.<name>)
from .lora import add_adapters, merge_adapters
from .masks import Masks, masked  # noqa: F401 (masked re-exported: structured.masked)

STRUCTURES = ("heads+mlp", "mlp", "heads")
ALLOCATIONS = ("uniform", "adaptive")
HEAD_MODES = ("query", "group")
STANDARDIZE = ("units", "channels")


# --------------------------------------------------------------------------- calibration statistics


@dataclass
class ChannelStats:
    """Running per-channel statistics of one projection's input: count, Σx and Σx² (float64)."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device) -> "ChannelStats":
        return cls(0, torch.zeros(n, dtype=torch.float64, device=device),
                   torch.zeros(n, dtype=torch.float64, device=device))

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.sumsq += x.float().pow(2).sum(0, dtype=torch.float64)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Sample variance over all calibration tokens (FLAP's "fluctuation" of the channel)."""
        n = max(self.count, 2)
        return ((self.sumsq - self.sum.pow(2) / n) / (n - 1)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's activation norm)."""
        return self.sumsq.sqrt()


@dataclass
class Calibration:
    """What the importance metrics need, per decoder layer (lists indexed by layer)."""

    attn: list[ChannelStats]                      # inputs of o_proj (n_heads * head_dim)
    mlp: list[ChannelStats]                       # inputs of down_proj (intermediate channels)
    block_influence: torch.Tensor                 # (n_layers,) mean 1 - cos(in, out) per token
    taylor: list[dict[str, torch.Tensor]] | None = None  # per-channel Σ|w·g| ("attn", "kv", "mlp")
    n_tokens: int = 0
    seq_len: int = 0


@contextmanager
def statistic_hooks(model: nn.Module) -> Iterator[Calibration]:
    """Forward hooks that reduce activations to per-channel running statistics as they pass.

    Yields a ``Calibration`` filled by every forward run inside the block; the hooks are removed
    in ``finally`` even when the forward fails.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    cal = Calibration([ChannelStats.zeros(layer.self_attn.o_proj.in_features, device) for layer in layers],
                      [ChannelStats.zeros(layer.mlp.down_proj.in_features, device) for layer in layers],
                      torch.zeros(len(layers), dtype=torch.float64))
    bi_count = [0]
    handles = []

    def attn_hook(i):
        return lambda _m, args: cal.attn[i].update(args[0].detach())

    def mlp_hook(i):
        return lambda _m, args: cal.mlp[i].update(args[0].detach())

    def block_hook(i):
        def hook(_m, args, kwargs, out):
            x = (args[0] if args else kwargs["hidden_states"]).detach()  # (a pass with gradients: taylor)
            y = (out[0] if isinstance(out, (tuple, list)) else out).detach()
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (batch, seq)
            cal.block_influence[i] += (1 - cos).sum(dtype=torch.float64).item()
            if i == 0:
                bi_count[0] += cos.numel()
        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook(i)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
            handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        yield cal
    finally:
        for h in handles:
            h.remove()
        cal.block_influence /= max(bi_count[0], 1)


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype != torch.long or ids.numel() == 0:
        raise ValueError("Calibration needs a LongTensor of token ids of shape (n_samples, seq_len), e.g. from "
                         "pruning_lab.data.calibration_batch(tokenizer, text, n_samples, seq_len).")
    return ids


def _base(model: nn.Module) -> nn.Module:
    return model.model


def calibrate(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 8, taylor: bool = False,
              progress: bool = False) -> Calibration:
    """Run the calibration windows ``ids`` (n, seq_len) through the model in batches under
    ``torch.inference_mode`` and return per-channel statistics and block influences.

    ``taylor=True`` adds LLM-Pruner's first-order scores, which need a pass with gradients (see
    ``taylor_scores``): the statistics are then collected during that pass (the same activations, bitwise),
    not in a pass of their own. The model is not changed.
    """
    decoder_layers(model)
    ids = _check_ids(ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with statistic_hooks(model) as cal:
            if taylor:
                scores = taylor_scores(model, ids, batch_size=batch_size, progress=progress)
            else:
                with torch.inference_mode():
                    for i in tqdm(range(0, len(ids), batch_size), desc="calibration", disable=not progress,
                                  leave=False):
                        _base(model)(input_ids=ids[i:i + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    cal.n_tokens, cal.seq_len = ids.numel(), ids.shape[1]
    if taylor:
        cal.taylor = scores
    return cal


def _coupled_sums(layer: nn.Module, saliency) -> dict[str, torch.Tensor]:
    """Sum an element-wise saliency over each coupled structure's weights, per channel.

    ``attn[c]``: q_proj row c + o_proj column c; ``kv[c]``: k_proj and v_proj row c;
    ``mlp[j]``: gate_proj and up_proj row j + down_proj column j. Biases count with their rows.
    """
    a, m = layer.self_attn, layer.mlp

    def rows(lin):
        s = saliency(lin.weight).sum(1)
        return s + saliency(lin.bias) if lin.bias is not None else s

    def cols(lin):
        return saliency(lin.weight).sum(0)

    return {"attn": (rows(a.q_proj) + cols(a.o_proj)).double(),
            "kv": (rows(a.k_proj) + rows(a.v_proj)).double(),
            "mlp": (rows(m.gate_proj) + rows(m.up_proj) + cols(m.down_proj)).double()}


def taylor_scores(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 8,
                  progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """LLM-Pruner's first-order ("param_first") importance: |w · ∂L/∂w| summed over each coupled
    structure, with ∂L/∂w the gradient of the mean next-token loss over all calibration windows
    (accumulated over batches). Gradients are enabled only on the projections, and the model's
    ``requires_grad`` flags and ``.grad`` fields are restored afterwards.
    """
    layers = decoder_layers(model)
    ids = _check_ids(ids)
    device = next(model.parameters()).device
    weights = {p for layer in layers for lin in layer.modules() if isinstance(lin, nn.Linear)
               for p in lin.parameters()}
    flags = {p: p.requires_grad for p in model.parameters()}
    old_grads = {p: p.grad for p in weights}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(p in weights)
            if p in weights:
                p.grad = None
        for i in tqdm(range(0, len(ids), batch_size), desc="taylor", disable=not progress, leave=False):
            batch = ids[i:i + batch_size].to(device)
            (next_token_loss(model, batch) * (len(batch) / len(ids))).backward()  # = the mean loss over all windows
        with torch.no_grad():
            out = []
            for layer in layers:
                grads = {lin.weight: lin.weight.grad for lin in layer.modules() if isinstance(lin, nn.Linear)}
                grads.update({lin.bias: lin.bias.grad for lin in layer.modules()
                              if isinstance(lin, nn.Linear) and lin.bias is not None})
                out.append(_coupled_sums(layer, lambda w: (w.detach() * grads[w]).abs()))
        return out
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p, g in old_grads.items():
            p.grad = g
        model.train(was_training)


# --------------------------------------------------------------------------- importance metrics


# A metric's ``paper_range`` = (first layers kept whole, last layers kept whole, of how many layers) in its
# paper's published recipe, scaled to the model by ``scaled_range``. FLAP's released code (lib/prune.py:
# prune_flap, prune_wanda_sp, prune_magnitude_sp; scripts/llama_7b.sh) prunes every layer with all three of
# its methods; LLM-Pruner's LLaMA-7B recipe prunes layers 4-29 of 32 (--block_{mlp,attention}_layer_start 4
# --block_..._layer_end 30, 25% of each, ~20% of the model).
ALL_LAYERS = (0, 0, 1)
LLM_PRUNER_RANGE = (4, 2, 32)


@dataclass(frozen=True)
class MagnitudeSP:
    """Magnitude-sp: Σ|w| over every weight of the coupled structure (no calibration needed). FLAP's
    code runs its magnitude-sp (the L2 norm of the output projection's column) on every layer."""

    name: str = "magnitude"
    needs_calibration: bool = False
    paper_range: tuple[int, int, int] = ALL_LAYERS

    def score(self, layer: nn.Module, i: int, cal: Calibration | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return _coupled_sums(layer, lambda w: w.detach().abs())


@dataclass(frozen=True)
class WandaSP:
    """Wanda-sp (as FLAP evaluates it): Σ_i |W_ij| · ‖X_j‖₂ over the output projection's column j
    (o_proj for heads, down_proj for MLP channels)."""

    name: str = "wanda-sp"
    needs_calibration: bool = True
    paper_range: tuple[int, int, int] = ALL_LAYERS  # FLAP's code: every layer, the same share of each

    def score(self, layer: nn.Module, i: int, cal: Calibration) -> dict[str, torch.Tensor]:
        a, m = layer.self_attn, layer.mlp
        return {"attn": a.o_proj.weight.detach().abs().sum(0).double() * cal.attn[i].norm,
                "kv": torch.zeros(a.k_proj.out_features, dtype=torch.float64, device=a.k_proj.weight.device),
                "mlp": m.down_proj.weight.detach().abs().sum(0).double() * cal.mlp[i].norm}


@dataclass(frozen=True)
class Taylor:
    """LLM-Pruner, first order: Σ |w · ∂L/∂w| over the coupled structure (needs gradients). Its paper's
    recipe leaves the first 4 and last 2 of LLaMA-7B's 32 layers whole."""

    name: str = "taylor"
    needs_calibration: bool = True
    paper_range: tuple[int, int, int] = LLM_PRUNER_RANGE

    def score(self, layer: nn.Module, i: int, cal: Calibration) -> dict[str, torch.Tensor]:
        if cal.taylor is None:
            raise ValueError("The Taylor metric needs gradients: call calibrate(model, ids, taylor=True).")
        return cal.taylor[i]


@dataclass(frozen=True)
class Fluctuation:
    """FLAP: Var(X_j) · ‖W_:,j‖² — the sample variance of input channel j over the calibration
    tokens times the squared norm of the output projection's column j."""

    name: str = "flap"
    needs_calibration: bool = True
    paper_range: tuple[int, int, int] = ALL_LAYERS  # FLAP's code: every layer ("AL-AM")

    def score(self, layer: nn.Module, i: int, cal: Calibration) -> dict[str, torch.Tensor]:
        a, m = layer.self_attn, layer.mlp
        return {"attn": cal.attn[i].var * a.o_proj.weight.detach().double().pow(2).sum(0),
                "kv": torch.zeros(a.k_proj.out_features, dtype=torch.float64, device=a.k_proj.weight.device),
                "mlp": cal.mlp[i].var * m.down_proj.weight.detach().double().pow(2).sum(0)}


@dataclass(frozen=True)
class TorchPruningMagnitude:
    """An independent magnitude-sp: Torch-Pruning's ``MagnitudeImportance`` (Fang et al., CVPR 2023)
    over each MLP's dependency group (gate and up rows + down column), found by tracing the MLP.
    ``p=1, group_reduction="sum"`` is Σ|w|, our ``MagnitudeSP``; Torch-Pruning's default is
    ``p=2, "mean"``. Heads keep our magnitude score (Torch-Pruning does not trace GQA attention)."""

    p: int = 2
    group_reduction: str = "mean"
    name: str = "torch-pruning magnitude"
    needs_calibration: bool = False

    def score(self, layer: nn.Module, i: int, cal: Calibration | None) -> dict[str, torch.Tensor]:
        import torch_pruning as tp

        mlp = layer.mlp
        example = torch.zeros(1, 1, mlp.gate_proj.in_features, device=mlp.gate_proj.weight.device,
                              dtype=mlp.gate_proj.weight.dtype)
        with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
            graph = tp.DependencyGraph().build_dependency(mlp, example_inputs=example)
        group = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels,
                                        idxs=list(range(mlp.gate_proj.out_features)))
        importance = tp.importance.MagnitudeImportance(p=self.p, group_reduction=self.group_reduction,
                                                       normalizer=None)
        with torch.no_grad():
            out = MagnitudeSP().score(layer, i, cal)
            out["mlp"] = importance(group).detach().double()
        return out


@dataclass(frozen=True)
class RandomSP:
    """Random structures: every head channel and MLP channel gets a uniform random score (seeded per
    layer). At uniform allocation it removes as many per layer as any metric does, so beside a metric it
    separates *which* structures go from *how many*; average several ``seed``s for its expectation."""

    seed: int = 0
    name: str = "random"
    needs_calibration: bool = False
    paper_range: tuple[int, int, int] = ALL_LAYERS

    def score(self, layer: nn.Module, i: int, cal: Calibration | None) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(100_003 * self.seed + i)
        a, m = layer.self_attn, layer.mlp
        return {"attn": torch.rand(a.o_proj.in_features, generator=g, dtype=torch.float64),
                "kv": torch.zeros(a.k_proj.out_features, dtype=torch.float64),
                "mlp": torch.rand(m.down_proj.in_features, generator=g, dtype=torch.float64)}


METRICS = {"magnitude": MagnitudeSP(), "wanda-sp": WandaSP(), "taylor": Taylor(), "flap": Fluctuation(),
           "random": RandomSP()}


def get_metric(metric) -> MagnitudeSP | WandaSP | Taylor | Fluctuation | TorchPruningMagnitude | RandomSP:
    if hasattr(metric, "score"):
        return metric
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}: choose one of {sorted(METRICS)} or pass an object with score().")
    return METRICS[metric]


# --------------------------------------------------------------------------- plans


@dataclass
class LayerPlan:
    """Kept structures of one decoder layer, as sorted original indices."""

    heads: torch.Tensor     # query heads kept (grouped by KV head, same count per group)
    kv_heads: torch.Tensor  # KV heads kept
    channels: torch.Tensor  # MLP channels kept


@dataclass
class StructuredPlan:
    """What to keep: one ``LayerPlan`` per decoder layer, and which whole layers to drop."""

    layers: list[LayerPlan]
    drop_layers: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)

    def summary(self) -> list[dict]:
        return [{"layer": i, "heads": len(p.heads), "kv_heads": len(p.kv_heads), "channels": len(p.channels),
                 "dropped": i in self.drop_layers} for i, p in enumerate(self.layers)]


def full_plan(model: nn.Module) -> StructuredPlan:
    """A plan that keeps everything (start from it to write plans by hand)."""
    plans = []
    for layer in decoder_layers(model):
        s = layer_shape(layer)
        plans.append(LayerPlan(torch.arange(s.heads), torch.arange(s.kv_heads), torch.arange(s.channels)))
    return StructuredPlan(plans)


def scaled_range(n_layers: int, first_whole: int, last_whole: int, of_layers: int) -> range:
    """A paper's layer range moved to a model of ``n_layers``: the paper keeps its first ``first_whole``
    and last ``last_whole`` of ``of_layers`` layers whole; the same shares (rounded half up) stay whole
    here. LLM-Pruner's LLaMA-7B recipe (4 and 2 of 32) gives ``range(4, 28)`` on SmolLM2's 30 layers."""
    first = math.floor(first_whole * n_layers / of_layers + 0.5)
    last = math.floor(last_whole * n_layers / of_layers + 0.5)
    return range(first, n_layers - last)


def layer_range(model: nn.Module | int, layers=None, metric=None) -> range:
    """The decoder layers a plan may prune, checked against the model (or a layer count).

    ``layers``: a ``range`` of step 1, a ``(start, stop)`` pair, ``"all"``, or ``None`` / ``"paper"``
    for the metric's paper recipe (``metric.paper_range``, scaled by ``scaled_range``): LLM-Pruner's
    Taylor keeps its first 4 and last 2 of LLaMA-7B's 32 layers whole; FLAP's code runs FLAP,
    Wanda-sp and magnitude-sp on every layer. A range outside the model or empty raises, naming
    the range and the model's layer count.
    """
    n = model if isinstance(model, int) else len(decoder_layers(model))
    if layers is None or layers == "paper":
        r = scaled_range(n, *(getattr(get_metric(metric), "paper_range", ALL_LAYERS) if metric is not None else ALL_LAYERS))
    elif layers == "all":
        r = range(n)
    elif isinstance(layers, range) and layers.step == 1:
        r = layers
    elif isinstance(layers, (tuple, list)) and len(layers) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in layers):
        r = range(*layers)
    else:
        raise ValueError(f"layers={layers!r} is not a layer range: give range(start, stop), (start, stop), 'all' "
                         "or 'paper' (the metric's paper recipe).")
    if not 0 <= r.start < r.stop <= n:
        raise ValueError(f"layers=range({r.start}, {r.stop}) is {'empty' if r.start >= r.stop else 'outside the model'}"
                         f": the model has {n} decoder layers (0 to {n - 1}); give range(start, stop) with "
                         f"0 <= start < stop <= {n}, e.g. {scaled_range(n, 4, 2, 32)}.")
    return r


@dataclass
class LayerUnits:
    """What one decoder layer of the range can lose: its head units and MLP channels, the parameters
    one of each holds, and — once scored — their scores, least important first.

    A head unit is, with ``head_mode="query"``, the r-th least important query head of every KV group
    (``n_rep`` units), with ``"group"`` one whole KV group (``kv_heads`` units)."""

    layer: int
    shape: LayerShape
    n_head_units: int
    head_cost: int
    channel_cost: int
    head_scores: torch.Tensor | None = None                       # (n_head_units,) ascending
    query_heads: list[torch.Tensor] = field(default_factory=list)  # the query heads of each unit
    kv_heads: list[torch.Tensor] = field(default_factory=list)     # the KV heads each unit removes
    channel_scores: torch.Tensor | None = None                    # (channels,) ascending
    channel_order: torch.Tensor | None = None                     # channel ids, least important first


def _head_unit_cost(layer: nn.Module, s: LayerShape, mode: str) -> int:
    a = layer.self_attn
    per_q = s.head_dim * (a.q_proj.in_features + a.o_proj.out_features) + (s.head_dim if a.q_proj.bias is not None else 0)
    per_kv = s.head_dim * (a.k_proj.in_features + a.v_proj.in_features) + (
        s.head_dim * 2 if a.k_proj.bias is not None else 0)
    return per_q * s.kv_heads if mode == "query" else per_q * s.n_rep + per_kv


def _channel_cost(layer: nn.Module) -> int:
    m = layer.mlp
    return m.gate_proj.in_features * 3 + (2 if m.gate_proj.bias is not None else 0)


def _check_ratio(ratio) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio!r} must be a fraction of the parameters in [0, 1): 0.2 removes 20%.")


def _kept_at_least(n: int, min_keep: float) -> int:
    """How many of a layer's ``n`` head units or channels always stay."""
    return max(1, math.ceil(min_keep * n))


@dataclass(frozen=True)
class PlanRequest:
    """A checked request to ``plan_structured``: what it may remove, where, and how much."""

    layers: range
    n_layers: int
    budget: float          # parameters to remove
    ratio: float
    structure: str
    allocation: str
    head_mode: str
    standardize: str
    min_keep: float
    clip_quantile: float = 1.0

    @property
    def heads(self) -> bool:
        return self.structure in ("heads+mlp", "heads")

    @property
    def mlp(self) -> bool:
        return self.structure in ("heads+mlp", "mlp")

    def where(self) -> str:
        return f"layers range({self.layers.start}, {self.layers.stop}) of the model's {self.n_layers}"


def check_request(model: nn.Module, ratio: float, metric="flap", *, layers=None, structure: str = "heads+mlp",
                  allocation: str = "adaptive", head_mode: str = "query", standardize: str = "units",
                  min_keep: float = 0.05, clip_quantile: float = 1.0) -> PlanRequest:
    """Check a pruning request against the model before anything is computed — no calibration needed,
    so a notebook can call it before calibrating: every option, the layer range (``layer_range``), and
    that the range can give up ``ratio`` of the model's parameters while every layer keeps
    ``min_keep`` of its head units and channels (uniform: the same share in every layer of the range)."""
    _check_ratio(ratio)
    for name, value, allowed in (("structure", structure, STRUCTURES), ("allocation", allocation, ALLOCATIONS),
                                 ("head_mode", head_mode, HEAD_MODES), ("standardize", standardize, STANDARDIZE)):
        if value not in allowed:
            extra = " (or use plan_layer_removal)" if name == "structure" else ""
            raise ValueError(f"Unknown {name} {value!r}: choose one of {allowed}{extra}.")
    if not isinstance(min_keep, (int, float)) or not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep={min_keep!r} must be a fraction in [0, 1).")
    if not isinstance(clip_quantile, (int, float)) or not 0.5 < clip_quantile <= 1.0:
        raise ValueError(f"clip_quantile={clip_quantile!r} must be in (0.5, 1]: 1 clips nothing (FLAP), 0.99 the top 1%.")
    blocks = decoder_layers(model)
    req = PlanRequest(layer_range(len(blocks), layers, metric), len(blocks), ratio * count_parameters(model), ratio,
                      structure, allocation, head_mode, standardize, min_keep, clip_quantile)
    units = _layer_units(blocks, req)
    if allocation == "uniform":
        allocate_uniform(units, req)  # raises when a layer would keep less than min_keep
    else:
        can = sum((u.n_head_units - _kept_at_least(u.n_head_units, min_keep)) * u.head_cost * req.heads
                  + (u.shape.channels - _kept_at_least(u.shape.channels, min_keep)) * u.channel_cost * req.mlp
                  for u in units)
        if req.budget > can:
            raise ValueError(f"ratio={ratio} asks to remove {req.budget:,.0f} parameters but the {structure} of "
                             f"{req.where()} hold at most {can:,.0f} removable ones with min_keep={min_keep}: lower "
                             "the ratio or min_keep, or widen the layer range.")
    return req


def _layer_units(blocks: nn.ModuleList, req: PlanRequest) -> list[LayerUnits]:
    out = []
    for i in req.layers:
        s = layer_shape(blocks[i])
        out.append(LayerUnits(i, s, s.n_rep if req.head_mode == "query" else s.kv_heads,
                              _head_unit_cost(blocks[i], s, req.head_mode), _channel_cost(blocks[i])))
    return out


def _head_units(s: LayerShape, head_scores: torch.Tensor, kv_scores: torch.Tensor, mode: str):
    """Removable head units of one layer, least important first: (scores, list of query-head sets,
    list of kv-head sets). ``query``: unit r = the r-th least important query head of every group.
    ``group``: unit g = KV group g."""
    if mode == "query":
        by_group = head_scores.view(s.kv_heads, s.n_rep)
        order = by_group.argsort(dim=1, stable=True)                        # (kv, n_rep)
        ranked = by_group.gather(1, order)                                  # ascending within group
        heads = order + torch.arange(s.kv_heads)[:, None] * s.n_rep         # original head ids
        return ranked.sum(0), [heads[:, r] for r in range(s.n_rep)], [torch.empty(0, dtype=torch.long)] * s.n_rep
    group = head_scores.view(s.kv_heads, s.n_rep).sum(1) + kv_scores
    order = group.argsort(stable=True)
    return (group[order], [torch.arange(g * s.n_rep, (g + 1) * s.n_rep) for g in order.tolist()],
            [torch.tensor([g]) for g in order.tolist()])


def score_units(blocks: nn.ModuleList, units: list[LayerUnits], calibration: Calibration | None, metric,
                req: PlanRequest) -> list[LayerUnits]:
    """Fill each layer's unit scores from ``metric.score`` (ascending). For the adaptive allocation
    with ``standardize="channels"`` (FLAP's code) a head unit's score is already a z-score: the squared
    attention score of every ``o_proj`` input channel, standardised over the layer's channels, averaged
    over the unit's heads' channels."""
    z_channels = req.allocation == "adaptive" and req.standardize == "channels"
    with torch.no_grad():
        for u in units:
            s, sc = u.shape, metric.score(blocks[u.layer], u.layer, calibration)
            if z_channels:
                ch = _clipped(sc["attn"].cpu().pow(2), req.clip_quantile)
                z_ch = (ch - ch.mean()) / (ch.std() if ch.std() > 0 else 1.0)
                head_z = z_ch.view(s.heads, s.head_dim).mean(1)
                hs, u.query_heads, u.kv_heads = _head_units(s, head_z, torch.zeros(s.kv_heads, dtype=head_z.dtype),
                                                            req.head_mode)
                u.head_scores = hs / len(u.query_heads[0])  # a unit's z: the mean of its heads' z
            else:
                u.head_scores, u.query_heads, u.kv_heads = _head_units(
                    s, sc["attn"].cpu().view(s.heads, s.head_dim).sum(1), sc["kv"].cpu().view(s.kv_heads, s.head_dim).sum(1),
                    req.head_mode)
            ms = sc["mlp"].cpu()
            u.channel_order = ms.argsort(stable=True)
            u.channel_scores = ms[u.channel_order]
    return units


class Removal(NamedTuple):
    """What an allocation takes from one layer: head units and MLP channels, least important first."""

    head_units: int
    channels: int


def _clipped(scores: torch.Tensor, q: float) -> torch.Tensor:
    """Scores clipped at their ``q``-quantile (``q`` = 1: unchanged): ranks below it stay, but a few outliers no
    longer set the mean and standard deviation a z-score is taken with."""
    return scores if q >= 1.0 else scores.clamp(max=float(torch.quantile(scores.double(), q)))


def allocate_uniform(units: list[LayerUnits], req: PlanRequest) -> dict[int, Removal]:
    """LLM-Pruner's block-wise allocation: every layer of the range loses the same share — head units
    rounded, the rest of the budget taken from MLP channels equally. Needs no scores. Returns
    ``{layer: Removal(head units, channels)}``."""
    head_total = sum(u.n_head_units * u.head_cost for u in units) if req.heads else 0
    mlp_total = sum(u.shape.channels * u.channel_cost for u in units) if req.mlp else 0
    if req.budget > head_total + mlp_total:
        raise ValueError(f"ratio={req.ratio} asks to remove {req.budget:,.0f} parameters but the {req.structure} of "
                         f"{req.where()} hold only {head_total + mlp_total:,}: lower the ratio, widen the layer range "
                         "or prune more structures.")
    frac = req.budget / max(head_total + mlp_total, 1)
    left, out = req.budget, {}
    for u in units:
        k = 0
        if req.heads:
            n = u.n_head_units
            k = round(frac * n) if req.mlp else round(req.budget / (len(units) * u.head_cost))
            if k > n - _kept_at_least(n, req.min_keep):
                what = "every head" if k >= n else f"{k} of the {n} head units"
                raise ValueError(f"ratio={req.ratio} would remove {what} of layer {u.layer} (head_mode="
                                 f"{req.head_mode!r}; {req.where()}), leaving fewer than "
                                 f"{_kept_at_least(n, req.min_keep)}: lower the ratio, widen the layer range, prune "
                                 "the MLP too, or use allocation='adaptive'.")
            left -= k * u.head_cost
        out[u.layer] = Removal(k, 0)
    if req.mlp:
        per_layer = max(left, 0) / len(units)
        for u in units:
            n, k = u.shape.channels, round(per_layer / u.channel_cost)
            if k > n - _kept_at_least(n, req.min_keep):
                raise ValueError(f"ratio={req.ratio} would remove {k} of the {n} MLP channels of layer {u.layer} "
                                 f"({req.where()}), keeping fewer than min_keep={req.min_keep}: lower the ratio or "
                                 "widen the layer range.")
            out[u.layer] = out[u.layer]._replace(channels=k)
    return out


def allocate_adaptive(units: list[LayerUnits], req: PlanRequest) -> dict[int, Removal]:
    """FLAP's adaptive allocation: each layer's unit scores are standardised within the layer and module
    (z = (s − mean) / std; already z with ``standardize="channels"``), pooled over the range, and the
    lowest go — each costing its parameters — until the budget is spent (overshoot < one unit). The
    ``min_keep`` most important units of every layer and module are never offered. With ``clip_quantile``
    below 1 (not FLAP's; a diagnostic variant), a layer's channel scores are clipped at that quantile before
    the z-score: one massive-activation channel can otherwise inflate a layer's standard deviation so much
    that every other channel's z sits near 0 and the whole layer is never pruned."""
    z, cost, owner = [], [], []
    for u in units:
        for kind, scores, c, use in (("head", u.head_scores, u.head_cost, req.heads),
                                     ("mlp", u.channel_scores, u.channel_cost, req.mlp)):
            if not use:
                continue
            n = len(scores)
            if kind == "head" and req.standardize == "channels":
                zz = scores
            else:
                scores = _clipped(scores, req.clip_quantile) if kind == "mlp" else scores
                std = scores.std() if n > 1 else torch.tensor(1.0, dtype=scores.dtype)
                zz = (scores - scores.mean()) / (std if std > 0 else 1.0)
            removable = n - _kept_at_least(n, req.min_keep)
            z.append(zz[:removable])
            cost.append(torch.full((removable,), float(c), dtype=torch.float64))
            owner += [(u.layer, kind)] * removable
    z, cost = torch.cat(z), torch.cat(cost)
    order = z.argsort(stable=True)
    n_take = 0
    if req.budget > 0:
        n_take = int(torch.searchsorted(cost[order].cumsum(0), torch.tensor(req.budget, dtype=torch.float64))) + 1
    out = {u.layer: [0, 0] for u in units}
    for j in order[:n_take].tolist():
        layer, kind = owner[j]
        out[layer][kind == "mlp"] += 1
    return {k: Removal(*v) for k, v in out.items()}


def plan_structured(model: nn.Module, calibration: Calibration | None, ratio: float, metric="flap", *,
                    layers=None, structure: str = "heads+mlp", allocation: str = "adaptive",
                    head_mode: str = "query", standardize: str = "units", min_keep: float = 0.05,
                    clip_quantile: float = 1.0, uniform_layers=()) -> StructuredPlan:
    """Choose the heads and MLP channels to remove so that ``ratio`` of the model's parameters go:
    check the request → score → allocate → plan.

    ``layers`` (see ``layer_range``): the decoder layers that may be pruned, the others stay whole;
    default the metric's paper recipe (Taylor: LLM-Pruner's first 4 and last 2 of 32 layers whole,
    scaled; the other metrics: every layer). ``ratio`` stays a fraction of the *whole* model, so a
    narrower range prunes its layers harder.

    ``allocation="uniform"`` (``allocate_uniform``): every layer of the range loses the same share.
    ``"adaptive"`` (``allocate_adaptive``, FLAP): standardised scores pooled over the range, the lowest
    removed until the budget is spent. ``min_keep`` is the fraction of every layer's head units and
    channels that always stays (at least one): a per-layer width floor.

    ``standardize`` (adaptive only) sets the population a head unit's z-score is taken over:
    ``"units"`` — the layer's removable head units (with GQA and ``head_mode="query"`` only 3,
    so the weakest unit's z lies in [-1.15, -0.58] whatever its real importance); ``"channels"`` —
    FLAP's released code: the attention score of every ``o_proj`` input channel is squared,
    standardised over the layer's channels, and a head's z is the mean over its ``head_dim``
    channels (a unit's z: the mean over its heads). MLP channels are standardised over the layer's
    channels either way. ``clip_quantile`` < 1 (adaptive only; ours, not FLAP's): channel scores are
    clipped at that quantile of their layer before they are standardised (see ``allocate_adaptive``).

    ``uniform_layers`` (adaptive only; a diagnosis, not a method): these layers get the uniform plan's
    heads and channels, every other layer keeps the adaptive choice, so the plan removes a little
    less than ``ratio`` when the adaptive plan had made those layers narrower (chapter 3 gives layer 0
    back its uniform width to see what its adaptive width costs).
    """
    uniform_layers = tuple(uniform_layers)
    if uniform_layers:
        if allocation != "adaptive":
            raise ValueError(f"uniform_layers={uniform_layers} only means something with allocation='adaptive' "
                             f"(with {allocation!r} every layer already has the uniform width): drop it.")
        n = len(decoder_layers(model))
        bad = [i for i in uniform_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad:
            raise ValueError(f"uniform_layers={uniform_layers}: {bad} are not decoder layers of this model "
                             f"(0 to {n - 1}); give layer indices.")
    metric = get_metric(metric)
    req = check_request(model, ratio, metric, layers=layers, structure=structure, allocation=allocation,
                        head_mode=head_mode, standardize=standardize, min_keep=min_keep, clip_quantile=clip_quantile)
    blocks = decoder_layers(model)
    if metric.needs_calibration and calibration is None:
        raise ValueError(f"The {metric.name!r} metric needs calibration statistics: pass calibrate(model, ids).")
    if calibration is not None and len(calibration.mlp) != len(blocks):
        raise ValueError(f"The calibration has {len(calibration.mlp)} layers, the model {len(blocks)}: "
                         "calibrate this model again.")
    units = score_units(blocks, _layer_units(blocks, req), calibration, metric, req)
    removal = (allocate_uniform if allocation == "uniform" else allocate_adaptive)(units, req)
    plan = full_plan(model)
    for u in units:
        heads_gone, channels_gone = removal[u.layer]
        s = u.shape
        kept_q = torch.cat(u.query_heads[heads_gone:]).sort().values if heads_gone else torch.arange(s.heads)
        gone_kv = set(torch.cat(u.kv_heads[:heads_gone]).tolist()) if heads_gone and head_mode == "group" else set()
        kept_kv = torch.tensor([g for g in range(s.kv_heads) if g not in gone_kv], dtype=torch.long)
        plan.layers[u.layer] = LayerPlan(kept_q, kept_kv, u.channel_order[channels_gone:].sort().values)
    if uniform_layers:
        uniform = plan_structured(model, calibration, ratio, metric, layers=layers, structure=structure,
                                  allocation="uniform", head_mode=head_mode, min_keep=min_keep)
        for i in uniform_layers:
            plan.layers[i] = uniform.layers[i]
    plan.info = {"metric": metric.name, "ratio": ratio, "layers": [req.layers.start, req.layers.stop],
                 "structure": structure, "allocation": allocation, "head_mode": head_mode,
                 "standardize": standardize, "min_keep": min_keep, "clip_quantile": clip_quantile,
                 "uniform_layers": list(uniform_layers)}
    return plan


def plan_layer_removal(model: nn.Module, calibration: Calibration, ratio: float | None = None, *,
                       n_layers: int | None = None) -> StructuredPlan:
    """Drop the decoder layers of lowest block influence (1 − cos of a layer's input and output,
    averaged over calibration tokens): ``n_layers`` of them, or as many as ``ratio`` of the
    parameters needs (rounded to whole layers). At least one layer stays."""
    layers = decoder_layers(model)
    if (ratio is None) == (n_layers is None):
        raise ValueError("Give exactly one of ratio= or n_layers=.")
    if n_layers is None:
        _check_ratio(ratio)
        per_layer = sum(p.numel() for p in layers[0].parameters())
        n_layers = round(ratio * count_parameters(model) / per_layer)
    if not 0 <= n_layers < len(layers):
        raise ValueError(f"Cannot drop {n_layers} of {len(layers)} layers: at least one must stay; lower the ratio.")
    if calibration is None or len(calibration.block_influence) != len(layers):
        raise ValueError("Layer removal needs calibrate(model, ids) of this model (block influences).")
    drop = calibration.block_influence.argsort(stable=True)[:n_layers].sort().values.tolist()
    plan = full_plan(model)
    plan.drop_layers = tuple(drop)
    plan.info = {"metric": "block-influence", "ratio": ratio, "structure": "layers", "allocation": "global",
                 "n_layers": n_layers}
    return plan


# --------------------------------------------------------------------------- checking and masks


def _check_plan(model: nn.Module, plan: StructuredPlan) -> nn.ModuleList:
    layers = decoder_layers(model)
    if len(plan.layers) != len(layers):
        raise ValueError(f"The plan has {len(plan.layers)} layers, the model {len(layers)}: plan for this model.")
    if len(set(plan.drop_layers)) != len(plan.drop_layers) or any(not 0 <= d < len(layers) for d in plan.drop_layers):
        raise ValueError(f"drop_layers={plan.drop_layers} must be distinct layer indices below {len(layers)}.")
    if len(plan.drop_layers) >= len(layers):
        raise ValueError("The plan drops every decoder layer: keep at least one.")
    for i, (layer, p) in enumerate(zip(layers, plan.layers)):
        s = layer_shape(layer)
        for name, idx, n in (("heads", p.heads, s.heads), ("kv_heads", p.kv_heads, s.kv_heads),
                             ("channels", p.channels, s.channels)):
            if not isinstance(idx, torch.Tensor) or idx.ndim != 1 or idx.dtype != torch.long:
                raise ValueError(f"Layer {i}: {name} must be a 1-D LongTensor of kept indices.")
            if len(idx) == 0:
                raise ValueError(f"Layer {i}: the plan keeps no {name}; keep at least one (or drop the layer).")
            if bool((idx[1:] <= idx[:-1]).any()) or int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(f"Layer {i}: {name} must be sorted, distinct indices in [0, {n}).")
        groups = p.heads // s.n_rep
        counts = torch.bincount(groups, minlength=s.kv_heads)
        kept_groups = counts.nonzero().flatten()
        if not torch.equal(kept_groups, p.kv_heads) or len(set(counts[kept_groups].tolist())) != 1:
            raise ValueError(f"Layer {i}: query heads {p.heads.tolist()} are not GQA-consistent with KV heads "
                             f"{p.kv_heads.tolist()} (every kept KV group needs the same number of query heads, "
                             "and every removed group all of its heads removed).")
    return layers


def _head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def plan_masks(model: nn.Module, plan: StructuredPlan) -> Masks:
    """The plan in the project's one mask vocabulary (param name -> bool, True = kept): zeroing
    these weights with ``magnitude.apply_masks`` gives the same logits as slicing them away.
    Layer drops are not masks (a dropped layer is an identity, not a zero): plans with drops raise."""
    layers = _check_plan(model, plan)
    if plan.drop_layers:
        raise ValueError("Dropped layers cannot be expressed as weight masks; use a plan without drop_layers.")
    names = {id(m): n for n, m in model.named_modules()}
    masks: Masks = {}
    for layer, p in zip(layers, plan.layers):
        a, m, s = layer.self_attn, layer.mlp, layer_shape(layer)
        q = torch.zeros(s.heads * s.head_dim, dtype=torch.bool)
        q[_head_channels(p.heads, s.head_dim)] = True
        kv = torch.zeros(s.kv_heads * s.head_dim, dtype=torch.bool)
        kv[_head_channels(p.kv_heads, s.head_dim)] = True
        c = torch.zeros(s.channels, dtype=torch.bool)
        c[p.channels] = True
        for lin, keep, axis in ((a.q_proj, q, 0), (a.k_proj, kv, 0), (a.v_proj, kv, 0), (a.o_proj, q, 1),
                                (m.gate_proj, c, 0), (m.up_proj, c, 0), (m.down_proj, c, 1)):
            dev = lin.weight.device
            masks[f"{names[id(lin)]}.weight"] = (keep[:, None] if axis == 0 else keep[None, :]).expand_as(
                lin.weight).to(dev).clone()
            if lin.bias is not None and axis == 0:
                masks[f"{names[id(lin)]}.bias"] = keep.to(dev).clone()
    return masks


# --------------------------------------------------------------------------- looking at what a plan removes


def removed_activation_share(model: nn.Module, plan: StructuredPlan, calibration: Calibration) -> list[dict]:
    """Per layer, the share of the calibration activations' energy (Σ_j ‖X_j‖², over tokens) that
    flows through the channels the plan removes: ``mlp`` (inputs of ``down_proj``) and ``attn``
    (inputs of ``o_proj``), beside the share of channels removed. A metric that removes 17% of the
    channels but 50% of the energy removes what the layer uses most. Also per layer: the channel with
    the largest activation norm, its norm over the median channel's, and whether the plan removes it."""
    layers = _check_plan(model, plan)
    out = []
    for i, (layer, p) in enumerate(zip(layers, plan.layers)):
        s = layer_shape(layer)
        row, gone = {"layer": i}, {}
        for kind, stats, kept, n in (("mlp", calibration.mlp[i], p.channels, s.channels),
                                     ("attn", calibration.attn[i], _head_channels(p.heads, s.head_dim),
                                      s.heads * s.head_dim)):
            energy = stats.sumsq.cpu()
            gone[kind] = torch.ones(n, dtype=torch.bool)
            gone[kind][kept] = False
            row[f"{kind}_channels_removed"] = float(gone[kind].double().mean())
            row[f"{kind}_energy_removed"] = float(energy[gone[kind]].sum() / energy.sum()) if energy.sum() > 0 else 0.0
        # the channel with the largest activations and how far it stands out (a "massive activation",
        # Sun et al. 2024, which a "super weight" of down_proj writes into the residual stream, Yu et al.
        # 2024, shows up as a norm hundreds of times the median): does the plan remove it?
        norm = calibration.mlp[i].norm.cpu()
        top = int(norm.argmax())
        row.update(top_activation_channel=top, top_activation_ratio=float(norm[top] / norm.median().clamp_min(1e-30)),
                   top_activation_removed=bool(gone["mlp"][top]))
        out.append(row)
    return out


def one_layer_at_a_time(model: nn.Module, plan: StructuredPlan, ids: torch.Tensor, *, seq_len: int = 128,
                        batch_size: int = 8, progress: bool = False) -> list[float]:
    """Held-out perplexity (``ids``: 1-D, disjoint windows of ``seq_len`` as ``eval.perplexity``) when only layer
    ``i`` follows ``plan`` (its removed heads and channels zeroed, every other layer dense), for each layer ``i``:
    which layers' removals do the damage. The layers before ``i`` are dense, so their output is the dense model's:
    it is computed once, and layer ``i``'s perplexity runs layers ``i`` to the last only (half the work on average).
    The model is restored after each layer."""
    layers = _check_plan(model, plan)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or len(ids) < seq_len:
        raise ValueError(f"ids: a 1-D tensor of at least seq_len={seq_len} token ids, got "
                         f"{tuple(getattr(ids, 'shape', ()))}.")
    device = next(model.parameters()).device
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    batches = [windows[i:i + batch_size].to(device) for i in range(0, len(windows), batch_size)]
    keep = torch.arange(seq_len - 1, device=device)  # the positions that predict a token (as perplexity scores)
    with eval_mode(model):  # the input of every layer, dense: hidden_states[i] enters layer i
        entering = [_base(model)(input_ids=b, use_cache=False, output_hidden_states=True).hidden_states for b in batches]
    names = {id(m): n for n, m in model.named_modules()}
    masks = {n: m for n, m in plan_masks(model, plan).items() if not bool(m.all())}
    out = []
    for i in tqdm(range(len(layers)), desc="one layer at a time", disable=not progress, leave=False):
        prefix = names[id(layers[i])] + "."
        nll = 0.0
        with masked(model, {n: m for n, m in masks.items() if n.startswith(prefix)}), _from_layer(model, i), \
                eval_mode(model):
            for b, hidden in zip(batches, entering):
                logits = model(inputs_embeds=hidden[i], use_cache=False, logits_to_keep=keep).logits
                nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                       reduction="none").double().sum().item()
        out.append(float(torch.tensor(nll / (len(windows) * (seq_len - 1))).exp()))  # as perplexity rounds it
    return out


@contextmanager
def _from_layer(model: nn.Module, i: int):
    """The model's decoder runs its layers from ``i`` on (its input: the hidden states entering layer ``i``, given
    as ``inputs_embeds``) inside the block."""
    base = _base(model)
    layers = base.layers
    base.layers = nn.ModuleList(list(layers)[i:])
    try:
        yield model
    finally:
        base.layers = layers


# --------------------------------------------------------------------------- physical shrinking


def _compensate(lin: nn.Linear, removed: torch.Tensor, mean: torch.Tensor) -> None:
    """FLAP bias compensation: b += W[:, removed] · E[x_removed], so the layer's mean output on the
    calibration data is unchanged. Adds a bias to ``lin`` if it has none."""
    if len(removed) == 0:
        return
    w = lin.weight.detach()
    removed = removed.to(w.device)
    delta = (w.index_select(1, removed).double() @ mean.to(w.device)[removed]).to(w.dtype)
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                requires_grad=lin.weight.requires_grad)
    with torch.no_grad():
        lin.bias.add_(delta)


def _removed(kept: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept] = True
    return (~keep).nonzero().flatten()


def _replaced_weights(layers: nn.ModuleList, plan: StructuredPlan) -> list[torch.Tensor]:
    """The weights ``prune_model`` replaces by sliced copies (and those of dropped layers): a copy of the model
    need not copy them. Biases are not listed: bias compensation writes into them before they are sliced."""
    out = []
    for i, (layer, p) in enumerate(zip(layers, plan.layers)):
        a, m, s = layer.self_attn, layer.mlp, layer_shape(layer)
        if i in plan.drop_layers:
            out += [t for t in layer.parameters()]
            continue
        if len(p.heads) < s.heads:
            out += [a.q_proj.weight, a.o_proj.weight]
        if len(p.kv_heads) < s.kv_heads:
            out += [a.k_proj.weight, a.v_proj.weight]
        if len(p.channels) < s.channels:
            out += [m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
    return out


def prune_model(model: nn.Module, plan: StructuredPlan, *, calibration: Calibration | None = None,
                bias_compensation: bool = False, inplace: bool = False) -> nn.Module:
    """Slice the weights the plan removes and return a smaller, ordinary model.

    Everything is checked first; on bad input nothing changes. With ``inplace=False`` (default) the
    model is deep-copied once — except the weight matrices the plan slices, which the sliced copies replace —
    and the copy is sliced: it shares no tensor with ``model`` (peak memory ≈ 1× + the pruned model); ``inplace=True``
    slices the given model itself, for large models or benchmarks: no second copy, only the sliced
    matrices are new (weights memory-mapped from safetensors keep their pages resident until the file
    is released, so SmolLM2 at 30% peaks at ~1.6× the model; see ``benchmarks/bench_structured.py``).
    ``bias_compensation`` (FLAP) needs the calibration statistics of this same dense model.
    """
    layers = _check_plan(model, plan)
    if bias_compensation:
        if calibration is None or len(calibration.mlp) != len(layers):
            raise ValueError("bias_compensation=True needs calibrate(model, ids) of this model (channel means).")
    head_dim = layers[0].self_attn.head_dim
    # the copy shares (never copies) the weights that are about to be sliced away, so it costs only what it keeps
    target = model if inplace else copy.deepcopy(model, {id(w): w for w in _replaced_weights(layers, plan)})
    layers = decoder_layers(target)
    with torch.no_grad():
        for i, (layer, p) in enumerate(zip(layers, plan.layers)):
            a, m, s = layer.self_attn, layer.mlp, layer_shape(layer)
            q_keep = _head_channels(p.heads, s.head_dim)
            kv_keep = _head_channels(p.kv_heads, s.head_dim)
            if bias_compensation:
                _compensate(a.o_proj, _removed(q_keep, s.heads * s.head_dim), calibration.attn[i].mean)
                _compensate(m.down_proj, _removed(p.channels, s.channels), calibration.mlp[i].mean)
            if len(p.heads) < s.heads:
                a.q_proj, a.o_proj = sliced_linear(a.q_proj, q_keep, 0), sliced_linear(a.o_proj, q_keep, 1)
            if len(p.kv_heads) < s.kv_heads:
                a.k_proj, a.v_proj = sliced_linear(a.k_proj, kv_keep, 0), sliced_linear(a.v_proj, kv_keep, 0)
            if len(p.channels) < s.channels:
                m.gate_proj, m.up_proj = sliced_linear(m.gate_proj, p.channels, 0), sliced_linear(m.up_proj, p.channels, 0)
                m.down_proj = sliced_linear(m.down_proj, p.channels, 1)
            set_layer_sizes(layer, len(p.heads), len(p.kv_heads))
        if plan.drop_layers:
            base = target.model
            base.layers = nn.ModuleList([layer for i, layer in enumerate(base.layers) if i not in plan.drop_layers])
            types = getattr(target.config, "layer_types", None)
            if isinstance(types, list) and len(types) == len(plan.layers):
                target.config.layer_types = [t for i, t in enumerate(types) if i not in plan.drop_layers]
    update_config(target, head_dim)
    return target


# --------------------------------------------------------------------------- LoRA recovery


def lora_recover(model: nn.Module, ids: torch.Tensor, *, steps: int = 20, lr: float = 2e-4, rank: int = 8,
                 alpha: int = 16, batch_size: int = 4, seed: int = 0, losses: list | None = None,
                 progress: bool = False) -> nn.Module:
    """LLM-Pruner's recovery, short: LoRA adapters (``peft``) on every projection, ``steps`` AdamW
    steps of next-token loss on calibration windows ``ids`` (drawn at random with ``seed``, which also
    seeds the adapters), then merged into the weights. ``losses``, if given, receives each step's
    training loss. Modifies and returns ``model`` (an ordinary model again, same shapes; added biases
    untouched)."""
    ids = _check_ids(ids)
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    device = next(model.parameters()).device
    peft_model = add_adapters(model, rank=rank, alpha=alpha, targets=PROJECTIONS, seed=seed)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    peft_model.train()
    for _ in tqdm(range(steps), desc="LoRA", disable=not progress, leave=False):
        batch = ids[torch.randint(0, len(ids), (batch_size,), generator=g)].to(device)
        loss = next_token_loss(peft_model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(loss.item())
    merged = merge_adapters(peft_model)
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged.eval()


def _lora_run(model: nn.Module, train_ids: torch.Tensor, eval_ids: torch.Tensor, seed: int, hp: dict,
              sample: list[int] | None, pad_token_id: int | None) -> dict:
    """One LoRA recovery of a copy of ``model`` with ``seed``: its training losses, held-out perplexity, and the
    greedy continuation of ``sample`` (token ids) when given."""
    t0 = time.perf_counter()
    losses = []
    tuned = lora_recover(copy.deepcopy(model), train_ids, steps=hp["steps"], lr=hp["lr"], rank=hp["rank"],
                         alpha=hp["alpha"], batch_size=hp["batch_size"], seed=seed, losses=losses)
    out = {"seed": seed, "train_losses": losses,
           "perplexity": perplexity(tuned, eval_ids, seq_len=hp["eval_seq_len"], batch_size=hp["eval_batch_size"])}
    if sample is not None:
        ids = torch.tensor([sample], device=next(tuned.parameters()).device)
        with torch.inference_mode():
            gen = tuned.generate(ids, max_new_tokens=hp["sample_tokens"], do_sample=False, pad_token_id=pad_token_id)
        out["sample"] = gen[0, len(sample):].tolist()
    out.update(seconds=time.perf_counter() - t0, threads=torch.get_num_threads(), computed=time.strftime("%Y-%m-%d"))
    return out


def lora_runs(models: dict[str, nn.Module], train_ids: torch.Tensor, eval_ids: torch.Tensor, *, seeds=(0, 1, 2),
              steps: int = 12, lr: float = 2e-3, rank: int = 8, alpha: int = 16, batch_size: int = 4,
              eval_seq_len: int = 128, eval_batch_size: int = 8, sample: list[int] | None = None,
              sample_tokens: int = 24, pad_token_id: int | None = None, root=None, progress: bool = True) -> dict:
    """``lora_recover`` of each model in ``models`` (name -> model) with each seed in ``seeds`` (its adapters and
    batches; the same seed draws the same batches for every model), each run's held-out perplexity on ``eval_ids``
    (windows of ``eval_seq_len``), training losses and, when ``sample`` (prompt token ids) is given, its greedy
    continuation of ``sample_tokens`` tokens. Returns ``{name: [run per seed]}``, each run a dict with ``seed``,
    ``perplexity``, ``train_losses``, ``seconds``, ``computed`` (date) and ``sample``.

    Trained once: each run is cached (``runs.RunFolder`` of kind ``lora_recovery``, named by the hash of the token ids,
    the hyperparameters, the library versions and the source of the code that trains and evaluates), keyed by the
    fingerprint of the model's weights and the seed, and written as soon as it is done (an interrupted call resumes).
    A fresh clone reads the repository's seed of the classroom runs (``assets/lora_recovery/``); to train them
    again, set ``PRUNING_LAB_SEEDS=none`` and delete the cache folder (``lora_folder(...)`` names it)."""
    if not models:
        raise ValueError("models is empty: give {name: model} for each model to recover.")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: give one or more distinct LoRA seeds.")
    train_ids, eval_ids = _check_ids(train_ids), _check_ids(eval_ids.reshape(1, -1))
    if eval_ids.shape[1] < eval_seq_len:
        raise ValueError(f"eval_ids holds {eval_ids.shape[1]} tokens, fewer than one window of eval_seq_len="
                         f"{eval_seq_len}: give more held-out tokens or a shorter window.")
    if steps < 1 or rank < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"steps={steps}, rank={rank}, lr={lr}, batch_size={batch_size}: each must be positive.")
    folder = lora_folder(train_ids, eval_ids, steps=steps, lr=lr, rank=rank, alpha=alpha, batch_size=batch_size,
                         eval_seq_len=eval_seq_len, eval_batch_size=eval_batch_size, sample_tokens=sample_tokens,
                         root=root)
    hp = folder.spec["hparams"]
    out = {}
    todo = [(name, m, s) for name, m in models.items() for s in seeds]
    fps = {name: runs.fingerprint(m) for name, m in models.items()}
    for name, m, s in tqdm(todo, desc="LoRA runs (cached)", disable=not progress):
        key = {"model": fps[name], "seed": s, "sample": sample}
        out.setdefault(name, []).append(folder.cached(
            "run", key, lambda: _lora_run(m, train_ids, eval_ids.flatten(), s, hp, sample, pad_token_id)))
    return out


def lora_folder(train_ids: torch.Tensor, eval_ids: torch.Tensor, *, root=None, **hparams) -> "runs.RunFolder":
    """The cache folder of ``lora_runs`` with these token ids and hyperparameters (see there)."""
    import peft
    import transformers

    spec = {"train_ids": runs.fingerprint(train_ids), "eval_ids": runs.fingerprint(eval_ids.flatten()),
            "hparams": hparams, "code": _lora_code(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}
    return runs.RunFolder(root, kind="lora_recovery", spec=spec, progress=False)


# everything a cached LoRA recovery runs: a change to the source of any of these names other runs (trains again)
_LORA_CODE = (lora_recover, _lora_run, _check_ids, add_adapters, merge_adapters, next_token_loss, perplexity,
              _takes_logits_to_keep)


def _lora_code() -> str:
    import inspect

    return runs.digest([inspect.getsource(f) for f in _LORA_CODE])


# --------------------------------------------------------------------------- one call


def structured_prune(model: nn.Module, ratio: float, metric="flap", *, calibration: Calibration | None = None,
                     layers=None, structure: str = "heads+mlp", allocation: str = "adaptive", head_mode: str = "query",
                     standardize: str = "units", bias_compensation: bool | None = None, min_keep: float = 0.05,
                     clip_quantile: float = 1.0, inplace: bool = False) -> tuple[nn.Module, StructuredPlan]:
    """Plan and prune in one call; returns ``(pruned_model, plan)``. ``layers`` is the range of decoder
    layers that may be pruned (default: the metric's paper recipe, see ``layer_range``).
    ``structure="layers"`` removes whole layers by block influence. ``bias_compensation`` defaults to on
    for FLAP, off otherwise. The model is copied unless ``inplace=True``; bad input raises before
    anything changes."""
    if structure == "layers":
        plan = plan_layer_removal(model, calibration, ratio)
        return prune_model(model, plan, inplace=inplace), plan
    metric = get_metric(metric)
    if bias_compensation is None:
        bias_compensation = metric.name == "flap"
    plan = plan_structured(model, calibration, ratio, metric, layers=layers, structure=structure,
                           allocation=allocation, head_mode=head_mode, standardize=standardize, min_keep=min_keep,
                           clip_quantile=clip_quantile)
    plan.info["bias_compensation"] = bias_compensation
    return prune_model(model, plan, calibration=calibration, bias_compensation=bias_compensation,
                       inplace=inplace), plan
