"""Running the experiment: `run_experiment` prepares (data, model, run directory), then runs
stage 1 (the diagnosis), stages 2-3 of every piece of the grid (tune, evaluate), stage 4 on the
kept weights, and writes results.json, the figures and report.md. Each stage re-uses what an
earlier invocation finished with the same key."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import backend, distributed
from ..io import atomic_write_json, atomic_write_text, read_json, to_jsonable
from .config import ATTR_FIELDS, ATTRIBUTABLE, DIAG_FIELDS, EVAL_FIELDS, TUNE_FIELDS, RunConfig
from .plan import Piece, _generates, estimate_seconds, plan_pieces
from .rundir import (PIECE_FORMAT, RESULTS_FORMAT, RunDir, _changed, _invocations, _load_piece,
                     _log, _release_locks, _state_key, claim_run_dir, run_manifest)


def _splits(spec, split_seed: int) -> dict:
    """{"calibration", "train", "test"} of a data setting: "bundled:KIND" as shipped, three specs as
    given (the test one checked for overlap), any other single spec split by `split_seed`."""
    from ..data import SPLITS, check_held_out, load_dataset, split_dataset

    if isinstance(spec, (list, tuple)):
        parts = dict(zip(SPLITS, (load_dataset(s) for s in spec)))
    elif spec in ("bundled:harmful", "bundled:benign"):
        parts = {s: load_dataset(f"{spec}:{s}") for s in SPLITS}
    else:
        parts = split_dataset(load_dataset(spec), seed=split_seed)
    check_held_out(parts)
    return parts


def _datasets(cfg: RunConfig) -> dict:
    """The splits: calibration (stage 1), train minus validation (stage 2), validation (curves),
    test (stage 3). Validation = the last `n_val` examples of each train split (ours)."""
    from ..data import DataError, load_dataset

    out = {}
    ecfg = cfg.evaluation
    for kind, spec in (("safe", cfg.safety_data), ("util", cfg.utility_data)):
        parts = _splits(spec, cfg.split_seed)
        train = parts["train"]
        if len(train) < cfg.n_val + 2:
            raise DataError(f"The train split of {spec!r} has {len(train)} examples: too few to "
                            f"hold out n_val={cfg.n_val} for validation and train on the rest.")
        out[f"{kind}_cal"] = parts["calibration"]
        out[f"{kind}_train"] = train.take(len(train) - cfg.n_val)
        out[f"{kind}_val"] = type(train)(f"{train.name}:val", train.examples[-cfg.n_val:],
                                         train.source)
        n_test = ecfg.n_harmful if kind == "safe" else ecfg.n_benign
        out[f"{kind}_test"] = parts["test"].take(n_test)
    out["harmful_test"], out["benign_test"] = out.pop("safe_test"), out.pop("util_test")
    out["over_refusal"] = load_dataset(ecfg.over_refusal).take(ecfg.n_over_refusal)
    return out


@dataclass
class _Context:
    """What every piece needs: the model, its frozen original, data, map and settings."""

    cfg: RunConfig
    model: Any
    original: Any
    original_state: dict
    data: dict
    cmap: Any
    monitor: Any
    curve_start: dict
    out: Path
    run_dir: RunDir
    original_logprobs: Any = None  # the original's log-probs on the benign test set, built once


def _prepare(cfg: RunConfig, overwrite: bool):
    """Everything that can fail on bad input, before any work or write: data, model, lengths, the
    run directory; then config.json and run.json are written (by rank 0 alone, the others wait).
    Returns (model, data)."""
    from ..io import check_out_dir
    from ..model import load_model

    # Under torchrun: join the group; this rank's device (cuda:LOCAL_RANK on GPUs).
    device = distributed.setup(cfg.device)
    if cfg.n_devices > 1 and distributed.world().local_world_size > 1:
        # TransformerLens puts a split model's blocks on the GPUs with the most free memory,
        # which ranks of one node would then share.
        raise distributed.DistributedError(
            f"n_devices={cfg.n_devices} splits each rank's model over several GPUs: launch one "
            "rank per node (torchrun --nproc-per-node 1, or srun --ntasks-per-node 1).")
    # A file, read-only path or a folder of the user's: before loading anything (rank 0 alone
    # probes it: no race).
    from ..io import check_run_dir

    distributed.main_only(lambda: (check_out_dir(cfg.out_dir), check_run_dir(cfg.out_dir, "run")))
    data = _datasets(cfg)
    torch.manual_seed(cfg.seed)  # before loading, as runs always did (a model's init draws)
    model = load_model(cfg.model, device=device, n_devices=cfg.n_devices)
    _check_lengths(cfg, model, data)
    _check_budgets(cfg, model)
    manifest = run_manifest(cfg, model, data)
    out = Path(cfg.out_dir)

    def claim() -> None:
        claim_run_dir(out, manifest, overwrite=overwrite)
        atomic_write_json(cfg.to_dict(), RunDir(out).config)
        atomic_write_json(manifest, RunDir(out).manifest)

    distributed.main_only(claim)
    return model, data


def _check_lengths(cfg: RunConfig, model, data: dict) -> None:
    """Every example fits the model's context as the stages will use it (a DataError naming the
    first that does not, before the diagnosis rather than after it)."""
    from ..data import check_fits, check_special_tokens

    answers = {"safe_cal": True, "safe_train": True, "safe_val": True,
               "util_cal": cfg.utility_reference == "dataset",
               "util_train": cfg.benign_reference == "dataset", "util_val": False,
               "benign_test": True, "harmful_test": False, "over_refusal": False}
    for name, with_response in answers.items():
        check_special_tokens(model.tokenizer, data[name], allow=cfg.allow_special_tokens)
        check_fits(model, data[name], with_response=with_response,
                   new_tokens=0 if with_response else 1)  # room for at least one answer token
    if cfg.generation_seeds != 0:  # some evaluation generates refusals
        for name in ("harmful_test", "over_refusal"):
            check_fits(model, data[name], with_response=False, new_tokens=cfg.eval_max_new_tokens)


def _check_budgets(cfg: RunConfig, model) -> None:
    """Settings that depend on the model's size, before any work: stage 4 chooses its top-k among
    `attribution_candidates` exact reverts, so they must be at least k (of this model's units)."""
    from ..registry.arms import get_arm
    from ..sparse_tuning import k_from_fraction
    from ..units import n_units

    n_total, per_layer = _n_units_total(model, cfg.unit), n_units(model, cfg.unit)
    for name in ("k_fractions", "k_sweep"):
        for f in getattr(cfg, name):
            k = k_from_fraction(float(f), n_total)
            # An arm may skip more than k (the layer band rounds up to whole layers).
            widest = max(((get_arm(b).max_units(k, per_layer), b) for b in cfg.baselines),
                         default=(k, None))
            band = max(k, widest[0])
            if band >= n_total:
                what = ("k" if k >= n_total else "the layer band (k rounded up to whole layers)"
                        if widest[1] == "layer_band" else f"the {widest[1]} arm's budget")
                raise ValueError(
                    f"{name} {f} gives {what} = {band} of the {n_total} {cfg.unit}s of "
                    f"{cfg.model}: skipping every unit leaves nothing to train. Use a smaller "
                    "fraction.")
    k = _k0(cfg, model)
    if cfg.attribute and cfg.attribution_candidates is not None and cfg.attribution_candidates < k:
        raise ValueError(
            f"attribution_candidates = {cfg.attribution_candidates} < k = {k} ({cfg.k_fractions[0]}"
            f" of {_n_units_total(model, cfg.unit)} {cfg.unit}s of {cfg.model}): stage 4 chooses "
            "the top-k among the candidates. Set attribution_candidates >= k (None: 2k), or "
            "attribute=False (--no-attribute).")


def run_experiment(cfg: RunConfig, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or resume) the whole experiment; returns the content of `results.json`.

    A directory holding a run with other settings (beyond more seeds, draws, budgets, baselines
    or stage-4 options), data or model is refused (`RunMismatchError`) unless `overwrite`, which
    deletes that run's files first.

    Under `torchrun` (or srun) every rank calls this with the same `cfg`: the pieces, the exact S
    sweep and attribution's exact reverts are shared out over the ranks (`distributed.py`), rank 0
    writes the shared files and returns the same document on every rank."""
    from ..io import RunDirectory

    out = Path(cfg.out_dir)
    try:
        with RunDirectory(out, "run"):  # records what it writes, checks what it re-uses
            return _run(cfg, out, progress, overwrite)
    finally:
        _release_locks()


def _run(cfg: RunConfig, out: Path, progress: bool, overwrite: bool) -> dict:
    t_start = time.time()
    model, data = _prepare(cfg, overwrite)
    progress = progress and distributed.is_main()  # one set of progress bars; every rank logs
    timings: dict[str, float] = {}
    t = time.time()
    _self_references(cfg, model, data, out)
    timings["self_reference_s"] = time.time() - t
    t = time.time()
    cmap = _diagnosis(cfg, model, data, out, progress)
    timings["diagnosis_s"] = time.time() - t
    ctx = _context(cfg, model, data, cmap, out)

    pieces = plan_pieces(cfg, _n_units_total(model, cfg.unit))
    _run_grid(ctx, pieces, progress)
    model.load_state_dict(ctx.original_state)

    attribution = None
    if cfg.attribute:
        attribution = _attribution(ctx, progress)
    w = distributed.world()
    return distributed.main_only(lambda: _write_results(
        ctx, pieces, attribution, timings, t_start,
        {"world_size": w.world_size, "backend": w.backend}))


def _run_grid(ctx: _Context, pieces: list[Piece], progress: bool) -> None:
    """Stages 2-3 of every piece not finished on disk (and the original's evaluation), shared
    out over the ranks: rank 0 lists what is missing, in plan order; rank r runs items r, r + W,
    ... of that list (`distributed.map_shared`); a piece is seeded by its own training seed and
    draw, so which rank runs it changes nothing. Returns when every item is on disk."""
    def missing() -> list:
        todo = [] if _finished_original(ctx) else [None]  # None: the original model
        todo += [(i, p) for i, p in enumerate(pieces) if _finished_piece(ctx, p) is None]
        return todo

    todo = distributed.main_only(missing)
    w = distributed.world()
    _log(f"grid: {len(todo)} of {len(pieces) + 1} pieces to run (the rest done before)"
         + (f", shared over {w.world_size} ranks" if w.world_size > 1 else ""))

    def run(item) -> None:
        if item is None:
            _original_eval(ctx)
        else:
            i, piece = item
            _run_piece(ctx, piece, f"{i + 1}/{len(pieces)}", progress)

    distributed.map_shared(run, todo)


def _write_results(ctx: _Context, pieces: list[Piece], attribution: Optional[dict],
                   timings: dict, t_start: float, world: dict) -> dict:
    """results.json, the figures and report.md from the finished pieces on disk (rank 0)."""
    from .. import report
    from ..model import model_id

    cfg, model, data, cmap, rd = ctx.cfg, ctx.model, ctx.data, ctx.cmap, ctx.run_dir
    base = _original_eval(ctx)
    results: dict[str, dict] = {}
    for piece in pieces:
        done = _finished_piece(ctx, piece)
        if done is None:
            raise RuntimeError(f"piece {piece.name} is not on disk after the grid ran: was "
                               f"{rd.arms} changed by another job? Run again to redo it.")
        results[piece.name] = done
    doc = {
        "format": RESULTS_FORMAT,
        "config": cfg.to_dict(),
        "model": model_id(model),
        "data": {k: v.describe() for k, v in data.items()},
        "data_split": read_json(rd.manifest)["split"],
        "diagnosis": {"concentration": cmap.concentration(unit=cfg.unit),
                      "top_units": cmap.top_units(_k0(cfg, model), unit=cfg.unit),
                      "top_heads": cmap.top_heads(_k0(cfg, model)) if cfg.unit == "head" else None,
                      "summary": cmap.summary.get(cfg.unit), "config": cmap.config},
        "original": base["eval"],
        "original_per_prompt": base["per_prompt"],
        "arms": results,
        "attribution": attribution,
        "timings": timings,
        "distributed": world,
        "time_s": time.time() - t_start,
    }
    if cfg.model == "smollm2-135m-instruct":  # the per-unit costs are SmolLM2's
        doc["estimate_s"] = estimate_seconds(cfg)
    doc["summary"] = report.summarize(base, results)
    doc["comparisons"] = report.compare_arms(doc)
    doc["time_s"] = time.time() - t_start
    doc["invocations"] = _invocations(rd.root, doc, cfg)
    atomic_write_json(doc, rd.results)
    report.run_figures(rd.root)
    atomic_write_text(report.report_markdown(doc), rd.report)
    _log(f"done in {doc['time_s']:.0f} s: {rd.report}")
    return to_jsonable(doc)


def _n_units_total(model, unit: str) -> int:
    from ..units import n_units

    return model.cfg.n_layers * n_units(model, unit)


def _k0(cfg: RunConfig, model) -> int:
    from ..sparse_tuning import k_from_fraction

    return k_from_fraction(float(cfg.k_fractions[0]), _n_units_total(model, cfg.unit))


def _self_references(cfg: RunConfig, model, data: dict, out: Path) -> None:
    """The original model's own answers: for the benign validation set (always) and for the benign
    training mix (`benign_reference="self"`, ours: the mix keeps what the model already does rather
    than teaching the style of the dataset's answers). Cached in `out_dir`."""
    from ..data import self_reference

    if cfg.benign_reference not in ("self", "dataset"):
        raise ValueError(f"benign_reference must be 'self' or 'dataset', got {cfg.benign_reference!r}.")
    n = cfg.self_reference_tokens
    _log(f"self-reference answers for {len(data['util_val'])} benign validation prompts")
    # Rank 0 writes the cached answers; every rank gets its answers (one list for all ranks).
    data["util_val"] = distributed.main_only(lambda: self_reference(
        model, data["util_val"], max_new_tokens=n, cache_path=RunDir(out).self_reference("val")))
    if cfg.benign_mix > 0 and cfg.benign_reference == "self":
        n_mix = min(len(data["util_train"]), math.ceil(cfg.steps * cfg.batch_size * cfg.benign_mix))
        _log(f"benign mix: the model's own answers to {n_mix} training prompts")
        data["util_train"] = distributed.main_only(lambda: self_reference(
            model, data["util_train"].take(n_mix), max_new_tokens=n,
            cache_path=RunDir(out).self_reference("train")))


def _diag_key(cfg: RunConfig) -> str:
    """The key of a run's map (the settings it depends on; bf16 also marked apart, as before the
    diagnosis settings were hashed as one config)."""
    return cfg.key(*DIAG_FIELDS, extra=None if cfg.diag_dtype == "float32" else cfg.diag_dtype)


def _diagnosis(cfg: RunConfig, model, data: dict, out: Path, progress: bool):
    """Stage 1, re-used from disk when its settings are unchanged."""
    from ..conflict_map import ConflictMap
    from ..diagnose import diagnose

    from ..conflict_map import META_FILE, TENSORS_FILE

    diag_dir, diag_key = RunDir(out).diagnosis, _diag_key(cfg)

    def on_disk() -> bool:
        if not (diag_dir / META_FILE).exists():
            return False
        if any(_changed(diag_dir / n) for n in (META_FILE, TENSORS_FILE)):
            return False
        try:
            return ConflictMap.load(diag_dir).config.get("run_key") == diag_key
        except Exception:  # unreadable or of another version: recompute
            return False

    if distributed.main_only(on_disk):
        _log("stage 1: diagnosis re-used from disk")
        return ConflictMap.load(diag_dir)
    _log("stage 1: diagnosis")
    # Every rank takes part (the exact S sweep is shared out); rank 0 saves its map, and the
    # other ranks select units from that saved map, so all ranks select alike.
    cmap = diagnose(model, data["safe_cal"], data["util_cal"], cfg.diagnosis_config(),
                    progress=progress)
    cmap.config["run_key"] = diag_key
    distributed.main_only(lambda: cmap.save(diag_dir))
    return cmap if distributed.is_main() else ConflictMap.load(diag_dir)


def _context(cfg: RunConfig, model, data: dict, cmap, out: Path) -> _Context:
    from ..sparse_tuning import ValidationMonitor

    original = backend.copy_model(model)
    original.requires_grad_(False)
    monitor = ValidationMonitor(original, data["safe_val"], data["util_val"], batch_size=8)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Step 0 of every curve is the original model: measured once, not once per piece.
    return _Context(cfg, model, original, state, data, cmap, monitor, monitor(original), out,
                    RunDir(out))


def _evaluate(ctx: _Context, *, generation: bool) -> tuple[dict, dict]:
    """Stage 3 of the current weights on the test sets: (EvalResult dict, per-prompt values
    {metric: [n]}), the per-prompt values from `EvalResult.per_prompt` (NaN where undefined)."""
    from ..evaluate import OriginalLogprobs, as_dataset, evaluate

    data, ecfg = ctx.data, ctx.cfg.evaluation_config(generation)
    if ctx.original_logprobs is None:  # every piece's KL reuses the frozen original's log-probs
        benign = as_dataset(data["benign_test"], "benign").take(ecfg.n_benign)
        ctx.original_logprobs = OriginalLogprobs(ctx.original, benign, tokens=ecfg.tokens,
                                                 batch_size=ecfg.batch_size,
                                                 group_by_length=ecfg.group_by_length)
    res = evaluate(ctx.model, original=ctx.original_logprobs, config=ecfg,
                   harmful=data["harmful_test"], benign=ctx.original_logprobs.data,
                   over_refusal=data["over_refusal"])
    per_prompt = {k: [math.nan if x is None else float(x) for x in v]
                  for k, v in res.per_prompt.items()}
    missing = [m for m in ("refusal_score", "kl_to_original") if m not in per_prompt]
    if missing:
        raise RuntimeError(f"evaluate() returned no per-prompt {missing}: the report's primary "
                           "endpoints need them (an original model must be given for KL).")
    return res.to_dict(), per_prompt


def _original_path_key(ctx: _Context) -> tuple[Path, str]:
    gen = _generates(ctx.cfg, None)
    return ctx.run_dir.original, ctx.cfg.key(*EVAL_FIELDS, extra=gen)


def _finished_original(ctx: _Context) -> Optional[dict]:
    return _load_piece(*_original_path_key(ctx))


def _original_eval(ctx: _Context) -> dict:
    gen = _generates(ctx.cfg, None)
    path, key = _original_path_key(ctx)
    base = _load_piece(path, key)
    if base is None:
        _log("stage 3: evaluating the original model")
        ctx.model.load_state_dict(ctx.original_state)  # the rank may have tuned a piece before
        ev, per_prompt = _evaluate(ctx, generation=gen)
        base = {"format": PIECE_FORMAT, "key": key, "eval": ev, "per_prompt": per_prompt}
        atomic_write_json(base, path)
    return base


def _finished_piece(ctx: _Context, piece: Piece) -> Optional[dict]:
    """A piece's result on disk if it can be re-used (same key, same skipped units, its kept
    weights present and of the same key), else None."""
    path, key = ctx.run_dir.piece(piece.name), _piece_key(ctx, piece)
    done = _load_piece(path, key)
    if done is not None and [tuple(u) for u in done["skip"]] == _skipped(ctx, piece) and (
            not _keeps_state(ctx, piece) or _state_key(_state_path(ctx, piece)) == key):
        return done
    return None


def _skipped(ctx: _Context, piece: Piece) -> list:
    from ..sparse_tuning import select_arm_units

    seed = piece.draw if piece.draw is not None else 0
    return select_arm_units(piece.method, ctx.cmap, piece.k, unit=ctx.cfg.unit, seed=seed,
                            model=ctx.original)  # ctx.model may hold the last piece's weights


def _piece_key(ctx: _Context, piece: Piece) -> str:
    return ctx.cfg.key(*TUNE_FIELDS, *EVAL_FIELDS, extra={
        **asdict(piece), "generation": _generates(ctx.cfg, piece.train_seed)})


def _keeps_state(ctx: _Context, piece: Piece) -> bool:
    """Whether a piece's tuned weights are kept: exactly the pieces stage 4 attributes
    (`_attributed_piece`; attention weights only, ~0.1 GB each)."""
    return piece.method in ATTRIBUTABLE and piece == _attributed_piece(ctx, piece.method)


def _state_path(ctx: _Context, piece: Piece) -> Path:
    return ctx.run_dir.tuned_state(piece)


def _run_piece(ctx: _Context, piece: Piece, where: str, progress: bool) -> dict:
    """Train and evaluate one piece, or re-use it from disk (same key and same skipped units)."""
    from ..sparse_tuning import safety_finetune

    cfg, path = ctx.cfg, ctx.run_dir.piece(piece.name)
    key, skip = _piece_key(ctx, piece), _skipped(ctx, piece)
    keeps_state = _keeps_state(ctx, piece)
    done = _finished_piece(ctx, piece)
    if done is not None:
        _log(f"piece {where} {piece.name}: done before, re-used")
        return done
    if path.exists():
        _log(f"piece {where} {piece.name}: on disk from other settings: redone")
    _log(f"piece {where} {piece.name}: tuning")
    ctx.model.load_state_dict(ctx.original_state)
    tcfg = cfg.tuning_config(piece.train_seed)
    skip_kw = {"skip_groups": skip} if cfg.unit == "group" else {"skip_heads": skip}
    tres = safety_finetune(ctx.model, ctx.data["safe_train"], config=tcfg,
                           benign_data=ctx.data["util_train"] if cfg.benign_mix > 0 else None,
                           monitor=ctx.monitor, eval_every=cfg.eval_every,
                           curve_start=ctx.curve_start, progress=progress, **skip_kw)
    t = time.perf_counter()
    ev, per_prompt = _evaluate(ctx, generation=_generates(cfg, piece.train_seed))
    eval_s = time.perf_counter() - t
    check_not_degenerate(tres, per_prompt, ctx.model.cfg.d_vocab, piece.name)
    result = {"format": PIECE_FORMAT, "key": key, "piece": asdict(piece),
              "arm": {"method": piece.method, "k": piece.k, "seed": piece.train_seed},
              "unit": cfg.unit, "skip": skip, "tuning": tres.to_dict(), "eval": ev,
              "per_prompt": per_prompt, "eval_time_s": eval_s}
    if keeps_state:
        from ..io import atomic_save_safetensors

        state = {k: v.detach().cpu() for k, v in ctx.model.state_dict().items()
                 if ".attn." in k or cfg.scope == "all"}
        atomic_save_safetensors(state, _state_path(ctx, piece), {"key": key})
    atomic_write_json(result, path)  # written last: its presence means the piece is finished
    return read_json(path)  # as JSON (tuples -> lists), the same whether fresh or re-used


class DegenerateTrainingError(ValueError):
    """Training collapsed the model to a uniform next-token distribution: its comparisons would be
    "+0 [+0, +0]" between arms that all say nothing."""


def check_not_degenerate(tuning, per_prompt: dict, d_vocab: int, name: str = "the model",
                         *, tol: float = 1e-3) -> None:
    """`DegenerateTrainingError` when a tuned model's output is uniform: every benign test
    answer's NLL is ln(d_vocab) (a uniform distribution's), or training ended on a zero gradient
    at a loss of ln(d_vocab). `tuning`: its `TuningResult`; `per_prompt`: its evaluation's."""
    uniform = math.log(d_vocab)
    nll = [x for x in per_prompt.get("reference_nll", []) if x is not None and math.isfinite(x)]
    flat_eval = bool(nll) and all(abs(x - uniform) < tol for x in nll)
    losses, norms = list(tuning.losses), list(tuning.grad_norms)
    flat_train = bool(losses and norms) and norms[-1] == 0.0 and abs(losses[-1] - uniform) < tol
    if flat_eval or flat_train:
        where = (f"its benign answers' NLL is {uniform:.4f} = ln({d_vocab}) on every prompt"
                 if flat_eval else f"its last step had loss {losses[-1]:.4f} = ln({d_vocab}) and "
                 "gradient norm 0")
        raise DegenerateTrainingError(
            f"Training {name} collapsed the model to uniform output ({where}; lr "
            f"{tuning.config.get('lr') if isinstance(getattr(tuning, 'config', None), dict) else '?'}"
            "): its comparisons would mean nothing. Lower the learning rate.")


def _attributed_piece(ctx: _Context, arm: str) -> Piece:
    """The piece stage 4 attributes for `arm`: its first training seed (random: draw 0) at the
    first budget."""
    cfg = ctx.cfg
    k = 0 if arm == "full" else _k0(cfg, ctx.model)
    return Piece(arm, k, cfg.train_seeds[0], 0 if arm == "random" else None)


def _attribution(ctx: _Context, progress: bool) -> dict:
    """Stage 4 (`attribution.attribute`, METHOD.md v2) on the first-seed piece of each of
    `cfg.attribution_arms`: units as in the map, the diagnosis' utility objective (the original
    model's own answers, content tokens), first order for all units, exact reverts of the
    candidates and a spread sample, units chosen on half A and measured on half B, random revert
    sets. Returns {arm: summary}; each arm's files go to `attribution/<arm>/`."""
    return {arm: _attribute_arm(ctx, arm, progress) for arm in ctx.cfg.attribution_arms}


def _attribution_key(cfg: RunConfig, piece: Piece) -> str:
    """Stage 4 of `piece` depends on its training and evaluation, the map and its own settings."""
    return cfg.key(*TUNE_FIELDS, *EVAL_FIELDS, *ATTR_FIELDS, *DIAG_FIELDS, extra=asdict(piece))


def _attribute_arm(ctx: _Context, arm: str, progress: bool) -> dict:
    from safetensors.torch import load_file

    from ..attribution import attribute

    cfg, rd, original = ctx.cfg, ctx.run_dir, ctx.original
    piece = _attributed_piece(ctx, arm)
    state_path = _state_path(ctx, piece)
    if _state_key(state_path) != _piece_key(ctx, piece):
        raise RuntimeError(f"{state_path} is missing or from other settings; rerun "
                           "`cast-interp run` on this directory to retrain that piece.")
    key = _attribution_key(cfg, piece)
    arm_dir, summary_path = rd.attribution_arm(arm), rd.attribution_summary(arm)
    done = distributed.main_only(lambda: _load_piece(summary_path, key))
    if done is not None:
        return done
    tuned = backend.copy_model(original)
    tuned.load_state_dict(load_file(str(state_path)), strict=False)
    _log(f"stage 4: post-hoc attribution of {piece.name} ({cfg.attribution_examples} examples, "
         "halves A/B)")
    res = attribute(tuned, original, utility_data=ctx.data["benign_test"], conflict_map=ctx.cmap,
                    safety_data=ctx.data["harmful_test"], unit=cfg.unit, k=_k0(cfg, ctx.model),
                    config=cfg.attribution, reference_cache=rd.attribution_reference, label=arm,
                    progress=progress)  # every rank: the exact reverts are shared out

    def save() -> dict:
        res.save(arm_dir)
        summary = {"key": key, "piece": piece.name, **res.summary()}
        atomic_write_json(summary, summary_path)
        return read_json(summary_path)

    return distributed.main_only(save)


def run_figures(out_dir, fig_dir=None) -> list[Path]:
    """Every figure of a finished run from its saved files alone (`report.run_figures`)."""
    from ..report import run_figures as _run

    return _run(out_dir, fig_dir)


def summarize(base: dict, results: dict[str, dict]) -> list[dict]:
    """One row per arm: metric means and changes from the original (`report.summarize`)."""
    from ..report import summarize as _summarize

    return _summarize(base, results)


def report_markdown(doc: dict) -> str:
    """The run's report (`report.report_markdown`)."""
    from ..report import report_markdown as _md

    return _md(doc)
