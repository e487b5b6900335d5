"""KV-cache eviction on SmolLM2-135M: memory and decode speed at a 25% budget of a 2k-token context, for
every policy, against the full cache measured in the same run; H2O's prompt scoring against prefill.

    .venv/bin/python benchmarks/bench_kv_eviction.py [--context 2048] [--budget 0.25] [--new-tokens 32] [--rounds 3]

Greedy decoding after a random-token prompt, the cache held at the budget. Three eviction frequencies per policy:

- every step: scores computed and the cache cut before every decoding step (decode-time eviction);
- the paper's frequency: StreamingLLM, H2O and TOVA evict at every step (one token out per token in); SnapKV
  compresses the prompt once and never evicts while decoding (prompt compression); LazyEviction evicts once per
  observation window (16 steps);
- amortised: every 16 steps (the cache cut 16 slots deeper, scores computed once per 16 tokens).

At decode time the prompt is read in chunks of 64 tokens (the chunk must fit beside what a policy always keeps).
Rounds alternate full and evicting runs; the best of each is kept. Then a longer context (2x) shows where eviction
starts to pay for itself, and H2O's prompt compression (accumulated attention of every prompt query) is timed
against the prefill it follows. Figures go to results/benchmarks/kv_eviction.json.

On a busy laptop (``busy_check``, ``benchmarks/_load.py``): decoding with eviction every step (StreamingLLM, H2O,
TOVA) and amortised (H2O every 16 steps) vs the full cache, at the same context and budget, each timed idle and
beside CPU-bound competitors the script starts and stops itself (one ``while True: pass`` per core minus one),
rounds interleaved (``--busy-rounds``), best of each; only the decode steps are timed. ``--busy-only`` runs just
this check and adds it to the committed JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from pruning_lab import kv_eviction as kv
from pruning_lab.models import load_llm
from pruning_lab.workbook import record_benchmark

POLICIES = ["streaming_llm", "h2o", "tova", "snapkv", "lazy_eviction"]
# how often each paper evicts while decoding: (moment, evict_every); None = the policy's own (1, or LazyEviction's window)
PAPER_FREQUENCY = {"streaming_llm": ("decode", None), "h2o": ("decode", None), "tova": ("decode", None),
                   "snapkv": ("prompt", None), "lazy_eviction": ("decode", None)}
CHUNK = 64
BUSY_PATHS = [("streaming_llm", None), ("h2o", None), ("tova", None), ("h2o", 16)]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def timed(model, ids, policy, budget, new_tokens, evict_every=None, moment="decode"):
    g = kv.generate(model, ids, policy=policy, budget=budget, moment=moment, max_new_tokens=new_tokens + 1,
                    prefill_chunk=CHUNK if moment == "decode" else 256, evict_every=evict_every)
    return {"decode_tokens_per_s": new_tokens / g.seconds_decode, "kv_bytes": g.kv_bytes,
            "prefill_s": g.seconds_prefill, "budget_tokens": g.budget}


def busy_paths(model, ids, budget, new_tokens, rounds) -> dict:
    """Decode seconds (prefill untimed) with eviction and with the full cache, idle and busy."""
    from _load import Timed, busy_check

    def run(policy, every):
        def fn():
            g = kv.generate(model, ids, policy=policy, budget=None if policy == "full" else budget, moment="decode",
                            max_new_tokens=new_tokens + 1, prefill_chunk=CHUNK, evict_every=every)
            return Timed(g.seconds_decode)
        return fn

    methods = {"full": run("full", None)}
    for policy, every in BUSY_PATHS:
        methods[policy if every is None else f"{policy}/every{every}"] = run(policy, every)
    return busy_check(methods, {name: "full" for name in methods if name != "full"}, rounds=rounds, log=lambda *_: None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy-rounds", type=int, default=2, help="interleaved idle/busy rounds of the busy check")
    ap.add_argument("--busy-only", action="store_true", help="run only the busy check; add it to the committed JSON")
    args = ap.parse_args()
    model, _ = load_llm()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (1, args.context), generator=g)
    if args.busy_only:
        from _load import merge_busy_check, print_busy_check

        timed(model, ids[:, :256], "h2o", 0.5, 4)  # warm-up
        check = dict(busy_paths(model, ids, args.budget, args.new_tokens, args.busy_rounds), context=args.context,
                     budget=args.budget, new_tokens=args.new_tokens)
        print_busy_check(check)
        print(f"wrote {merge_busy_check('kv_eviction', check)}")
        return 0
    print(f"SmolLM2-135M, {torch.get_num_threads()} threads, context {args.context}, budget {args.budget:.0%}, "
          f"{args.new_tokens} decoded tokens, best of {args.rounds} alternating rounds")
    timed(model, ids[:, :256], "h2o", 0.5, 4)  # warm-up
    best: dict[str, dict] = {}
    variants = ([("full", None, "decode")] + [(p, None, "decode") for p in POLICIES]
                + [(p, 16, "decode") for p in POLICIES if p != "lazy_eviction"] + [("lazy_eviction", 1, "decode")]
                + [("snapkv", None, "prompt")])
    for _ in range(args.rounds):
        for policy, every, moment in variants:
            name = policy if every is None else f"{policy}/every{every}"
            name = name if moment == "decode" else f"{name}/prompt"
            r = timed(model, ids, policy, None if policy == "full" else args.budget, args.new_tokens, every, moment)
            if name not in best or r["decode_tokens_per_s"] > best[name]["decode_tokens_per_s"]:
                best[name] = r
    full = best["full"]
    rows = {}
    for name, r in best.items():
        rows[name] = dict(r, kv_bytes_ratio=r["kv_bytes"] / full["kv_bytes"],
                          decode_speed_ratio=r["decode_tokens_per_s"] / full["decode_tokens_per_s"])
        print(f"  {name:<26} KV {r['kv_bytes'] / 2**20:6.1f} MiB = {rows[name]['kv_bytes_ratio']:.3f}x   "
              f"decode {r['decode_tokens_per_s']:5.1f} tok/s = {rows[name]['decode_speed_ratio']:.2f}x")

    # a long context: where the smaller cache starts to pay for its scoring
    long_ids = torch.randint(100, model.config.vocab_size, (1, 2 * args.context), generator=g)
    long = {}
    for _ in range(args.rounds):
        for policy, every in (("full", None), ("streaming_llm", None), ("h2o", 16), ("tova", 16)):
            name = policy if every is None else f"{policy}/every{every}"
            r = timed(model, long_ids, policy, None if policy == "full" else args.budget, args.new_tokens // 2, every)
            if name not in long or r["decode_tokens_per_s"] > long[name]["decode_tokens_per_s"]:
                long[name] = r
    long_ratios = {k: v["decode_tokens_per_s"] / long["full"]["decode_tokens_per_s"] for k, v in long.items()}
    print(f"  context {2 * args.context}: decode speed vs full " + ", ".join(f"{k} {v:.2f}x" for k, v in long_ratios.items()))

    # H2O prompt compression: scoring every prompt query vs the prefill itself (best of rounds)
    scoring, prefill = [], []
    for _ in range(args.rounds):
        with kv.evicting(model, "h2o", round(args.budget * args.context), "prompt") as cache, torch.inference_mode():
            import time

            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            t1 = time.perf_counter()
            cache.before_forward(1, 1, None)  # the compression that precedes the first decoding step
            t2 = time.perf_counter()
        prefill.append(t1 - t0)
        scoring.append(t2 - t1)
    h2o_extra = min(scoring) / min(prefill)
    print(f"  H2O prompt scoring {min(scoring):.2f} s vs prefill {min(prefill):.2f} s = +{h2o_extra:.0%}")

    every_step = {p: rows[p] for p in POLICIES if p != "lazy_eviction"}
    every_step["lazy_eviction"] = rows["lazy_eviction/every1"]
    amortised = {p: rows[f"{p}/every16"] for p in POLICIES if p != "lazy_eviction"}
    amortised["lazy_eviction"] = rows["lazy_eviction"]  # it evicts once per observation window by design
    paper = {p: rows[p if m == "decode" else f"{p}/prompt"] for p, (m, _) in PAPER_FREQUENCY.items()}
    targets = {
        "kv_bytes <= 0.3x (every policy, every setting)": all(r["kv_bytes_ratio"] <= 0.3 for r in rows.values()
                                                             if r is not rows["full"]),
        "decode >= 0.9x at the paper's frequency (every policy)": all(r["decode_speed_ratio"] >= 0.9 for r in paper.values()),
        "decode >= 0.9x, amortised every 16 (every policy)": all(r["decode_speed_ratio"] >= 0.9 for r in amortised.values()),
        "decode >= 0.9x, every step (every policy)": all(r["decode_speed_ratio"] >= 0.9 for r in every_step.values()),
        "faster than full at 2x context (amortised H2O)": long_ratios["h2o/every16"] > 1.0,
        "H2O prompt scoring <= +50% of prefill": h2o_extra <= 0.5,
    }
    for k, v in targets.items():
        print(f"  {k}: {'met' if v else 'NOT met'}")
    from _load import print_busy_check

    check = busy_paths(model, ids, args.budget, args.new_tokens, args.busy_rounds)
    print_busy_check(check)
    path = record_benchmark("kv_eviction", {
        "context": args.context, "budget": args.budget, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "full": full, "policies": rows,
        "prefill_chunk_at_decode": CHUNK,
        "paper_frequency": {p: ("prompt compression once, no eviction while decoding" if m == "prompt" else
                                f"every {kv.get_policy(p).evict_every} step(s)") for p, (m, _) in PAPER_FREQUENCY.items()},
        "decode_speed_ratio_paper_frequency": {p: r["decode_speed_ratio"] for p, r in paper.items()},
        "min_decode_speed_ratio_paper_frequency": min(r["decode_speed_ratio"] for r in paper.values()),
        "min_decode_speed_ratio_every_step": min(r["decode_speed_ratio"] for r in every_step.values()),
        "min_decode_speed_ratio_amortised": min(r["decode_speed_ratio"] for r in amortised.values()),
        "max_kv_bytes_ratio": max(r["kv_bytes_ratio"] for r in rows.values() if r is not rows["full"]),
        "long_context": 2 * args.context, "long_context_decode_speed_ratio": long_ratios,
        "h2o_prompt_scoring_s": min(scoring), "prefill_s": min(prefill), "h2o_prompt_scoring_over_prefill": h2o_extra,
        "targets_met": targets,
        "busy_check": check,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
