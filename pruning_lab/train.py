"""A training loop for the small nets that keeps the whole data set as tensors.

No DataLoader and no per-sample Python: each epoch is one seeded ``randperm`` and a slice per
batch. ``after_step`` runs after every optimiser step — the pruning chapters pass a function that
re-applies their masks there, so pruned weights stay exactly zero even under Adam.

Threads. A LeNet step at batch 60 is a few small matmuls. Split over torch's intra-op threads, each ends
in a barrier that waits for the slowest thread, and on a laptop where another process wants a core that
thread is often parked: beside one busy process an epoch took 3.4x to 28x its idle time with 2 threads,
depending on the run, and 1.05x with one (``benchmarks/bench_train_loop.py``). So ``train`` runs its steps
with ``TrainConfig.threads`` intra-op threads (default 1, chosen for these op sizes; ``None`` keeps torch's
count, for bigger nets on idle cores) and restores torch's count on exit. The count changes the trained
weights in their last bits; one thread gives the same weights whatever the machine's core count (its
instruction set can still change the last bits). Lottery runs always train on one thread (chapter 2 set
the whole process to one thread before), so their hashes and cached levels stay valid.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .eval import accuracy, evaluate


@dataclass
class TrainConfig:
    """The LTH paper's LeNet settings by default: Adam 1.2e-3, batch 60."""

    iterations: int = 5000
    batch_size: int = 60
    lr: float = 1.2e-3
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    weight_decay: float = 0.0
    eval_every: int = 500  # validation loss/accuracy every this many iterations (0: only at the end)
    seed: int = 0  # data order
    threads: int | None = 1  # intra-op threads for the steps (module docstring); None: torch's count

    def __post_init__(self):
        if self.iterations < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"iterations, batch_size and lr must be positive: {self}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads={self.threads!r} must be an integer >= 1 (intra-op threads for the training "
                             "steps), or None to keep torch's thread count.")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r}: use 'adam' or 'sgd'.")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # {"iteration", "val_loss", "val_accuracy"}
    test_accuracy: float = float("nan")

    @property
    def early_stop_iteration(self) -> int:
        """Iteration of minimum validation loss (the LTH paper's "learns faster" measure)."""
        return min(self.history, key=lambda h: h["val_loss"])["iteration"] if self.history else -1

    @property
    def best_val_accuracy(self) -> float:
        return max((h["val_accuracy"] for h in self.history), default=float("nan"))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


@contextmanager
def intra_op_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (``None``: as they are), restoring the count on exit."""
    prev = torch.get_num_threads()
    if n is not None and n != prev:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches: a fresh permutation each epoch, the last short batch dropped."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def train(model: nn.Module, data, cfg: TrainConfig | None = None, *,
          after_step: Callable[[nn.Module], None] | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          on_eval: Callable[[int, nn.Module, dict], None] | None = None,
          progress: bool = True, desc: str = "train") -> TrainResult:
    """Train ``model`` on ``data`` (an ``ImageData``) for ``cfg.iterations`` steps.

    Validation (``data.x_val``) is measured every ``cfg.eval_every`` steps and at the end; the
    test set only once, at the end. ``on_eval(iteration, model, history_entry)`` is called after
    each validation (e.g. to keep the weights of the best one). Returns the history and the final
    test accuracy.
    """
    cfg = cfg or TrainConfig()
    device = next(model.parameters()).device
    x, y = data.x_train.to(device), data.y_train.to(device)
    if len(x) < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({len(x)}).")
    opt = optimizer or make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult()
    stream = batches(len(x), cfg.batch_size, g)
    has_val = getattr(data, "x_val", None) is not None
    with intra_op_threads(cfg.threads if device.type == "cpu" else None):
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for it in tqdm(range(1, cfg.iterations + 1), desc=desc, disable=not progress, leave=False, mininterval=1.0):
            idx = next(stream).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.index_select(0, idx)), y.index_select(0, idx))
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
            if has_val and ((cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.iterations):
                val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
                result.history.append({"iteration": it, "val_loss": val_loss, "val_accuracy": val_acc})
                if on_eval is not None:
                    on_eval(it, model, result.history[-1])
                model.train()
        result.test_accuracy = accuracy(model, data.x_test, data.y_test)
        model.eval()
    return result
