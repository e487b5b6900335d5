"""The cost of an IMP level beyond training: one ticket level (prune + reset + masked training)
vs the foundation's plain training loop on the same data, iterations and threads, measured in
one run. Repeats alternate the two so a busy machine slows both alike.

    .venv/bin/python benchmarks/bench_lottery.py [--iterations 1000] [--repeats 3] [--threads 1]
"""

import argparse
import statistics
import tempfile
import time

import torch

from pruning_lab.data import load_image_data
from pruning_lab.lottery import DataHparams, LotteryHparams, LotteryRun, PruningHparams, TrainHparams, imp_step, reset_to
from pruning_lab.magnitude import keep_masked
from pruning_lab.models import make_model
from pruning_lab.train import TrainConfig, train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_image_data()
    hp = LotteryHparams(data=DataHparams(), train=TrainHparams(iterations=args.iterations, eval_every=0),
                        pruning=PruningHparams(rate=0.36, output_rate=0.19))
    with tempfile.TemporaryDirectory() as tmp:
        run = LotteryRun(hp, run_dir=tmp, data=data, progress=False)
        run.run(1, baselines=())  # level 0 (dense) and level 1 exist; time the next levels' work
        masks, final, theta0 = run.masks(1), run.final_state(1), run.rewind_state()
        plain_s, masked_s, level_s, prune_s = [], [], [], []
        for _ in range(args.repeats):
            model = make_model("lenet", 0)
            t0 = time.perf_counter()
            train(model, data, TrainConfig(iterations=args.iterations, eval_every=0), progress=False)
            plain_s.append(time.perf_counter() - t0)

            model = make_model("lenet", 0)
            t0 = time.perf_counter()
            train(model, data, TrainConfig(iterations=args.iterations, eval_every=0), progress=False,
                  after_step=keep_masked(model, masks))
            masked_s.append(time.perf_counter() - t0)

            model = make_model("lenet", 0)
            t0 = time.perf_counter()
            model.load_state_dict(final)
            new_masks = imp_step(model, masks, hp.pruning)
            reset_to(model, theta0, new_masks)
            prune_s.append(time.perf_counter() - t0)
            run._train(model, new_masks, 0, "bench")
            level_s.append(time.perf_counter() - t0)
    p, lv, pr = statistics.median(plain_s), statistics.median(level_s), statistics.median(prune_s)
    mk = statistics.median(masked_s)
    print(f"LeNet-300-100, Fashion-MNIST, {args.iterations} iterations of batch 60, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"  plain pruning_lab.train             : {p:.2f} s")
    print(f"  same + keep_masked after every step : {mk:.2f} s")
    print(f"  one IMP level (prune+reset+masked)  : {lv:.2f} s, of which prune + reset {1000 * pr:.1f} ms")
    print("    (a level also keeps the best-validation weights and tests them once: the LTH's accuracy at early stop)")
    print(f"  ratio masked / plain                : {mk / p:.3f}")
    print(f"  ratio level / plain                 : {lv / p:.3f}")
    from pruning_lab.workbook import record_benchmark

    path = record_benchmark("lottery", {
        "iterations": args.iterations, "threads": args.threads, "repeats": args.repeats, "statistic": "median",
        "seconds": {"plain": p, "masked": mk, "imp_level": lv, "prune_and_reset": pr},
        "masked_over_plain": mk / p, "level_over_plain": lv / p,
    })
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
