"""The whole CAST experiment as one resumable run: diagnose -> tune every arm -> evaluate -> report.

    run_experiment(RunConfig(out_dir="runs/default"))

1. Diagnosis (stage 1) on the calibration splits: the pre-alignment `ConflictMap`.
2. Safety fine-tuning (stage 2) of a fresh copy of the model per arm, all at the same budget k, same
   data, steps and seed set: full tuning, CAST (skip top-k by C), random k (several seeds), bottom-k
   by C, top-k by O only, top-k by S only, and a band of whole layers.
3. Evaluation (stage 3) of the original and of every arm on held-out data, reported as the change
   from the original model.
4. Post-hoc attribution (stage 4) of the full-tuning arm, compared with the map (optional).

Every finished piece is written atomically to `out_dir` and re-used when the run is started again
with the same configuration, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from .io import atomic_write_json, atomic_write_text, read_json, to_jsonable

PRESETS: dict[str, dict[str, Any]] = {
    # Sized for 2 CPU cores: the whole run in under 20 minutes on SmolLM2-135M-Instruct.
    "cpu": {},
    # Smallest settings for a smoke test of the plumbing (tiny model or a quick look).
    "smoke": {"n_calibration": 4, "n_sensitivity": 4, "n_bootstrap": 10, "steps": 2,
              "batch_size": 4, "n_eval": 4, "eval_max_new_tokens": 8, "k_fractions": [0.1],
              "k_sweep": [], "random_seeds": [0], "attribution_examples": 4,
              "attribution_exact_heads": 2},
    # A larger run for a GPU (the `device` machine): more data, steps and seeds.
    "gpu": {"n_calibration": 128, "n_sensitivity": 64, "n_bootstrap": 500, "steps": 40,
            "batch_size": 16, "n_eval": 50, "eval_max_new_tokens": 32,
            "k_fractions": [0.05, 0.1, 0.2], "k_sweep": [0.3], "random_seeds": [0, 1, 2, 3, 4],
            "attribution_method": "exact", "attribution_examples": 32},
}


@dataclass
class RunConfig:
    """Everything that defines a CAST run (saved in `results.json`)."""

    out_dir: str = "runs/default"
    model: str = "smollm2-135m-instruct"
    safety_data: str = "bundled:harmful"
    utility_data: str = "bundled:benign"
    over_refusal_data: str = "bundled:over_refusal"
    # Stage 1
    n_calibration: int = 32          # examples per calibration set for the gradients (O)
    n_sensitivity: int = 6           # utility examples for S (exact ablation is the costly part)
    diag_batch_size: int = 8
    ablation: str = "mean"
    sensitivity_method: str = "exact"
    combine: str = "product"
    n_bootstrap: int = 200
    utility_reference: str = "dataset"  # D_util answers for O and S: the dataset's, or "self"
    # Stage 2
    k_fractions: list = field(default_factory=lambda: [0.1])   # k for the full set of baselines
    k_sweep: list = field(default_factory=lambda: [0.2])  # extra k for CAST and random (seed 0)
    random_seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 8
    batch_size: int = 8
    lr: Optional[float] = None       # None: TuningConfig's default
    benign_mix: float = 0.25         # share of benign examples per batch (tempers over-refusal)
    benign_reference: str = "self"   # benign answers trained on: the model's own ("self") or the data's
    scope: str = "attention"
    kv_policy: str = "any"
    seed: int = 0
    # Stage 3
    n_eval: int = 16                 # held-out examples per evaluation set
    eval_max_new_tokens: int = 12    # refusals show in the first words
    # Stage 4
    attribute: bool = True
    attribution_method: str = "first_order"  # all heads; "exact" costs a forward per head
    attribution_exact_heads: int = 6          # also exact on this many heads (top by first-order)
    attribution_examples: int = 16
    # Utility answers for stage 4: the original model's own greedy answers ("self", default, ours:
    # the tax is drift from what the model did, which dataset answers of another style can hide)
    # or the dataset's ("dataset").
    attribution_reference: str = "self"
    preset: str = "cpu"
    device: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_preset(cls, preset: str = "cpu", **overrides) -> "RunConfig":
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose from {sorted(PRESETS)}.")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=preset, **values)

    def key(self, *names: str) -> str:
        """Hash of the named fields: a finished piece is re-used only if these are unchanged."""
        d = self.to_dict()
        return hashlib.sha256(json.dumps({n: d[n] for n in names}, sort_keys=True,
                                         default=str).encode()).hexdigest()[:12]


DIAG_FIELDS = ("model", "safety_data", "utility_data", "n_calibration", "n_sensitivity",
               "diag_batch_size", "ablation", "sensitivity_method", "combine", "n_bootstrap", "seed",
               "utility_reference")
TUNE_FIELDS = DIAG_FIELDS + ("steps", "batch_size", "lr", "benign_mix", "benign_reference", "scope",
                             "kv_policy")
ATTR_FIELDS = ("attribution_method", "attribution_exact_heads", "attribution_examples",
               "attribution_reference")
EVAL_FIELDS = ("model", "safety_data", "utility_data", "over_refusal_data", "n_eval",
               "eval_max_new_tokens")


@dataclass
class Arm:
    """One fine-tuning run: a method at a budget k (a count of heads) with a seed."""

    method: str
    k: int
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.method}_k{self.k}_s{self.seed}"


def plan_arms(cfg: RunConfig, n_heads_total: int) -> list[Arm]:
    """Every arm of the run: all baselines at each k in `k_fractions`; CAST and random at `k_sweep`."""
    arms = [Arm("full", 0, cfg.seed)]
    ks_full = [max(1, round(f * n_heads_total)) for f in cfg.k_fractions]
    ks_sweep = [max(1, round(f * n_heads_total)) for f in cfg.k_sweep]
    for k in ks_full:
        arms.append(Arm("cast", k, cfg.seed))
        arms += [Arm("random", k, s) for s in cfg.random_seeds]
        arms += [Arm(m, k, cfg.seed) for m in ("bottom", "top_o", "top_s", "layer_band")]
    for k in ks_sweep:
        if k in ks_full:
            continue
        arms.append(Arm("cast", k, cfg.seed))
        arms += [Arm("random", k, s) for s in cfg.random_seeds[:1]]
    return arms


_T0 = time.time()


def _log(msg: str) -> None:
    print(f"[cast {time.time() - _T0:7.1f}s] {msg}", flush=True)


def _datasets(cfg: RunConfig):
    from .data import load_dataset

    def split(spec: str, name: str):
        return load_dataset(spec if spec.count(":") >= 2 or not spec.startswith("bundled:")
                            else f"{spec}:{name}")

    return {
        "safe_cal": split(cfg.safety_data, "calibration"),
        "util_cal": split(cfg.utility_data, "calibration"),
        "safe_train": split(cfg.safety_data, "train"),
        "util_train": split(cfg.utility_data, "train"),
        "harmful_test": split(cfg.safety_data, "test").take(cfg.n_eval),
        "benign_test": split(cfg.utility_data, "test").take(cfg.n_eval),
        "over_refusal": load_dataset(cfg.over_refusal_data).take(cfg.n_eval),
    }


def run_experiment(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Run (or resume) the whole experiment; returns the content of `results.json`."""
    from .conflict_map import ConflictMap
    from .diagnose import DiagnosisConfig, diagnose
    from .evaluate import EvalConfig, evaluate
    from .model import load_model, model_id
    from .sparse_tuning import TuningConfig, safety_finetune, select_arm_heads

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.to_dict(), out / "config.json")
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device=cfg.device)
    data = _datasets(cfg)
    n_total = model.cfg.n_layers * model.cfg.n_heads
    if cfg.benign_mix > 0 and cfg.benign_reference == "self":
        # The benign mix keeps what the model already does (its own greedy answers, made once and
        # cached) rather than teaching the style of the dataset's answers, which would confound the
        # reference NLL measured on held-out answers of that same style (ours).
        from .data import self_reference

        n_benign = min(len(data["util_train"]), math.ceil(cfg.steps * cfg.batch_size * cfg.benign_mix))
        _log(f"benign mix: the model's own answers to {n_benign} training prompts")
        data["util_train"] = self_reference(model, data["util_train"].take(n_benign),
                                            max_new_tokens=64,
                                            cache_path=out / "self_reference_train.jsonl")
    elif cfg.benign_reference not in ("self", "dataset"):
        raise ValueError(f"benign_reference must be 'self' or 'dataset', got {cfg.benign_reference!r}.")

    # ---- Stage 1: diagnosis (re-used if already on disk with the same settings)
    diag_dir, diag_key = out / "diagnosis", cfg.key(*DIAG_FIELDS)
    cmap = None
    if (diag_dir / "conflict_map.json").exists():
        try:
            cmap = ConflictMap.load(diag_dir)
            if cmap.config.get("run_key") != diag_key:
                cmap = None
        except Exception:
            cmap = None
    if cmap is None:
        _log("stage 1: diagnosis")
        dcfg = DiagnosisConfig(n_calibration=cfg.n_calibration, n_sensitivity=cfg.n_sensitivity,
                               batch_size=cfg.diag_batch_size, ablation=cfg.ablation,
                               sensitivity_method=cfg.sensitivity_method, combine=cfg.combine,
                               n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                               utility_reference=cfg.utility_reference)
        cmap = diagnose(model, data["safe_cal"], data["util_cal"], dcfg, progress=progress)
        cmap.config["run_key"] = diag_key
        cmap.save(diag_dir)
    else:
        _log("stage 1: diagnosis re-used from disk")
    _diagnosis_figures(cmap, out / "figures", k=max(1, round(cfg.k_fractions[0] * n_total)))

    # ---- Stage 3 on the original model
    ecfg = EvalConfig(n_harmful=cfg.n_eval, n_benign=cfg.n_eval, n_over_refusal=cfg.n_eval,
                      max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed)
    eval_kwargs = dict(harmful=data["harmful_test"], benign=data["benign_test"],
                       over_refusal=data["over_refusal"], config=ecfg)
    arms_dir = out / "arms"
    eval_key = cfg.key(*EVAL_FIELDS)
    base_path = arms_dir / "original.json"
    base = _load_piece(base_path, eval_key)
    if base is None:
        _log("stage 3: evaluating the original model")
        res = evaluate(model, original=model, **eval_kwargs)
        base = {"key": eval_key, "eval": res.to_dict()}
        atomic_write_json(base, base_path)

    # ---- Stage 2 + 3 per arm
    original_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = copy.deepcopy(model)
    original.requires_grad_(False)
    tune_key = cfg.key(*TUNE_FIELDS, *EVAL_FIELDS)
    arms = plan_arms(cfg, n_total)
    results: dict[str, dict] = {}
    tcfg_kwargs = dict(steps=cfg.steps, batch_size=cfg.batch_size, scope=cfg.scope,
                       kv_policy=cfg.kv_policy, benign_mix=cfg.benign_mix)
    if cfg.lr is not None:
        tcfg_kwargs["lr"] = cfg.lr
    full_state = None
    for i, arm in enumerate(arms):
        path = arms_dir / f"{arm.name}.json"
        piece = _load_piece(path, tune_key)
        if piece is not None and (arm.method != "full" or (arms_dir / "full_state.safetensors").exists()
                                  or not cfg.attribute):
            results[arm.name] = piece
            _log(f"arm {i + 1}/{len(arms)} {arm.name}: done before, re-used")
            continue
        _log(f"arm {i + 1}/{len(arms)} {arm.name}: tuning")
        model.load_state_dict(original_state)
        skip = [] if arm.method == "full" else select_arm_heads(
            arm.method, cmap, arm.k, seed=arm.seed, kv_policy=cfg.kv_policy, model=model)
        tcfg = TuningConfig(seed=arm.seed, **tcfg_kwargs)
        tres = safety_finetune(model, data["safe_train"], skip_heads=skip, config=tcfg,
                               benign_data=data["util_train"] if cfg.benign_mix > 0 else None,
                               progress=progress)
        res = evaluate(model, original=original, **eval_kwargs)
        piece = {"key": tune_key, "arm": asdict(arm), "skip_heads": skip,
                 "tuning": tres.to_dict(), "eval": res.to_dict()}
        if arm.method == "full" and cfg.attribute:
            from .io import atomic_save_safetensors

            full_state = {k: v.detach().cpu() for k, v in model.state_dict().items()
                          if ".attn." in k or cfg.scope == "all"}
            atomic_save_safetensors(full_state, arms_dir / "full_state.safetensors",
                                    {"key": tune_key})
        atomic_write_json(piece, path)  # written last: its presence means the arm is finished
        results[arm.name] = piece
    model.load_state_dict(original_state)

    # ---- Stage 4: which heads caused the drop
    attribution = None
    if cfg.attribute:
        attribution = _attribution(cfg, model, original, cmap, data, arms_dir, tune_key, out,
                                   progress)

    summary = summarize(base, results)
    doc = {
        "config": cfg.to_dict(),
        "model": model_id(model),
        "data": {k: v.describe() for k, v in data.items()},
        "diagnosis": {"concentration": cmap.concentration(), "top_heads": cmap.top_heads(
            max(1, round(cfg.k_fractions[0] * n_total))), "config": cmap.config},
        "original": base["eval"],
        "arms": results,
        "summary": summary,
        "attribution": attribution,
        "time_s": time.time() - t_start,
    }
    atomic_write_json(doc, out / "results.json")
    run_figures(out)
    atomic_write_text(report_markdown(doc), out / "report.md")
    _log(f"done in {doc['time_s']:.0f} s: {out / 'report.md'}")
    return to_jsonable(doc)


def _load_piece(path: Path, key: str) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        piece = read_json(path)
    except (ValueError, FileNotFoundError):
        return None
    return piece if piece.get("key") == key else None


def _attribution(cfg, model, original, cmap, data, arms_dir, tune_key, out, progress):
    """Stage 4 on the full-tuning arm: per-head utility recovered by reverting it, against the map.

    `attribution_method` on every head ("first_order" by default: one backward per objective), then
    "exact" reverts on the `attribution_exact_heads` heads that first-order ranks highest, with the
    agreement of the two on those heads (`agreement_*`)."""
    from safetensors.torch import load_file

    from .attribution import causal_attribution, compare_attribution

    key = cfg.key(*TUNE_FIELDS, *EVAL_FIELDS, *ATTR_FIELDS)
    path = out / "attribution" / "attribution.json"
    piece = _load_piece(path, key)
    if piece is not None:
        return piece
    tuned = copy.deepcopy(original)
    tuned.load_state_dict(load_file(str(arms_dir / "full_state.safetensors")), strict=False)
    util = data["benign_test"].take(cfg.attribution_examples)
    if cfg.attribution_reference == "self":
        from .data import self_reference

        _log(f"stage 4: the original model's own answers to {len(util)} benign test prompts")
        util = self_reference(original, util, max_new_tokens=48,
                              cache_path=out / "attribution" / "self_reference_test.jsonl")
    elif cfg.attribution_reference != "dataset":
        raise ValueError("attribution_reference must be 'self' or 'dataset', got "
                         f"{cfg.attribution_reference!r}.")
    _log(f"stage 4: post-hoc attribution of the full-tuning arm ({cfg.attribution_method})")
    kw = dict(utility_data=util, safety_data=data["harmful_test"],
              conflict_map=cmap, n_examples=cfg.attribution_examples, seed=cfg.seed,
              progress=progress)
    res = causal_attribution(tuned, original, method=cfg.attribution_method, **kw)
    res.save(out / "attribution")
    summary = res.summary()
    n_exact = min(cfg.attribution_exact_heads, len(res.ranking()))
    if cfg.attribution_method != "exact" and n_exact > 0:
        heads = res.ranking()[:n_exact]
        _log(f"stage 4: exact reverts of the top {n_exact} heads")
        exact = causal_attribution(tuned, original, method="exact", heads=heads,
                                   **{**kw, "conflict_map": None})  # agreement only: no map needed
        exact.save(out / "attribution" / "exact_subset")
        agree = compare_attribution(res, exact, k=max(1, n_exact // 3))["utility"]
        summary.update({f"agreement_{k}": v for k, v in agree.items()
                        if isinstance(v, (int, float))})
    piece = {"key": key, **summary}
    atomic_write_json(piece, path)
    return piece


METRICS = ("refusal_rate", "refusal_score", "over_refusal_rate", "reference_nll", "kl_to_original")


def summarize(base: dict, results: dict[str, dict]) -> list[dict]:
    """One row per (method, k): metric changes from the original, mean and spread over seeds."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for piece in results.values():
        groups.setdefault((piece["arm"]["method"], piece["arm"]["k"]), []).append(piece)
    base_m = base["eval"]["metrics"]
    rows = []
    for (method, k), pieces in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
        row: dict[str, Any] = {"method": method, "k": k, "n_seeds": len(pieces),
                               "n_trainable": pieces[0]["tuning"].get("n_trainable")}
        for m in METRICS:
            vals = [p["eval"]["metrics"].get(m) for p in pieces]
            vals = [v for v in vals if v is not None]
            if not vals:
                continue
            ref = base_m.get(m) if m != "kl_to_original" else 0.0
            deltas = np.array(vals, dtype=float) - (ref or 0.0)
            row[m] = float(np.mean(vals))
            row[f"d_{m}"] = float(deltas.mean())
            row[f"sd_{m}"] = float(deltas.std(ddof=1)) if len(deltas) > 1 else 0.0
        rows.append(row)
    return rows


def report_markdown(doc: dict) -> str:
    """The run's report: configuration, the conflict map's concentration, the arms table."""
    cfg = doc["config"]
    lines = [f"# CAST run: {cfg['model']}", "",
             f"Data: safety `{cfg['safety_data']}`, utility `{cfg['utility_data']}`, over-refusal "
             f"`{cfg['over_refusal_data']}`. Steps {cfg['steps']}, batch {cfg['batch_size']}, "
             f"scope {cfg['scope']}, seeds {cfg['random_seeds']}. Total time "
             f"{doc['time_s'] / 60:.1f} min.", "", "## Diagnosis", ""]
    conc = doc["diagnosis"]["concentration"]
    lines.append("Concentration of C: " + ", ".join(
        f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in conc.items()))
    lines += ["", "Top heads by C: " + ", ".join(f"L{l}H{h}" for l, h in doc["diagnosis"]["top_heads"]),
              "", "![conflict maps](figures/conflict_maps.png)", "", "## Arms", "",
              "Changes from the original model (mean ± sd over seeds). Refusal on held-out harmful "
              "prompts (higher is safer); over-refusal on safe prompts, reference NLL and KL to the "
              "original on benign prompts (lower is better).", ""]
    orig = doc["original"]["metrics"]
    lines.append("| method | k | seeds | trainable | refusal rate | Δ refusal | Δ refusal score | "
                 "Δ over-refusal | Δ ref. NLL | KL to original |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    lines.append(f"| original | - | - | - | {orig.get('refusal_rate', float('nan')):.3f} | | | | | |")

    def pm(row, m):
        if f"d_{m}" not in row:
            return "n/a"
        return f"{row[f'd_{m}']:+.3f} ± {row[f'sd_{m}']:.3f}"

    for r in doc["summary"]:
        lines.append(
            f"| {r['method']} | {r['k']} | {r['n_seeds']} | {r.get('n_trainable')} | "
            f"{r.get('refusal_rate', float('nan')):.3f} | {pm(r, 'refusal_rate')} | "
            f"{pm(r, 'refusal_score')} | {pm(r, 'over_refusal_rate')} | {pm(r, 'reference_nll')} | "
            f"{r.get('kl_to_original', float('nan')):.4f} |")
    lines += ["", "![trade-off](figures/tradeoff.png)", ""]
    att = doc.get("attribution")
    if att:
        lines += ["## Which heads caused the utility drop", "",
                  f"Post-hoc attribution of the full-tuning arm ({att.get('method')}, "
                  f"{att.get('n_examples')} examples per set, utility answers: "
                  f"{doc['config'].get('attribution_reference', 'dataset')}): each head's parameters "
                  "reverted to their pre-training values, one at a time; utility recovered = "
                  "L_util(tuned) - L_util(head reverted).", ""]
        f = lambda v: "n/a" if not isinstance(v, (int, float)) else f"{v:.4g}"  # noqa: E731
        lines += ["| quantity | value |", "|---|---|",
                  f"| utility drop of full tuning (ΔL_util, nats/token) | {f(att.get('total_drop'))} |",
                  f"| Spearman(recovered, C) / (.., O) / (.., S) | {f(att.get('C_spearman'))} / "
                  f"{f(att.get('O_spearman'))} / {f(att.get('S_spearman'))} |",
                  f"| top-{att.get('k')} overlap with top-{att.get('k')} by C | "
                  f"{f(att.get('C_top_k_overlap'))} |"]
        for name, label in (("top_k_C", f"top-{att.get('k')} by C"),
                            ("top_k_recovered", f"top-{att.get('k')} by recovered"),
                            ("random_k", f"random {att.get('k')} (mean)"),
                            ("all_heads", "all heads")):
            lines.append(f"| share of the drop recovered by reverting {label} | "
                         f"{f(att.get(f'joint_share_{name}'))} |")
        if "agreement_spearman" in att:
            lines.append(f"| first-order vs exact on {att.get('agreement_n_heads')} heads "
                         f"(Spearman, max abs diff) | {f(att['agreement_spearman'])}, "
                         f"{f(att.get('agreement_max_abs_diff'))} |")
        lines += ["", f"Heads whose revert recovers most: {att.get('top_heads_recovered')}.", "",
                  "![attribution](figures/attribution_vs_map.png)", ""]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    from .figures import save_figure

    for ext in ("png", "pdf"):
        save_figure(fig, path.with_suffix(f".{ext}"))


def _diagnosis_figures(cmap, fig_dir: Path, k: int) -> None:
    from . import figures

    _save(figures.plot_conflict_maps(cmap), fig_dir / "conflict_maps")
    _save(figures.plot_o_vs_s(cmap, k), fig_dir / "o_vs_s")
    _save(figures.plot_sorted_c(cmap), fig_dir / "sorted_c")


def run_figures(out_dir, fig_dir=None) -> list[Path]:
    """Every figure of a finished run, regenerated from its saved files alone (no model needed).

    Reads `out_dir/results.json`, `diagnosis/` and `attribution/`; writes PNG and PDF into
    `fig_dir` (default `out_dir/figures`). Returns the written paths."""
    from . import figures
    from .attribution import AttributionResult
    from .conflict_map import ConflictMap

    out = Path(out_dir)
    fig_dir = Path(fig_dir) if fig_dir is not None else out / "figures"
    doc = read_json(out / "results.json")
    cmap = ConflictMap.load(out / "diagnosis")
    n_total = cmap.n_heads_total
    k = max(1, round(doc["config"]["k_fractions"][0] * n_total))
    _diagnosis_figures(cmap, fig_dir, k)
    _save(figures.plot_tradeoff(doc["summary"]), fig_dir / "tradeoff")
    _save(figures.plot_drop_vs_k(doc["summary"]), fig_dir / "drop_vs_k")
    _save(figures.plot_training_curves(doc["arms"]), fig_dir / "training_curves")
    if (out / "attribution" / "attribution_result.json").exists():
        res = AttributionResult.load(out / "attribution")
        _save(figures.plot_attribution_vs_map(res, cmap, k=k), fig_dir / "attribution_vs_map")
    return sorted(fig_dir.glob("*.p*"))
