"""What a validation curve costs beside the training it watches (issue #23, "cheap curves").

A v3 piece (the verdict and the peer comparison) records safety and the primary utility endpoint at
8 or more validation checkpoints, generation-free: the log-probability of the 16 refusal openings
after each of `--n-val` harmful and `--n-val` benign-but-sensitive prompts (`harness.CurveEvaluator`:
a bf16 copy of the weights kept between points; each prompt once after the shared system turn,
the openings as a token trie). This script times, on the same model and core count:

  training step   one v3 step (`VerdictConfig().tuning`: pure safety SFT of attention, bf16 with
                  float32 masters), batch `--batch-size`; the median step after the first;
  curve point     `CurveEvaluator` in bf16 (the v3 default) and in float32 (the naive way: no
                  copy, float32 weights), median of `--repeats`; the same values either way up to
                  bf16 rounding (printed);

with the FLOPs each does (`bench_precision.Flops`: real tokens only; a curve point splits into the
prompts' tokens and the trie's) and the share of the machine's matmul peak. It then gives the
ratio a piece pays, 8 curve points against `steps` training steps, for pieces of 16 to 256 steps,
and the ratio of FLOPs, which no implementation can beat at equal efficiency.

Run it on an otherwise idle machine. Example:
python benchmarks/bench_curves.py --threads 1
A quick check that it runs: --model tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import BF16, Flops, matmul_peak  # noqa: E402

from cast_interp import backend  # noqa: E402
from cast_interp.data import example_lengths, load_bundled, with_refusals  # noqa: E402
from cast_interp.harness import CurveEvaluator  # noqa: E402
from cast_interp.model import load_model  # noqa: E402
from cast_interp.safety import (REFUSAL_OPENINGS, _common_prefix, encode_prompt,  # noqa: E402
                                encode_text)
from cast_interp.sparse_tuning import _BatchSource, safety_finetune  # noqa: E402
from cast_interp.verdict import VerdictConfig  # noqa: E402

PIECE_STEPS = (16, 64, 128, 256)
CURVE_POINTS = 8


def curve_flops(model, flops: Flops, datasets) -> dict:
    """FLOPs of one curve point as `refusal_logprobs` does it: per set, the shared opening once,
    each prompt's own tokens, then the openings' trie (one token per proper prefix of an opening,
    attending to its prompt and its trie ancestors; unembedded at the prompt's last token and at
    every trie node). {"prompt", "trie", "total", "prompt_tokens", "trie_tokens"}."""
    opens = [encode_text(model, o) for o in REFUSAL_OPENINGS]
    nodes = {tuple(o[:k]) for o in opens for k in range(1, len(o))}
    prompt = trie = 0.0
    n_prompt = n_trie = 0
    for ds in datasets:
        ids = [encode_prompt(model, p) for p in ds.prompts]
        shared = len(_common_prefix(ids))
        prompt += flops.forward(shared, shared * shared, 0)
        for p in ids:
            n = len(p) - shared
            prompt += flops.forward(n, n * len(p), 1)
            trie += sum(flops.forward(1, len(p) + len(node), 1) for node in nodes)
            n_prompt += n
            n_trie += len(nodes)
    return {"prompt": prompt, "trie": trie, "total": prompt + trie, "prompt_tokens": n_prompt,
            "trie_tokens": n_trie}


def time_training(model, data, args, flops: Flops) -> dict:
    cfg = replace(VerdictConfig().tuning(0), steps=args.steps, batch_size=args.batch_size)
    source = _BatchSource(model, data, None, cfg)
    batches = [source.next() for _ in range(cfg.steps)]
    step_flops = [flops.train(example_lengths(b).tolist(), flops.attn_weights) for b in batches]
    ends: list = []
    tuned = backend.copy_model(model)
    safety_finetune(tuned, data, config=cfg, on_step=lambda s, loss: ends.append(
        time.perf_counter()))
    times = np.diff(ends)
    return {"time_s": float(np.median(times)), "flops": float(np.mean(step_flops[1:]))}


def time_curve(model, harmful, over, dtype: str, repeats: int) -> tuple[float, dict]:
    from types import SimpleNamespace

    ev = CurveEvaluator(SimpleNamespace(harmful_val=harmful, over_val=over), dtype=dtype)
    values = ev(model)  # the first call makes the bf16 copy; the run's later points refresh it
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ev(model)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), values


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a model name load_model knows (tiny: a quick check)")
    ap.add_argument("--threads", type=int, default=1, help="one per piece, as a worker runs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="training steps timed (first dropped)")
    ap.add_argument("--n-val", type=int, default=32, help="harmful and over-refusal prompts each")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    model.requires_grad_(False)
    flops = Flops(model)
    peaks = {"float32": matmul_peak(torch.float32), "bf16": matmul_peak(BF16)}
    train = with_refusals(load_bundled("harmful", "train"))
    harmful = load_bundled("harmful", "test").take(args.n_val)
    over = load_bundled("over_refusal").take(args.n_val)

    step = time_training(model, train, args, flops)
    cf = curve_flops(model, flops, (harmful, over))
    t16, v16 = time_curve(model, harmful, over, "bfloat16", args.repeats)
    t32, v32 = time_curve(model, harmful, over, "float32", args.repeats)
    gap = max(float(np.max(np.abs(np.subtract(v16[k], v32[k])))) for k in v16)

    print(f"{args.model} on {torch.get_num_threads()} thread(s); 2048x2048 matmul peak: float32 "
          f"{peaks['float32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s\n")
    print("| pass | time (s) | GFLOP | GFLOP/s | share of peak |")
    print("|---|---|---|---|---|")
    rows = [("training step (bf16, batch %d)" % args.batch_size, step["time_s"], step["flops"],
             "bf16"),
            (f"curve point, bf16 ({len(harmful)} + {len(over)} prompts)", t16, cf["total"],
             "bf16"),
            ("curve point, float32 (naive: no bf16 copy)", t32, cf["total"], "float32")]
    for name, t, f, dt in rows:
        print(f"| {name} | {t:.2f} | {f / 1e9:.1f} | {f / t / 1e9:.1f} | "
              f"{f / t / peaks[dt]:.0%} |")
    print(f"\ncurve point tokens: {cf['prompt_tokens']} prompt tokens after the shared system "
          f"turn, {cf['trie_tokens']} trie tokens ({cf['trie'] / cf['total']:.0%} of its FLOPs); "
          f"largest |bf16 - float32| of a prompt's score: {gap:.3f} nats; bf16 vs float32 "
          f"speed {t32 / t16:.2f}x")
    print(f"\n| piece | training (s) | {CURVE_POINTS} curve points, bf16 (s) | curves / training "
          "| FLOP ratio (floor at equal efficiency) |")
    print("|---|---|---|---|---|")
    table = []
    for n in PIECE_STEPS:
        tr, cu = n * step["time_s"], CURVE_POINTS * t16
        fr = CURVE_POINTS * cf["total"] / (n * step["flops"])
        table.append({"steps": n, "train_s": tr, "curves_s": cu, "ratio": cu / tr,
                      "flop_ratio": fr})
        print(f"| {n} steps | {tr:.0f} | {cu:.0f} | {cu / tr:.2f} | {fr:.2f} |")
    return {"model": args.model, "threads": torch.get_num_threads(), "peaks": peaks,
            "step": step, "curve_flops": cf, "curve_s": {"bf16": t16, "float32": t32},
            "gap": gap, "pieces": table}


if __name__ == "__main__":
    main()
