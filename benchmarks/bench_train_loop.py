"""One LeNet-300-100 epoch on Fashion-MNIST at the LTH settings (batch 60, Adam 1.2e-3):
pruning_lab.train's tensor-only loop vs the naive DataLoader loop, measured in one run.

    .venv/bin/python benchmarks/bench_train_loop.py

"Naive" is the loop of the usual tutorial: a map-style dataset that turns one stored 28x28 uint8
image at a time into a PIL image, then into a float tensor, then normalises it (what
``torchvision.datasets.FashionMNIST(transform=Compose([ToTensor(), Normalize(...)]))`` does per
sample; torchvision itself does not import beside torch 2.13 here, so the dataset below does the
same steps with PIL and numpy), a ``DataLoader(batch_size=60, shuffle=True)`` that collates 60
samples per step, and the default ``Adam``. Two intermediate loops show where the time goes: the
same DataLoader over an in-memory ``TensorDataset`` (data already tensors, still per-sample
indexing and collation), and that with fused Adam.

Every loop is timed idle and beside CPU-bound competitors that the script starts and stops itself (one
``while True: pass`` per core minus one, ``benchmarks/_load.py``), rounds interleaved, best of each: the
speed-ups are the idle ones, and ``busy_check`` puts our loop's busy/idle slowdown beside the naive loop's.
``train`` runs its steps on one intra-op thread (``TrainConfig.threads``: LeNet's ops are too small to split;
a split op ends in a barrier that waits for a thread a busy core has parked); ``ours_torch_threads`` is the
same loop on torch's thread count, the setting before, to show what the choice costs idle and saves busy.
The DataLoader loops run on torch's threads, as a tutorial's would.
"""

import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pruning_lab.data import FASHION_MNIST_FILES, _find_fashion_mnist, load_image_data, read_idx
from pruning_lab.models import make_model
from pruning_lab.train import TrainConfig, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _load import busy_check, print_busy_check  # noqa: E402


class PerSampleFashionMNIST(Dataset):
    """uint8 images kept as stored; each ``__getitem__`` does PIL -> float tensor -> normalise."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        pic = Image.fromarray(self.images[i], mode="L")
        x = torch.from_numpy(np.array(pic, np.uint8, copy=True)).view(pic.size[1], pic.size[0], 1)
        x = x.permute(2, 0, 1).contiguous().float().div(255)
        return x.sub_(self.mean).div_(self.std), int(self.labels[i])


def naive_epoch(model, dataset, held_out, batch_size=60, lr=1.2e-3, fused=False):
    """One training epoch, then one pass over the held-out images (as ``train()`` ends with one)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for xb, yb in loader:
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in DataLoader(held_out, batch_size=1000):
            correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / len(held_out)


def main(repeats: int = 3):
    t0 = time.perf_counter()
    data = load_image_data()
    load_s = time.perf_counter() - t0
    n = len(data.x_train)
    steps = n // 60
    folder = _find_fashion_mnist(None)
    if folder is None:
        raise SystemExit("Fashion-MNIST not found: run `./lab setup` (it installs dataset-fashion-mnist).")
    images = read_idx(folder / FASHION_MNIST_FILES["train_images"])
    labels = read_idx(folder / FASHION_MNIST_FILES["train_labels"])
    test_images = read_idx(folder / FASHION_MNIST_FILES["test_images"])
    test_labels = read_idx(folder / FASHION_MNIST_FILES["test_labels"])
    mean, std = float(images[:n].mean() / 255), float(images[:n].std() / 255)
    # the same sizes as ours: n training images; 5,000 validation + 10,000 test images evaluated once
    per_sample = PerSampleFashionMNIST(images[:n], labels[:n], mean, std)
    per_sample_held_out = PerSampleFashionMNIST(np.concatenate([images[n:], test_images]),
                                                np.concatenate([labels[n:], test_labels]), mean, std)
    in_memory = TensorDataset(data.x_train, data.y_train)
    in_memory_held_out = TensorDataset(torch.cat([data.x_val, data.x_test]), torch.cat([data.y_val, data.y_test]))

    torch.manual_seed(0)
    # warm-up (thread pool, allocator, PIL) so that no variant pays the process's first-call costs
    train(make_model("lenet", seed=0), data, TrainConfig(iterations=50, eval_every=0), progress=False)
    for _ in DataLoader(per_sample, batch_size=60, sampler=range(600)):
        pass

    variants = {
        "naive": lambda: naive_epoch(make_model("lenet", seed=0), per_sample, per_sample_held_out),
        "tensor_ds": lambda: naive_epoch(make_model("lenet", seed=0), in_memory, in_memory_held_out),
        "tensor_ds_fused": lambda: naive_epoch(make_model("lenet", seed=0), in_memory, in_memory_held_out,
                                               fused=True),
        # train() ends with one validation and one test pass
        "ours": lambda: train(make_model("lenet", seed=0), data, TrainConfig(iterations=steps, eval_every=0),
                              progress=False),
        "ours_torch_threads": lambda: train(make_model("lenet", seed=0), data,
                                            TrainConfig(iterations=steps, eval_every=0, threads=None), progress=False),
    }
    # interleaved rounds, idle and busy, best of `repeats` in each state: the machine's noise hits all alike
    check = busy_check(variants, {"ours": "naive"}, rounds=repeats, log=print)
    best = check["seconds_idle"]

    print(f"Fashion-MNIST load (cached): {load_s:.2f} s")
    print(f"one epoch ({steps} steps of batch 60, then 15,000 held-out images evaluated), {torch.get_num_threads()} threads, best of {repeats}")
    print(f"  naive DataLoader loop (per-sample PIL -> tensor -> normalise, Adam): {best['naive']:.2f} s")
    print(f"  DataLoader over an in-memory TensorDataset, Adam        : {best['tensor_ds']:.2f} s")
    print(f"  same, fused Adam                                        : {best['tensor_ds_fused']:.2f} s")
    print(f"  pruning_lab.train (tensor batches, fused Adam, 1 thread): {best['ours']:.2f} s")
    print(f"  the same on torch's {torch.get_num_threads()} threads       : {best['ours_torch_threads']:.2f} s")
    print(f"  speed-up vs naive loop          : {best['naive'] / best['ours']:.2f}x")
    print(f"  speed-up vs TensorDataset loop  : {best['tensor_ds'] / best['ours']:.2f}x "
          "(the stricter baseline: its data are already tensors)")
    print(f"  speed-up vs TensorDataset+fused : {best['tensor_ds_fused'] / best['ours']:.2f}x (the data path alone)")
    print_busy_check(check)
    from pruning_lab.workbook import record_benchmark

    path = record_benchmark("train_loop", {
        "steps": steps, "batch_size": 60, "repeats": repeats, "statistic": "best", "seconds": best,
        "speedup_vs_naive": best["naive"] / best["ours"], "speedup_vs_tensor_ds": best["tensor_ds"] / best["ours"],
        "speedup_vs_tensor_ds_fused": best["tensor_ds_fused"] / best["ours"],
        "train_threads": TrainConfig().threads, "torch_threads": torch.get_num_threads(),
        "one_thread_over_torch_threads_idle": best["ours"] / best["ours_torch_threads"],
        "one_thread_speedup_busy": check["seconds_busy"]["ours_torch_threads"] / check["seconds_busy"]["ours"],
        "busy_check": check,
        "speedup_vs_naive_busy": check["seconds_busy"]["naive"] / check["seconds_busy"]["ours"],
    })
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
