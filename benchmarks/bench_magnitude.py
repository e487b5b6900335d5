"""Global magnitude masks for all Linear weights of SmolLM2-135M at 50% sparsity:
pruning_lab.magnitude vs torch.nn.utils.prune.global_unstructured(L1Unstructured), one run.

Prints both timings, the speed-up, whether the masks are identical, and the peak extra memory of
each method (resident-set growth, measured in a fresh subprocess per method) as a multiple of the
pruned weights' bytes.

    .venv/bin/python benchmarks/bench_magnitude.py
"""

import json
import resource
import subprocess
import sys
import time

import torch

SPARSITY = 0.5


def peak_rss_mib() -> float:
    """Peak resident set (VmHWM) of this process."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def ours(model):
    from pruning_lab.magnitude import global_magnitude_masks

    return global_magnitude_masks(model, SPARSITY)


def peer(model, weights):
    from torch.nn.utils import prune

    modules = {n.removesuffix(".weight"): m for n, m in model.named_modules()}
    targets = [(modules[n.removesuffix(".weight")], "weight") for n in weights]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=SPARSITY)
    return {n: m.weight_mask.bool() for n, (m, _) in zip(weights, targets)}


def worker(method: str) -> None:
    """Load the model, then measure how far the peak resident set grows while one method runs."""
    from pruning_lab.magnitude import prunable_parameters
    from pruning_lab.models import load_llm

    model, _ = load_llm()
    weights = prunable_parameters(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in weights.values())
    reset_peak_rss()
    before = peak_rss_mib()
    t0 = time.perf_counter()
    ours(model) if method == "ours" else peer(model, list(weights))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "extra_mib": peak_rss_mib() - before, "weight_mib": weight_bytes / 2**20}))


def main():
    from pruning_lab.magnitude import prunable_parameters
    from pruning_lab.models import load_llm

    model, _ = load_llm()
    weights = prunable_parameters(model)
    n = sum(p.numel() for p in weights.values())
    t0 = time.perf_counter()
    a = ours(model)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = peer(model, list(weights))
    peer_s = time.perf_counter() - t0
    equal = sum(int((a[k] == b[k]).sum()) for k in a)
    # SmolLM2's weights are dequantised 4-bit values: many magnitudes are exactly equal, and the two
    # methods may break ties at the threshold differently. Check that every difference is such a tie.
    threshold = max(float(weights[k].detach().abs()[~a[k]].max()) for k in a if (~a[k]).any())
    diff_at_threshold = all(bool((weights[k].detach().abs()[a[k] != b[k]] == threshold).all()) for k in a)

    mem = {}
    for method in ("ours", "peer"):
        out = subprocess.run([sys.executable, __file__, "--worker", method], capture_output=True, text=True, check=True)
        mem[method] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"SmolLM2-135M: {len(weights)} Linear weights, {n:,} values, sparsity {SPARSITY}, "
          f"{torch.get_num_threads()} threads")
    print(f"  torch.nn.utils.prune.global_unstructured : {peer_s:6.2f} s")
    print(f"  pruning_lab global_magnitude_masks       : {ours_s:6.2f} s")
    print(f"  speed-up                                 : {peer_s / ours_s:6.2f}x")
    print(f"  identical mask entries                   : {equal / n:.6f} ({n - equal} differ; all of them "
          f"ties at |w| = threshold {threshold:.6g}: {diff_at_threshold})")
    for method, label in (("ours", "pruning_lab"), ("peer", "torch.nn.utils.prune")):
        r = mem[method]
        print(f"  peak extra memory, {label:<21}: {r['extra_mib']:7.0f} MiB = "
              f"{r['extra_mib'] / r['weight_mib']:.2f}x the weights' {r['weight_mib']:.0f} MiB "
              f"(incl. the returned masks, 0.25x)")
    from pruning_lab.workbook import record_benchmark

    path = record_benchmark("magnitude", {
        "sparsity": SPARSITY, "weights": len(weights), "values": n,
        "seconds": {"pruning_lab": ours_s, "torch_prune": peer_s}, "speedup": peer_s / ours_s,
        "identical_fraction": equal / n, "differing_entries": n - equal, "all_differences_are_ties": diff_at_threshold,
        "peak_extra_memory_over_weights": {k: mem[k]["extra_mib"] / mem[k]["weight_mib"] for k in mem},
    })
    print(f"  wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
