"""Benchmark screened Functional Sensitivity against the full exact sweep (diagnosis v2).

On the same examples (the model's own answers to the bundled benign calibration prompts, content
tokens), for head units:

  (a) full exact    `functional_sensitivity(method="exact")` over every head
  (b) screened      `screened_sensitivity`: attribution patching for every head, then exact ablation
                    of the top `--n-exact` candidates (by S and by the C they would give with O)

and prints a table: time, speed-up, whether the top-k by S and by C (k = 10% of heads) are the same
heads, and how many of the top-k have a 95% CI (bootstrap over examples) that excludes 0 at
several sample sizes (the "how many examples does S need" measurement).

    python benchmarks/bench_screening.py --n-examples 32 --sizes 8,16,32
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cast_interp.conflict import optimization_conflict
from cast_interp.conflict_map import combine
from cast_interp.data import load_bundled, make_batches, self_reference
from cast_interp.model import load_model
from cast_interp.sensitivity import functional_sensitivity, screened_sensitivity
from cast_interp.stats import ratio_of_sums_ci


def top(t: torch.Tensor, k: int) -> set:
    idx = torch.argsort(-torch.nan_to_num(t.flatten(), nan=-1e9))[:k]
    return {divmod(int(i), t.shape[1]) for i in idx}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-examples", type=int, default=32)
    ap.add_argument("--sizes", default="8,16,32", help="sample sizes for the CI measurement")
    ap.add_argument("--n-exact", type=int, default=None, help="default 2 x 10%% of heads")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model = load_model(args.model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    k = max(1, round(0.1 * L * H))
    n_exact = args.n_exact or 2 * k
    t = time.perf_counter()
    util = self_reference(model, load_bundled("benign", "calibration").take(args.n_examples),
                          max_new_tokens=args.max_new_tokens)
    t_ref = time.perf_counter() - t
    kw = dict(batch_size=8, end_of_turn_in_loss=False)
    ub = make_batches(model, util, **kw)
    sb = make_batches(model, load_bundled("harmful", "calibration").take(args.n_examples), **kw)
    n_tok = sum(b.n_response_tokens for b in ub)
    print(f"{args.model}: {L}x{H} heads, {len(util)} self-reference answers ({util.n_truncated} cut "
          f"at {args.max_new_tokens}; {t_ref:.0f} s), {n_tok} content tokens; k = {k}, "
          f"n_exact = {n_exact}", flush=True)
    O = optimization_conflict(model, sb, ub, n_bootstrap=0).O

    t = time.perf_counter()
    full = functional_sensitivity(model, ub, n_bootstrap=200)
    t_full = time.perf_counter() - t
    print(f"  full exact: {t_full:.0f} s", flush=True)
    t = time.perf_counter()
    scr = screened_sensitivity(model, ub, n_exact=n_exact, prior_O=O, n_bootstrap=200)
    t_scr = time.perf_counter() - t
    print(f"  screened: {t_scr:.0f} s", flush=True)

    C_full, C_scr = combine(O, full.S), combine(O, scr.S)
    rows = [{"method": "full exact sweep", "time_s": round(t_full, 1), "speedup": 1.0,
             "top_k_S_same": 1.0, "top_k_C_same": 1.0},
            {"method": f"screened (attribution + exact top {n_exact})", "time_s": round(t_scr, 1),
             "speedup": round(t_full / t_scr, 1),
             "top_k_S_same": len(top(scr.S, k) & top(full.S, k)) / k,
             "top_k_C_same": len(top(C_scr, k) & top(C_full, k)) / k}]
    print("\n| method | time (s) | vs full | top-k by S same | top-k by C same |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['time_s']} | {r['speedup']}x | {r['top_k_S_same']:.2f} | "
              f"{r['top_k_C_same']:.2f} |")

    # How many examples until the top-k units' CIs exclude 0: resample from the full sweep's
    # per-example increases (the first n examples), no new model pass.
    ci_rows = []
    top_full = sorted(top(full.S, k))
    for n in [int(x) for x in args.sizes.split(",") if int(x) <= len(util)]:
        r = ratio_of_sums_ci(full.per_example[:n].numpy(), full.tokens[:n].numpy(), n_boot=1000)
        low = torch.as_tensor(r["low"])
        S_n = torch.as_tensor(r["estimate"])
        top_n = sorted(top(S_n, k))
        ci_rows.append({"n_examples": n, "top_k_ci_excludes_0": int(sum(low[u] > 0 for u in top_n)),
                        "k": k, "median_ci_width_top_k": float(torch.stack(
                            [torch.as_tensor(r["high"])[u] - low[u] for u in top_n]).median())})
    print("\n| examples | top-k heads whose 95% CI excludes 0 | median CI width (top-k) |\n|---|---|---|")
    for r in ci_rows:
        print(f"| {r['n_examples']} | {r['top_k_ci_excludes_0']} of {r['k']} | "
              f"{r['median_ci_width_top_k']:.4f} |")
    if args.json:
        from cast_interp.io import atomic_write_json

        atomic_write_json({"args": vars(args), "n_tokens": n_tok, "table": rows, "ci": ci_rows,
                           "self_reference_s": t_ref, "n_truncated": util.n_truncated}, args.json)


if __name__ == "__main__":
    main()
