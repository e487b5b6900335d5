"""Chapter 5's machinery on SmolLM2-135M, every ratio from one run (interleaved rounds, best of each):

1. **Scoring steps**: the one-pass scorer (one forward per trace, traces batched 8 at a time, then per-step
   reductions over exact token spans) vs one forward per step (the prefix up to each step's end), equal scores
   checked — on the trace writer's short traces (no re-checks) and long ones (every kind of redundancy), and on the
   reasoner's own CoTs of at least 6 steps. The speed-up is bounded by how many more tokens the per-step forwards
   read (their prefixes add up), which grows with the number of steps.
2. **Training throughput** (tokens/s of one optimizer step on 8 real training examples): full fine-tuning (float32)
   vs LoRA (float32 weights, and bfloat16 base weights as the reasoner is trained).
3. **Generation throughput** of the reasoner (greedy, 16 prompts in one batch): bfloat16 vs float32 weights.

4. **On a busy laptop** (``busy_check``, ``benchmarks/_load.py``): one-pass scoring vs one forward per step on the
   first ``--busy-traces`` (10) short traces, each timed idle and beside CPU-bound competitors the script starts
   and stops itself (one ``while True: pass`` per core minus one), rounds interleaved, best of each: the one-pass
   scorer's busy/idle slowdown beside the per-step baseline's. ``--busy-only`` runs just this check and adds it
   to the committed JSON.

    .venv/bin/python benchmarks/bench_cot.py [--traces 50] [--rounds 2] [--busy-traces 10] [--busy-only]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import replace

import torch

from pruning_lab import cot
from pruning_lab import reasoner as rs
from pruning_lab.models import load_llm
from pruning_lab.workbook import record_benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@torch.inference_mode()
def per_step(model, enc):
    """The slow way: for each step, a forward over the prefix that ends with it."""
    first, mean = [], []
    for a, b in enc.steps:
        logits = model(input_ids=enc.ids[None, :b], use_cache=False).logits[0, a - 1:b - 1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, enc.ids[a:b, None])[:, 0]
        first.append(-float(lp[0]))
        mean.append(-float(lp.mean()))
    return torch.tensor(first), torch.tensor(mean)


def one_pass(model, encoded):
    """One forward per trace (traces batched 8 at a time), then per-step reductions."""
    logps = cot.token_logprobs_batch(model, [e.ids for e in encoded])
    return [(cot.FirstTokenSurprisal().score(e, lp), cot.MeanSurprisal().score(e, lp)) for e, lp in zip(encoded, logps)]


def measure_scoring(model, encoded, rounds):
    tokens = sum(len(e.ids) for e in encoded)
    prefix_tokens = sum(b for e in encoded for _, b in e.steps)  # what one forward per step reads
    steps = sum(len(e.steps) for e in encoded)
    one_pass(model, encoded[:2]), per_step(model, encoded[0])  # warm-up
    best = {"one_pass": float("inf"), "per_step": float("inf")}
    for _ in range(rounds):  # alternate, best of rounds
        for name, fn in (("one_pass", one_pass), ("per_step", lambda m, es: [per_step(m, e) for e in es])):
            t0 = time.perf_counter()
            out = fn(model, encoded)
            best[name] = min(best[name], time.perf_counter() - t0)
            if name == "one_pass":
                fast = out
            else:
                slow = out
    diff = max(float((a - b).abs().max()) for fa, sa in zip(fast, slow) for a, b in zip(fa, sa))
    return {"traces": len(encoded), "steps": steps, "steps_per_trace": steps / len(encoded), "tokens": tokens,
            "prefix_tokens_read_per_step": prefix_tokens, "token_ratio": prefix_tokens / tokens, "seconds": best,
            "speedup": best["per_step"] / best["one_pass"], "one_pass_tokens_per_s": tokens / best["one_pass"],
            "max_abs_score_difference": diff}


def busy_scoring(model, encoded, rounds) -> dict:
    """One-pass scoring vs one forward per step over ``encoded``, idle and busy (``busy_check``)."""
    from _load import busy_check

    one_pass(model, encoded[:2]), per_step(model, encoded[0])  # warm-up
    methods = {"one_pass": lambda: one_pass(model, encoded), "per_step": lambda: [per_step(model, e) for e in encoded]}
    return dict(busy_check(methods, {"one_pass": "per_step"}, rounds=rounds, log=lambda *_: None),
                traces=len(encoded), tokens=sum(len(e.ids) for e in encoded))


def train_step_seconds(model, tok, pairs, hp: rs.LoraHparams) -> tuple[float, int]:
    """Seconds of one optimizer step on ``pairs`` (after one warm-up step), and the tokens it reads."""
    wrapped = rs._wrap(model, hp)
    params = list(rs._trainable(wrapped).values())
    opt = torch.optim.AdamW(params, lr=1e-5)
    micro = [rs._batch(tok, pairs[i:i + hp.micro_batch], hp.max_len, "cpu") for i in range(0, len(pairs), hp.micro_batch)]
    tokens = sum(int(m.sum()) for _, m, _ in micro)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for ids, mask, target in micro:
            rs.completion_loss(wrapped, ids, mask, target).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[-1], tokens


def measure_training(tok, pairs, rounds):
    settings = {"full_fp32": rs.LoraHparams(rank=0), "lora_fp32": rs.LoraHparams(bf16=False),
                "lora_bf16": rs.LoraHparams(bf16=True)}
    best = {k: float("inf") for k in settings}
    tokens = 0
    for _ in range(rounds):
        for name, hp in settings.items():
            model, _ = load_llm()
            s, tokens = train_step_seconds(model, tok, pairs, hp)
            best[name] = min(best[name], s)
            del model
    tps = {k: tokens / v for k, v in best.items()}
    return {"tokens_per_step": tokens, "seconds_per_step": best, "tokens_per_s": tps,
            "lora_bf16_over_full": tps["lora_bf16"] / tps["full_fp32"],
            "lora_fp32_over_full": tps["lora_fp32"] / tps["full_fp32"]}


def measure_generation(model, tok, problems, rounds, max_new_tokens=128):
    prompts = [rs.prompt(tok, p) for p in problems]
    f32 = copy.deepcopy(model).float()
    best = {"bf16": float("inf"), "fp32": float("inf")}
    tokens = {}
    for _ in range(rounds):
        for name, m in (("bf16", model), ("fp32", f32)):
            t0 = time.perf_counter()
            out = rs.generate(m, tok, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
            best[name] = min(best[name], time.perf_counter() - t0)
            tokens[name] = sum(o["new_tokens"] for o in out)
    tps = {k: tokens[k] / best[k] for k in best}
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "new_tokens": tokens, "seconds": best,
            "tokens_per_s": tps, "bf16_over_fp32": tps["bf16"] / tps["fp32"]}


@torch.inference_mode()
def reference_forward(model, rounds) -> float:
    """One 512-token float32 forward of SmolLM2 (0.96 s on 2 idle cores, /work/shared/NOTES.md): how loaded the
    machine was while the other figures were measured."""
    ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy-traces", type=int, default=10, help="short traces scored in the busy check")
    ap.add_argument("--busy-only", action="store_true", help="run only the busy check; add it to the committed JSON")
    args = ap.parse_args()
    base, tok = load_llm()
    if args.busy_only:
        from _load import merge_busy_check, print_busy_check

        problems = rs.make_problems(args.traces, seed=0)[:args.busy_traces]
        short = [cot.encode(tok, rs.verbose_trace(p, seed=i, redundancy=0.0)) for i, p in enumerate(problems)]
        check = busy_scoring(base, short, args.rounds)
        print_busy_check(check)
        print(f"wrote {merge_busy_check('cot', check)}")
        return 0
    ref_before = reference_forward(base, args.rounds)
    problems = rs.make_problems(args.traces, seed=0)
    short = [cot.encode(tok, rs.verbose_trace(p, seed=i, redundancy=0.0)) for i, p in enumerate(problems)]
    long = [cot.encode(tok, rs.verbose_trace(p, seed=i)) for i, p in enumerate(problems)]
    runs = {"short": measure_scoring(base, short, args.rounds), "long": measure_scoring(base, long, args.rounds)}
    reasoner, _ = rs.load_reasoner(rs.CLASSROOM)
    # the reasoner's own CoTs as chapter 5 samples them (temperature 0.6), on 3-operation problems of its family so
    # that enough have >= 6 steps (right or wrong: the scorer's speed does not depend on the answer)
    own_p = rs.make_problems(4 * args.traces, seed=1, family=replace(rs.CLASSROOM.family, steps=(3, 3)))
    sols = rs.solve(reasoner, tok, own_p, max_new_tokens=448, batch_size=25, temperature=0.6, progress=True)
    own_enc = [cot.encode(tok, rs.Trace(p.question, rs.split_cot(o["text"]), p.answer))
               for p, o in zip(own_p, sols) if rs.split_cot(o["text"]).count("\n\n") >= 5]
    own_enc = own_enc[:args.traces]
    if len(own_enc) < 2:
        raise SystemExit(f"only {len(own_enc)} of the reasoner's {len(own_p)} CoTs have >= 6 steps: raise --traces.")
    runs["own"] = measure_scoring(reasoner.float(), own_enc, args.rounds)
    reasoner = reasoner.to(torch.bfloat16)
    pairs = rs.training_examples(rs.CLASSROOM, tok, 8, seed=99)
    training = measure_training(tok, pairs, args.rounds)
    generation = measure_generation(reasoner, tok, rs.make_problems(16, split="heldout", seed=5), args.rounds)
    busy = busy_scoring(base, short[:args.busy_traces], args.rounds)
    ref_after = reference_forward(load_llm()[0], args.rounds)
    print(f"{torch.get_num_threads()} threads, best of {args.rounds}; reference 512-token forward {ref_before:.2f} s "
          f"before, {ref_after:.2f} s after (0.96 s on 2 idle cores)")
    for name, r in runs.items():
        print(f"  scoring, {name}: {r['traces']} traces, {r['steps_per_trace']:.1f} steps/trace, {r['tokens']} tokens; "
              f"per step {r['seconds']['per_step']:.2f} s (reads {r['token_ratio']:.1f}x the tokens), one pass "
              f"{r['seconds']['one_pass']:.2f} s ({r['one_pass_tokens_per_s']:.0f} tokens/s): {r['speedup']:.1f}x, "
              f"max score difference {r['max_abs_score_difference']:.1e}")
    print("  training tokens/s: " + ", ".join(f"{k} {v:.0f}" for k, v in training["tokens_per_s"].items())
          + f" (LoRA bf16 / full: {training['lora_bf16_over_full']:.2f}x)")
    print("  generation tokens/s: " + ", ".join(f"{k} {v:.0f}" for k, v in generation["tokens_per_s"].items())
          + f" (bf16 / fp32: {generation['bf16_over_fp32']:.2f}x)")
    from _load import print_busy_check

    print_busy_check(busy)
    path = record_benchmark("cot", {
        "rounds": args.rounds, "reference_forward_512_s": {"before": ref_before, "after": ref_after, "idle": 0.96},
        "short_traces": runs["short"], "long_traces": runs["long"], "own_traces": runs["own"],
        "speedup_short": runs["short"]["speedup"], "speedup_long": runs["long"]["speedup"],
        "speedup_own": runs["own"]["speedup"], "target_5x_met": {k: r["speedup"] >= 5 for k, r in runs.items()},
        "training": training, "generation": generation,
        "train_tokens_per_s_lora_bf16": training["tokens_per_s"]["lora_bf16"],
        "train_tokens_per_s_full": training["tokens_per_s"]["full_fp32"],
        "generate_tokens_per_s_bf16": generation["tokens_per_s"]["bf16"],
        "busy_check": busy})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
