"""Cost of exact head freezing: masked safety fine-tuning vs the same run without a skip.

Masking adds, per step, a `masked_fill_` of the frozen gradient entries and a `torch.where` restore
of the frozen slices (only the attention parameters of layers with a skipped head). This times N
steps of both runs on the same data, seed and settings and prints the overhead.

    python benchmarks/bench_masked_training.py                      # SmolLM2, 5 steps, batch 8
    python benchmarks/bench_masked_training.py --model tiny --steps 20
    python benchmarks/bench_masked_training.py --batch-size 4 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cast_interp.data import load_bundled
from cast_interp.model import load_model
from cast_interp.sparse_tuning import (TuningConfig, safety_finetune, select_arm_heads,
                                       trainable_parameters)


def timed_run(model, data, skip, cfg) -> tuple[list[float], int]:
    """Seconds per step (from `on_step` timestamps) and n_trainable."""
    stamps = [time.perf_counter()]
    res = safety_finetune(model, data, skip_heads=skip, config=cfg,
                          on_step=lambda s, l: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])], res.n_trainable


def mask_ops_time(model, skip, repeats: int = 20) -> float:
    """Seconds per step of the masking work alone (gradient masked_fill_ + where-restore), which
    shared-CPU noise in whole-step timings can hide."""
    params, masks = trainable_parameters(model, skip)
    named = dict(model.named_parameters())
    work = [(named[n], torch.randn_like(named[n]), named[n].detach().clone(), m)
            for n, m in masks.items()]
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(repeats):
            for p, grad, snap, m in work:
                grad.masked_fill_(m, 0.0)
                p.copy_(torch.where(m, snap, p))
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name or 'tiny'")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-fraction", type=float, default=0.1, help="fraction of heads skipped")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"])
    ap.add_argument("--scope", default="attention", choices=["attention", "all"])
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = load_model(args.model, device="cpu")
    data = load_bundled("harmful", "train")
    cfg = TuningConfig(steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer,
                       scope=args.scope, seed=args.seed)
    skip = select_arm_heads("random", None, args.skip_fraction, model=model, seed=args.seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    # One unrecorded step first: allocator and thread-pool warm-up would bias whichever run is first.
    safety_finetune(model, data, config=TuningConfig(steps=1, batch_size=args.batch_size))
    times: dict[str, list[float]] = {"unmasked": [], "masked": []}
    n_trainable = {}
    for _ in range(args.repeats):
        for name, heads in (("unmasked", []), ("masked", skip)):
            model.load_state_dict(state)
            t, n_trainable[name] = timed_run(model, data, heads, cfg)
            times[name] += t
    model.load_state_dict(state)

    print(f"model={args.model} threads={torch.get_num_threads()} steps={args.steps} "
          f"batch={args.batch_size} optimizer={args.optimizer} scope={args.scope} "
          f"skipped heads={len(skip)} ({args.skip_fraction:.0%})")
    print(f"{'run':<10}{'n_trainable':>14}{'mean s/step':>13}{'median s/step':>15}"
          f"{'overhead (median)':>19}")
    base = statistics.median(times["unmasked"])
    for name in ("unmasked", "masked"):
        med = statistics.median(times[name])
        over = f"{100 * (med / base - 1):+.1f}%" if name == "masked" else ""
        print(f"{name:<10}{n_trainable[name]:>14,}{statistics.mean(times[name]):>13.3f}{med:>15.3f}"
              f"{over:>19}")
    ops = mask_ops_time(model, skip)
    model.load_state_dict(state)
    print(f"masking work alone: {ops * 1e3:.1f} ms/step ({100 * ops / base:.2f}% of a step)")


if __name__ == "__main__":
    main()
