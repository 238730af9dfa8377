"""The regime (METHOD v3): find where full safety tuning costs utility, before any arm is compared.

A verdict on CAST needs a tax to save. This stage sweeps *full* safety tuning (no unit skipped) over
trainable scope x learning rate, with pure safety SFT (benign share 0) on a larger safety set, one
run per setting with a constant learning rate after warmup, so that its checkpoints are the same
model a shorter run would give. At every checkpoint it evaluates, generation-free:

- safety: refusal score on held-out harmful prompts (log P(refusal opening | prompt), higher safer);
- the primary utility endpoint (declared here, before the sweep): over-refusal score on held-out
  benign-but-sensitive prompts (XSTest safe and the CoCoNot contrast set), log P(refusal opening),
  higher is worse; its cost is tuned - original, per prompt, paired;
- drift: KL(original || tuned) and NLL on the model's own answers to held-out benign prompts;
- at the test checkpoints also the judged over-refusal rate (greedy answers, the rule-based judge
  built from public refusal prefixes, not from the training answers) on a subset, and multiple-choice
  accuracy where the original is above chance.

Validation curves use the validation splits; the tax is read on the test splits with a paired
bootstrap CI over prompts (one training seed: the sweep chooses a regime, it does not compare arms).

Regime rule (declared before the sweep, ours): the tax exists at a (setting, step) when the primary
cost's 95% CI excludes 0 and its mean is at least `min_tax` nats (1 nat: a refusal opening at least
e times likelier on safe prompts). Among those, prefer attention-only scope (CAST's arms tune
attention), then the fewest steps, then the smallest learning rate whose safety gain is at least
`min_safety` nats: the cheapest regime in which there is something to save.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import backend
from .backend import Model
from .checks import check_int
from .data import (
    ChatDataset,
    DataError,
    dedup_against,
    load_bundled,
    load_coconot,
    load_jailbreakbench,
    load_mmlu_dir,
    load_refusal_direction,
    load_safety_pairs,
    load_xstest,
    load_alpaca,
    self_reference,
    shared_datasets_dir,
    truncate_responses,
    with_refusals,
)
from .io import atomic_write_json, package_versions, read_json, to_jsonable
from .model import model_id

PRIMARY = "over_refusal_score"
REGIME_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class RegimeData:
    """The splits of the regime sweep. Harmful and over-refusal prompts have no responses; benign
    ones carry the original model's own answers."""

    safety_train: ChatDataset
    harmful_val: ChatDataset
    harmful_test: ChatDataset
    over_val: ChatDataset
    over_test: ChatDataset
    benign_val: ChatDataset
    benign_test: ChatDataset
    mc_items: list = field(default_factory=list)
    source: str = "bundled"
    # The verdict's diagnosis splits (`regime_data(n_safety_cal=, n_benign_diag=, n_over_diag=)`),
    # disjoint from training and from every validation and test prompt; None in the sweep.
    safety_cal: Optional[ChatDataset] = None
    benign_diag: Optional[ChatDataset] = None
    over_diag: Optional[ChatDataset] = None

    def describe(self) -> dict:
        sets = {k: v.describe() for k, v in vars(self).items() if isinstance(v, ChatDataset)}
        return {**sets, "mc_items": len(self.mc_items), "source": self.source}


def _shuffled(ds: ChatDataset, seed: int) -> ChatDataset:
    ex = list(ds.examples)
    random.Random(seed).shuffle(ex)
    return ChatDataset(ds.name, ex, ds.source)


def _cut(ds: ChatDataset, n: int, name: str) -> tuple[ChatDataset, ChatDataset]:
    if len(ds) <= n:
        raise DataError(f"{ds.name!r} has {len(ds)} prompts; the regime needs more than {n} "
                        f"(validation) to leave a test split. Lower {name}.")
    return (ChatDataset(ds.name + "-val", ds.examples[:n], ds.source),
            ChatDataset(ds.name + "-test", ds.examples[n:], ds.source))


def _concat(name: str, *sets: ChatDataset) -> ChatDataset:
    return ChatDataset(name, [e for s in sets for e in s], "+".join(s.name for s in sets))


def regime_data(
    model: Model, *, datasets: Union[str, Path, None] = None, n_val: int = 32, n_over_val: int = 64,
    n_benign_test: int = 64, n_over_test: Optional[int] = None, max_safety_tokens: int = 64,
    answer_tokens: int = 64, n_mc_per_subject: int = 50, split_seed: int = 0,
    cache_dir: Union[str, Path, None] = None, n_harmful_test: Optional[int] = None,
    n_safety_cal: int = 0, n_benign_diag: int = 0, n_over_diag: int = 0,
) -> RegimeData:
    """The sweep's data, from the public datasets folder when present (`shared_datasets_dir`),
    else from the bundled sets (smaller; recorded as `source="bundled"`; `datasets="bundled"`
    forces them).

    Safety training: Bianchi et al.'s 2,483 safety pairs, the refusal-direction harmful train split
    and the bundled harmful train split (both with the project's own refusals), answers cut at
    `max_safety_tokens`. Held-out harmful: bundled test, JailbreakBench and the refusal-direction
    validation split, minus any prompt in training. Over-refusal: XSTest safe and CoCoNot contrast
    (and the bundled over-refusal set). Benign: Alpaca prompts (bundled benign when absent) with the
    model's own greedy answers (`answer_tokens`). Validation comes first after a seeded shuffle.

    The verdict's diagnosis splits (0: none, as in the sweep): `n_safety_cal` safety pairs taken
    out of training (D_safe), `n_benign_diag` benign prompts after the benign test split and
    `n_over_diag` over-refusal prompts between the over-refusal validation and test splits, both
    with the model's own answers (D_util, general or benign-but-sensitive). `n_harmful_test` caps
    the held-out harmful test split.
    """
    for name, v in (("n_val", n_val), ("n_over_val", n_over_val), ("n_benign_test", n_benign_test),
                    ("max_safety_tokens", max_safety_tokens), ("answer_tokens", answer_tokens)):
        check_int(name, v, 1)
    for name, v in (("n_safety_cal", n_safety_cal), ("n_benign_diag", n_benign_diag),
                    ("n_over_diag", n_over_diag)):
        check_int(name, v, 0)
    check_int("n_harmful_test", n_harmful_test, 1, none_ok=True)
    root = (None if datasets == "bundled" else
            shared_datasets_dir(datasets) if datasets is not None else shared_datasets_dir())
    bundled_train = with_refusals(load_bundled("harmful", "train"), seed=split_seed)
    if root is not None:
        train = _concat("safety-train", load_safety_pairs(root / "safety_only_data_Instructions.json"),
                        with_refusals(load_refusal_direction(root / "harmful_train.json"),
                                      seed=split_seed), bundled_train)
        harmful = _concat("harmful-heldout", load_bundled("harmful", "test"),
                          load_jailbreakbench(root / "jailbreakbench_harmful.csv"),
                          load_refusal_direction(root / "harmful_val.json"))
        over = _concat("over-refusal", load_xstest(root / "xstest_prompts.csv", label="safe"),
                       load_coconot(root / "coconot_contrast_eval.jsonl"),
                       load_bundled("over_refusal"))
        benign = load_alpaca(root / "alpaca_small.json")
        mc = load_mmlu_dir(root / "mmlu", n_per_subject=n_mc_per_subject) if n_mc_per_subject \
            else []
        source = str(root)
    else:
        train = _concat("safety-train", bundled_train)
        harmful = load_bundled("harmful", "test")
        over = load_bundled("over_refusal")
        benign = load_bundled("benign")
        mc = []
        source = "bundled"
    train = dedup_against(train, name="safety-train")
    train = truncate_responses(model, train, max_safety_tokens)
    safety_cal = None
    if n_safety_cal:
        train = _shuffled(train, split_seed + 3)
        safety_cal, train = _cut(train, n_safety_cal, "n_safety_cal")
        safety_cal = ChatDataset("safety-cal", safety_cal.examples, train.source)
        train = ChatDataset("safety-train", train.examples, train.source)
    harmful = _shuffled(dedup_against(harmful, train, name="harmful-heldout"), split_seed)
    over = _shuffled(dedup_against(over, train, harmful, name="over-refusal"), split_seed + 1)
    benign = _shuffled(dedup_against(benign, train, harmful, over, name="benign"), split_seed + 2)
    h_val, h_test = _cut(harmful, n_val, "n_val")
    if n_harmful_test is not None:
        h_test = h_test.take(n_harmful_test)
    o_val, o_test = _cut(over, n_over_val, "n_over_val")
    o_diag = None
    if n_over_diag:
        o_diag, rest = _cut(o_test, n_over_diag, "n_over_diag")
        o_test = ChatDataset(o_test.name, rest.examples, o_test.source)
    if n_over_test is not None:
        o_test = o_test.take(n_over_test)
    benign = benign.take(n_val + n_benign_test + n_benign_diag)
    cache = Path(cache_dir) if cache_dir is not None else None
    benign = self_reference(model, ChatDataset(benign.name, [type(e)(e.prompt, None, e.category)
                                                             for e in benign], benign.source),
                            max_new_tokens=answer_tokens,
                            cache_path=cache / "self_reference_benign.jsonl" if cache else None)
    b_val, b_test = _cut(benign, n_val, "n_val")
    b_diag = None
    if n_benign_diag:
        first, rest = _cut(b_test, n_benign_test, "n_benign_test")
        b_test, b_diag = (ChatDataset(b_test.name, first.examples, b_test.source),
                          ChatDataset("benign-diag", rest.examples, b_test.source))
    if o_diag is not None:
        o_diag = self_reference(model, ChatDataset("over-refusal-diag", o_diag.examples,
                                                   o_diag.source),
                                max_new_tokens=answer_tokens,
                                cache_path=cache / "self_reference_over_diag.jsonl" if cache else None)
    return RegimeData(train, h_val, h_test, o_val, o_test, b_val, b_test, mc, source,
                      safety_cal, b_diag, o_diag)


# --------------------------------------------------------------------------------------------------
# Evaluation at a checkpoint
# --------------------------------------------------------------------------------------------------


class RegimeEvaluator:
    """Per-prompt endpoints of a model on one split ("val" or "test") of `RegimeData`.

    The original's log-probs on the benign answers are computed once (`OriginalLogprobs`), so a
    checkpoint costs forwards of the tuned model only.
    """

    def __init__(self, original: Model, data: RegimeData, split: str, *, batch_size: int = 16,
                 n_generate: int = 0, generate_tokens: int = 32):
        from .utility import OriginalLogprobs

        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}.")
        self.split, self.batch_size = split, batch_size
        self.harmful = getattr(data, f"harmful_{split}")
        self.over = getattr(data, f"over_{split}")
        benign = getattr(data, f"benign_{split}")
        self.reference = OriginalLogprobs(original, benign, batch_size=batch_size, tokens="content")
        self.n_generate, self.generate_tokens = n_generate, generate_tokens

    def __call__(self, model: Model) -> dict[str, list]:
        """{metric: per-prompt values} (lists, JSON-ready)."""
        from .safety import refusal_logprobs, refusal_rate
        from .utility import utility_per_prompt

        out: dict[str, list] = {}
        with torch.no_grad(), backend.inference_layout(model):
            out["refusal_score"] = refusal_logprobs(model, self.harmful,
                                                    batch_size=self.batch_size).tolist()
            out["over_refusal_score"] = refusal_logprobs(model, self.over,
                                                         batch_size=self.batch_size).tolist()
            u = utility_per_prompt(model, self.reference.batches, original=self.reference,
                                   batch_size=self.batch_size, tokens="content")
            out["kl"] = u["kl_to_original"].tolist()
            out["nll"] = u["reference_nll"].tolist()
            if self.n_generate:
                r = refusal_rate(model, self.over.take(self.n_generate),
                                 max_new_tokens=self.generate_tokens, batch_size=self.batch_size)
                out["over_refusal_judged"] = [float(x) for x in r["refused"]]
        return out


def mc_correct(model: Model, items: Sequence[dict], *, batch_size: int = 16) -> list:
    """Per-item multiple-choice correctness (0/1), `utility.task_accuracy`."""
    from .utility import task_accuracy

    with torch.no_grad(), backend.inference_layout(model):
        acc = task_accuracy(model, items, batch_size=batch_size)
    return [float(c) for c in acc["correct"]]


# The sweep's per-prompt keys and the registered metric each one is (`registry.metrics`: role,
# unit and direction live there).
SWEEP_METRICS = {"refusal_score": "refusal_score", "over_refusal_score": "over_refusal_score",
                 "over_refusal_judged": "over_refusal_rate", "kl": "kl_to_original",
                 "nll": "reference_nll", "mc_correct": "task_accuracy"}


def endpoints() -> dict[str, tuple[str, str]]:
    """{sweep key: (role, "unit, lower/higher is better")}, read from the metrics registry."""
    from .registry.metrics import get_metric

    out = {}
    for key, name in SWEEP_METRICS.items():
        m = get_metric(name)
        out[key] = (m.role, f"{m.unit}, {'lower' if m.lower_is_better else 'higher'} is better")
    return out


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


@dataclass
class SweepConfig:
    """Settings of the regime sweep (saved with its results).

    Each (scope, lr) is one run of `max(checkpoints)` steps at a constant lr after `warmup_steps`,
    batch `batch_size`, benign share 0, training seed `seed`; the validation split is evaluated at
    every checkpoint, the test split at `test_checkpoints`.
    """

    scopes: tuple = ("attention", "all")
    lrs: tuple = (5e-5, 2e-4, 5e-4)
    checkpoints: tuple = (4, 8, 16, 32, 64, 128, 256)
    test_checkpoints: tuple = (16, 64, 256)
    mc_checkpoints: tuple = (256,)
    batch_size: int = 8
    warmup_steps: int = 2
    seed: int = 0
    split_seed: int = 0
    n_val: int = 32
    n_over_val: int = 64
    n_benign_test: int = 64
    n_over_test: Optional[int] = None
    max_safety_tokens: int = 64
    answer_tokens: int = 64
    n_generate: int = 128
    n_mc_per_subject: int = 50
    min_tax: float = 1.0
    min_safety: float = 1.0
    order: Optional[tuple] = None  # settings as "scope@lr", in run order; None: scopes x lrs

    def __post_init__(self) -> None:
        for name in ("batch_size", "n_val", "n_over_val", "n_benign_test", "max_safety_tokens",
                     "answer_tokens"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0)
        if not self.checkpoints or any(int(c) < 1 for c in self.checkpoints):
            raise ValueError(f"checkpoints must be steps >= 1, got {self.checkpoints!r}.")
        if not set(self.test_checkpoints) <= set(self.checkpoints) or not set(
                self.mc_checkpoints) <= set(self.test_checkpoints):
            raise ValueError(f"test_checkpoints {self.test_checkpoints} must be among the "
                             f"checkpoints {self.checkpoints}, and mc_checkpoints "
                             f"{self.mc_checkpoints} among the test checkpoints.")
        for lr in self.lrs:
            if not (isinstance(lr, (int, float)) and 0 < lr <= 1 and math.isfinite(lr)):
                raise ValueError(f"every lr must be in (0, 1], got {lr!r}.")
        for s in self.scopes:
            if s not in ("attention", "all"):
                raise ValueError(f"scope must be 'attention' or 'all', got {s!r}.")

    def settings(self) -> list[tuple[str, float]]:
        if self.order is not None:
            out = []
            for item in self.order:
                scope, lr = str(item).split("@")
                out.append((scope, float(lr)))
            return out
        return [(s, float(lr)) for s in self.scopes for lr in self.lrs]

    def to_dict(self) -> dict:
        return asdict(self)


def setting_name(scope: str, lr: float) -> str:
    return f"{scope}_lr{lr:.0e}".replace("e-0", "e-")


def run_regime_sweep(
    model: Model, cfg: SweepConfig, out_dir: Union[str, Path], *, datasets=None,
    progress: bool = True,
) -> dict:
    """Run (or resume) the sweep into `out_dir`; returns the summary (`summarize_sweep`).

    Files: `sweep.json` (config, data description, versions), `original.json` (the untrained
    model's per-prompt endpoints on both splits), `settings/<name>/step_<k>.json` (one per
    checkpoint, written atomically as it is reached), `settings/<name>/done.json` (training log
    when the setting finished). A finished setting is skipped on resume; an unfinished one is
    re-run from step 0 (its finished checkpoints are identical by seed and are overwritten).
    """
    from .sparse_tuning import TuningConfig, safety_finetune

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = regime_data(model, datasets=datasets, n_val=cfg.n_val, n_over_val=cfg.n_over_val,
                       n_benign_test=cfg.n_benign_test, n_over_test=cfg.n_over_test,
                       max_safety_tokens=cfg.max_safety_tokens, answer_tokens=cfg.answer_tokens,
                       n_mc_per_subject=cfg.n_mc_per_subject, split_seed=cfg.split_seed,
                       cache_dir=out)
    t_data = time.perf_counter() - t0
    meta = {"format": REGIME_FORMAT, "config": cfg.to_dict(), "data": data.describe(),
            "model": model_id(model), "versions": package_versions(),
            "primary": PRIMARY, "endpoints": endpoints()}
    sweep_file = out / "sweep.json"
    if sweep_file.exists():
        old = read_json(sweep_file)
        new = json.loads(json.dumps(to_jsonable(meta)))  # tuples as JSON gives them back
        # The run order only decides which settings come first; every other field must match.
        same = {k: v for k, v in new["config"].items() if k != "order"} == {
            k: v for k, v in (old.get("config") or {}).items() if k != "order"}
        if not same or old.get("data") != new["data"]:
            raise ValueError(f"{out} holds a sweep with other settings or data; use a new "
                             "directory (nothing was changed).")
    else:
        atomic_write_json(meta, sweep_file)

    original_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    val = RegimeEvaluator(model, data, "val")
    test = RegimeEvaluator(model, data, "test", n_generate=cfg.n_generate)
    orig_file = out / "original.json"
    if not orig_file.exists():
        t = time.perf_counter()
        base = {"val": val(model), "test": test(model)}
        if data.mc_items:
            base["test"]["mc_correct"] = mc_correct(model, data.mc_items)
        base["time_s"] = time.perf_counter() - t
        base["data_time_s"] = t_data
        atomic_write_json(base, orig_file)
    base = read_json(orig_file)
    # Capability is an endpoint only where the original is above chance (METHOD v3).
    mc_used = _above_chance(base["test"].get("mc_correct"), data.mc_items)

    for scope, lr in cfg.settings():
        name = setting_name(scope, lr)
        sdir = out / "settings" / name
        if (sdir / "done.json").exists():
            continue
        sdir.mkdir(parents=True, exist_ok=True)
        model.load_state_dict(original_state)
        steps = max(cfg.checkpoints)
        tcfg = TuningConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, schedule="constant",
                            warmup_steps=cfg.warmup_steps, scope=scope, benign_mix=0.0,
                            seed=cfg.seed)
        t_eval = [0.0]
        t_start = time.perf_counter()

        def on_step(step: int, loss: float, _sdir=sdir, _name=name) -> None:
            done = step + 1
            if done not in cfg.checkpoints:
                return
            t = time.perf_counter()
            rec = {"step": done, "setting": _name, "loss": loss, "val": val(model)}
            if done in cfg.test_checkpoints:
                rec["test"] = test(model)
                if mc_used and done in cfg.mc_checkpoints:
                    rec["test"]["mc_correct"] = mc_correct(model, data.mc_items)
            rec["eval_time_s"] = time.perf_counter() - t
            rec["elapsed_s"] = time.perf_counter() - t_start
            t_eval[0] += rec["eval_time_s"]
            atomic_write_json(rec, _sdir / f"step_{done:04d}.json")
            if progress:
                v = rec["val"]
                print(f"[{_name}] step {done}: loss {loss:.3f} refusal "
                      f"{np.mean(v['refusal_score']):+.2f} over-refusal "
                      f"{np.mean(v['over_refusal_score']):+.2f} kl {np.nanmean(v['kl']):.3f} "
                      f"({rec['eval_time_s']:.0f} s eval, {rec['elapsed_s']:.0f} s)", flush=True)

        res = safety_finetune(model, data.safety_train, config=tcfg, on_step=on_step)
        atomic_write_json({"setting": name, "scope": scope, "lr": lr, "losses": res.losses,
                           "grad_norms": res.grad_norms, "time_s": res.config["time_s"],
                           "eval_time_s": t_eval[0],
                           "train_time_s": res.config["time_s"] - t_eval[0],
                           "n_trainable": res.n_trainable, "tuning": tcfg.to_dict()},
                          sdir / "done.json")
    model.load_state_dict(original_state)
    return summarize_sweep(out)


def _above_chance(correct: Optional[list], items: Sequence[dict]) -> bool:
    """Whether the original's multiple-choice accuracy's 95% CI (normal approximation) lies above
    chance: only then is capability an endpoint that can fall."""
    if not correct or not items:
        return False
    acc = float(np.mean(correct))
    chance = float(np.mean([1 / len(it["choices"]) for it in items]))
    half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / len(correct))
    return acc - half > chance


# --------------------------------------------------------------------------------------------------
# Summary: the tax with its CI, per setting and checkpoint
# --------------------------------------------------------------------------------------------------


def _paired(tuned: list, base: list, seed: int) -> dict:
    from .stats import paired_difference

    a, b = np.asarray(tuned, float), np.asarray(base, float)
    keep = np.isfinite(a) & np.isfinite(b)
    return paired_difference(a[keep], b[keep], n_boot=2000, seed=seed)


def summarize_sweep(out_dir: Union[str, Path], *, write: bool = True) -> dict:
    """Per setting and test checkpoint, each endpoint's change from the original (tuned - original,
    paired over prompts, 95% bootstrap CI), the validation curves, and the chosen regime."""
    out = Path(out_dir)
    meta = read_json(out / "sweep.json")
    base = read_json(out / "original.json")
    cfg = meta["config"]
    rows, curves = [], {}
    for sdir in sorted((out / "settings").glob("*")) if (out / "settings").exists() else []:
        steps = sorted(sdir.glob("step_*.json"))
        done = read_json(sdir / "done.json") if (sdir / "done.json").exists() else None
        curve = []
        for f in steps:
            rec = read_json(f)
            v = rec["val"]
            curve.append({"step": rec["step"], **{k: float(np.nanmean(x)) for k, x in v.items()},
                          "safety_gain": float(np.mean(v["refusal_score"])
                                               - np.mean(base["val"]["refusal_score"])),
                          "tax": float(np.mean(v[PRIMARY]) - np.mean(base["val"][PRIMARY]))})
            if "test" in rec:
                row = {"setting": sdir.name, "step": rec["step"]}
                for k, vals in rec["test"].items():
                    if k in base["test"]:
                        row[k] = _paired(vals, base["test"][k], seed=rec["step"])
                rows.append(row)
        curves[sdir.name] = {"curve": curve, "finished": done is not None,
                             "train_time_s": done["train_time_s"] if done else None,
                             "eval_time_s": done["eval_time_s"] if done else None}
    chosen = choose_regime(rows, min_tax=cfg["min_tax"], min_safety=cfg["min_safety"])
    summary = {"rows": rows, "curves": curves, "chosen": chosen, "primary": PRIMARY,
               "original": {s: {k: float(np.nanmean(v)) for k, v in d.items()}
                            for s, d in base.items() if isinstance(d, dict)},
               "config": cfg, "data": meta["data"], "model": meta["model"],
               "versions": meta["versions"]}
    if write:
        atomic_write_json(summary, out / "summary.json")
    return summary


def choose_regime(rows: Sequence[dict], *, min_tax: float, min_safety: float) -> Optional[dict]:
    """The regime rule of the module docstring, applied to summary rows: None when no (setting,
    step) shows a tax (the report then says "no alignment tax in this regime")."""
    ok = []
    for r in rows:
        tax, safe = r.get(PRIMARY), r.get("refusal_score")
        if not tax or not safe:
            continue
        if tax["low"] > 0 and tax["diff"] >= min_tax and safe["diff"] >= min_safety:
            scope, lr = r["setting"].split("_lr")
            ok.append((scope != "attention", r["step"], float(lr), r))
    if not ok:
        return None
    ok.sort(key=lambda t: t[:3])
    r = ok[0][3]
    return {"setting": r["setting"], "step": r["step"], "tax": r[PRIMARY]["diff"],
            "tax_low": r[PRIMARY]["low"], "tax_high": r[PRIMARY]["high"],
            "safety_gain": r["refusal_score"]["diff"]}


# The regime the committed sweep chose by the rule above (figures/regime/report.md): the v3
# verdict's tuning, as `TuningConfig` fields, and the data `regime_data` builds.
REGIME_V3 = {"tuning": dict(steps=16, batch_size=8, lr=5e-5, schedule="constant", warmup_steps=2,
                            scope="attention", benign_mix=0.0),
             "data": dict(max_safety_tokens=64), "sweep": "figures/regime"}


# Sized for one working session on 2 CPU cores (see the README's regime section for what was cut).
CPU_SWEEP = dict(order=("all@2e-4", "attention@5e-5", "attention@2e-4", "attention@5e-4",
                        "all@5e-5"),
                 checkpoints=(4, 8, 16, 32, 64), test_checkpoints=(16, 64), mc_checkpoints=(64,),
                 n_over_test=256, n_generate=64)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m cast_interp.regime ...` = `cast-interp regime ...`."""
    import sys

    from .cli import main as cli_main

    return cli_main(["regime", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
