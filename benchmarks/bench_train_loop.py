"""One LeNet-300-100 epoch on Fashion-MNIST at the LTH settings (batch 60, Adam 1.2e-3):
pruning_lab.train's tensor-only loop vs the naive DataLoader loop, measured in one run.

    .venv/bin/python benchmarks/bench_train_loop.py
"""

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruning_lab.data import load_image_data
from pruning_lab.models import make_model
from pruning_lab.train import TrainConfig, train


def naive_epoch(model, x, y, batch_size=60, lr=1.2e-3, fused=False):
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for xb, yb in loader:
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()


def main(repeats: int = 3):
    t0 = time.perf_counter()
    data = load_image_data()
    load_s = time.perf_counter() - t0
    steps = len(data.x_train) // 60
    torch.manual_seed(0)
    # warm-up (thread pool, allocator) so that no variant pays the process's first-call costs
    train(make_model("lenet", seed=0), data, TrainConfig(iterations=50, eval_every=0), progress=False)

    variants = {
        "naive": lambda: naive_epoch(make_model("lenet", seed=0), data.x_train, data.y_train),
        "naive_fused": lambda: naive_epoch(make_model("lenet", seed=0), data.x_train, data.y_train, fused=True),
        # includes one validation and one test pass at the end
        "ours": lambda: train(make_model("lenet", seed=0), data, TrainConfig(iterations=steps, eval_every=0),
                              progress=False),
    }
    best = {k: float("inf") for k in variants}
    for _ in range(repeats):  # interleaved, best of `repeats`: the machine's noise hits all alike
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)

    print(f"Fashion-MNIST load (cached): {load_s:.2f} s")
    print(f"one epoch, {steps} steps of batch 60, {torch.get_num_threads()} threads, best of {repeats}")
    print(f"  naive DataLoader loop : {best['naive']:.2f} s")
    print(f"  same, fused Adam      : {best['naive_fused']:.2f} s (what the optimiser alone buys)")
    print(f"  pruning_lab.train     : {best['ours']:.2f} s (tensor batches + fused Adam, incl. final val + test eval)")
    print(f"  speed-up vs naive     : {best['naive'] / best['ours']:.2f}x")
    print(f"  speed-up vs naive+fused Adam: {best['naive_fused'] / best['ours']:.2f}x (the data path alone)")


if __name__ == "__main__":
    main()
