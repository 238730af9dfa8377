"""What the peer methods' own training loops share with `sparse_tuning.safety_finetune`.

LoRA and gradient projection cannot run inside `safety_finetune` (one trains adapters outside the
model, the other needs two gradients per step), so they have loops of their own. To keep the
comparison paired (METHOD v2: arms on one training seed see the same batches), these pieces do
what `safety_finetune` does, with its own functions where they exist:

- `Batches`: the data order. With a `TuningConfig`'s `seed` and `batch_size` and no benign share,
  each step's batch is exactly `safety_finetune`'s (same `batch_fingerprint`s; a test checks it).
  The examples come from `make_batches(model, data, batch_size=32)` split back into rows, as there.
- `lr_factor`, `make_optimizer`: the learning-rate schedule and the optimizer (AdamW without
  `foreach`, bit-reproducible on CPU).
- `Compute`: a step's loss and gradients at the config's precision ("float32", "bf16": a bfloat16
  working copy of the model whose trainable weights are refreshed from the float32 master weights
  before each step, gradients cast back to float32; "bf16-autocast").
- `Recorder`: the monitor's curve and `on_step`, called on the model as it would be evaluated.

(The batch order, schedule, optimizer and bf16 working copy are `sparse_tuning`'s own functions,
imported; the pairing test in tests/test_peers.py fails if the loops drift apart.)
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn import Parameter

from ..backend import Model
from ..data import ChatBatch, ChatDataset, make_batches, pad_token_id
from ..objectives import NonFiniteLossError, response_nll
from ..sparse_tuning import TuningConfig
# safety_finetune's own batch order, schedule and optimizer: every method sees the same batches
from ..sparse_tuning.batches import SeededStream, collate, split_examples
from ..sparse_tuning.train import lr_factor, make_optimizer, working_copy

__all__ = ["Batches", "Compute", "Recorder", "check_config", "clip_", "frozen_model",
           "global_norm", "lr_factor", "make_optimizer", "nonfinite", "update_"]

Example = tuple[Tensor, Tensor, int]  # (tokens [len], loss_mask [len], prompt length)


def check_config(config: Optional[TuningConfig], method: str) -> TuningConfig:
    """The `TuningConfig` a peer loop runs (default `TuningConfig()`), or a one-line error for a
    setting the loop does not implement."""
    cfg = config or TuningConfig()
    if not isinstance(cfg, TuningConfig):
        raise TypeError(f"config must be a TuningConfig, got {type(cfg).__name__}.")
    if cfg.group_by_length:
        raise ValueError(f"{method} runs each step's batch whole: set group_by_length=False "
                         "(it changes speed only, not the batches).")
    if cfg.benign_mix:
        raise ValueError(f"{method} takes no benign share in its batches (benign_mix="
                         f"{cfg.benign_mix}): set benign_mix=0 (the anchor is its own arm).")
    if cfg.kv_policy is not None:
        raise ValueError(f"{method} freezes what units own: leave kv_policy=None (deprecated).")
    return cfg


# --------------------------------------------------------------------------------------------------
# Batches: safety_finetune's seeded order (benign share 0)
# --------------------------------------------------------------------------------------------------


class Batches:
    """Each step's `batch_size` examples of `data`, from seeded per-epoch permutations.

    With `seed` = a `TuningConfig`'s seed this is `safety_finetune`'s data order at
    `benign_mix=0`: the same batches in the same order. `data` is a `ChatDataset` with responses
    or a list of `ChatBatch` (split back into examples and re-batched, as there).
    """

    def __init__(self, model: Model, data: Union[ChatDataset, Sequence[ChatBatch]],
                 batch_size: int, seed: int, what: str = "safety"):
        if isinstance(data, ChatDataset):
            self.examples = split_examples(make_batches(model, data, batch_size=32))
            self.describe = data.describe()
        elif isinstance(data, (list, tuple)) and all(isinstance(b, ChatBatch) for b in data):
            self.examples = split_examples(data)
            self.describe = {"name": f"{what} batches", "n_batches": len(data),
                             "n": len(self.examples)}
        else:
            raise TypeError(f"{what} data must be a ChatDataset or a list of ChatBatch, got "
                            f"{type(data).__name__}.")
        if not self.examples:
            raise ValueError(f"The {what} data has no example with response tokens: nothing to "
                             "train on.")
        self.batch_size = batch_size
        self.stream = SeededStream(len(self.examples), torch.Generator().manual_seed(seed))
        self.pad = pad_token_id(model)

    def next(self) -> ChatBatch:
        return collate([self.examples[i] for i in self.stream.take(self.batch_size)], self.pad)


# --------------------------------------------------------------------------------------------------
# Schedule, optimizer, one step's gradients
# --------------------------------------------------------------------------------------------------


def global_norm(grads: Sequence[Optional[Tensor]]) -> Tensor:
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_(grads: Sequence[Optional[Tensor]], norm: Tensor, max_norm: Optional[float]) -> None:
    """Scale `grads` in place as `safety_finetune` clips (global norm, frozen entries excluded)."""
    if max_norm:
        clip = min(1.0, max_norm / (float(norm) + 1e-6))
        if clip < 1.0:
            for g in grads:
                if g is not None:
                    g.mul_(clip)


def update_(optimizer: torch.optim.Optimizer, params: Sequence[Parameter],
            grads: Sequence[Optional[Tensor]], norm: Tensor, cfg: TuningConfig) -> list[Tensor]:
    """One optimizer step with `grads` (finite, global norm `norm`) clipped as `safety_finetune`
    clips; returns the weights from before it (the last state with a finite loss and gradient)."""
    last_good = [p.detach().clone() for p in params]
    clip_(grads, norm, cfg.max_grad_norm)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return last_good


class Compute:
    """A step's loss and float32 gradients at `cfg.precision`.

    `trainable`: the model's own parameters that train (float32 master weights; empty for LoRA,
    whose adapters live outside the model). "bf16" runs the step on a bfloat16 copy of the model
    (`work`); its copies of `trainable` are refreshed from the masters before each step and their
    gradients are returned in float32 (the master weights, optimizer state and clipping stay
    float32, as in `safety_finetune`). Anything to attach to the forward (LoRA's hooks) attaches
    to `work`.
    """

    def __init__(self, model: Model, cfg: TuningConfig, trainable: Sequence[Parameter] = ()):
        self.model, self.precision = model, cfg.precision
        self.work, pairs = working_copy(model, list(trainable), cfg.precision)
        self.pairs: dict[int, Parameter] = {id(p): w for p, w in pairs}

    def loss_and_grads(self, batch: ChatBatch,
                       wrt: Sequence[Tensor]) -> tuple[float, list[Optional[Tensor]]]:
        """(token-mean response NLL of `batch`, float32 d loss / d each of `wrt`, None where the
        loss does not depend on it); `wrt` are master parameters of the model or tensors outside
        it (adapters). No gradients when the loss is not finite (the list is then empty)."""
        with torch.no_grad():
            for p in wrt:
                w = self.pairs.get(id(p))
                if w is not None:
                    w.copy_(p)  # rounds the float32 master to bf16
        targets = [self.pairs.get(id(p), p) for p in wrt]
        old = [t.requires_grad for t in targets]
        for t in targets:
            t.requires_grad_(True)
        try:
            ctx = (torch.autocast(torch.device(self.model.cfg.device).type, dtype=torch.bfloat16)
                   if self.precision == "bf16-autocast" else nullcontext())
            with ctx:
                loss = response_nll(self.work, batch, reduction="mean")
            value = float(loss.detach())
            if not math.isfinite(value):
                return value, []
            grads = torch.autograd.grad(loss, targets, allow_unused=True)
        finally:
            for t, r in zip(targets, old):
                t.requires_grad_(r)
        # None where the loss does not depend on a tensor: the optimizer then skips it (no decay),
        # as it skips a parameter whose .grad stayed None in safety_finetune.
        return value, [None if g is None else _laid_out_like(g.float(), p)
                       for g, p in zip(grads, wrt)]

    def describe(self) -> dict:
        return {"forward_backward": {"float32": "float32", "bf16": "bfloat16 copy of the float32 "
                                     "weights", "bf16-autocast": "float32 under torch.autocast("
                                     "bfloat16)"}[self.precision],
                "master_weights": "float32", "optimizer_state": "float32"}


def _laid_out_like(g: Tensor, p: Tensor) -> Tensor:
    """`g` with `p`'s strides, as `.grad` is after a backward: autograd.grad may return another
    layout, and a norm summed in another order differs in the last bit (then so does clipping)."""
    if g.stride() == p.stride():
        return g
    out = torch.empty_like(p, dtype=g.dtype)
    out.copy_(g)
    return out


def nonfinite(msg: str, step: int, losses: list[float]) -> NonFiniteLossError:
    """The error `safety_finetune` raises, with `.step` and `.losses` (completed steps)."""
    err = NonFiniteLossError(msg)
    err.step = step  # type: ignore[attr-defined]
    err.losses = list(losses)  # type: ignore[attr-defined]
    return err


class Recorder:
    """The monitor's curve (`[{"step", **values}]`) and `on_step`, run on the model as it is
    evaluated: `view()` is a context manager that yields it (LoRA: merged into the weights)."""

    def __init__(self, model: Model, view: Callable[[], ContextManager[Model]], *,
                 monitor: Optional[Callable[[Model], dict]], eval_every: int,
                 curve_start: Optional[dict], on_step: Optional[Callable[[int, float], None]],
                 steps: int):
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
            raise ValueError(f"eval_every must be an integer >= 0 (0: monitor only before and "
                             f"after training), got {eval_every!r}.")
        self.model, self.view, self.monitor, self.eval_every = model, view, monitor, eval_every
        self.curve_start, self.on_step, self.steps = curve_start, on_step, steps
        self.curve: list[dict] = []

    def start(self) -> None:
        if self.monitor is None:
            return
        if self.curve_start is not None:
            self.curve.append({"step": 0, **self.curve_start})
        else:
            self.curve.append({"step": 0, **self.monitor(self.model)})

    def after(self, step: int, loss: float) -> None:
        done = step + 1
        wants_curve = self.monitor is not None and (
            done == self.steps or (self.eval_every and done % self.eval_every == 0))
        if self.on_step is None and not wants_curve:
            return
        with self.view() as model:
            if self.on_step is not None:
                self.on_step(step, loss)
            if wants_curve:
                self.curve.append({"step": done, **self.monitor(model)})


@contextmanager
def frozen_model(model: Model) -> Iterator[None]:
    """No parameter of `model` requires a gradient inside (restored on exit)."""
    old = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(old[n])
            p.grad = None
