"""`safety_finetune`: the training loop that never changes the skipped units (gradients masked,
frozen entries restored after every optimizer step), in float32 or bf16, with the curve."""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn import Parameter

from .. import backend
from .. import units as U
from ..backend import Model
from ..data import ChatBatch, ChatDataset, example_lengths
from ..model import model_id
from ..objectives import NonFiniteLossError, response_nll
from .batches import _BatchSource, _rows, batch_fingerprint, length_groups
from .config import TuningConfig, TuningResult
from .masks import parameter_budget, trainable_parameters


def lr_factor(step: int, cfg: TuningConfig) -> float:
    """Multiplier of cfg.lr at `step` (0-based): linear warmup, then constant/linear/cosine to 0."""
    warm = min(cfg.warmup_steps, cfg.steps - 1)
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - warm, 1)
    frac = (step - warm) / span  # never reaches 1: the last step still moves the weights
    if cfg.schedule == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(params: list[Parameter], cfg: TuningConfig) -> torch.optim.Optimizer:
    # foreach=False: the per-parameter loop is bit-reproducible and as fast on CPU at this size.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def _nonfinite(msg: str, step: int, losses: list[float], kept: int) -> NonFiniteLossError:
    """The error, carrying `.step` (the bad step), `.losses` (of the completed steps) and
    `.n_updates_kept` (optimizer updates in the restored weights)."""
    err = NonFiniteLossError(msg)
    err.step = step  # type: ignore[attr-defined]
    err.losses = list(losses)  # type: ignore[attr-defined]
    err.n_updates_kept = kept  # type: ignore[attr-defined]
    return err


def _restore(params: list[Parameter], saved: Optional[list[Tensor]]) -> None:
    if saved is None:
        return
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def _global_norm(params: list[Parameter]) -> tuple[Tensor, list[Tensor]]:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(()), grads
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    return torch.linalg.vector_norm(norms), grads


def working_copy(model: Model, params: Sequence[Parameter], precision: str
                 ) -> tuple[Model, list[tuple[Parameter, Parameter]]]:
    """The model a training step runs on at `precision`, and (master, working copy) pairs of the
    trainable `params`: the model itself and [] in "float32" and "bf16-autocast"; in "bf16" a
    bfloat16 copy, none of whose parameters requires a gradient (the caller decides), paired with
    the float32 masters it is refreshed from before each step. Shared by `safety_finetune` and the
    peer methods' loops (`peers.loop.Compute`), so that both run the same step."""
    if precision != "float32" and any(p.dtype != torch.float32 for p in params):
        raise ValueError(f"precision={precision!r} keeps float32 master weights, but the model's "
                         f"trainable weights are {sorted({str(p.dtype) for p in params})}: load "
                         "it in float32.")
    if precision != "bf16":
        return model, []
    name_of = {id(p): n for n, p in model.named_parameters()}
    work = backend.copy_in_dtype(model, torch.bfloat16)
    working = dict(work.named_parameters())
    for w in working.values():
        w.requires_grad_(False)
        w.grad = None
    return work, [(p, working[name_of[id(p)]]) for p in params]


class _StepCompute:
    """A training step's forward and backward at `cfg.precision`, leaving float32 gradients in
    `.grad` of the (float32) trainable `params`; the step's loss value is the token mean over the
    whole batch, micro-batched by length when `cfg.group_by_length`.

    "bf16" keeps a bfloat16 working copy of the model: before each step the trainable weights are
    copied into it (rounded to bf16), the forward and backward run there, and its bf16 gradients
    are cast to float32 into the master parameters' `.grad`. Everything the optimizer sees (weights,
    gradients, moments, the clipping norm, the frozen restore) is float32. Out-of-scope weights are
    copied once: they never change.
    """

    def __init__(self, model: Model, params: list[Parameter], cfg: TuningConfig):
        self.model, self.precision, self.grouped = model, cfg.precision, cfg.group_by_length
        self.n_tokens = {"computed": 0, "real": 0}
        self.work, self.pairs = working_copy(model, params, cfg.precision)
        for _, w in self.pairs:
            w.requires_grad_(True)

    def describe(self) -> dict:
        """What ran where (recorded in `TuningResult.config["compute"]`), with the share of the
        computed tokens that were padding."""
        weights = {"float32": "float32", "bf16": "bfloat16 copy of the float32 weights",
                   "bf16-autocast": "float32 under torch.autocast(bfloat16)"}[self.precision]
        c = self.n_tokens["computed"]
        return {"forward_backward": weights, "master_weights": "float32",
                "optimizer_state": "float32", "loss": "float32 log-softmax",
                "micro_batches": "by length" if self.grouped else "one per step",
                "padded_token_share": (c - self.n_tokens["real"]) / c if c else 0.0}

    def forward_backward(self, batch: ChatBatch) -> float:
        """Run the step: gradients into `.grad` of the master params; returns the loss value
        (NaN/inf without backward when any part of it is not finite)."""
        if self.pairs:
            with torch.no_grad():
                for p, w in self.pairs:
                    w.copy_(p)  # rounds the float32 master to bf16
                    w.grad = None
        lengths = example_lengths(batch)
        if self.grouped:
            parts = [_rows(batch, g, int(lengths[g[0]])) for g in length_groups(lengths.tolist())]
        else:
            parts = [batch]
        self.n_tokens["real"] += int(lengths.sum())
        self.n_tokens["computed"] += sum(b.tokens.numel() for b in parts)
        if len(parts) == 1:  # exactly the float32 path of before: one mean loss, one backward
            loss = self._loss(parts[0], "mean")
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()
        else:
            n = batch.n_response_tokens
            if n == 0:
                raise ValueError("Batch has no response tokens: the loss is undefined.")
            value = 0.0
            for b in parts:  # sum over micro-batches of (summed NLL / all tokens) = the mean
                loss = self._loss(b, "sum") / n
                part = float(loss.detach())
                value += part
                if not math.isfinite(part):
                    break
                loss.backward()
        if self.pairs and math.isfinite(value):
            for p, w in self.pairs:
                p.grad = None if w.grad is None else w.grad.float()
                w.grad = None
        return value

    def _loss(self, batch: ChatBatch, reduction: str) -> Tensor:
        if self.precision == "bf16-autocast":
            device = torch.device(self.model.cfg.device).type
            with torch.autocast(device, dtype=torch.bfloat16):
                return response_nll(self.model, batch, reduction=reduction)
        return response_nll(self.work, batch, reduction=reduction)


def _check_units_source(model: Model, **units) -> None:
    """`UnitError` when units selected from a conflict map (`ConflictMap.top_units` remembers its
    model) are given to another model, even one of the same shape."""
    from ..conflict_map import model_difference

    for name, sel in units.items():
        diff = model_difference(getattr(sel, "model", None) or {}, model)
        if diff:
            desc = ", ".join(f"{k}: map {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise U.UnitError(f"{name} come from a conflict map of another model ({desc}): the "
                              "ranking does not apply to this one. Re-run diagnose on this model.")


def safety_finetune(
    model: Model,
    safety_data: Union[ChatDataset, Sequence[ChatBatch]],
    *,
    skip_heads: Sequence[Sequence[int]] = (),
    skip_groups: Sequence[Sequence[int]] = (),
    config: Optional[TuningConfig] = None,
    benign_data: Union[ChatDataset, Sequence[ChatBatch], None] = None,
    monitor: Optional[Callable[[Model], dict]] = None,
    eval_every: int = 0,
    curve_start: Optional[dict] = None,
    progress: bool = False,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> TuningResult:
    """Safety fine-tuning of `model` IN PLACE, with the skipped units' parameters frozen bit-exactly.

    Each step draws `batch_size` examples (a fraction `benign_mix` of them from `benign_data`) from
    seeded per-epoch permutations, minimises their token-mean response NLL, and restores the frozen
    slices. A `list[ChatBatch]` is split back into examples and re-batched at `config.batch_size`
    (so a dataset and its batches train identically). The benign share per batch is
    `round(benign_mix * batch_size)` examples (recorded as `n_benign_per_batch`).

    Args:
        skip_heads: query heads whose own parameters never change (CAST: the top-k of C; [] = full).
        skip_groups: key/value groups (GQA) whose K/V never change.
        monitor: called as `monitor(model) -> {name: float}` before training, after every
            `eval_every` steps (0: only before and after) and after the last step, into `curve`.
        curve_start: the monitor's values of the untrained model when already known (the same
            for every arm of an experiment): recorded as step 0 instead of calling the monitor.
        on_step: called as `on_step(step, loss)` after each optimizer step.

    Raises:
        NonFiniteLossError: a loss, gradient or updated weight is NaN/inf. Training stops; the
            message names the step (`err.step`), and the weights are restored to the last state
            whose loss and gradient were finite, from before the update that produced the bad
            state (`err.n_updates_kept` updates; `err.losses` of the completed steps).
        UnitError: a skipped unit the model lacks (or groups without GQA).
    """
    cfg = config or TuningConfig()
    if not isinstance(cfg, TuningConfig):
        raise TypeError(f"config must be a TuningConfig, got {type(cfg).__name__}.")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every must be an integer >= 0 (0: monitor only before and after "
                         f"training), got {eval_every!r}.")
    heads = U.validate_units(model, skip_heads, "head")
    groups = U.validate_units(model, skip_groups, "group") if list(skip_groups) else []
    _check_units_source(model, skip_heads=skip_heads, skip_groups=skip_groups)
    t0 = time.perf_counter()
    source = _BatchSource(model, safety_data, benign_data, cfg)
    params, masks = trainable_parameters(model, heads, skip_groups=groups, scope=cfg.scope,
                                         kv_policy=cfg.kv_policy)
    budget = parameter_budget(model, heads, groups, scope=cfg.scope, kv_policy=cfg.kv_policy)
    name_of = {id(p): n for n, p in model.named_parameters()}
    masked = [(p, masks[name_of[id(p)]]) for p in params if name_of[id(p)] in masks]
    snapshots = [p.detach().clone() for p, _ in masked]  # frozen values, restored after each step
    compute = _StepCompute(model, params, cfg)  # before any work: a bf16 model fails here

    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(params, cfg)
    trainable = {id(p) for p in params}
    old_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)  # out-of-scope params need no gradient at all

    log: dict[str, list] = {"losses": [], "grad_norms": [], "lrs": [], "fingerprints": [],
                            "curve": []}
    t_monitor = [0.0]

    def record(step: int) -> None:
        if step == 0 and curve_start is not None and monitor is not None:
            log["curve"].append({"step": 0, **curve_start})
        elif monitor is not None:
            t = time.perf_counter()
            log["curve"].append({"step": step, **monitor(model)})
            t_monitor[0] += time.perf_counter() - t

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"safety SFT (skip {len(heads)}h {len(groups)}g)",
                   leave=False)
    try:
        record(0)
        _train_loop(compute, cfg, source, optimizer, params, masked, snapshots, log, bar, on_step,
                    record, eval_every)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(old_requires_grad[n])
            p.grad = None
        if bar is not None:
            bar.close()

    meta = {
        **cfg.to_dict(),
        "model": model_id(model),
        "safety_data": source.safe_desc,
        "benign_data": source.benign_desc,
        "n_benign_per_batch": source.n_benign,
        "eval_every": eval_every,
        "compute": compute.describe(),
        "time_s": time.perf_counter() - t0,
        "monitor_time_s": t_monitor[0],
    }
    return TuningResult(log["losses"], heads, budget["n_trainable"], budget["n_frozen"], meta,
                        log["grad_norms"], log["lrs"], groups, budget["n_absent"],
                        log["fingerprints"], log["curve"])


def _train_loop(compute, cfg, source, optimizer, params, masked, snapshots, log, bar, on_step,
                record, eval_every) -> None:
    """The optimizer steps of `safety_finetune` (see there for the NaN policy); `compute` (a
    `_StepCompute`) runs each step's forward and backward into the float32 `params`' `.grad`."""
    # Weights whose loss and gradient were finite, copied before their update (one copy of the
    # trainable parameters per step: small next to a forward and backward).
    last_good: Optional[list[Tensor]] = None
    losses = log["losses"]
    for step in range(cfg.steps):
        batch = source.next()
        lr = cfg.lr * lr_factor(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_value = compute.forward_backward(batch)
        norm, grads = torch.zeros(()), []
        if math.isfinite(loss_value):
            for p, m in masked:
                if p.grad is not None:
                    p.grad.masked_fill_(m, 0.0)  # frozen: no gradient, no moments, no norm
            norm, grads = _global_norm(params)
        if not (math.isfinite(loss_value) and bool(torch.isfinite(norm))):
            # The current weights are bad: go back to the last state that gave a finite loss
            # and gradient, i.e. from before the previous step's update.
            _restore(params, last_good)
            what = (f"safety loss is {loss_value}" if not math.isfinite(loss_value) else
                    f"gradient norm is {float(norm)} (loss {loss_value:.4g})")
            raise _nonfinite(
                f"The {what} at step {step}"
                + (f"; weights restored to before step {step - 1}'s update (the last state "
                   "with a finite loss and gradient)" if last_good is not None else
                   "; the initial weights already give it (check for NaN/inf weights)")
                + ". Lower the learning rate or check the data.", step, losses, max(step - 1, 0))
        last_good = [p.detach().clone() for p in params]
        if cfg.max_grad_norm:
            clip = min(1.0, cfg.max_grad_norm / (float(norm) + 1e-6))
            if clip < 1.0:
                for g in grads:
                    g.mul_(clip)
        optimizer.step()
        with torch.no_grad():
            for (p, m), snap in zip(masked, snapshots):
                p.copy_(torch.where(m, snap, p))  # undo decay / any drift of frozen slices
        if not all(bool(torch.isfinite(p).all()) for p in params):
            _restore(params, last_good)
            raise _nonfinite(f"The update at step {step} made weights NaN/inf (loss "
                             f"{loss_value:.4g}); weights restored to before it. Lower the "
                             "learning rate.", step, losses, step)
        losses.append(loss_value)
        log["grad_norms"].append(float(norm))
        log["lrs"].append(lr)
        log["fingerprints"].append(batch_fingerprint(batch))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if on_step is not None:
            on_step(step, loss_value)
        done = step + 1
        if done == cfg.steps or (eval_every and done % eval_every == 0):
            record(done)
