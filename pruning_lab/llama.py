"""The Llama decoder layout, read and reshaped: one home for what every structured method needs to know about it.

A Llama/Mistral/Qwen2-style causal LM keeps its decoder layers in ``model.model.layers``; each has
``self_attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; GQA: ``num_key_value_groups`` query heads per KV
head) and ``mlp`` (``gate_proj``, ``up_proj``, ``down_proj``). This module

- reads it: ``decoder_layers`` (checked, with a clear error for other layouts) and ``layer_shape`` (heads, KV
  heads, head size, MLP channels, hidden size of one layer);
- reshapes it: ``sliced_linear`` (a Linear holding only some rows or columns), ``set_layer_sizes`` and
  ``update_config`` (the attributes and config fields that must follow the new sizes), ``structure_of`` (the
  per-layer sizes of a model whose layers differ);
- saves and reloads a model whose layers differ in width: ``save_pruned`` / ``load_pruned`` (config.json, the
  per-layer sizes as JSON, safetensors weights; no pickle, no remote code).

*Which* heads and channels go is ``structured``'s question; this module only knows the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import default_device
from ._io import read_json, write_json

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the nn.Linear modules of ``self_attn``
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")           # and of ``mlp``
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS              # every projection of a decoder layer
STRUCTURE_FILE = "pruning_lab_structure.json"
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------- reading the layout


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a Llama/Mistral/Qwen2-style causal LM, checked; else a clear error."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} is not a supported causal LM: structured pruning needs "
                         "model.model.layers (a ModuleList of decoder layers), as in Llama, Mistral or Qwen2.")
    need = [f"self_attn.{n}" for n in ATTENTION_PROJECTIONS] + [f"mlp.{n}" for n in MLP_PROJECTIONS]
    for i, layer in enumerate(layers):
        missing = [n for n in need if not isinstance(layer.get_submodule(n) if _has(layer, n) else None, nn.Linear)]
        attn = getattr(layer, "self_attn", None)
        for a in ("head_dim", "num_key_value_groups"):
            if attn is not None and not hasattr(attn, a):
                missing.append(f"self_attn.{a}")
        if missing:
            raise ValueError(f"{type(model).__name__} layer {i} lacks {', '.join(missing)} (nn.Linear projections "
                             "and GQA attributes of a Llama-style layer): this attention layout is not supported.")
        hd, q, kv = attn.head_dim, attn.q_proj.out_features, attn.k_proj.out_features
        if q % hd or kv % hd or (q // hd) % (kv // hd):
            raise ValueError(f"Layer {i}: q_proj/k_proj sizes {q}/{kv} "
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


# --------------------------------------------------------------------------- reshaping it


def sliced_linear(lin: nn.Linear, idx: torch.Tensor, axis: int) -> nn.Linear:
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


def set_layer_sizes(layer: nn.Module, heads: int, kv_heads: int) -> None:
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


def update_config(model: nn.Module, head_dim: int) -> None:
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
        device = default_device()
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
            a.q_proj = sliced_linear(a.q_proj, torch.arange(q), 0)
            a.k_proj, a.v_proj = sliced_linear(a.k_proj, torch.arange(kv), 0), sliced_linear(a.v_proj, torch.arange(kv), 0)
            a.o_proj = sliced_linear(a.o_proj, torch.arange(q), 1)
            m.gate_proj, m.up_proj = sliced_linear(m.gate_proj, torch.arange(c), 0), sliced_linear(m.up_proj, torch.arange(c), 0)
            m.down_proj = sliced_linear(m.down_proj, torch.arange(c), 1)
            for lin, flag in ((a.o_proj, sizes["o_proj_bias"]), (m.down_proj, sizes["down_proj_bias"])):
                if flag and lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device))
            set_layer_sizes(layer, sizes["num_attention_heads"], sizes["num_key_value_heads"])
    load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
    return model.eval()
