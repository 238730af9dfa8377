"""`cast-interp`: the command line, whose verbs mirror the Python API.

    cast-interp eval      --model M [--harmful SPEC --benign SPEC --over-refusal SPEC] --out F.json
    cast-interp diagnose  --model M --safety-data SPEC --utility-data SPEC --out DIR
    cast-interp run       [--preset cpu|gpu|smoke] --out DIR          (the whole experiment)
    cast-interp attribute --run DIR                                   (stage 4 on a finished run)

Dataset specs: "bundled:harmful:test", "advbench:/path/advbench.csv", "/path/file.jsonl", "hf:name".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct (default, offline), tiny, a local HF dir, or a TL name")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _cmd_eval(args) -> int:
    from .data import load_dataset
    from .evaluate import EvalConfig, evaluate, format_table
    from .io import atomic_write_json
    from .model import load_model

    model = load_model(args.model, device=args.device)
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens)
    n = args.n
    res = evaluate(
        model, original=model, config=cfg,
        harmful=load_dataset(args.harmful).take(n), benign=load_dataset(args.benign).take(n),
        over_refusal=load_dataset(args.over_refusal).take(n), progress=True,
    )
    print(format_table({args.model: res}))
    if args.out:
        atomic_write_json(res.to_dict(), args.out)
        print(f"wrote {args.out}")
    return 0


def _cmd_diagnose(args) -> int:
    from .data import load_dataset
    from .diagnose import DiagnosisConfig, diagnose
    from .model import load_model
    from .pipeline import _diagnosis_figures

    model = load_model(args.model, device=args.device)
    cfg = DiagnosisConfig(n_calibration=args.n_calibration, n_sensitivity=args.n_sensitivity,
                          batch_size=args.batch_size, ablation=args.ablation,
                          sensitivity_method=args.sensitivity_method, combine=args.combine,
                          n_bootstrap=args.n_bootstrap, seed=args.seed,
                          utility_reference=args.utility_reference)
    t = time.time()
    cmap = diagnose(model, load_dataset(args.safety_data), load_dataset(args.utility_data), cfg,
                    progress=True)
    out = Path(args.out)
    cmap.save(out)
    n_total = model.cfg.n_layers * model.cfg.n_heads
    _diagnosis_figures(cmap, out / "figures", k=max(1, round(0.1 * n_total)))
    print(f"diagnosis done in {time.time() - t:.0f} s")
    print("concentration:", {k: (round(v, 4) if isinstance(v, float) else v)
                             for k, v in cmap.concentration().items()})
    k = min(10, n_total)
    print(f"top {k} heads by C:", ", ".join(f"L{l}H{h}" for l, h in cmap.top_heads(k)))
    print(f"wrote {out}")
    return 0


def _cmd_run(args) -> int:
    from .pipeline import RunConfig, run_experiment

    cfg = RunConfig.from_preset(
        args.preset, out_dir=args.out, model=args.model, device=args.device, steps=args.steps,
        seed=args.seed, safety_data=args.safety_data, utility_data=args.utility_data,
        over_refusal_data=args.over_refusal_data,
        **({"attribute": False} if args.no_attribute else {}),
    )
    run_experiment(cfg)
    print((Path(args.out) / "report.md").read_text())
    return 0


def _cmd_attribute(args) -> int:
    from .pipeline import RunConfig, run_experiment
    from .io import read_json

    path = Path(args.run) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass the output directory of a "
                                "`cast-interp run` (it holds config.json).")
    cfg = RunConfig.from_dict(read_json(path))
    cfg.attribute = True
    cfg.out_dir = str(args.run)  # the directory may have been moved or copied since the run
    if args.method:
        cfg.attribution_method = args.method
    if args.exact_heads is not None:
        cfg.attribution_exact_heads = args.exact_heads
    run_experiment(cfg)  # finished stages are re-used; only attribution is computed
    print((Path(args.run) / "report.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cast-interp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="safety and utility of a model (stage 3)")
    _add_model_args(e)
    e.add_argument("--harmful", default="bundled:harmful:test")
    e.add_argument("--benign", default="bundled:benign:test")
    e.add_argument("--over-refusal", default="bundled:over_refusal")
    e.add_argument("--n", type=int, default=50, help="examples per dataset (default 50)")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--out", default="eval.json")
    e.set_defaults(fn=_cmd_eval)

    d = sub.add_parser("diagnose", help="the pre-alignment conflict map (stage 1)")
    _add_model_args(d)
    d.add_argument("--safety-data", default="bundled:harmful:calibration")
    d.add_argument("--utility-data", default="bundled:benign:calibration")
    d.add_argument("--n-calibration", type=int, default=32)
    d.add_argument("--n-sensitivity", type=int, default=None)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--ablation", choices=["mean", "zero", "resample"], default="mean")
    d.add_argument("--sensitivity-method", choices=["exact", "attribution"], default="exact")
    d.add_argument("--combine", choices=["product", "rank_product", "weighted_sum",
                                         "first_order_harm"], default="product")
    d.add_argument("--n-bootstrap", type=int, default=200)
    d.add_argument("--utility-reference", choices=["dataset", "self"], default="dataset",
                   help="utility answers: the dataset's, or the model's own greedy answers")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/diagnosis")
    d.set_defaults(fn=_cmd_diagnose)

    r = sub.add_parser("run", help="the whole experiment: diagnose, tune every arm, evaluate")
    _add_model_args(r)
    r.add_argument("--preset", choices=["cpu", "gpu", "smoke"], default="cpu")
    r.add_argument("--safety-data", default=None)
    r.add_argument("--utility-data", default=None)
    r.add_argument("--over-refusal-data", default=None)
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--no-attribute", action="store_true", help="skip stage 4")
    r.add_argument("--out", default="runs/default")
    r.set_defaults(fn=_cmd_run)

    a = sub.add_parser("attribute", help="which heads caused the utility drop (stage 4)")
    a.add_argument("--run", required=True, help="output directory of `cast-interp run`")
    a.add_argument("--method", choices=["first_order", "exact"], default=None)
    a.add_argument("--exact-heads", type=int, default=None,
                   help="also revert exactly this many heads (top by the first-order map)")
    a.set_defaults(fn=_cmd_attribute)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .heads import HeadIndexError
    from .model import ModelLoadError
    from .objectives import NonFiniteLossError

    try:
        return args.fn(args)
    except (DataError, ModelLoadError, HeadIndexError, NonFiniteLossError, FileNotFoundError,
            ValueError) as exc:
        # Bad input: one clear line, no traceback from deep inside torch.
        print(f"cast-interp: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
