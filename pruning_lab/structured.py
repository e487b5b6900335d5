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
    small = prune_model(model, plan, calibration=cal, bias_compensation=True)   # a sliced copy
    save_pruned(small, "folder"); again = load_pruned("folder")                 # safetensors + JSON

``ratio`` is always the fraction of the model's *total* parameters (embeddings included, tied
weights once) to remove, taken from attention and MLP only; LLM-Pruner and FLAP count it that way.
Calibration keeps running sums per input channel of ``o_proj`` and ``down_proj`` (count, Σx, Σx²),
never the activations themselves.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._io import read_json, write_json
from .magnitude import Masks

STRUCTURES = ("heads+mlp", "mlp", "heads")
ALLOCATIONS = ("uniform", "adaptive")
HEAD_MODES = ("query", "group")
STANDARDIZE = ("units", "channels")
STRUCTURE_FILE = "pruning_lab_structure.json"
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------- the architecture


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a Llama/Mistral/Qwen2-style causal LM, checked; else a clear error."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} is not a supported causal LM: structured pruning needs "
                         "model.model.layers (a ModuleList of decoder layers), as in Llama, Mistral or Qwen2.")
    need = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    for i, layer in enumerate(layers):
        missing = [n for n in need if not isinstance(layer.get_submodule(n) if _has(layer, n) else None, nn.Linear)]
        attn = getattr(layer, "self_attn", None)
        for a in ("head_dim", "num_key_value_groups"):
            if attn is not None and not hasattr(attn, a):
                missing.append(f"self_attn.{a}")
        if missing:
            raise ValueError(f"{type(model).__name__} layer {i} lacks {', '.join(missing)} (nn.Linear projections "
                             "and GQA attributes of a Llama-style layer): this attention layout is not supported.")
        hd = attn.head_dim
        if attn.q_proj.out_features % hd or attn.k_proj.out_features % hd or \
                (attn.q_proj.out_features // hd) % (attn.k_proj.out_features // hd):
            raise ValueError(f"Layer {i}: q_proj/k_proj sizes {attn.q_proj.out_features}/{attn.k_proj.out_features} "
                             f"are not whole heads of head_dim {hd} in equal GQA groups: layout not supported.")
    return layers


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer."""

    heads: int
    kv_heads: int
    head_dim: int
    channels: int
    hidden: int

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads


def layer_shape(layer: nn.Module) -> LayerShape:
    a, m = layer.self_attn, layer.mlp
    hd = a.head_dim
    return LayerShape(a.q_proj.out_features // hd, a.k_proj.out_features // hd, hd, m.gate_proj.out_features,
                      a.o_proj.out_features)


def _params_of(*linears: nn.Linear) -> int:
    return sum(lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0) for lin in linears)


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
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
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

    ``taylor=True`` adds LLM-Pruner's first-order scores, which need one more pass with gradients
    (see ``taylor_scores``). The model is not changed.
    """
    decoder_layers(model)
    ids = _check_ids(ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with statistic_hooks(model) as cal, torch.inference_mode():
            for i in tqdm(range(0, len(ids), batch_size), desc="calibration", disable=not progress, leave=False):
                _base(model)(input_ids=ids[i:i + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    cal.n_tokens, cal.seq_len = ids.numel(), ids.shape[1]
    if taylor:
        cal.taylor = taylor_scores(model, ids, batch_size=batch_size, progress=progress)
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
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            (loss * (len(batch) / len(ids))).backward()  # = the mean loss over all windows
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


@dataclass(frozen=True)
class MagnitudeSP:
    """Magnitude-sp: Σ|w| over every weight of the coupled structure (no calibration needed)."""

    name: str = "magnitude"
    needs_calibration: bool = False

    def score(self, layer: nn.Module, i: int, cal: Calibration | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return _coupled_sums(layer, lambda w: w.detach().abs())


@dataclass(frozen=True)
class WandaSP:
    """Wanda-sp (as FLAP evaluates it): Σ_i |W_ij| · ‖X_j‖₂ over the output projection's column j
    (o_proj for heads, down_proj for MLP channels)."""

    name: str = "wanda-sp"
    needs_calibration: bool = True

    def score(self, layer: nn.Module, i: int, cal: Calibration) -> dict[str, torch.Tensor]:
        a, m = layer.self_attn, layer.mlp
        return {"attn": a.o_proj.weight.detach().abs().sum(0).double() * cal.attn[i].norm,
                "kv": torch.zeros(a.k_proj.out_features, dtype=torch.float64, device=a.k_proj.weight.device),
                "mlp": m.down_proj.weight.detach().abs().sum(0).double() * cal.mlp[i].norm}


@dataclass(frozen=True)
class Taylor:
    """LLM-Pruner, first order: Σ |w · ∂L/∂w| over the coupled structure (needs gradients)."""

    name: str = "taylor"
    needs_calibration: bool = True

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


METRICS = {"magnitude": MagnitudeSP(), "wanda-sp": WandaSP(), "taylor": Taylor(), "flap": Fluctuation()}


def get_metric(metric) -> MagnitudeSP | WandaSP | Taylor | Fluctuation | TorchPruningMagnitude:
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


def _head_unit_cost(layer: nn.Module, s: LayerShape, mode: str) -> int:
    a = layer.self_attn
    per_q = s.head_dim * (a.q_proj.in_features + a.o_proj.out_features) + (s.head_dim if a.q_proj.bias is not None else 0)
    per_kv = s.head_dim * (a.k_proj.in_features + a.v_proj.in_features) + \
        (s.head_dim * 2 if a.k_proj.bias is not None else 0)
    return per_q * s.kv_heads if mode == "query" else per_q * s.n_rep + per_kv


def _channel_cost(layer: nn.Module) -> int:
    m = layer.mlp
    return m.gate_proj.in_features * 3 + (2 if m.gate_proj.bias is not None else 0)


def _check_ratio(ratio) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio!r} must be a fraction of the parameters in [0, 1): 0.2 removes 20%.")


def plan_structured(model: nn.Module, calibration: Calibration | None, ratio: float, metric="flap", *,
                    structure: str = "heads+mlp", allocation: str = "adaptive", head_mode: str = "query",
                    standardize: str = "units", min_keep: float = 0.05) -> StructuredPlan:
    """Choose the heads and MLP channels to remove so that ``ratio`` of the model's parameters go.

    ``allocation="uniform"``: every layer loses the same share (head units rounded, the rest of the
    budget taken from MLP channels equally). ``"adaptive"`` (FLAP): scores are standardised within
    each layer and module (z = (s − mean) / std), pooled over all layers, and the least important
    units are removed, cheapest-score first, until the parameter budget is spent. ``min_keep`` is
    the fraction of every layer's head units and channels that always stays (at least one).

    ``standardize`` (adaptive only) sets the population a head unit's z-score is taken over:
    ``"units"`` — the layer's removable head units (with GQA and ``head_mode="query"`` only 3,
    so the weakest unit's z lies in [-1.15, -0.58] whatever its real importance); ``"channels"`` —
    FLAP's released code: the attention score of every ``o_proj`` input channel is squared,
    standardised over the layer's channels, and a head's z is the mean over its ``head_dim``
    channels (a unit's z: the mean over its heads). MLP channels are standardised over the layer's
    channels either way.
    """
    _check_ratio(ratio)
    if structure not in STRUCTURES:
        raise ValueError(f"Unknown structure {structure!r}: choose one of {STRUCTURES} (or use plan_layer_removal).")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"Unknown allocation {allocation!r}: choose one of {ALLOCATIONS}.")
    if head_mode not in HEAD_MODES:
        raise ValueError(f"Unknown head_mode {head_mode!r}: choose one of {HEAD_MODES}.")
    if standardize not in STANDARDIZE:
        raise ValueError(f"Unknown standardize {standardize!r}: choose one of {STANDARDIZE}.")
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep={min_keep!r} must be a fraction in [0, 1).")
    metric = get_metric(metric)
    layers = decoder_layers(model)
    if metric.needs_calibration and calibration is None:
        raise ValueError(f"The {metric.name!r} metric needs calibration statistics: pass calibrate(model, ids).")
    if calibration is not None and len(calibration.mlp) != len(layers):
        raise ValueError(f"The calibration has {len(calibration.mlp)} layers, the model {len(layers)}: "
                         "calibrate this model again.")
    from .eval import count_parameters

    budget = ratio * count_parameters(model)
    use_heads, use_mlp = structure in ("heads+mlp", "heads"), structure in ("heads+mlp", "mlp")
    units = []  # per layer: dict(head=(scores, qsets, kvsets, cost), mlp=(scores, order, cost))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            s = layer_shape(layer)
            sc = metric.score(layer, i, calibration)
            head_scores = sc["attn"].cpu().view(s.heads, s.head_dim).sum(1)
            kv_scores = sc["kv"].cpu().view(s.kv_heads, s.head_dim).sum(1)
            if allocation == "adaptive" and standardize == "channels":
                ch = sc["attn"].cpu().pow(2)
                z_ch = (ch - ch.mean()) / (ch.std() if ch.std() > 0 else 1.0)
                head_z = z_ch.view(s.heads, s.head_dim).mean(1)
                hs, qsets, kvsets = _head_units(s, head_z, torch.zeros_like(kv_scores), head_mode)
                hs = hs / len(qsets[0])  # a unit's z: the mean of its heads' z
            else:
                hs, qsets, kvsets = _head_units(s, head_scores, kv_scores, head_mode)
            ms = sc["mlp"].cpu()
            morder = ms.argsort(stable=True)
            units.append({"shape": s, "head": (hs, qsets, kvsets, _head_unit_cost(layer, s, head_mode)),
                          "mlp": (ms[morder], morder, _channel_cost(layer))})
    n_layers = len(layers)

    def floor(n):
        return max(1, math.ceil(min_keep * n))

    remove_h = [0] * n_layers
    remove_c = [0] * n_layers
    if allocation == "uniform":
        head_total = sum(len(u["head"][1]) * u["head"][3] for u in units) if use_heads else 0
        mlp_total = sum(len(u["mlp"][1]) * u["mlp"][2] for u in units) if use_mlp else 0
        if budget > head_total + mlp_total:
            raise ValueError(f"ratio={ratio} asks to remove {budget:,.0f} parameters but the {structure} of all layers "
                             f"hold only {head_total + mlp_total:,}: lower the ratio or prune more structures.")
        frac = budget / max(head_total + mlp_total, 1)
        left = budget
        for i, u in enumerate(units):
            n_units = len(u["head"][1])
            if use_heads:
                k = round(frac * n_units) if use_mlp else round(budget / (n_layers * u["head"][3]))
                if k > n_units - floor(n_units):
                    what = "every head" if k >= n_units else f"{k} of the {n_units} head units"
                    raise ValueError(f"ratio={ratio} would remove {what} of layer {i} "
                                     f"(head_mode={head_mode!r}), leaving fewer than {floor(n_units)}: lower the "
                                     "ratio, prune the MLP too, or use allocation='adaptive'.")
                remove_h[i] = k
                left -= k * u["head"][3]
        if use_mlp:
            per_layer = max(left, 0) / n_layers
            for i, u in enumerate(units):
                n = len(u["mlp"][1])
                k = round(per_layer / u["mlp"][2])
                if k > n - floor(n):
                    raise ValueError(f"ratio={ratio} would remove {k} of the {n} MLP channels of layer {i}, "
                                     f"keeping fewer than min_keep={min_keep}: lower the ratio.")
                remove_c[i] = k
    else:
        z, cost, owner = [], [], []  # pooled standardised scores of every removable unit
        for i, u in enumerate(units):
            for kind, scores, c, n in (("head", u["head"][0], u["head"][3], len(u["head"][1])),
                                       ("mlp", u["mlp"][0], u["mlp"][2], len(u["mlp"][1]))):
                if (kind == "head" and not use_heads) or (kind == "mlp" and not use_mlp):
                    continue
                if kind == "head" and standardize == "channels":
                    zz = scores  # already z-scores of the layer's attention channels
                else:
                    std = scores.std() if n > 1 else torch.tensor(1.0, dtype=scores.dtype)
                    zz = (scores - scores.mean()) / (std if std > 0 else 1.0)
                removable = n - floor(n)   # the most important `floor` units are protected
                z.append(zz[:removable])
                cost.append(torch.full((removable,), float(c), dtype=torch.float64))
                owner += [(i, kind)] * removable
        z, cost = torch.cat(z), torch.cat(cost)
        if budget > cost.sum():
            raise ValueError(f"ratio={ratio} asks to remove {budget:,.0f} parameters but at most {cost.sum():,.0f} can "
                             f"go with min_keep={min_keep}: lower the ratio or min_keep.")
        order = z.argsort(stable=True)
        # the first units whose cumulated cost reaches the budget (overshoot < one unit)
        n_take = int(torch.searchsorted(cost[order].cumsum(0), torch.tensor(budget, dtype=torch.float64))) + 1 \
            if budget > 0 else 0
        for j in order[:n_take].tolist():
            i, kind = owner[j]
            if kind == "head":
                remove_h[i] += 1
            else:
                remove_c[i] += 1
    plans = []
    for i, u in enumerate(units):
        s = u["shape"]
        _, qsets, kvsets, _ = u["head"]
        kept_q = torch.cat(qsets[remove_h[i]:]).sort().values if remove_h[i] else torch.arange(s.heads)
        gone_kv = torch.cat(kvsets[:remove_h[i]]) if remove_h[i] and head_mode == "group" else torch.empty(0, dtype=torch.long)
        kept_kv = torch.tensor([g for g in range(s.kv_heads) if g not in set(gone_kv.tolist())], dtype=torch.long)
        kept_c = u["mlp"][1][remove_c[i]:].sort().values
        plans.append(LayerPlan(kept_q, kept_kv, kept_c))
    return StructuredPlan(plans, info={"metric": metric.name, "ratio": ratio, "structure": structure,
                                       "allocation": allocation, "head_mode": head_mode,
                                       "standardize": standardize, "min_keep": min_keep})


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
        from .eval import count_parameters

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


@contextmanager
def masked(model: nn.Module, masks: Masks) -> Iterator[nn.Module]:
    """Zero the masked weights of ``model`` in place for the ``with`` block, restoring them in
    ``finally`` (only the masked tensors are copied): a plan's effect without a pruned copy."""
    from .magnitude import _check_masks

    params = _check_masks(model, masks)
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.mul_(masks[n].to(p.device, p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


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
    """Held-out perplexity when only layer ``i`` follows ``plan`` (its removed heads and channels
    zeroed, every other layer dense), for each layer ``i``: which layers' removals do the damage.
    The model is restored after each layer."""
    from .eval import perplexity

    layers = _check_plan(model, plan)
    full = full_plan(model)
    out = []
    for i in tqdm(range(len(layers)), desc="one layer at a time", disable=not progress, leave=False):
        one = StructuredPlan([plan.layers[j] if j == i else full.layers[j] for j in range(len(layers))])
        masks = {n: m for n, m in plan_masks(model, one).items() if not bool(m.all())}  # layer i's only
        with masked(model, masks):
            out.append(perplexity(model, ids, seq_len=seq_len, batch_size=batch_size))
    return out


# --------------------------------------------------------------------------- physical shrinking


def _sliced(lin: nn.Linear, idx: torch.Tensor, axis: int) -> nn.Linear:
    """A new Linear holding only rows (axis 0) or columns (axis 1) ``idx`` of ``lin``."""
    w = lin.weight.detach()
    idx = idx.to(w.device)
    out_f, in_f = (len(idx), lin.in_features) if axis == 0 else (lin.out_features, len(idx))
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device="meta")
    new.weight = nn.Parameter(w.index_select(axis, idx).contiguous(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias.detach()
        new.bias = nn.Parameter((b.index_select(0, idx) if axis == 0 else b.clone()).contiguous(),
                                requires_grad=lin.bias.requires_grad)
    return new


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


def _set_layer_sizes(layer: nn.Module, heads: int, kv_heads: int) -> None:
    a = layer.self_attn
    a.num_key_value_groups = heads // kv_heads
    for name, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(a, name):
            setattr(a, name, value)
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features


def structure_of(model: nn.Module) -> dict:
    """Per-layer sizes (and which added biases exist): what ``load_pruned`` needs to rebuild it."""
    out = []
    for layer in decoder_layers(model):
        s = layer_shape(layer)
        out.append({"num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
                    "intermediate_size": s.channels,
                    "o_proj_bias": layer.self_attn.o_proj.bias is not None,
                    "down_proj_bias": layer.mlp.down_proj.bias is not None})
    return {"format": "pruning_lab.structured/1", "layers": out}


def _update_config(model: nn.Module, head_dim: int) -> None:
    """Global config fields: layer count, and the largest per-layer sizes (the per-layer truth is
    ``structure_of(model)``, saved beside config.json)."""
    layers = decoder_layers(model)
    cfg = model.config
    shapes = [layer_shape(layer) for layer in layers]
    cfg.head_dim = head_dim  # keep it explicit: the default hidden // heads would change with the heads
    cfg.num_attention_heads = max(s.heads for s in shapes)
    cfg.num_key_value_heads = max(s.kv_heads for s in shapes)
    cfg.intermediate_size = max(s.channels for s in shapes)
    cfg.num_hidden_layers = len(layers)
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i


def prune_model(model: nn.Module, plan: StructuredPlan, *, calibration: Calibration | None = None,
                bias_compensation: bool = False, inplace: bool = False) -> nn.Module:
    """Slice the weights the plan removes and return a smaller, ordinary model.

    Everything is checked first; on bad input nothing changes. With ``inplace=False`` (default) the
    model is deep-copied once and the copy is sliced (peak memory ≈ 2× the model); ``inplace=True``
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
    target = model if inplace else copy.deepcopy(model)
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
                a.q_proj, a.o_proj = _sliced(a.q_proj, q_keep, 0), _sliced(a.o_proj, q_keep, 1)
            if len(p.kv_heads) < s.kv_heads:
                a.k_proj, a.v_proj = _sliced(a.k_proj, kv_keep, 0), _sliced(a.v_proj, kv_keep, 0)
            if len(p.channels) < s.channels:
                m.gate_proj, m.up_proj = _sliced(m.gate_proj, p.channels, 0), _sliced(m.up_proj, p.channels, 0)
                m.down_proj = _sliced(m.down_proj, p.channels, 1)
            _set_layer_sizes(layer, len(p.heads), len(p.kv_heads))
        if plan.drop_layers:
            base = target.model
            base.layers = nn.ModuleList([layer for i, layer in enumerate(base.layers) if i not in plan.drop_layers])
            types = getattr(target.config, "layer_types", None)
            if isinstance(types, list) and len(types) == len(plan.layers):
                target.config.layer_types = [t for i, t in enumerate(types) if i not in plan.drop_layers]
    _update_config(target, head_dim)
    return target


# --------------------------------------------------------------------------- save / reload


def save_pruned(model: nn.Module, folder, tokenizer=None) -> Path:
    """Write ``config.json``, ``pruning_lab_structure.json`` (per-layer sizes) and
    ``model.safetensors`` (tied weights stored once) — no pickle."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    structure = structure_of(model)
    structure["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_FILE))
    write_json(folder / STRUCTURE_FILE, structure)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_pruned(folder, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by ``save_pruned``: the architecture from config.json
    (``from_config``, no remote code), every layer resized to its saved sizes (with the biases bias
    compensation added), then the safetensors weights loaded strictly. ``device`` defaults to CUDA
    when present, ``dtype`` to the saved one. Returns it in eval mode."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    for name in ("config.json", STRUCTURE_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: is {folder} a folder written by save_pruned()?")
    structure = read_json(folder / STRUCTURE_FILE)
    config = AutoConfig.from_pretrained(folder)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:  # the dtype the weights were saved in
        dtype = getattr(torch, structure.get("dtype", "float32"))
    with torch.device(device):  # build on the target device at once: no second copy of a large model
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_layers(model)
    if len(structure["layers"]) != len(layers):
        raise ValueError(f"{STRUCTURE_FILE} lists {len(structure['layers'])} layers, config.json {len(layers)}.")
    with torch.no_grad():
        for layer, sizes in zip(layers, structure["layers"]):
            a, m = layer.self_attn, layer.mlp
            q = sizes["num_attention_heads"] * sizes["head_dim"]
            kv = sizes["num_key_value_heads"] * sizes["head_dim"]
            c = sizes["intermediate_size"]
            a.q_proj = _sliced(a.q_proj, torch.arange(q), 0)
            a.k_proj, a.v_proj = _sliced(a.k_proj, torch.arange(kv), 0), _sliced(a.v_proj, torch.arange(kv), 0)
            a.o_proj = _sliced(a.o_proj, torch.arange(q), 1)
            m.gate_proj, m.up_proj = _sliced(m.gate_proj, torch.arange(c), 0), _sliced(m.up_proj, torch.arange(c), 0)
            m.down_proj = _sliced(m.down_proj, torch.arange(c), 1)
            for lin, flag in ((a.o_proj, sizes["o_proj_bias"]), (m.down_proj, sizes["down_proj_bias"])):
                if flag and lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device))
            _set_layer_sizes(layer, sizes["num_attention_heads"], sizes["num_key_value_heads"])
    load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
    return model.eval()


# --------------------------------------------------------------------------- LoRA recovery


def lora_recover(model: nn.Module, ids: torch.Tensor, *, steps: int = 20, lr: float = 2e-4, rank: int = 8,
                 alpha: int = 16, batch_size: int = 4, seed: int = 0, progress: bool = False) -> nn.Module:
    """LLM-Pruner's recovery, short: LoRA adapters (``peft``) on every projection, ``steps`` AdamW
    steps of next-token loss on calibration windows ``ids`` (cycled), then merged into the weights.
    Modifies and returns ``model`` (an ordinary model again, same shapes; added biases untouched)."""
    from peft import LoraConfig, get_peft_model

    ids = _check_ids(ids)
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    device = next(model.parameters()).device
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        g = torch.Generator().manual_seed(seed)
        peft_model.train()
        for _ in tqdm(range(steps), desc="LoRA", disable=not progress, leave=False):
            batch = ids[torch.randint(0, len(ids), (batch_size,), generator=g)].to(device)
            logits = peft_model(input_ids=batch, use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged.eval()


# --------------------------------------------------------------------------- one call


def structured_prune(model: nn.Module, ratio: float, metric="flap", *, calibration: Calibration | None = None,
                     structure: str = "heads+mlp", allocation: str = "adaptive", head_mode: str = "query",
                     standardize: str = "units", bias_compensation: bool | None = None, min_keep: float = 0.05,
                     inplace: bool = False) -> tuple[nn.Module, StructuredPlan]:
    """Plan and prune in one call; returns ``(pruned_model, plan)``. ``structure="layers"`` removes
    whole layers by block influence. ``bias_compensation`` defaults to on for FLAP, off otherwise.
    The model is copied unless ``inplace=True``; bad input raises before anything changes."""
    if structure == "layers":
        plan = plan_layer_removal(model, calibration, ratio)
        return prune_model(model, plan, inplace=inplace), plan
    metric = get_metric(metric)
    if bias_compensation is None:
        bias_compensation = metric.name == "flap"
    plan = plan_structured(model, calibration, ratio, metric, structure=structure, allocation=allocation,
                           head_mode=head_mode, standardize=standardize, min_keep=min_keep)
    plan.info["bias_compensation"] = bias_compensation
    return prune_model(model, plan, calibration=calibration, bias_compensation=bias_compensation,
                       inplace=inplace), plan
