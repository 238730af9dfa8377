"""Benchmark the two TransformerLens backends (and plain transformers) on the same tokens.

Run it once per environment (TransformerLens 3.x gives `HookedTransformer`, 4.x gives
`TransformerBridge`); each run appends rows to one JSON-lines file, and `--table` prints them side
by side. Measured, on the bundled benign calibration split with its dataset responses (identical
tokens under both backends: the same tokenizer):

  forward            logits of one batch, no gradient
  forward_hook_z     the same with a no-op hook on every `blocks.{l}.attn.hook_z` (the hooked path)
  forward_backward   summed response NLL, backward to every parameter
  s_sweep            exact mean-ablation S of every head of `--s-layers` layers
                     (`functional_sensitivity(method="exact")`: cached resid_pre, stacked heads)
  hf_forward, hf_forward_backward
                     the same model as a plain transformers module (no hooks), for reference

Each number is the median of `--repeats` timed runs after one warm-up.

Example (full size, about 15 minutes per environment on 2 idle CPU cores):
    python benchmarks/bench_backends.py --out benchmarks/backends.jsonl
    /path/to/other/venv/bin/python benchmarks/bench_backends.py --out benchmarks/backends.jsonl
    python benchmarks/bench_backends.py --table benchmarks/backends.jsonl
On cores shared with other jobs, run the two environments at the same time with `--threads 1`
each, so that both see the same background load (the README's table: `--threads 1 --repeats 2
--s-layers 15`, 4 minutes per environment under load).
A quick check that it runs: --model tiny --n-examples 2 --s-layers 0 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cast_interp import backend
from cast_interp.data import load_bundled, make_batches
from cast_interp.model import load_model
from cast_interp.objectives import token_nll
from cast_interp.sensitivity import functional_sensitivity


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _hf_reference(name: str):
    """The same weights as a plain transformers model (SmolLM2 only), or None."""
    if not name.lower().startswith("smollm2"):
        return None
    from cast_interp import hf_models, model as model_mod

    hf, _ = hf_models.load_smollm2_hf(model_mod._smollm2_gguf_dir(), model_mod.SMOLLM2_GGUF,
                                      model_mod.default_cache_dir(), name=model_mod.DEFAULT_MODEL)
    return hf.eval()


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    util = load_bundled("benign", "calibration").take(args.n_examples)
    [batch] = make_batches(model, util, batch_size=args.n_examples, max_length=args.max_length)
    tokens = batch.tokens
    rows, common = [], {"backend": backend.backend_name(model), "model": args.model,
                        "tokens": list(tokens.shape), "threads": args.threads}

    def add(what, seconds):
        rows.append({**common, "what": what, "seconds": round(seconds, 4)})
        print(f"{what:22s} {seconds:8.3f} s   ({common['backend']})", flush=True)

    with torch.no_grad():
        add("forward", _timed(lambda: model(tokens), args.repeats))
        noop = [(lambda n: n.endswith("attn.hook_z"), lambda z, hook: z)]
        add("forward_hook_z", _timed(lambda: model.run_with_hooks(tokens, fwd_hooks=noop),
                                     args.repeats))

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        token_nll(model(tokens), batch).sum().backward()

    add("forward_backward", _timed(fwd_bwd, args.repeats))
    model.zero_grad(set_to_none=True)
    heads = [(l, h) for l in args.s_layers for h in range(model.cfg.n_heads)]
    add("s_sweep", _timed(lambda: functional_sensitivity(model, [batch], heads=heads,
                                                         method="exact"), args.repeats))
    hf = _hf_reference(args.model)
    if hf is not None:
        with torch.no_grad():
            add("hf_forward", _timed(lambda: hf(tokens), args.repeats))

        def hf_fwd_bwd():
            hf.zero_grad(set_to_none=True)
            token_nll(hf(tokens).logits, batch).sum().backward()

        add("hf_forward_backward", _timed(hf_fwd_bwd, args.repeats))
    return rows


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    backends = sorted({r["backend"] for r in rows})
    whats = list(dict.fromkeys(r["what"] for r in rows))
    print("| measure | " + " | ".join(backends) + " |")
    print("|---|" + "---|" * len(backends))
    for w in whats:
        cells = []
        for b in backends:
            v = [r["seconds"] for r in rows if r["what"] == w and r["backend"] == b]
            cells.append(f"{v[-1]:.3f} s" if v else "")
        print(f"| {w} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n-examples", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--s-layers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 15, 29],
                   help="layers whose heads the S sweep ablates (comma-separated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="append rows to this JSON-lines file")
    p.add_argument("--table", type=Path, default=None, help="print a saved file as a table")
    args = p.parse_args()
    if args.table:
        table(args.table)
        return
    rows = run(args)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
