"""Benchmark bf16 and length-grouped batches against float32: time, FLOPs, share of the machine's
peak, and the accuracy check of each path, for the three costly passes of a run.

The machine's peak is measured first: a 2048 x 2048 matmul in float32 and in bfloat16 (best of
`--repeats`). Then, on the same model:

  training step   `safety_finetune` steps (batch `--batch-size` of bundled harmful prompts with
                  refusals, attention scope): float32, float32 grouped by length, bf16 (a bf16
                  copy computes, float32 masters), bf16 grouped, bf16-autocast. Time: the median
                  step after the first. Check: the largest |loss - float32 loss| / |float32 loss|
                  over the steps (the curve check over seeds: `--curve-steps`).
  diagnosis       `optimization_conflict` gradients (one example at a time: no padding, so no
                  grouped row) of `--n-diag` safety and `--n-diag` utility examples, float32 vs a
                  bf16 copy. Check: `check_map` on O (top-10% overlap, Spearman); with
                  `--full-map`, `diagnose` both ways and `check_map` on O, S and C.
  evaluation      the monitor's generation-free pass (`utility_per_prompt` KL + NLL with the
                  original's log-probs kept, `refusal_logprobs`) of `--n-eval` benign and harmful
                  prompts, on two arms (the model and a copy with 1% noise on attention weights):
                  float32 ungrouped (the reference), float32 grouped, bf16, bf16 grouped. Check:
                  `check_paired_differences` of the arms' per-prompt refusal score, KL and NLL.

FLOPs are counted, not measured: a matmul of an `m x k` by a `k x n` is 2mkn. Forward: 2 x (the
blocks' matmul weights) per token, 4 x n_heads x d_head per (query, key) pair per layer (the full
square, as TransformerLens computes it), and 2 x d_model x d_vocab per unembedded position.
Backward: the forward's FLOPs again for the gradients of activations (twice for the attention
products, whose two operands both need one; none for the first block's Q/K/V inputs: nothing below
trains), plus 2 x (trained matmul weights) per token for the weights' gradients (frozen weights
get none). These counts equal torch's `FlopCounterMode` on the tiny model
(tests/test_bench_precision.py). Only real tokens count: padding is work done but not useful, so
grouping shows up as a shorter time for the same FLOPs.
"share of peak" divides the achieved FLOP/s by the peak of the dtype the path computes in.

`--curve-steps N` adds the training-curve check in the v3 regime's tuning
(`VerdictConfig().tuning`): float32 on `--curve-seeds` training seeds and bf16 (grouped) on the
first of them, N steps each, a `ValidationMonitor` every `--eval-every` steps, then `check_curves`
on the refusal score and the KL (the issue's 64-step check on SmolLM2: --curve-steps 64).

Run it on an otherwise idle machine; under load the times are meaningless. Example:
python benchmarks/bench_precision.py --threads 2 --out bench_precision.json
A quick check that it runs: --model tiny
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from cast_interp import backend
from cast_interp.conflict import optimization_conflict
from cast_interp.data import (ChatDataset, example_lengths, load_bundled, make_batches,
                              padded_token_share, with_refusals)
from cast_interp.model import load_model
from cast_interp.precision_checks import (check_curves, check_map, check_paired_differences,
                                          curve_array)
from cast_interp.safety import (REFUSAL_OPENINGS, _common_prefix, encode_prompt, encode_text,
                                prefix_padded_share, refusal_logprobs)
from cast_interp.sparse_tuning import (TuningConfig, ValidationMonitor, _BatchSource,
                                       safety_finetune)
from cast_interp.utility import OriginalLogprobs, _scored_mask, utility_per_prompt

BF16 = torch.bfloat16


# --------------------------------------------------------------------------------------------------
# Peak and FLOPs
# --------------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, *, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n matmuls in `dtype` (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _seconds(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Flops:
    """FLOP counts of one model's passes (see the module docstring for the convention)."""

    def __init__(self, model):
        c = model.cfg
        kv = c.n_key_value_heads or c.n_heads
        self.qkv_weights = c.d_model * c.d_head * (c.n_heads + 2 * kv)  # one layer's Q, K, V
        self.attn_weights = c.n_layers * c.d_model * c.d_head * (2 * c.n_heads + 2 * kv)
        mlp = (3 if getattr(c, "gated_mlp", False) else 2) * c.d_model * c.d_mlp
        self.block_weights = self.attn_weights + c.n_layers * mlp
        self.pair = 4 * c.n_layers * c.n_heads * c.d_head
        self.unembed = 2 * c.d_model * c.d_vocab

    def forward(self, tokens: int, pairs: int, unembedded: int) -> float:
        return 2.0 * self.block_weights * tokens + self.pair * pairs + self.unembed * unembedded

    def train(self, lengths: list[int], trainable_weights: int) -> float:
        """Forward + backward over whole sequences of these lengths (every position unembedded),
        with nothing below the first block trained (its Q/K/V need no input gradient)."""
        t, pairs = sum(lengths), sum(n * n for n in lengths)
        fwd = self.forward(t, pairs, t)
        # Backward: the activations' gradients (the forward again; both operands of the two
        # attention products need one, so those count twice) and the trained weights'.
        bwd = fwd - 2.0 * self.qkv_weights * t + self.pair * pairs + 2.0 * trainable_weights * t
        return fwd + bwd


# --------------------------------------------------------------------------------------------------
# The three passes
# --------------------------------------------------------------------------------------------------

TRAIN_PATHS = [("float32", False), ("float32", True), ("bf16", False), ("bf16", True),
               ("bf16-autocast", False)]


def bench_training(model, data: ChatDataset, args, flops: Flops) -> list[dict]:
    rows, ref_losses = [], None
    for precision, grouped in TRAIN_PATHS:
        cfg = TuningConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-4, seed=0,
                           precision=precision, group_by_length=grouped)
        # The steps' batches, rebuilt from the same seeded source, for the FLOP count.
        source = _BatchSource(model, data, None, cfg)
        steps = [source.next() for _ in range(cfg.steps)]
        step_flops = [flops.train(example_lengths(b).tolist(), flops.attn_weights) for b in steps]
        ends = []
        tuned = backend.copy_model(model)
        res = safety_finetune(tuned, data, config=cfg,
                              on_step=lambda s, loss: ends.append(time.perf_counter()))
        del tuned
        times = np.diff(ends)  # steps 1.. (the first step warms up)
        t = float(np.median(times)) if len(times) else float("nan")
        ref_losses = res.losses if ref_losses is None else ref_losses
        dev = max(abs(a - b) / abs(b) for a, b in zip(res.losses, ref_losses))
        rows.append({"stage": "training step", "path": _name(precision, grouped), "time_s": t,
                     "flops": float(np.mean(step_flops[1:] or step_flops)),
                     "dtype": "float32" if precision == "float32" else "bf16",
                     "padded_share": res.config["compute"]["padded_token_share"],
                     "check": "reference" if (precision, grouped) == TRAIN_PATHS[0] else
                     f"loss within {dev:.1e} of float32", "passed": None, "losses": res.losses})
    return rows


def bench_diagnosis(model, safe: ChatDataset, util: ChatDataset, args, flops: Flops) -> list[dict]:
    kw = dict(batch_size=8, end_of_turn_in_loss=False)
    rows, ref = [], None
    for dtype in ("float32", "bf16"):
        m = model if dtype == "float32" else backend.copy_in_dtype(model, BF16)
        sb, ub = make_batches(m, safe, **kw), make_batches(m, util, **kw)
        lengths = [n for b in sb + ub for n in example_lengths(b).tolist()]
        f = sum(flops.train([n], flops.attn_weights) for n in lengths)
        t = min(_seconds(lambda: optimization_conflict(m, sb, ub, n_bootstrap=0))
                for _ in range(args.repeats))
        res = optimization_conflict(m, sb, ub, n_bootstrap=0)
        O = res.units("head")["O"]
        if ref is None:
            ref, check = O, {"passed": None, "text": "reference"}
        else:
            c = check_map({"O": ref}, {"O": O})
            check = {"passed": c["passed"], "text": f"Spearman(O) {c['spearman']['O']:.3f}"}
        rows.append({"stage": "diagnosis gradients", "path": dtype, "time_s": t, "flops": f,
                     "dtype": dtype, "padded_share": 0.0, "check": check["text"],
                     "passed": check["passed"]})
    if args.full_map:
        rows[-1].update(_full_map_check(model, safe, util))
    return rows


def _full_map_check(model, safe, util) -> dict:
    from cast_interp.diagnose import DiagnosisConfig, diagnose

    maps = [diagnose(model, safe, util, DiagnosisConfig(
        n_calibration=len(safe), utility_reference="dataset", n_bootstrap=0, dtype=d))
        for d in ("float32", "bfloat16")]
    c = check_map(maps[0], maps[1], seed=maps[0].config.get("diagnosis", {}).get("seed", 0))
    return {"check": f"map: top-{c['k']} overlap {c['overlap']}/{c['k']} (need {c['need']}), "
            f"Spearman O {c['spearman']['O']:.3f}, S {c['spearman']['S']:.3f}",
            "passed": c["passed"]}


EVAL_PATHS = [("float32", False), ("float32", True), ("bf16", False), ("bf16", True)]


def _eval_flops(model, flops: Flops, benign_batches, eot: int, harmful: ChatDataset) -> float:
    """FLOPs of one evaluation as it is done: each batch's shared opening once, real tokens only,
    the unembedding at scored positions; refusal prompts after their shared opening, then the
    refusal openings' token trie."""
    total = 0.0
    for b in benign_batches:
        scored = _scored_mask(b, eot, "content")
        same = int((b.tokens == b.tokens[:1]).all(0).long().cumprod(0).sum())
        first = int(scored.any(0).long().argmax())
        s = min(same, first) if len(b) > 1 else 0
        lengths = example_lengths(b).tolist()
        rest = [n - s for n in lengths]
        total += flops.forward(s + sum(rest), s * s + sum(r * (s + r) for r in rest),
                               int(scored.sum()))
    prompts = [encode_prompt(model, p) for p in harmful.prompts]
    shared = len(_common_prefix(prompts))
    opens = [encode_text(model, o) for o in REFUSAL_OPENINGS]
    nodes = {tuple(o[:k]) for o in opens for k in range(1, len(o))}  # tokens run on the trie
    depth = max(len(o) for o in opens)  # keys of a trie token: its prompt and at most this many
    for p in prompts:
        n = len(p) - shared
        total += flops.forward(n + len(nodes), n * len(p) + len(nodes) * (len(p) + depth),
                               1 + len(nodes))
    return total + flops.forward(shared, shared * shared, 0)


def bench_evaluation(model, harmful: ChatDataset, benign: ChatDataset, args,
                     flops: Flops) -> list[dict]:
    from cast_interp.data import end_of_turn_id

    arm_b = backend.copy_model(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in arm_b.named_parameters():
            if n in backend.attention_param_names(arm_b):
                p.add_(0.01 * p.std() * torch.randn(p.shape, generator=gen))
    bs = args.batch_size
    refs = {g: OriginalLogprobs(model, benign, batch_size=bs, group_by_length=g)
            for g in (False, True)}
    prompt_ids = [encode_prompt(model, p) for p in harmful.prompts]
    f = _eval_flops(model, flops, refs[False].batches, end_of_turn_id(model.tokenizer), harmful)
    rows, ref_values = [], None
    for dtype, grouped in EVAL_PATHS:
        arms = [model, arm_b] if dtype == "float32" else [backend.copy_in_dtype(m, BF16)
                                                          for m in (model, arm_b)]

        def one(m):
            u = utility_per_prompt(m, benign, original=refs[grouped], batch_size=bs,
                                   group_by_length=grouped)
            return {"refusal_score": refusal_logprobs(m, harmful, batch_size=bs,
                                                      group_by_length=grouped),
                    "kl": u["kl_to_original"], "nll": u["reference_nll"]}

        values = [one(m) for m in arms]
        t = min(_seconds(lambda: one(arms[1])) for _ in range(args.repeats))
        pad_kl = padded_token_share(refs[grouped].batches)
        pad_ref = prefix_padded_share(prompt_ids, batch_size=bs, group_by_length=grouped)
        if ref_values is None:
            ref_values, text, passed = values, "reference", None
        else:
            checks = {k: check_paired_differences(ref_values[0][k], ref_values[1][k],
                                                  values[0][k], values[1][k])
                      for k in ("refusal_score", "kl", "nll")}
            passed = all(c["passed"] for c in checks.values())
            text = "paired diff/spread: " + ", ".join(f"{k} {c['ratio']:.3f}"
                                                      for k, c in checks.items())
        rows.append({"stage": "evaluation", "path": _name(dtype, grouped), "time_s": t,
                     "flops": f, "dtype": dtype, "padded_share": pad_kl,
                     "padded_share_refusal": pad_ref, "check": text, "passed": passed})
    return rows


def curve_check(model, data, harmful, benign, args) -> dict:
    """float32 on `--curve-seeds` seeds and bf16 grouped on the first; `check_curves` of each
    measure."""
    monitor = ValidationMonitor(model, harmful, benign, batch_size=args.batch_size,
                                group_by_length=True)
    start = monitor(model)

    from dataclasses import replace

    from cast_interp.verdict import VerdictConfig

    def run(seed, precision, grouped):
        # The v3 regime's tuning (pure safety SFT of attention, constant lr after warmup).
        cfg = replace(VerdictConfig().tuning(seed, precision), steps=args.curve_steps,
                      batch_size=args.batch_size, group_by_length=grouped)
        tuned = backend.copy_model(model)
        return safety_finetune(tuned, data, config=cfg, monitor=monitor,
                               eval_every=args.eval_every, curve_start=start).curve

    f32 = [run(s, "float32", False) for s in range(args.curve_seeds)]
    b16 = [run(0, "bf16", True)]
    out = {}
    for key in ("refusal_score", "kl"):
        c = check_curves(curve_array(f32, key), curve_array(b16, key))
        out[key] = {**c, "float32": curve_array(f32, key).tolist(),
                    "bf16": curve_array(b16, key).tolist()}
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _name(dtype: str, grouped: bool) -> str:
    return dtype + (" grouped" if grouped else "")


def print_table(rows: list[dict], peaks: dict[str, float]) -> None:
    print("| stage | path | time (s) | GFLOP | GFLOP/s | share of peak | padded tokens | "
          "vs float32 | accuracy check |")
    print("|---|---|---|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    for r in rows:
        base.setdefault(r["stage"], r["time_s"])
        rate = r["flops"] / r["time_s"] if r["time_s"] > 0 else float("nan")
        mark = "" if r["passed"] is None else (" (pass)" if r["passed"] else " (FAIL)")
        pad = f"{r['padded_share']:.0%}" + (f" / {r['padded_share_refusal']:.0%}"
                                            if "padded_share_refusal" in r else "")
        print(f"| {r['stage']} | {r['path']} | {r['time_s']:.3g} | {r['flops'] / 1e9:.3g} | "
              f"{rate / 1e9:.3g} | {rate / peaks[r['dtype']]:.0%} | {pad} | "
              f"{base[r['stage']] / r['time_s']:.2f}x | {r['check']}{mark} |")


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a load_model name ('tiny' for a quick check that it runs)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="training steps per path (the first "
                    "warms up)")
    ap.add_argument("--n-diag", type=int, default=8, help="safety and utility examples each")
    ap.add_argument("--n-eval", type=int, default=32, help="benign and harmful prompts each")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per pass")
    ap.add_argument("--full-map", action="store_true", help="also diagnose both ways (slow)")
    ap.add_argument("--curve-steps", type=int, default=0, help="training-curve check (0: none)")
    ap.add_argument("--curve-seeds", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    model.requires_grad_(False)
    flops = Flops(model)
    peaks = {"float32": matmul_peak(torch.float32, repeats=max(args.repeats, 3)),
             "bf16": matmul_peak(BF16, repeats=max(args.repeats, 3))}
    print(f"{args.model} on {torch.get_num_threads()} threads; 2048x2048 matmul peak: float32 "
          f"{peaks['float32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s "
          f"({peaks['bf16'] / peaks['float32']:.2f}x)\n")
    train = with_refusals(load_bundled("harmful", "train"))
    safe = with_refusals(load_bundled("harmful", "calibration")).take(args.n_diag)
    util = load_bundled("benign", "calibration").take(args.n_diag)
    harmful = load_bundled("harmful", "test").take(args.n_eval)
    benign = load_bundled("benign", "test").take(args.n_eval)
    rows = (bench_training(model, train, args, flops)
            + bench_diagnosis(model, safe, util, args, flops)
            + bench_evaluation(model, harmful, benign, args, flops))
    print_table(rows, peaks)
    print("\npadded tokens: of the tokens computed (evaluation: KL batches / refusal prompts). "
          "Accuracy checks: cast_interp.precision_checks.")
    out = {"config": vars(args), "model": args.model, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformer_lens": backend.TL_VERSION,
           "peak_flops": peaks, "rows": rows}
    if args.curve_steps:
        curves = curve_check(model, train, harmful, benign, args)
        out["curves"] = curves
        for key, c in curves.items():
            print(f"curve check ({args.curve_steps} steps, {args.curve_seeds} float32 seeds), "
                  f"{key}: {'pass' if c['passed'] else 'FAIL'}; worst checkpoint "
                  f"{c['worst_checkpoint']}: deviation {c['deviation'][c['worst_checkpoint']]:.3g}"
                  f" vs spread {c['spread'][c['worst_checkpoint']]:.3g}")
    if args.out:
        from cast_interp.io import atomic_write_json

        atomic_write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
