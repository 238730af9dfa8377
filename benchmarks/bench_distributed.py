"""The experiment on 1 and on N gloo ranks (torchrun): wall time and the cost of sharing out.

    python benchmarks/bench_distributed.py [--ranks 1 2] [--preset smoke] [--model tiny]

Each setting runs `cast-interp run` into a fresh directory (one process, or `torchrun
--nproc-per-node N`), one torch thread per rank. From each run's `results.json` and log it reports:
- wall: the launch's wall time, process start-up and imports included;
- CPU: user + system seconds of every process of the launch (torchrun and its ranks);
- start-up: the CPU seconds of the same launch doing nothing but the imports (torchrun's agent
  and one interpreter per rank);
- extra CPU / work: the CPU seconds the launch spends beyond the one-process run, over the
  one-process run's CPU seconds without its start-up (the work): start-up per rank, the work
  every rank repeats (data, model, O and the screen of stage 1, stage 4's first order), the
  collective calls, and cores shared between more processes. Waiting costs no CPU (gloo does not
  spin: a 5 s barrier wait measured 0.02 s of CPU), so this is what sharing out costs whatever
  the number of cores; "beyond start-up" leaves the imports out;
- grid: wall time of stages 2-3 (rank 0's "grid:" log line to its next stage), the part shared
  out piece by piece, and its speed-up over one process;
- in-run: `time_s` of the run itself (rank 0, data loading to report).
On 2 cores shared with other jobs expect little gain in wall time; the point is the overhead.

    python benchmarks/bench_distributed.py --estimate

prints the README's table of what the `gpu` preset would cost on Llama-3-8B-Instruct per GPU
count: an ESTIMATE, not a measurement (no GPU was lent to this work). Per piece, the SmolLM2
seconds of `pipeline.estimate_seconds` (unit costs measured on 2 CPU cores) times the FLOP ratio
of the two models (parameters; similar token counts) divided by an assumed GPU:CPU throughput
ratio (`--gpu-tflops` sustained on one GPU, float32 as the pipeline trains, over the
`CPU_TFLOPS` the 2 cores sustained in a SmolLM2 training step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, preset: str, model: str, out: Path, steps: int | None = None,
        startup: bool = False) -> dict:
    """One launch; `startup`: the same launch importing what a run imports, and nothing else."""
    args = ["-m", "cast_interp.cli", "run", "--preset", preset, "--model", model, "--device",
            "cpu", "--out", str(out), *(["--steps", str(steps)] if steps else [])]
    if startup:
        args = [str(Path(__file__).resolve()), "--import-only"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                "127.0.0.1", "--master-port", str(_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, text=True,
                       capture_output=True)
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"ranks={nproc} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    if startup:
        return {"wall": wall, "cpu": cpu}
    doc = json.loads((out / "results.json").read_text())
    log = p.stdout + p.stderr
    stamps = [(float(m.group(1)), m.group(2)) for m in re.finditer(
        r"\[cast(?: r0/\d+)? +([0-9.]+)s\] ([^\n]*)", log)]
    grid = next(i for i, (_, msg) in enumerate(stamps) if msg.startswith("grid:"))
    after = next((t for t, msg in stamps[grid + 1:] if msg.startswith(("stage 4", "done"))),
                 stamps[-1][0])
    return {"ranks": nproc, "wall": wall, "cpu": cpu, "in_run": doc["time_s"],
            "grid": after - stamps[grid][0], "n_pieces": len(doc["arms"])}


# SmolLM2-135M-Instruct's training step on 2 cores: 6 x 134.5M parameters x (8 examples x ~85
# padded tokens; bundled train examples are 65-70 tokens) / 5.34 s (`COST_S["train_step"]`).
CPU_TFLOPS = 6 * 134.5e6 * 8 * 85 / 5.34 / 1e12
PARAMS = {"smollm2": 134.5e6, "llama3_8b": 8.03e9}


def estimate(gpu_tflops: float, gpu_counts: list[int]) -> None:
    """The Llama-3-8B table (see the module docstring): pieces x seconds per piece per GPU count."""
    import math

    sys.path.insert(0, str(REPO))
    from cast_interp.pipeline import RunConfig, estimate_seconds

    cfg = RunConfig.from_preset("gpu")
    e = estimate_seconds(cfg)
    scale = PARAMS["llama3_8b"] / PARAMS["smollm2"] / (gpu_tflops / CPU_TFLOPS)
    piece_cpu = sum(e["per_piece"].values())
    piece = piece_cpu * scale
    n = e["n_pieces"] + 1  # and the original model's evaluation
    # Stage 1 at the preset's sizes: the measured 508 s diagnosis is 32 calibration and 16 S
    # examples; the gpu preset has 128 and 64 (x4). O (82 s of the 508) and the self-reference
    # answers (109 s) run on rank 0 / every rank; the exact S passes are shared out.
    diag_fixed, diag_shared = 4 * (82 + 109) * scale, 4 * (508 - 82 - 109) * scale
    # Stage 4: 16.5 min per arm on SmolLM2 with 16 examples; the gpu preset has 32 examples and
    # three arms; nearly all of it is exact reverts and random revert sets (shared out).
    attr = 3 * 2 * 16.5 * 60 * scale
    print(f"SmolLM2 on 2 CPU cores, `gpu` preset: {e['n_pieces']} pieces x {piece_cpu:.0f} s "
          f"(train {e['per_piece']['train']:.0f}, curves {e['per_piece']['curve']:.0f}, eval "
          f"{e['per_piece']['eval_generation_free'] + e['per_piece']['eval_generation']:.0f}) = "
          f"{e['n_pieces'] * piece_cpu / 3600:.1f} h of pieces")
    print(f"CPU sustained {CPU_TFLOPS * 1000:.0f} GFLOP/s; assumed GPU {gpu_tflops} TFLOP/s; "
          f"Llama-3-8B/SmolLM2 FLOPs {PARAMS['llama3_8b'] / PARAMS['smollm2']:.1f}x; "
          f"one Llama piece on one GPU ~ {piece:.0f} s\n")
    print("| GPUs = ranks (ESTIMATE) | pieces per rank | grid | diagnosis | stage 4 (3 arms) | total |")
    print("|---|---|---|---|---|---|")
    for g in gpu_counts:
        per = math.ceil(n / g)
        grid, diag, att = per * piece, diag_fixed + diag_shared / g, attr / g
        h = lambda s: f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"  # noqa: E731
        print(f"| {g} | {per} | {h(grid)} | {h(diag)} | {h(att)} | {h(grid + diag + att)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per piece (default: the preset's); more work per piece")
    ap.add_argument("--import-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--estimate", action="store_true",
                    help="print the Llama-3-8B `gpu` preset estimate instead (no runs)")
    ap.add_argument("--gpu-tflops", type=float, default=30.0,
                    help="assumed sustained float32 TFLOP/s of one GPU (default 30: ~45%% of an "
                         "H100's 67 TFLOP/s without TF32)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = ap.parse_args()
    if args.import_only:  # what each process of a launch imports before it works
        sys.path.insert(0, str(REPO))
        import cast_interp.cli, cast_interp.model, cast_interp.pipeline  # noqa: E401, F401
        return
    if args.estimate:
        estimate(args.gpu_tflops, args.gpus)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            rows.append(run(n, args.preset, args.model, Path(tmp) / f"r{n}", args.steps))
            rows[-1]["startup_cpu"] = run(n, "", "", Path(tmp), startup=True)["cpu"]
            print(f"ranks={n}: {rows[-1]}", flush=True)
    one = next((r for r in rows if r["ranks"] == 1), rows[0])
    steps = f", {args.steps} steps per piece" if args.steps else ""
    print(f"\n`{args.preset}` grid on `{args.model}` ({one['n_pieces']} pieces{steps}), gloo ranks, "
          f"{os.cpu_count()} CPU cores, 1 thread per rank\n")
    print("| ranks | wall (launch) | CPU, all processes | of which start-up (imports) "
          "| extra CPU / work | extra CPU beyond start-up / work | grid wall | grid speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    work = one["cpu"] - one["startup_cpu"]
    for r in rows:
        over = (r["cpu"] - one["cpu"]) / work
        inner = (r["cpu"] - r["startup_cpu"] - work) / work
        pct = lambda x: "(the work)" if r is one else f"{100 * x:+.1f}%"  # noqa: E731
        print(f"| {r['ranks']} | {r['wall']:.1f} s | {r['cpu']:.1f} s | {r['startup_cpu']:.1f} s "
              f"| {pct(over)} | {pct(inner)} | {r['grid']:.1f} s | "
              f"{one['grid'] / r['grid']:.2f}x |")


if __name__ == "__main__":
    main()
