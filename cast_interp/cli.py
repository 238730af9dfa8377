"""`cast-interp`: the command line, whose verbs mirror the Python API.

    cast-interp eval      --model M [--harmful SPEC --benign SPEC --over-refusal SPEC] --out F.json
    cast-interp diagnose  --model M --safety-data SPEC --utility-data SPEC --out DIR
    cast-interp run       [--preset cpu|gpu|smoke] --out DIR          (the whole experiment)
    torchrun --nproc-per-node N -m cast_interp.cli run ...            (pieces shared over N ranks)
    cast-interp attribute --run DIR                                   (stage 4 on a finished run)

Dataset specs: "bundled:harmful:test", "advbench:/path/advbench.csv", "/path/file.jsonl", "hf:name".
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct (default, offline), tiny, a local HF dir, or a TL name")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="keep data text that tokenizes into chat-template special tokens (turn "
                        "markers); refused by default")


def _add_dist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="under torchrun: NCCL on GPUs, gloo on CPU (auto picks by device)")


def _cmd_eval(args) -> int:
    from .checks import check_int
    from .data import check_special_tokens, load_dataset
    from .evaluate import EvalConfig, evaluate, format_table
    from .io import atomic_write_json, check_out_file
    from .model import load_model

    check_int("--n", args.n, 1, what=" (examples per dataset)")
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens)  # checks the numbers
    if args.out:
        check_out_file(args.out)
        if Path(args.out).exists() and not args.overwrite:
            raise ValueError(f"--out {args.out} already exists: pass --overwrite to replace it, or "
                             "another --out.")
    sets = {k: load_dataset(getattr(args, k)).take(args.n)
            for k in ("harmful", "benign", "over_refusal")}
    model = load_model(args.model, device=args.device)
    for ds in sets.values():
        check_special_tokens(model.tokenizer, ds, allow=args.allow_special_tokens)
    res = evaluate(model, original=model, config=cfg, **sets, progress=True)
    print(format_table({args.model: res}))
    if args.out:
        atomic_write_json(res.to_dict(), args.out)
        print(f"wrote {args.out}")
    return 0


def _cmd_diagnose(args) -> int:
    from . import distributed
    from .conflict_map import map_report
    from .data import check_special_tokens, load_dataset
    from .diagnose import DiagnosisConfig, diagnose
    from .figures import diagnosis_figures
    from .io import (RunDirectory, RunLock, atomic_write_text, check_out_dir, check_run_dir,
                     remove_own_partials)
    from .model import load_model

    # Only options given on the command line override DiagnosisConfig's defaults (one source).
    names = ("n_calibration", "n_sensitivity", "batch_size", "ablation", "sensitivity_method",
             "n_exact", "combine", "n_bootstrap", "seed", "utility_reference", "max_new_tokens",
             "dtype")
    cfg = DiagnosisConfig(**{n: getattr(args, n) for n in names if getattr(args, n) is not None},
                          include_end_of_turn=args.include_end_of_turn)
    out = Path(args.out)
    # Under torchrun every rank diagnoses (the exact S passes are shared out); rank 0 writes.
    device = distributed.setup(args.device, backend=args.dist_backend)
    rd, lock = RunDirectory(out, "diagnose"), RunLock(out)

    def claim() -> None:
        check_out_dir(out)
        if check_run_dir(out, "diagnose") is not None and not args.overwrite:
            raise ValueError(f"--out {out} already holds a diagnosis; pass --overwrite to replace "
                             "it, or another --out.")
        lock.acquire()
        if args.overwrite:
            rd.remove_written()  # only the files the earlier diagnosis wrote
        remove_own_partials(out)  # of a killed earlier diagnosis
        rd.start()

    try:
        with rd:
            distributed.main_only(claim)
            safety, utility = load_dataset(args.safety_data), load_dataset(args.utility_data)
            model = load_model(args.model, device=device, n_devices=args.n_devices)
            for ds in (safety, utility):
                check_special_tokens(model.tokenizer, ds, allow=args.allow_special_tokens)
            t = time.time()
            cmap = diagnose(model, safety, utility, cfg, progress=distributed.is_main())

            def write() -> None:
                cmap.save(out)
                diagnosis_figures(cmap, out / "figures", k=0.1)
                report = map_report(cmap, k=0.1)
                atomic_write_text(report, out / "report.md")
                print(report)
                print(f"diagnosis done in {time.time() - t:.0f} s; wrote {out}")

            distributed.main_only(write)
    finally:
        lock.release()
    return 0


def _cmd_run(args) -> int:
    from . import distributed
    from .pipeline import RunConfig, RunDir, run_experiment

    cfg = RunConfig.from_preset(
        args.preset, out_dir=args.out, model=args.model, device=args.device, steps=args.steps,
        seed=args.seed, safety_data=_spec(args.safety_data), utility_data=_spec(args.utility_data),
        over_refusal_data=args.over_refusal_data, split_seed=args.split_seed,
        n_devices=args.n_devices, diag_dtype=args.diag_dtype, lr=args.lr,
        train_precision=args.train_precision, baselines=args.baselines,
        **({"allow_special_tokens": True} if args.allow_special_tokens else {}),
        **({"attribute": False} if args.no_attribute else {}),
    )
    distributed.setup(cfg.device, backend=args.dist_backend)  # under torchrun; else nothing
    run_experiment(cfg, overwrite=args.overwrite)
    if distributed.is_main():
        print(RunDir(args.out).report.read_text())
    return 0


def _spec(values: Optional[list]):
    """One data spec (split by the run) or three [calibration, train, test]; None: the preset's."""
    if values is None or len(values) == 1:
        return values[0] if values else None
    if len(values) != 3:
        raise ValueError(f"Give one data spec (split into calibration/train/test) or three "
                         f"(calibration, train, test), got {len(values)}: {values}.")
    return list(values)


def _cmd_attribute(args) -> int:
    from . import distributed
    from .io import RunDirectory, check_run_dir, read_json
    from .pipeline import RunConfig, RunDir, RunMismatchError, run_experiment

    run = RunDir(args.run)
    path = run.config
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass the output directory of a "
                                "`cast-interp run` (it holds config.json).")
    check_run_dir(run.root, "run", flag="--run")
    RunDirectory(run.root).verify(path)
    if not run.results.exists() and not args.finish_run:
        raise ValueError(f"{run.root} holds no {run.results.name}: its run did not finish, and "
                         "`attribute` would run the whole experiment (model, data and all). Finish "
                         "it with `cast-interp run`, or pass --finish-run to run the missing stages "
                         "here.")
    # The directory may have been moved or copied since the run; `replace` re-checks the options.
    names = ("examples", "candidates", "spread", "draws", "arms")
    options = {f"attribution_{n}": getattr(args, n) for n in names if getattr(args, n) is not None}
    cfg = replace(RunConfig.from_dict(read_json(path, expect=dict)), attribute=True,
                  out_dir=str(args.run), **options)
    distributed.setup(cfg.device, backend=args.dist_backend)  # under torchrun; else nothing
    try:
        run_experiment(cfg)  # finished stages are re-used; only attribution is computed
    except RunMismatchError as exc:  # `attribute` has no --overwrite: give its own advice
        raise ValueError(f"{exc.reason}. `attribute` works on a run as it was made: start a new "
                         "run with `cast-interp run` instead.") from None
    if distributed.is_main():
        print(run.report.read_text())
    return 0


def _cmd_figures(args) -> int:
    from .pipeline import RunDir
    from .report import run_figures

    out = Path(args.out) if args.out else RunDir(args.run).figures
    written = run_figures(args.run, out)
    print(f"{len(written)} figure files in {out}")
    return 0


def _cmd_regime(args) -> int:
    from .io import check_out_dir
    from .model import load_model
    from .regime import CPU_SWEEP, SweepConfig, run_regime_sweep
    from .regime_report import write_sweep_report

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / "sweep.json").exists():
        raise ValueError(f"--out {out} is a non-empty folder that holds no sweep; give a new or "
                         "empty folder (nothing was changed).")
    if out.exists() or not args.report_only:
        check_out_dir(out)  # a file, or not writable: refused before the model loads
    cfg = SweepConfig(**CPU_SWEEP) if args.preset == "cpu" else SweepConfig()
    if args.report_only:
        print(write_sweep_report(out).read_text())
        return 0
    model = load_model(args.model, device=args.device)
    run_regime_sweep(model, cfg, out, datasets=args.datasets)
    print(write_sweep_report(out).read_text())
    return 0


def _run_comparison(args, what: str, record: str, config_cls, run, write_report) -> int:
    """The v3 comparisons' command (`verdict`, `peers`): refuse a folder that holds something
    else, `--report-only`, or load the model, run (resumable) and print the report."""
    from .io import check_out_dir
    from .model import load_model

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / record).exists():
        raise ValueError(f"--out {out} is a non-empty folder that holds no {what}; give a new "
                         "or empty folder (nothing was changed).")
    if args.report_only:
        if not (out / record).exists():
            raise ValueError(f"--out {out} holds no {what} (no {record}): run it first.")
        print(write_report(out).read_text())
        return 0
    check_out_dir(out)  # a file, or not writable: refused before the model loads
    cfg = config_cls.from_preset(args.preset, model=args.model, datasets=args.datasets)
    model = load_model(cfg.model, device=args.device)
    run(model, cfg, out, max_pieces=args.max_pieces)
    print(write_report(out).read_text())
    return 0


def _cmd_verdict(args) -> int:
    from .verdict import VerdictConfig, run_verdict
    from .verdict_report import write_verdict_report

    return _run_comparison(args, "verdict run", "verdict.json", VerdictConfig, run_verdict,
                           write_verdict_report)


def _cmd_peers(args) -> int:
    from .peers import PeersConfig, run_peers, write_peers_report

    return _run_comparison(args, "peer comparison", "peers.json", PeersConfig, run_peers,
                           write_peers_report)


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
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    e.set_defaults(fn=_cmd_eval)

    d = sub.add_parser("diagnose", help="the pre-alignment conflict map (stage 1)")
    _add_model_args(d)
    d.add_argument("--safety-data", default="bundled:harmful:calibration")
    d.add_argument("--utility-data", default="bundled:benign:calibration")
    d.add_argument("--n-calibration", type=int, default=None, help="default 32")
    d.add_argument("--n-sensitivity", type=int, default=None, help="default 16")
    d.add_argument("--batch-size", type=int, default=None)
    d.add_argument("--ablation", choices=["mean", "zero", "resample"], default=None)
    d.add_argument("--sensitivity-method", choices=["screened", "exact", "attribution"],
                   default=None, help="default screened: attribution for all, exact for the top")
    d.add_argument("--n-exact", type=int, default=None,
                   help="exact candidates per unit kind when screened (default 2 x 10%%)")
    d.add_argument("--combine", choices=["rank_product", "product", "weighted_sum",
                                         "first_order_harm"], default=None)
    d.add_argument("--n-bootstrap", type=int, default=None)
    d.add_argument("--utility-reference", choices=["self", "dataset"], default=None,
                   help="utility answers: the model's own (default) or the dataset's")
    d.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on self-reference answers (default 128)")
    d.add_argument("--include-end-of-turn", action="store_true",
                   help="put the end-of-turn token in the diagnosis losses (v1 behaviour)")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights of the gradient and ablation passes (default float32; bf16 "
                        "sums over examples in float32)")
    d.add_argument("--n-devices", type=int, default=1,
                   help="split a model too large for one GPU over this many GPUs (TL 3)")
    _add_dist_args(d)
    d.add_argument("--out", default="runs/diagnosis")
    d.add_argument("--overwrite", action="store_true", help="replace a map already in --out")
    d.set_defaults(fn=_cmd_diagnose)

    r = sub.add_parser("run", help="the whole experiment: diagnose, tune every arm, evaluate")
    _add_model_args(r)
    from .pipeline import PRESETS

    r.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    data_help = ("one spec, split into calibration/train/test by --split-seed ('bundled:KIND' "
                 "uses the shipped splits), or three specs: calibration train test")
    r.add_argument("--safety-data", nargs="+", default=None, help=data_help)
    r.add_argument("--utility-data", nargs="+", default=None, help=data_help)
    r.add_argument("--split-seed", type=int, default=None, help="seed of that split (default 0)")
    r.add_argument("--over-refusal-data", default=None)
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of stage 2, in (0, 1] (default 2e-4)")
    from .registry.arms import baseline_names  # the arms registry: a registered arm is a choice

    r.add_argument("--baselines", nargs="*", choices=baseline_names(), default=None,
                   help="arms besides full tuning, CAST and random (default: the preset's; "
                        "none given: none)")
    r.add_argument("--no-attribute", action="store_true", help="skip stage 4")
    r.add_argument("--n-devices", type=int, default=None,
                   help="split a model too large for one GPU over this many GPUs (TL 3)")
    r.add_argument("--diag-dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights of the diagnosis (default: the preset's; bf16 sums in float32)")
    r.add_argument("--train-precision", choices=["float32", "bf16"], default=None,
                   help="training steps: bf16 computes on a bf16 copy with float32 master "
                        "weights and optimizer state (default: the preset's)")
    _add_dist_args(r)
    r.add_argument("--out", default="runs/default")
    r.add_argument("--overwrite", action="store_true",
                   help="delete the files of a run of other settings, data or model in --out "
                        "first (only files that run wrote)")
    r.set_defaults(fn=_cmd_run)

    a = sub.add_parser("attribute", help="which heads caused the utility drop (stage 4)")
    a.add_argument("--run", required=True, help="output directory of `cast-interp run`")
    a.add_argument("--examples", type=int, default=None, help="examples (halves A and B)")
    a.add_argument("--candidates", type=int, default=None,
                   help="exact reverts of the top first-order units (default 2k)")
    a.add_argument("--spread", type=int, default=None, help="exact reverts spread over the range")
    a.add_argument("--draws", type=int, default=None, help="random revert sets (default 20)")
    a.add_argument("--arms", nargs="+", choices=["full", "cast", "random"], default=None,
                   help="arms to attribute on the first training seed (default: full)")
    a.add_argument("--finish-run", action="store_true",
                   help="run the stages missing from --run first (the whole experiment if it "
                        "has no results.json)")
    _add_dist_args(a)
    a.set_defaults(fn=_cmd_attribute)

    f = sub.add_parser("figures", help="redraw every figure of a run from its saved files")
    f.add_argument("--run", required=True, help="output directory of `cast-interp run`")
    f.add_argument("--out", default=None, help="where to write them (default: RUN/figures)")
    f.set_defaults(fn=_cmd_figures)

    g = sub.add_parser("regime", help="sweep full safety tuning for a regime with a utility tax "
                                      "(METHOD v3), before any arm is compared")
    g.add_argument("--model", default="smollm2-135m-instruct")
    g.add_argument("--device", default=None)
    g.add_argument("--out", required=True, help="sweep folder (resumable)")
    g.add_argument("--datasets", default=None,
                   help="public datasets folder (default: ../shared/datasets or "
                        "$CAST_SHARED_DATASETS when present; 'bundled' forces the bundled sets)")
    g.add_argument("--preset", choices=("cpu", "full"), default="cpu",
                   help="cpu: 5 settings up to 64 steps; full: 2 scopes x 3 lrs up to 256 steps")
    g.add_argument("--report-only", action="store_true",
                   help="rewrite report.md and the figure from the sweep's files")
    g.set_defaults(fn=_cmd_regime)

    v = sub.add_parser("verdict", help="the v3 verdict: CAST's map against random, layer-matched "
                                       "and graded head sets at matched safety, in the v3 regime")
    v.add_argument("--preset", choices=("smoke", "cpu", "cpu-full"), default="cpu",
                   help="smoke: tiny model, seconds; cpu: a quick look (one map, one seed, 4 random "
                        "sets); cpu-full: the verdict (2 maps, 2 seeds, 20 random sets, "
                        "layer-matched and graded sets)")
    v.add_argument("--model", default=None, help="default: the preset's (SmolLM2)")
    v.add_argument("--device", default=None)
    v.add_argument("--out", required=True, help="run folder (resumable)")
    v.add_argument("--datasets", default=None,
                   help="public datasets folder (default: ../shared/datasets or "
                        "$CAST_SHARED_DATASETS when present; 'bundled' forces the bundled sets)")
    v.add_argument("--max-pieces", type=int, default=None,
                   help="stop after training this many new pieces (resume later)")
    v.add_argument("--report-only", action="store_true",
                   help="rewrite report.md and the figures from the run's files")
    v.set_defaults(fn=_cmd_verdict)

    q = sub.add_parser("peers", help="peer methods (interpolation, anchor, layer freezes, LoRA, "
                                     "gradient projection, activation choice) beside CAST at "
                                     "matched safety, in the v3 regime")
    q.add_argument("--preset", choices=("smoke", "peers"), default="peers")
    q.add_argument("--model", default=None, help="default: the preset's (SmolLM2)")
    q.add_argument("--device", default=None)
    q.add_argument("--out", required=True, help="run folder (resumable; one process per core)")
    q.add_argument("--datasets", default=None, help="as for `verdict`")
    q.add_argument("--max-pieces", type=int, default=None)
    q.add_argument("--report-only", action="store_true")
    q.set_defaults(fn=_cmd_peers)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from . import distributed
    from .data import DataError
    from .heads import HeadIndexError
    from .model import ModelLoadError
    from .objectives import NonFiniteLossError
    from .units import UnitError

    try:
        return args.fn(args)
    except (DataError, ModelLoadError, HeadIndexError, UnitError, NonFiniteLossError,
            FileNotFoundError, ValueError, distributed.DistributedError) as exc:
        # Bad input: one clear line, no traceback from deep inside torch.
        print(f"cast-interp: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder where a file goes, no permission, disk full, file too large
        print(f"cast-interp: error: {_os_message(exc)}", file=sys.stderr)
        return 2
    except RecursionError:
        print("cast-interp: error: an input is nested too deeply to read (a JSON file edited or "
              "not written by cast_interp?); check the files given and the output folder.",
              file=sys.stderr)
        return 2
    finally:
        distributed.teardown()


def _os_message(exc: OSError) -> str:
    """One line for an OSError: what happened, to which file, and what to do."""
    import errno

    where = f" {exc.filename}" if exc.filename else ""
    what = exc.strerror or str(exc)
    if exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
        return (f"could not write{where}: {what} (the disk or the file-size limit is full). The "
                "files written so far are complete (atomic writes); free space or raise the limit "
                "and re-run the same command to resume.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"no permission to write or read{where} ({what}): make it writable or pick "
                "another path, then re-run the same command to resume.")
    if exc.errno == errno.EISDIR:
        return f"{where.strip() or 'a path'} is a folder where a file was expected ({what})."
    if exc.errno == errno.ENOTDIR:
        return f"{where.strip() or 'a path'}: a part of it is a file, not a folder ({what})."
    return f"{what}{':' + where if where else ''}."


if __name__ == "__main__":
    sys.exit(main())
