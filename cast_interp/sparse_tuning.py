"""Stage 2 of CAST: sparse safety fine-tuning that never touches the skipped heads.

Safety fine-tuning (SFT on D_safe: harmful prompt -> refusal, loss on response tokens) costs general
ability. CAST's claim is that the cost comes mostly from updating a few heads whose safety and utility
gradients conflict and on which utility depends; so it trains as usual but *skips* the top-k heads of
the conflict map C. Skipping head (l, h) freezes its `W_Q[h]`, `b_Q[h]`, `W_O[h]` slices and, through
its key/value group, `W_K/b_K/W_V/b_V[g(h)]` (`kv_policy`, see `heads.head_param_masks`).

"Never change" is exact: the frozen slices are bit-identical after training, whatever the optimizer.
Masking gradients alone is not enough (AdamW's decoupled weight decay moves parameters whose gradient
is zero), so each step (1) zeroes the frozen entries of the gradient, which also keeps them out of
the clipping norm and the optimizer's moments, and (2) after the optimizer step, restores the frozen
entries from a snapshot taken before training (`torch.where(mask, snapshot, param)`). Only the
attention parameters of layers with a skipped head are snapshotted, so this is cheap.

Budget-matched baselines (`select_arm_heads`): at the same k, every arm skips k heads and so freezes
the same number of Q/O parameters; without grouped-query attention the whole count is equal. Under
GQA with `kv_policy="any"` a K/V group is frozen when any of its heads is skipped, so arms whose k
heads share groups freeze fewer K/V parameters than arms that scatter them; `TuningResult.n_trainable`
and `n_frozen_in_scope` are reported so a table shows the actual budget. `kv_policy="none"` (only Q/O
slices freeze) makes every k-head arm freeze exactly the same count under GQA too. The layer band is rounded up
to whole layers (`layer_band_heads`).

Choices that are ours, not the paper's, and recorded in `TuningConfig`: `scope="attention"` (only
attention parameters train by default: all heads' Q/K/V/O and biases, plus the per-layer `b_O`, which
belongs to no head; MLPs, embeddings and norms stay frozen), `kv_policy="any"`, and the defaults of
lr / steps / schedule, chosen so one arm trains SmolLM2-135M-Instruct to refuse in about a minute on
two CPU cores.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, Protocol, Sequence, Union, get_args

import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn import Parameter
from transformer_lens import HookedTransformer

from .data import ChatBatch, ChatDataset, make_batches
from .heads import (Head, HeadIndexError, KVPolicy, head_param_count, head_param_masks,
                    rank_heads, validate_heads)
from .io import atomic_write_json, check_fields, read_json, to_jsonable
from .model import model_id
from .objectives import NonFiniteLossError, response_nll

Optimizer = Literal["adamw", "adam", "sgd"]
Schedule = Literal["constant", "linear", "cosine"]
Scope = Literal["attention", "all"]
Arm = Literal["cast", "full", "random", "bottom", "top_o", "top_s", "layer_band"]
ARMS: tuple[str, ...] = get_args(Arm)

# Attention parameters that belong to heads (b_O is shared by the layer and belongs to none).
_ATTN_PARAM_NAMES = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O",
                     "_W_K", "_b_K", "_W_V", "_b_V")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")


# --------------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------------


@dataclass
class TuningConfig:
    """Settings of one safety fine-tuning run (saved with its result).

    The defaults (ours) are sized for the default pipeline on CPU: 12 AdamW steps of 8 bundled
    harmful examples (about one epoch of the train split) at peak lr 2e-4, cosine decay, attention
    only, take about 70 s on two CPU cores and take SmolLM2-135M-Instruct from 3/16 to 15/16
    refusal-phrase answers on held-out harmful prompts. Pure refusal SFT also over-refuses benign
    prompts (the alignment tax CAST is about); `benign_mix` tempers it. Raise `steps` for more data.

    Attributes:
        steps: optimizer steps; batches cycle through the data in a seeded shuffled order.
        batch_size: examples per step (safety + benign).
        lr: peak learning rate (after `warmup_steps` of linear warmup).
        weight_decay: decoupled for AdamW, L2 for Adam/SGD; frozen slices never decay.
        optimizer: "adamw" (default), "adam" or "sgd" (plain, no momentum).
        schedule: lr after warmup: "constant", "linear" or "cosine" decay to 0 at the last step.
        max_grad_norm: clip the global norm of the trainable gradient (frozen entries excluded);
            None or 0 disables clipping.
        scope: trainable parameters (ours): "attention" (all heads' Q/K/V/O, biases and b_O) or "all".
        kv_policy: GQA K/V group frozen when "any" (default, ours) or "all" its heads are skipped,
            or never ("none": exact parameter-budget matching between arms under GQA).
        benign_mix: fraction of each batch drawn from benign data (0 = pure safety SFT).
        seed: seeds torch's global RNG and the batch-order generator.
    """

    steps: int = 12
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.01
    optimizer: Optimizer = "adamw"
    schedule: Schedule = "cosine"
    warmup_steps: int = 2
    max_grad_norm: Optional[float] = 1.0
    scope: Scope = "attention"
    kv_policy: KVPolicy = "any"
    benign_mix: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, get_args(Optimizer))
        _check_choice("schedule", self.schedule, get_args(Schedule))
        _check_choice("scope", self.scope, get_args(Scope))
        _check_choice("kv_policy", self.kv_policy, ("any", "all", "none"))
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0.0 <= self.benign_mix < 1.0:
            raise ValueError(f"benign_mix must be in [0, 1), got {self.benign_mix} (it is the "
                             "fraction of each batch taken from benign data).")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TuningConfig":
        check_fields(cls, d)
        return cls(**d)


@dataclass
class TuningResult:
    """What one safety fine-tuning run did (the tuned weights are the model itself, trained in place).

    Attributes:
        losses: training loss per step (token-mean response NLL of that step's batch).
        skip_heads: the skipped (layer, head) pairs.
        n_trainable: scalar parameters that could change (in scope, minus frozen slices).
        n_frozen_in_scope: in-scope scalar parameters frozen by the skipped heads.
        config: `TuningConfig.to_dict()` plus model_id, data `describe()`s and time_s.
        grad_norms: global norm of the (masked) gradient per step, before clipping.
        lrs: learning rate used at each step.
    """

    losses: list[float]
    skip_heads: list[Head]
    n_trainable: int
    n_frozen_in_scope: int
    config: dict
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip_heads"] = [list(h) for h in self.skip_heads]
        return to_jsonable(d)

    @classmethod
    def from_dict(cls, d: dict) -> "TuningResult":
        d = dict(d)
        d["skip_heads"] = [tuple(h) for h in d["skip_heads"]]
        return cls(**d)

    def save(self, path) -> None:
        """JSON, written atomically."""
        atomic_write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path) -> "TuningResult":
        return cls.from_dict(read_json(path))


# --------------------------------------------------------------------------------------------------
# Which parameters train
# --------------------------------------------------------------------------------------------------


def _in_scope(name: str, scope: Scope) -> bool:
    if scope == "all":
        return True
    return ".attn." in name and name.split(".")[-1] in _ATTN_PARAM_NAMES


def trainable_parameters(
    model: HookedTransformer, skip_heads: Sequence[Sequence[int]] = (), *,
    scope: Scope = "attention", kv_policy: KVPolicy = "any",
) -> tuple[list[Parameter], dict[str, Tensor]]:
    """The parameters to optimise and the frozen masks of the partly frozen ones.

    Returns:
        params: in-scope parameters with at least one entry free to change (a parameter entirely
            frozen by the skip, e.g. `W_Q` of a layer whose every head is skipped, is left out).
        masks: `{name: bool mask}` (True = frozen) for each returned parameter that is partly frozen.
    """
    _check_choice("scope", scope, get_args(Scope))
    _check_choice("kv_policy", kv_policy, ("any", "all", "none"))
    heads = validate_heads(model, skip_heads)
    all_masks = head_param_masks(model, heads, kv_policy=kv_policy) if heads else {}
    params, masks = [], {}
    for name, p in model.named_parameters():
        if not _in_scope(name, scope):
            continue
        m = all_masks.get(name)
        if m is not None and bool(m.all()):
            continue
        params.append(p)
        if m is not None and bool(m.any()):
            masks[name] = m.to(p.device)
    return params, masks


def _count_budget(model: HookedTransformer, heads: list[Head], scope: Scope,
                  kv_policy: KVPolicy) -> tuple[int, int]:
    """(n_trainable, n_frozen_in_scope) in scalar parameters."""
    n_scope = sum(p.numel() for n, p in model.named_parameters() if _in_scope(n, scope))
    n_frozen = head_param_count(model, heads, kv_policy=kv_policy) if heads else 0
    return n_scope - n_frozen, n_frozen


# --------------------------------------------------------------------------------------------------
# Batches: seeded, shuffled, cycling; optional benign mix
# --------------------------------------------------------------------------------------------------


def _split_examples(batches: Sequence[ChatBatch]) -> list[tuple[Tensor, Tensor, int]]:
    """Single examples (tokens, loss_mask, prompt_length) of right-padded batches, padding cut.

    The last response token (end-of-turn) ends an example, so trailing padding is dropped exactly.
    """
    out = []
    for b in batches:
        for i in range(len(b)):
            where = b.loss_mask[i].nonzero()
            if len(where) == 0:
                continue  # no response: contributes nothing to the loss
            end = int(where[-1]) + 1
            out.append((b.tokens[i, :end].cpu(), b.loss_mask[i, :end].cpu(), b.prompt_lengths[i]))
    return out


def _collate(examples: list[tuple[Tensor, Tensor, int]], pad: int) -> ChatBatch:
    width = max(len(t) for t, _, _ in examples)
    tokens = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, (t, m, _) in enumerate(examples):
        tokens[i, :len(t)] = t
        mask[i, :len(m)] = m
    return ChatBatch(tokens, mask, [n for _, _, n in examples])


class _Stream:
    """Indices 0..n-1 in a fresh seeded permutation each epoch (every example once per epoch)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.gen, self.order, self.pos = n, generator, [], 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out


def _as_examples(model: HookedTransformer, data: Union[ChatDataset, Sequence[ChatBatch]],
                 what: str) -> tuple[list[tuple[Tensor, Tensor, int]], dict]:
    if isinstance(data, ChatDataset):
        examples = _split_examples(make_batches(model, data, batch_size=32))
        desc = data.describe()
    elif isinstance(data, (list, tuple)) and all(isinstance(b, ChatBatch) for b in data):
        examples = _split_examples(data)
        desc = {"name": f"{what} batches", "n_batches": len(data), "n": len(examples)}
    else:
        raise TypeError(f"{what} data must be a ChatDataset or a list of ChatBatch, "
                        f"got {type(data).__name__}.")
    if not examples:
        raise ValueError(f"The {what} data has no example with response tokens: nothing to train on.")
    return examples, desc


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _lr_factor(step: int, cfg: TuningConfig) -> float:
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


def _make_optimizer(params: list[Parameter], cfg: TuningConfig) -> torch.optim.Optimizer:
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


def safety_finetune(
    model: HookedTransformer,
    safety_data: Union[ChatDataset, Sequence[ChatBatch]],
    *,
    skip_heads: Sequence[Sequence[int]] = (),
    config: Optional[TuningConfig] = None,
    benign_data: Union[ChatDataset, Sequence[ChatBatch], None] = None,
    progress: bool = False,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> TuningResult:
    """Safety fine-tuning of `model` IN PLACE, with the `skip_heads` slices frozen bit-exactly.

    Each step draws `batch_size` examples (a fraction `benign_mix` of them from `benign_data`) from
    seeded per-epoch permutations, minimises their token-mean response NLL, and restores the frozen
    slices. A `list[ChatBatch]` is split back into examples and re-batched at `config.batch_size`
    (so a dataset and its batches train identically). The benign share per batch is
    `round(benign_mix * batch_size)` examples (recorded as `n_benign_per_batch`).

    Args:
        skip_heads: heads whose parameters never change (CAST: the top-k of C; [] = full tuning).
        on_step: called as `on_step(step, loss)` after each optimizer step.

    Raises:
        NonFiniteLossError: a loss, gradient or updated weight is NaN/inf. Training stops; the
            message names the step (`err.step`), and the weights are restored to the last state
            whose loss and gradient were finite, from before the update that produced the bad
            state (`err.n_updates_kept` updates; `err.losses` of the completed steps).
        HeadIndexError: a skipped head the model lacks.
    """
    cfg = config or TuningConfig()
    if not isinstance(cfg, TuningConfig):
        raise TypeError(f"config must be a TuningConfig, got {type(cfg).__name__}.")
    heads = validate_heads(model, skip_heads)
    if cfg.benign_mix > 0 and benign_data is None:
        raise ValueError(f"benign_mix={cfg.benign_mix} needs benign_data.")
    n_benign = int(round(cfg.benign_mix * cfg.batch_size)) if benign_data is not None else 0
    n_safe = cfg.batch_size - n_benign
    if n_safe < 1:
        raise ValueError(f"benign_mix={cfg.benign_mix} leaves no safety example in a batch of "
                         f"{cfg.batch_size}; lower benign_mix or raise batch_size.")

    t0 = time.perf_counter()
    safe_ex, safe_desc = _as_examples(model, safety_data, "safety")
    benign_ex, benign_desc = (_as_examples(model, benign_data, "benign") if n_benign
                              else ([], None))
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    params, masks = trainable_parameters(model, heads, scope=cfg.scope, kv_policy=cfg.kv_policy)
    n_trainable, n_frozen = _count_budget(model, heads, cfg.scope, cfg.kv_policy)
    name_of = {id(p): n for n, p in model.named_parameters()}
    masked = [(p, masks[name_of[id(p)]]) for p in params if name_of[id(p)] in masks]
    snapshots = [p.detach().clone() for p, _ in masked]  # frozen values, restored after each step

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    safe_stream = _Stream(len(safe_ex), gen)
    benign_stream = _Stream(len(benign_ex), gen) if n_benign else None

    optimizer = _make_optimizer(params, cfg)
    trainable = {id(p) for p in params}
    old_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)  # out-of-scope params need no gradient at all

    losses: list[float] = []
    grad_norms: list[float] = []
    lrs: list[float] = []
    steps = range(cfg.steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(steps, desc=f"safety SFT (skip {len(heads)})", leave=False)
        steps = bar
    # Weights whose loss and gradient were finite, copied before their update (one copy of the
    # trainable parameters per step: small next to a forward and backward).
    last_good: Optional[list[Tensor]] = None
    try:
        for step in steps:
            idx = [safe_ex[i] for i in safe_stream.take(n_safe)]
            if benign_stream is not None:
                idx += [benign_ex[i] for i in benign_stream.take(n_benign)]
            batch = _collate(idx, pad)
            lr = cfg.lr * _lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            optimizer.zero_grad(set_to_none=True)
            loss = response_nll(model, batch)
            loss_value = float(loss.detach())
            norm = torch.zeros(())
            if math.isfinite(loss_value):
                loss.backward()
                for p, m in masked:
                    if p.grad is not None:
                        p.grad.masked_fill_(m, 0.0)  # frozen: no gradient, no moments, no norm
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    norm = torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads]))
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
                    + ". Lower the learning rate or check the data.", step, losses,
                    max(step - 1, 0))
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
            grad_norms.append(float(norm))
            lrs.append(lr)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}")
            if on_step is not None:
                on_step(step, loss_value)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(old_requires_grad[n])
            p.grad = None
        if bar is not None:
            bar.close()

    meta = {
        **cfg.to_dict(),
        "model": model_id(model),
        "safety_data": safe_desc,
        "benign_data": benign_desc,
        "n_benign_per_batch": n_benign,
        "time_s": time.perf_counter() - t0,
    }
    return TuningResult(losses, heads, n_trainable, n_frozen, meta, grad_norms, lrs)


def _restore(params: list[Parameter], saved: Optional[list[Tensor]]) -> None:
    if saved is None:
        return
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


# --------------------------------------------------------------------------------------------------
# Budget-matched arms
# --------------------------------------------------------------------------------------------------


class _HasScores(Protocol):
    O: Tensor
    S: Tensor
    C: Tensor


def _ranked(scores: Float[Tensor, "n_layers n_heads"], k: int, *, largest: bool) -> list[Head]:
    """Top-k (or bottom-k) heads by score; NaN never selected; ties by (layer, head) order."""
    ranked = rank_heads(scores, largest=largest)
    if len(ranked) < k:
        raise ValueError(f"Only {len(ranked)} heads have a finite score, fewer than k={k}; "
                         "the conflict map is incomplete (NaN scores mean undefined values).")
    return sorted(ranked[:k])


def _resolve_k(k: Union[int, float], n_total: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a count (int) or a fraction (float in [0, 1)), got {k!r}.")
    if isinstance(k, float):
        if not 0.0 <= k < 1.0:
            raise HeadIndexError(f"k = {k} is out of range: a fraction must be in [0, 1) "
                                 f"(or pass a count 0..{n_total}).")
        return int(round(k * n_total))
    if not 0 <= k <= n_total:
        raise HeadIndexError(f"k = {k} is out of range: the model has {n_total} heads "
                             f"(use a count 0..{n_total} or a fraction in [0, 1)).")
    return int(k)


def layer_band_heads(
    model: Union[HookedTransformer, tuple[int, int]], k: Union[int, float], *,
    start_layer: Optional[int] = None,
) -> list[Head]:
    """All heads of a band of consecutive whole layers, the layer baseline at budget k.

    The band has ceil(k / n_heads) layers, so it freezes exactly the parameters of k heads when k is
    a multiple of n_heads (without GQA; with GQA and `kv_policy="any"` whole layers share their K/V
    groups, so the band freezes no more K/V than k scattered heads would), and otherwise rounds *up*
    to the next whole layer (it then freezes more than k heads). `start_layer` defaults (ours) to
    the band centred on the middle of the network.

    Args:
        model: a model, or its `(n_layers, n_heads)`.
    """
    L, H = ((model.cfg.n_layers, model.cfg.n_heads) if hasattr(model, "cfg")
            else (int(model[0]), int(model[1])))
    k = _resolve_k(k, L * H)
    n_band = -(-k // H)
    if n_band == 0:
        return []
    if start_layer is None:
        start_layer = (L - n_band) // 2
    if not 0 <= start_layer <= L - n_band:
        raise HeadIndexError(f"A band of {n_band} layers starting at layer {start_layer} does not "
                             f"fit in {L} layers (start in 0..{L - n_band}).")
    return [(l, h) for l in range(start_layer, start_layer + n_band) for h in range(H)]


def select_arm_heads(
    arm: Arm,
    conflict_map: Optional[_HasScores],
    k: Union[int, float],
    *,
    seed: int = 0,
    kv_policy: KVPolicy = "any",
    model: Optional[HookedTransformer] = None,
    start_layer: Optional[int] = None,
) -> list[Head]:
    """The heads an arm skips at budget k (a count, or a fraction of all heads).

    Arms: "cast" top-k by C; "full" none (k ignored); "random" a seeded sample of k heads (run
    several seeds); "bottom" bottom-k by C; "top_o" / "top_s" top-k by O / S alone; "layer_band"
    whole consecutive layers (`layer_band_heads`, rounded up to whole layers). NaN scores are never
    selected. `conflict_map` is anything with `O`, `S`, `C` tensors of shape [n_layers, n_heads]
    (a `ConflictMap`); with `model`, its shape is checked against the model.
    `kv_policy` does not change the heads, only what they freeze; it is accepted so a caller can
    pass one set of options to selection and training.
    """
    _check_choice("arm", arm, ARMS)
    _check_choice("kv_policy", kv_policy, ("any", "all", "none"))
    if arm == "full":
        return []
    shape = None
    if conflict_map is not None:
        missing = [a for a in ("O", "S", "C") if not isinstance(getattr(conflict_map, a, None),
                                                                Tensor)]
        if missing:
            raise TypeError(f"conflict_map must have O, S, C tensors (a ConflictMap); "
                            f"missing {missing}.")
        shape = tuple(conflict_map.C.shape)
        for a in ("O", "S"):
            if tuple(getattr(conflict_map, a).shape) != shape:
                raise ValueError(f"conflict_map.{a} has shape {tuple(getattr(conflict_map, a).shape)}"
                                 f" but C has {shape}.")
    if model is not None:
        mshape = (model.cfg.n_layers, model.cfg.n_heads)
        if shape is not None and shape != mshape:
            raise HeadIndexError(
                f"The conflict map is [{shape[0]} layers x {shape[1]} heads] but the model has "
                f"{mshape[0]} x {mshape[1]}: it was computed on a different model. Recompute the "
                "map on this model.")
        if shape is not None and hasattr(conflict_map, "check_model"):
            conflict_map.check_model(model)
        shape = mshape
    if shape is None:
        raise ValueError(f"Arm {arm!r} needs a conflict map or a model (for the head grid).")
    if len(shape) != 2:
        raise ValueError(f"Conflict scores must be [n_layers, n_heads], got shape {shape}.")
    n_total = shape[0] * shape[1]
    k = _resolve_k(k, n_total)
    if arm == "layer_band":
        return layer_band_heads(shape, k, start_layer=start_layer)
    if k == 0:
        return []
    if arm == "random":
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(n_total, generator=gen)[:k]
        return sorted((int(i) // shape[1], int(i) % shape[1]) for i in pick)
    if conflict_map is None:
        raise ValueError(f"Arm {arm!r} with k={k} ranks heads by the conflict map: pass one "
                         "(a ConflictMap from the diagnosis stage).")
    scores = {"cast": conflict_map.C, "bottom": conflict_map.C, "top_o": conflict_map.O,
              "top_s": conflict_map.S}[arm]
    heads = _ranked(scores, k, largest=arm != "bottom")
    if not heads:  # defensive: k > 0 must give k heads
        raise ValueError(f"Arm {arm!r} selected no heads for k={k}; check the conflict map.")
    return heads
