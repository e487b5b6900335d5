"""Structured pruning of SmolLM2-135M at 30% of parameters removed (heads + MLP channels): does it shrink and
speed up, how long does FLAP take, and how much memory does pruning need?

    .venv/bin/python benchmarks/bench_structured.py [--ratio 0.3] [--rounds 3] [--json out.json]

Prints both timings and the ratios, all measured in this one run:
- parameters pruned / dense;
- prefill and decode tokens/s of the pruned model vs the dense one (alternating rounds, best of each);
- FLAP's pruning time (calibration on 128 windows of 128 tokens, scoring, planning, slicing), in a subprocess;
- that subprocess's peak resident memory while pruning, minus what it used before loading the model (with the
  calibration windows already tokenised), in units of the model's size (sampled every 5 ms from /proc/self/statm;
  ru_maxrss printed too). The loaded weights are memory-mapped from the safetensors cache, so the dense weights'
  pages stay resident beside the sliced copies even when pruning in place: the peak is about 1x (dense) + 0.7x
  (pruned copies of the sliced matrices) + the calibration's activations.
- where a decode step's time goes, dense vs pruned: module hooks split one greedy step into the decoder's
  Linear layers (they shrink with the widths), the output layer (``lm_head``, vocabulary x hidden: it does not)
  and everything else (norms, RoPE, attention over the cache, the cache update, masks, Python and dispatch: it does
  not either), and ``torch.profiler`` lists the operators' self CPU time per step. Both go into the JSON.
- on a busy laptop (``busy_check``, ``benchmarks/_load.py``): each hot path timed idle and beside CPU-bound
  competitors the script starts and stops itself (one ``while True: pass`` per core minus one), rounds
  interleaved, best of each, its busy/idle slowdown beside its baseline's: FLAP's calibration on the 32 windows
  of 128 tokens calibrated here vs plain dense forwards over the same windows (what calibration cannot avoid);
  planning and slicing the 30% model vs copying the dense model (memory-bound work of the same size); and 32
  greedy decode steps after a 256-token prompt (untimed) of each pruned model vs the dense one (``--busy-rounds``).
Targets: params <= 0.72x, prefill >= 1.3x, decode >= 1.3x (90% of the ideal 1/0.70), FLAP < 120 s, peak < 2x the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

CHILD = "--child-memory"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread; ``.peak`` is the highest value seen inside the block."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def child(ratio: float, samples: int, seq_len: int) -> None:
    """Load, calibrate, plan and prune in place with FLAP; print one JSON line."""
    import ctypes
    import gc
    import resource

    import torch

    from transformers import AutoTokenizer

    from pruning_lab import data
    from pruning_lab import structured as st
    from pruning_lab.eval import model_bytes
    from pruning_lab.models import embedded_model_folder, load_llm

    # The calibration windows are input data, prepared before the baseline. Tokenising 2M characters leaves
    # 0.1-0.2 GB of freed heap that glibc keeps mapped; malloc_trim hands it back to the OS, so that it is
    # neither counted as pruning's memory nor silently reused by it (either would bias the ratio).
    tok = AutoTokenizer.from_pretrained(embedded_model_folder())
    ids = data.calibration_batch(tok, data.python_docs_corpus().calibration, samples, seq_len, seed=0)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before_model = _rss_bytes()
    model, _ = load_llm(None)
    size = model_bytes(model)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        cal = st.calibrate(model, ids, batch_size=8)
        t1 = time.perf_counter()
        plan = st.plan_structured(model, cal, ratio, "flap", allocation="adaptive")
        model = st.prune_model(model, plan, calibration=cal, bias_compensation=True, inplace=True)
        t2 = time.perf_counter()
    print(json.dumps({
        "model_bytes": size, "rss_before_model": before_model, "peak_rss_pruning": peak.peak,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "calibration_s": t1 - t0, "plan_and_slice_s": t2 - t1, "flap_total_s": t2 - t0,
        "threads": torch.get_num_threads(), "tokens": ids.numel(),
    }))


def decode_breakdown(model, prompt_len: int, new_tokens: int, rounds: int = 3, seed: int = 0) -> dict:
    """Milliseconds per greedy decode step (KV cache, batch 1, after a ``prompt_len`` prompt): the whole step (best
    of ``rounds``, no hooks), the decoder's Linear layers and the output layer (module hooks), the rest by difference
    (of the hooked step), and torch.profiler's 12 operators with the most self CPU time per step."""
    import contextlib

    import torch
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    from pruning_lab.eval import eval_mode

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    spent = {"linear": 0.0, "lm_head": 0.0}
    start: dict = {}

    def decode(during=None):
        """Prefill, then ``new_tokens`` timed greedy steps (inside ``during()``); seconds per step. The hooks'
        sums are reset after the prefill: the first hooked forward of the timed steps starts from zero."""
        @contextlib.contextmanager
        def timed_steps():
            spent.update(linear=0.0, lm_head=0.0)
            with (during or contextlib.nullcontext)():
                yield

        return greedy_decode_seconds(model, prompt, new_tokens, during=timed_steps) / new_tokens

    def pre(m, _args):
        start[id(m)] = time.perf_counter()

    def post(kind):
        def hook(m, _args, _out):
            spent[kind] += time.perf_counter() - start.pop(id(m))
        return hook

    head = model.get_output_embeddings()
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    with eval_mode(model):
        decode()  # warm-up
        step = min(decode() for _ in range(rounds))
        handles = [m.register_forward_pre_hook(pre) for m in linears + [head]]
        handles += [m.register_forward_hook(post("linear")) for m in linears] + [head.register_forward_hook(post("lm_head"))]
        try:
            best = None
            for _ in range(rounds):
                hooked = decode()
                if best is None or hooked < best[0]:
                    best = (hooked, {k: v / new_tokens for k, v in spent.items()})
        finally:
            for h in handles:
                h.remove()
        prof = profile(activities=[ProfilerActivity.CPU])
        decode(lambda: prof)
    hooked, parts = best
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"step_ms": 1000 * step, "hooked_step_ms": 1000 * hooked,
            "linear_ms": 1000 * parts["linear"], "lm_head_ms": 1000 * parts["lm_head"],
            "other_ms": 1000 * (hooked - parts["linear"] - parts["lm_head"]),
            "profiler_top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / new_tokens, 4) for e in ops}}


def greedy_decode_seconds(model, prompt, new_tokens: int, during=None):
    """Prefill ``prompt`` (untimed), then ``new_tokens`` greedy steps with the KV cache (inside ``during()`` when
    given, e.g. a profiler): their seconds, as ``Timed``."""
    import contextlib

    from _load import Timed
    from pruning_lab.eval import eval_mode

    with eval_mode(model):
        out = model(input_ids=prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        with (during or contextlib.nullcontext)():
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return Timed(time.perf_counter() - t0)


def busy_paths(model, variants, ids, ratio: float, prompt_len: int, new_tokens: int, rounds: int) -> dict:
    """The hot paths a student waits on, idle and busy, each beside its baseline (see the module docstring)."""
    import copy

    import torch

    from _load import busy_check
    from pruning_lab import structured as st
    from pruning_lab.eval import eval_mode

    def dense_forward():
        with eval_mode(model):
            for i in range(0, len(ids), 8):
                model(input_ids=ids[i:i + 8], use_cache=False)

    cal = st.calibrate(model, ids, batch_size=8)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    methods = {"calibration": lambda: st.calibrate(model, ids, batch_size=8), "dense_forward": dense_forward,
               "plan_and_slice": lambda: st.structured_prune(model, ratio, "flap", calibration=cal, allocation="uniform"),
               "dense_copy": lambda: copy.deepcopy(model),
               "decode_dense": lambda: greedy_decode_seconds(model, prompt, new_tokens)}
    for name, m in variants.items():
        methods[f"decode_{name}"] = lambda m=m: greedy_decode_seconds(m, prompt, new_tokens)
    baselines = {"calibration": "dense_forward", "plan_and_slice": "dense_copy",
                 **{f"decode_{name}": "decode_dense" for name in variants}}
    return busy_check(methods, baselines, rounds=rounds, log=lambda *_: None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating dense/pruned speed rounds")
    parser.add_argument("--busy-rounds", type=int, default=2, help="interleaved idle/busy rounds of the busy check")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child(args.ratio, args.samples, args.seq_len)
        return 0

    import torch

    from pruning_lab import data
    from pruning_lab import structured as st
    from pruning_lab.eval import count_parameters, tokens_per_second
    from pruning_lab.models import load_llm

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ratio {args.ratio}")
    # 1. FLAP pruning time and memory, in a fresh process (its own peak RSS)
    out = subprocess.run([sys.executable, __file__, CHILD, "--ratio", str(args.ratio), "--samples",
                          str(args.samples), "--seq-len", str(args.seq_len)],
                         capture_output=True, text=True, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    peak_x = (mem["peak_rss_pruning"] - mem["rss_before_model"]) / mem["model_bytes"]
    print(f"FLAP pruning ({args.samples}x{args.seq_len} calibration tokens): calibration {mem['calibration_s']:.1f} s "
          f"+ plan and slice {mem['plan_and_slice_s']:.1f} s = {mem['flap_total_s']:.1f} s")
    print(f"memory: model {mem['model_bytes'] / 2**20:.0f} MiB; peak RSS while pruning "
          f"{mem['peak_rss_pruning'] / 2**20:.0f} MiB, before loading {mem['rss_before_model'] / 2**20:.0f} MiB "
          f"-> {peak_x:.2f}x the model (ru_maxrss {mem['ru_maxrss_bytes'] / 2**20:.0f} MiB)")

    # 2. parameters and speed, dense vs pruned, measured alternately in this process
    model, tok = load_llm(None)
    corpus = data.python_docs_corpus()
    ids = data.calibration_batch(tok, corpus.calibration, 32, 128, seed=0)
    cal = st.calibrate(model, ids, batch_size=8)
    variants = {}
    for allocation in ("uniform", "adaptive"):
        small, _ = st.structured_prune(model, args.ratio, "flap", calibration=cal, allocation=allocation)
        variants[f"flap-{allocation}"] = small
    dense_params = count_parameters(model)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name, m in (("dense", model), *variants.items()):
            sp = tokens_per_second(m, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=2)
            b = best.setdefault(name, {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0})
            for k, v in sp.items():
                b[k] = max(b[k], v)
    d = best["dense"]
    print(f"dense: {dense_params:,} params, prefill {d['prefill_tokens_per_s']:.0f} tok/s, "
          f"decode {d['decode_tokens_per_s']:.1f} tok/s (prompt {args.prompt_len}, {args.new_tokens} new tokens)")
    report = {"ratio": args.ratio, "memory": mem, "peak_over_model": peak_x, "dense": {"params": dense_params, **d},
              "pruned": {}}
    for name, m in variants.items():
        b, p = best[name], count_parameters(m)
        row = {"params": p, "params_ratio": p / dense_params, **b,
               "prefill_speedup": b["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
               "decode_speedup": b["decode_tokens_per_s"] / d["decode_tokens_per_s"]}
        report["pruned"][name] = row
        print(f"{name}: {p:,} params = {row['params_ratio']:.3f}x; prefill {b['prefill_tokens_per_s']:.0f} tok/s = "
              f"{row['prefill_speedup']:.2f}x; decode {b['decode_tokens_per_s']:.1f} tok/s = {row['decode_speedup']:.2f}x")
    # 3. where a decode step's time goes (alternating rounds again; each model's best)
    parts: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, m in (("dense", model), *variants.items()):
            parts.setdefault(name, []).append(decode_breakdown(m, args.prompt_len, args.new_tokens))
    breakdown = {name: min(rows, key=lambda r: r["step_ms"]) for name, rows in parts.items()}
    report["decode_breakdown"] = breakdown
    bd = breakdown["dense"]
    for name, b in breakdown.items():
        print(f"decode step, {name}: {b['step_ms']:.1f} ms = Linear layers {b['linear_ms']:.1f} + output layer "
              f"{b['lm_head_ms']:.1f} + the rest {b['other_ms']:.1f} (hooked step {b['hooked_step_ms']:.1f} ms)")
    for name in variants:
        b = breakdown[name]
        fixed = b["lm_head_ms"] + b["other_ms"]
        ideal = 1 / report["pruned"][name]["params_ratio"]
        report["pruned"][name]["decode_fixed_share"] = fixed / b["hooked_step_ms"]
        report["pruned"][name]["decode_bound_if_linears_vanished"] = bd["hooked_step_ms"] / fixed
        print(f"{name}: the output layer and the rest are {fixed:.1f} ms of {b['hooked_step_ms']:.1f} ms "
              f"({fixed / b['hooked_step_ms']:.0%}); they do not shrink with the widths (ideal 1/params = {ideal:.2f}x)")
    print("profiler, self CPU ms per decode step (dense | flap-uniform):")
    for op, ms in breakdown["dense"]["profiler_top_ops_ms_per_step"].items():
        print(f"  {op:<40}{ms:>8.3f} | {breakdown['flap-uniform']['profiler_top_ops_ms_per_step'].get(op, float('nan')):>8.3f}")
    u = report["pruned"]["flap-uniform"]
    checks = {"params <= 0.72x": u["params_ratio"] <= 0.72, "prefill >= 1.3x": u["prefill_speedup"] >= 1.3,
              "decode >= 1.3x": u["decode_speedup"] >= 1.3, "FLAP < 120 s": mem["flap_total_s"] < 120,
              "peak < 2x model": peak_x < 2}
    report["targets_met"] = checks
    # 4. the same paths on a busy laptop
    check = busy_paths(model, variants, ids, args.ratio, args.prompt_len, args.new_tokens, args.busy_rounds)
    from _load import print_busy_check

    print_busy_check(check)
    report["busy_check"] = check
    print("targets (flap-uniform): " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))
    from pruning_lab.workbook import record_benchmark

    print(f"wrote {record_benchmark('structured', report)}")
    if args.json:
        from pruning_lab._io import write_json

        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
