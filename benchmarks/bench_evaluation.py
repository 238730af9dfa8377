"""Benchmark stage 3's generation-free metrics against the naive way, and their share of an
evaluation.

One `evaluate()` of a perturbed copy of the model (every attention weight moved by 1% noise, so KL
is not 0) on the bundled test sets at the `cpu-full` preset's sizes (all 50 harmful, 60
over-refusal and 50 benign test prompts, 40 task items, 32 generated tokens), then the naive way
of its two largest generation-free parts, on the same prompts:

  refusal score  ours: `refusal_logprobs` of the harmful and over-refusal prompts (the template's
                 shared opening runs once, prompts are batched, the 16 refusal openings run as a
                 token trie on the prompts' cache).
                 naive: every (prompt, opening) pair teacher-forced as its own sequence, in padded
                 batches of 16, with a plain forward (all positions unembedded).
  KL + NLL       ours: `utility_per_prompt` with `OriginalLogprobs` (the original's log-probs on
                 the benign answers, computed once per run: its time is the row "once per run";
                 the template's shared opening once per batch, the unembedding only where scored).
                 naive: plain forwards of the tuned and the original model in every evaluation.
  generation     ours: as `evaluate` generates (`inference_layout`: TransformerLens 3 stops
                 copying the MLP and unembedding matrices in each of the 33 forward calls).
                 naive: the same call without it (on TransformerLens 4 the two are the same).

Prints each part's time, the naive time, their ratio and the largest difference in the
per-prompt values, then the generation-free share of the evaluation (generation-free parts over
those plus generation).

Example (about 6 minutes on 2 idle CPU cores): python benchmarks/bench_evaluation.py
A quick check that it runs: --model tiny --n 4
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import contextmanager
from unittest import mock

import torch

from cast_interp import backend
from cast_interp.data import ChatDataset, ChatExample, end_of_turn_id, load_bundled, make_batches
from cast_interp.evaluate import EvalConfig, evaluate
from cast_interp.model import load_model
from cast_interp.safety import REFUSAL_OPENINGS, refusal_rate
from cast_interp.utility import OriginalLogprobs, content_mask


@contextmanager
def _as_it_is(model):
    yield model


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.no_grad()
def _plain_logprobs(model, batch, scored):
    """log-softmax of a plain forward's logits at the scored predictions: [n_scored, vocab]."""
    logits = model(batch.tokens.to(model.cfg.device))[:, :-1]
    return logits[scored.to(model.cfg.device)].float().log_softmax(-1).cpu()


def _scored(model, batch):
    return content_mask(batch, end_of_turn_id(model.tokenizer))[:, 1:]


def naive_refusal_logprobs(model, prompts, openings=REFUSAL_OPENINGS, batch_size=16):
    """log sum_o P(o | prompt), each (prompt, opening) pair a plain forward of its own sequence
    (padded batches). [n]"""
    pairs = ChatDataset("pairs", [ChatExample(p, o) for p in prompts for o in openings])
    out = []
    for batch in make_batches(model, pairs, batch_size=batch_size):
        scored = _scored(model, batch)
        lp = _plain_logprobs(model, batch, scored).gather(-1, batch.tokens[:, 1:][scored][:, None])
        out.append(torch.zeros(len(batch), dtype=torch.float64).index_add(
            0, scored.nonzero()[:, 0], lp[:, 0].double()))
    return torch.cat(out).view(len(prompts), len(openings)).logsumexp(-1)


def naive_utility(model, original, benign, batch_size=16):
    """Per-prompt KL(original || model) and NLL, from plain forwards of both models."""
    kl, nll = [], []
    for batch in make_batches(model, benign, batch_size=batch_size):
        scored = _scored(model, batch)
        rows, n = scored.nonzero()[:, 0], scored.sum(-1).double()
        logq, logp = _plain_logprobs(model, batch, scored), _plain_logprobs(original, batch, scored)
        zeros = torch.zeros(len(batch), dtype=torch.float64)
        nll.append(zeros.index_add(0, rows, -logq.gather(
            -1, batch.tokens[:, 1:][scored][:, None])[:, 0].double()) / n)
        kl.append(zeros.index_add(0, rows, (logp.exp() * (logp - logq)).sum(-1).double()) / n)
    return {"kl_to_original": torch.cat(kl), "reference_nll": torch.cat(nll)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=None, help="cut every set to n prompts (default all)")
    ap.add_argument("--n-task", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = load_model(args.model)
    original.requires_grad_(False)
    model = copy.deepcopy(original)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attn." in name:
                p.add_(0.01 * p.std() * torch.randn_like(p))
    cfg = EvalConfig(n_harmful=args.n, n_benign=args.n, n_over_refusal=args.n, n_task=args.n_task,
                     max_new_tokens=32)
    benign = load_bundled("benign", "test").take(args.n)
    ref, t_ref = _timed(lambda: OriginalLogprobs(original, benign, batch_size=cfg.batch_size,
                                                 tokens=cfg.tokens))
    res = evaluate(model, original=ref, config=cfg, benign=benign)
    t = res.timings_s
    prompts = {k: load_bundled(*spec).take(args.n).prompts for k, spec in
               {"harmful": ("harmful", "test"), "over_refusal": ("over_refusal",)}.items()}
    naive_score, t_naive_score = _timed(lambda: {
        k: naive_refusal_logprobs(model, p, openings=cfg.openings, batch_size=cfg.batch_size)
        for k, p in prompts.items()})
    naive_util, t_naive_util = _timed(lambda: naive_utility(model, original, benign,
                                                            batch_size=cfg.batch_size))
    both = ChatDataset("both", [ChatExample(q) for q in prompts["harmful"]
                                + prompts["over_refusal"]])
    with mock.patch.object(backend, "inference_layout", _as_it_is):
        naive_gen, t_naive_gen = _timed(lambda: refusal_rate(
            model, both, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size))
    same_answers = naive_gen["answers"] == res.answers["harmful"] + res.answers["over_refusal"]

    def diff(ours, naive):
        return float((torch.tensor(ours, dtype=torch.float64) - naive.double()).abs().max())

    d_score = max(diff(res.per_prompt[m], naive_score[k]) for k, m in
                  (("harmful", "refusal_score"), ("over_refusal", "over_refusal_score")))
    d_util = max(diff(res.per_prompt[m], naive_util[m]) for m in ("kl_to_original",
                                                                   "reference_nll"))
    ours_score = t["refusal_score"] + t["over_refusal_score"]
    naive_free = (t["generation_free"] - ours_score - t["reference_nll+kl"] + t_naive_score
                  + t_naive_util)
    n = {k: len(v) for k, v in prompts.items()}
    print(f"{args.model}: {n['harmful']} harmful + {n['over_refusal']} over-refusal prompts, "
          f"{len(benign)} benign, {args.n_task} task items, {torch.get_num_threads()} threads\n")
    rows = [("refusal score (both sets)", ours_score, t_naive_score, d_score),
            ("KL + NLL", t["reference_nll+kl"], t_naive_util, d_util),
            ("original's log-probs (once per run)", t_ref, None, None),
            ("task accuracy", t.get("task_accuracy", 0.0), None, None),
            ("**generation-free, total**", t["generation_free"], naive_free, None),
            ("generation (32 tokens, both sets)", t["generation"], t_naive_gen, None)]
    print("| part | ours (s) | naive (s) | naive / ours | max abs difference |")
    print("|---|---|---|---|---|")
    for name, ours, naive, d in rows:
        cells = ["", "", ""] if naive is None else [f"{naive:.1f}", f"{naive / ours:.1f}x",
                                                     "" if d is None else f"{d:.1e}"]
        print(f"| {name} | {ours:.1f} | " + " | ".join(cells) + " |")
    print(f"\ngeneration-free share of the evaluation: {t['generation_free_share']:.0%} "
          f"(the naive way: {naive_free / (naive_free + t_naive_gen):.0%}); the same generated "
          f"answers both ways: {same_answers}")

if __name__ == "__main__":
    main()
