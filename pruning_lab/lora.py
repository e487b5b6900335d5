"""LoRA adapters: the one place the workbook adds and merges them (``peft``).

Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". A frozen weight ``W`` gets a
trainable low-rank update ``(alpha / r) · B A`` (``A`` random, ``B`` zero at the start, so training starts from
the model itself); after training the update is merged into ``W`` and the model is an ordinary one again.

Chapter 3 recovers a pruned model with it (``structured.lora_recover``, LLM-Pruner's recipe), chapter 5 trains the
small reasoner and its students with it (``reasoner.sft``). Both go through ``add_adapters`` / ``merge_adapters``::

    wrapped = add_adapters(model, rank=8, alpha=16, targets=llama.PROJECTIONS, seed=0)
    ...                                         # train wrapped's adapters (the only trainable weights)
    model = merge_adapters(wrapped)             # same shapes as before, adapters folded into the weights
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

def add_adapters(model: nn.Module, *, rank: int, alpha: int, targets, seed: int = 0) -> nn.Module:
    """``model`` wrapped with LoRA adapters of ``rank`` on the modules named ``targets`` (e.g. ``llama.PROJECTIONS``:
    every projection of a decoder layer; dropout 0, no bias
    training); only the adapters are trainable. Their random initialisation is drawn from ``seed`` without
    touching torch's global generator."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: a LoRA rank is a positive integer (8 is LLM-Pruner's).")
    from peft import LoraConfig, get_peft_model  # peft is imported only by the chapters that train adapters

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers 5 asks peft
        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                                target_modules=list(targets)))


def merge_adapters(wrapped: nn.Module) -> nn.Module:
    """The model of ``add_adapters`` with its trained adapters merged into the weights: an ordinary model again,
    same shapes (``peft``'s ``merge_and_unload``)."""
    return wrapped.merge_and_unload()
