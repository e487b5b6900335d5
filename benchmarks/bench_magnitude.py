"""Global magnitude masks for all Linear weights of SmolLM2-135M at 50% sparsity:
pruning_lab.magnitude vs torch.nn.utils.prune.global_unstructured(L1Unstructured), one run.

Both are timed idle and beside CPU-bound competitors that the script starts and stops itself (one
``while True: pass`` process per core minus one), in interleaved rounds, best of each. Prints the
timings, the speed-ups in both states, whether the masks are identical, the number of torch operations
one call issues (torch.profiler), and the peak extra memory of each method (resident-set growth,
measured in a fresh subprocess per method) as a multiple of the pruned weights' bytes. ``load_llm`` maps
the model's safetensors into memory, so a weight's pages become resident when first read: the worker reads
every weight once before the peak is reset, or the model itself would count as extra memory (about 1x
the weights) for whichever method touches it first.

    .venv/bin/python benchmarks/bench_magnitude.py
"""

import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune.remove below)

SPARSITY = 0.5
ROUNDS = 5
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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


def count_ops(fn) -> int:
    """Torch operations one call issues (every aten op, nested ones included), profiled on this thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # ours then runs its per-tensor work on this thread, where the profiler sees it
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.set_num_threads(prev)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def worker(method: str) -> None:
    """Load the model, page in every weight (the safetensors are memory-mapped), then measure how far the
    peak resident set grows while one method runs."""
    from pruning_lab.magnitude import prunable_parameters
    from pruning_lab.models import load_llm

    model, _ = load_llm()
    weights = prunable_parameters(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in weights.values())
    with torch.no_grad():
        for p in weights.values():
            p.sum()  # reads every page of the mapped file: the model is resident before the peak is reset
    reset_peak_rss()
    before = peak_rss_mib()
    t0 = time.perf_counter()
    ours(model) if method == "ours" else peer(model, list(weights))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "extra_mib": peak_rss_mib() - before, "weight_mib": weight_bytes / 2**20}))


def main():
    from pruning_lab.magnitude import prunable_parameters
    from pruning_lab.models import load_llm

    from _load import idle_and_busy, slowdowns

    model, _ = load_llm()
    weights = prunable_parameters(model)
    n = sum(p.numel() for p in weights.values())
    a = ours(model)  # warm-up, and the masks compared below
    # torch's pruning re-parametrises the modules it prunes (weight_orig * weight_mask): it runs on a second copy,
    # undone after every call (untimed), so every round prunes the same plain weights
    peer_model, _ = load_llm()
    peer_names = list(prunable_parameters(peer_model))
    b = peer(peer_model, peer_names)
    modules = dict(peer_model.named_modules())

    def undo_peer():
        for name in peer_names:
            m = modules[name.removesuffix(".weight")]
            orig = m.weight_orig.detach()
            torch.nn.utils.prune.remove(m, "weight")
            with torch.no_grad():
                m.weight.copy_(orig)

    undo_peer()
    times = idle_and_busy({"pruning_lab": lambda: ours(model), "torch_prune": lambda: peer(peer_model, peer_names)},
                          rounds=ROUNDS, after={"torch_prune": undo_peer})
    ops = count_ops(lambda: ours(model))
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
          f"{torch.get_num_threads()} threads; busy = {times['competitors']} CPU-bound competitor(s)")
    for state in ("idle", "busy"):
        o, p = times[state]["pruning_lab"], times[state]["torch_prune"]
        print(f"  {state}: torch.nn.utils.prune {p:6.2f} s, pruning_lab {o:6.3f} s, speed-up {p / o:6.1f}x")
    slow = slowdowns(times)
    print(f"  busy / idle: pruning_lab {slow['pruning_lab']:.2f}x, torch.nn.utils.prune {slow['torch_prune']:.2f}x")
    print(f"  torch operations per call: {ops}")
    print(f"  identical mask entries                   : {equal / n:.6f} ({n - equal} differ; all of them "
          f"ties at |w| = threshold {threshold:.6g}: {diff_at_threshold})")
    for method, label in (("ours", "pruning_lab"), ("peer", "torch.nn.utils.prune")):
        r = mem[method]
        print(f"  peak extra memory, {label:<21}: {r['extra_mib']:7.0f} MiB = "
              f"{r['extra_mib'] / r['weight_mib']:.2f}x the weights' {r['weight_mib']:.0f} MiB "
              f"(incl. the returned masks, 0.25x; weights paged in before)")
    from pruning_lab.workbook import record_benchmark

    path = record_benchmark("magnitude", {
        "sparsity": SPARSITY, "weights": len(weights), "values": n,
        "competitors_when_busy": times["competitors"], "rounds": ROUNDS,
        "seconds": {"pruning_lab": times["idle"]["pruning_lab"], "torch_prune": times["idle"]["torch_prune"]},
        "seconds_busy": {"pruning_lab": times["busy"]["pruning_lab"], "torch_prune": times["busy"]["torch_prune"]},
        "speedup": times["idle"]["torch_prune"] / times["idle"]["pruning_lab"],
        "speedup_busy": times["busy"]["torch_prune"] / times["busy"]["pruning_lab"],
        "busy_over_idle": slow, "torch_ops_per_call": ops,
        "identical_fraction": equal / n, "differing_entries": n - equal, "all_differences_are_ties": diff_at_threshold,
        "peak_extra_memory_over_weights": {k: mem[k]["extra_mib"] / mem[k]["weight_mib"] for k in mem},
        "memory_measured_with_weights_paged_in": True,
    })
    print(f"  wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
