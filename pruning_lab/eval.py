"""Measuring tools every chapter uses: accuracy, perplexity, next-token loss, tokens/s, bytes.

Everything here that only measures runs under ``torch.inference_mode`` and restores the model's
train/eval mode. Comparisons of two methods use the workbook's one noise test, ``pruning_lab.stats``
(re-exported here as ``paired``, ``paired_text``, ``mean_std``): a paired two-sided Student t test at
the 5% level (``stats.LEVEL``) on per-seed or per-item differences — "A better" / "B better" only when
the 95% confidence interval of the mean difference excludes 0 — an exact McNemar test for yes/no
outcomes, and no verdict at all below 3 pairs.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

# the one noise test lives in stats; its names are re-exported here for the notebooks that import them
from .data import tokenize
from .stats import LEVEL, NOISE_TEST, mean_std, paired, paired_binary, paired_text  # noqa: F401


@contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- classifiers


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 5000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classifier on ``(x, y)``."""
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    return loss_sum / len(x), correct / len(x)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 5000) -> float:
    """Top-1 accuracy in [0, 1]."""
    return evaluate(model, x, y, batch_size)[1]


# --------------------------------------------------------------------------- language models


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens ≤ t over a batch of windows ``ids``
    (n, seq_len), logits in float32; differentiable (call it under ``inference_mode`` to only measure)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` can compute the output layer at chosen positions only (transformers' LMs)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def perplexity(model: nn.Module, ids: torch.Tensor | str, tokenizer=None, *, seq_len: int = 512,
               stride: int | None = None, batch_size: int = 4, max_tokens: int | None = None,
               progress: bool = False) -> float:
    """Perplexity of a causal LM on held-out tokens with a sliding window.

    ``ids`` is a 1-D tensor of token ids (or text, with ``tokenizer``). Windows of ``seq_len``
    tokens start every ``stride`` tokens (default: ``seq_len``, i.e. disjoint windows); in each
    window after the first only the last ``stride`` tokens are scored, so every scored token is
    scored once with at least ``seq_len - stride`` tokens of context. Tokens past the last full
    window are dropped. Returns ``exp(mean negative log-likelihood)``.
    """
    if isinstance(ids, str):
        if tokenizer is None:
            raise ValueError("perplexity() got text: pass tokenizer= too, or token ids.")
        ids = tokenize(tokenizer, ids, max_tokens)
    ids = ids[:max_tokens] if max_tokens else ids
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must be in (0, seq_len={seq_len}].")
    if ids.ndim != 1 or len(ids) < seq_len:
        raise ValueError(f"Need a 1-D sequence of at least seq_len={seq_len} tokens, got shape {tuple(ids.shape)}.")
    windows = ids.unfold(0, seq_len, stride)  # (W, seq_len), a view
    # Position j of a window predicts token j+1; score it in the first window, or when it is new.
    scored = torch.arange(1, seq_len) >= seq_len - stride
    device = next(model.parameters()).device
    # the output layer at the positions that predict a token only: contiguous logits, so the log-softmax runs
    # along memory (over a strided vocabulary axis, float32 sums drifted by ~1e-4 nats per token on SmolLM2)
    keep = {"logits_to_keep": torch.arange(seq_len - 1, device=device)} if _takes_logits_to_keep(model) else {}
    nll, count = 0.0, 0
    with eval_mode(model):
        for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = windows[i:i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False, **keep).logits
            logits = logits if keep else logits[:, :-1]
            targets = batch[:, 1:]
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="none").view(targets.shape)
            mask = scored.to(device).expand_as(losses).clone()
            if i == 0:
                mask[0] = True
            nll += losses[mask].double().sum().item()
            count += int(mask.sum())
    return float(torch.tensor(nll / count).exp())


def tokens_per_second(model: nn.Module, *, prompt_len: int = 256, new_tokens: int = 32, batch_size: int = 1,
                      repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Prefill and greedy-decode throughput on random token ids, best of ``repeats`` runs.

    Prefill: one forward over ``batch_size x prompt_len`` tokens that computes the output layer at the last
    position only (``logits_to_keep=1``), as ``generate`` does: the output layer over every prompt position
    would cost a fifth of a 135M model's prefill and not shrink with pruning. Decode: ``new_tokens``
    single-token steps with the KV cache. Report ratios between models measured in the same process, not the
    absolute numbers, which depend on the machine.
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).to(device)
    last_only = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    prefill, decode = float("inf"), float("inf")
    with eval_mode(model):
        model(input_ids=prompt[:, :8], **last_only)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True, **last_only)
            t1 = time.perf_counter()
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t3 = time.perf_counter()
            prefill, decode = min(prefill, t1 - t0), min(decode, t3 - t2)
    return {"prefill_tokens_per_s": batch_size * prompt_len / prefill,
            "decode_tokens_per_s": batch_size * new_tokens / decode}


@dataclass
class LMComparison:
    """Perplexity and speed of smaller variants of one dense causal LM, as ratios to it.

    ``measure(model)`` gives the parameters, the held-out perplexity and the prefill/decode tokens/s
    of ``model`` with their ratios to ``dense``. Speed depends only on the weights' shapes, so it is
    measured once per distinct set of shapes, each time right after timing ``dense`` again: a ratio
    always compares two runs taken under the same machine load. ``record(model, **info)`` measures
    and keeps the row, with ``info`` (what the model is), in ``rows``.
    """

    dense: nn.Module
    held_ids: torch.Tensor
    seq_len: int = 128
    batch_size: int = 8
    prompt_len: int = 128
    new_tokens: int = 16
    repeats: int = 2
    seed: int = 0
    rows: list = field(default_factory=list, repr=False)
    _speeds: dict = field(default_factory=dict, repr=False)

    def perplexity(self, model: nn.Module) -> float:
        return perplexity(model, self.held_ids, seq_len=self.seq_len, batch_size=self.batch_size)

    def speed(self, model: nn.Module) -> dict[str, float]:
        return tokens_per_second(model, prompt_len=self.prompt_len, new_tokens=self.new_tokens,
                                 repeats=self.repeats, seed=self.seed)

    def measure(self, model: nn.Module) -> dict[str, float]:
        key = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
        if key not in self._speeds:
            d, s = self.speed(self.dense), self.speed(model)
            self._speeds[key] = dict(s, prefill_speedup=s["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
                                     decode_speedup=s["decode_tokens_per_s"] / d["decode_tokens_per_s"])
        return dict(params=count_parameters(model), perplexity=self.perplexity(model), **self._speeds[key])

    def record(self, model: nn.Module, *, speed: bool = True, **info) -> dict:
        """Measure ``model`` (``measure``; with ``speed=False`` only its parameters and perplexity) and append
        ``info`` + the measurements to ``rows``; returns that row."""
        row = self.measure(model) if speed else dict(params=count_parameters(model), perplexity=self.perplexity(model))
        self.rows.append(dict(info, **row))
        return self.rows[-1]


# --------------------------------------------------------------------------- sizes


def _unique_tensors(tensors):
    seen, out = set(), []
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def count_parameters(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters (tied weights counted once); ``nonzero=True`` counts only non-zeros."""
    params = _unique_tensors(p.detach() for p in model.parameters())
    return int(sum(int((p != 0).sum()) if nonzero else p.numel() for p in params))


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (tied weights counted once)."""
    tensors = _unique_tensors([p.detach() for p in model.parameters()] + list(model.buffers()))
    return int(sum(t.numel() * t.element_size() for t in tensors))


def cache_bytes(past_key_values) -> int:
    """Bytes held by a KV cache: a transformers ``Cache`` (its layers' keys/values) or nested tuples."""
    if past_key_values is None:
        return 0
    if isinstance(past_key_values, torch.Tensor):
        return past_key_values.numel() * past_key_values.element_size()
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:
        return sum(cache_bytes(getattr(layer, name, None)) for layer in layers for name in ("keys", "values"))
    if isinstance(past_key_values, (list, tuple)):
        return sum(cache_bytes(x) for x in past_key_values)
    raise TypeError(f"Cannot measure a cache of type {type(past_key_values).__name__}.")

