"""Stage 2 of CAST: sparse safety fine-tuning that never touches the skipped units.

Safety fine-tuning (SFT on D_safe: harmful prompt -> refusal, loss on response tokens) costs general
ability. CAST's claim is that the cost comes mostly from updating a few units whose safety and
utility gradients conflict and on which utility depends; so it trains as usual but *skips* the top-k
units of the conflict map C.

Units (METHOD v2, `units.py`). Skipping a query head freezes exactly what the head owns: its
`W_Q[h]`, `b_Q[h]`, `W_O[h]` slices, plus its K/V slices only without grouped-query attention (then
the head is its own group). Under GQA the shared K/V of a group belong to the group, so they train
in every head arm, and every k-head arm freezes exactly the same number of parameters. With
`unit="group"` an arm skips whole key/value groups (`W_K/b_K/W_V/b_V[g]`). Biases the architecture
does not have (TransformerLens keeps zero `b_Q/b_K/b_V` for Llama-style models) never train, in any
arm (`units.absent_param_names`). (The v1 `kv_policy`, which froze a group's K/V with its heads and
so gave arms of one k different budgets, remains as a deprecated option.)

"Never change" is exact: the frozen slices are bit-identical after training, whatever the optimizer.
Masking gradients alone is not enough (AdamW's decoupled weight decay moves parameters whose
gradient is zero), so each step (1) zeroes the frozen entries of the gradient, which also keeps them out of
the clipping norm and the optimizer's moments, and (2) after the optimizer step, restores the frozen
entries from a snapshot taken before training (`torch.where(mask, snapshot, param)`).

Paired design (METHOD v2). Everything random in training (the data order, torch's global RNG) comes
from `TuningConfig.seed`, the *training* seed, and nothing else: the skipped units never change the
batches. So two arms on one training seed see the same batches in the same order (each step's batch
fingerprint is recorded in `TuningResult.batch_fingerprints`), and their difference is the units
alone. The random arms' unit draws have their own seeds (`select_arm_units(..., seed=)`).

Safety along training. With a `monitor` (e.g. `ValidationMonitor`: generation-free refusal score on
harmful validation prompts, KL to the original on benign validation answers) the run records the
monitor's values before training, every `eval_every` steps and at the end (`TuningResult.curve`), so
arms can be compared at equal safety. The monitor draws no random numbers and changes no weight.

Speed without other numbers (`TuningConfig.precision`, `group_by_length`; both off by default).
"bf16" runs each step's forward and backward on a bfloat16 copy of the model and keeps float32
master weights and optimizer state, so the frozen restore above stays exact; "bf16-autocast" uses
`torch.autocast` instead. `group_by_length` runs a step's examples as length-sorted micro-batches:
the same batch and loss, little padding (`config["compute"]["padded_token_share"]`). Whether bf16
keeps a run's curves is checked against float32 seeds (`precision_checks.check_curves`).

Choices that are ours, not the paper's, recorded in `TuningConfig`: `scope="attention"` (only
attention parameters train by default: the units' slices plus the per-layer `b_O`, which belongs
to no unit; MLPs, embeddings and norms stay frozen) and the defaults of lr / steps / schedule,
chosen so one arm trains SmolLM2-135M-Instruct to refuse quickly on a CPU (benchmarks/README.md).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, Protocol, Sequence, Union, get_args

import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn import Parameter

from . import backend
from .backend import Model

from . import stats
from . import units as U
from .checks import check_int, check_number, check_types
from .data import ChatBatch, ChatDataset, example_lengths, make_batches
from .heads import head_param_masks
from .io import atomic_write_json, check_fields, read_json, to_jsonable
from .model import model_id
from .objectives import NonFiniteLossError, response_nll

Optimizer = Literal["adamw", "adam", "sgd"]
Schedule = Literal["constant", "linear", "cosine"]
Scope = Literal["attention", "all"]
Precision = Literal["float32", "bf16", "bf16-autocast"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# The built-in arms; `registry.arms.arm_names()` lists every registered one (the source).
ArmMethod = Literal["cast", "full", "random", "bottom", "top_o", "top_s", "layer_band"]
ARMS: tuple[str, ...] = get_args(ArmMethod)
Arm = ArmMethod  # v1 name of the Literal
Unit = tuple[int, int]
LEGACY_KV_POLICIES = ("any", "all", "none")



def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")


def _check_kv_policy(kv_policy: Optional[str]) -> None:
    if kv_policy is None:
        return
    _check_choice("kv_policy", kv_policy, LEGACY_KV_POLICIES)
    warnings.warn("kv_policy is deprecated (v1): arms of one k then freeze different numbers of "
                  "parameters. Leave it None: a head freezes what it owns (units.py), and "
                  "unit='group' skips whole key/value groups.", DeprecationWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------------


@dataclass
class TuningConfig:
    """Settings of one safety fine-tuning run (saved with its result).

    The defaults (ours) are sized for the default pipeline on CPU: 12 AdamW steps of 8 bundled
    harmful examples (about one epoch of the train split) at peak lr 2e-4, cosine decay, attention
    only. Pure refusal SFT also over-refuses benign prompts (the alignment tax CAST is about);
    `benign_mix` tempers it. Raise `steps` for more data.

    Attributes:
        steps: optimizer steps; batches cycle through the data in a seeded shuffled order.
        batch_size: examples per step (safety + benign).
        lr: peak learning rate (after `warmup_steps` of linear warmup).
        weight_decay: decoupled for AdamW, L2 for Adam/SGD; frozen slices never decay.
        optimizer: "adamw" (default), "adam" or "sgd" (plain, no momentum).
        schedule: lr after warmup: "constant", "linear" or "cosine" decay to 0 at the last step.
        max_grad_norm: clip the global norm of the trainable gradient (frozen entries excluded);
            None or 0 disables clipping.
        scope: trainable parameters (ours): "attention" (the units' slices and b_O) or "all".
        kv_policy: deprecated (v1), None by default: what a skipped head freezes of its K/V group,
            "any" / "all" / "none" of its heads skipped. None freezes what units own (`units.py`).
        benign_mix: fraction of each batch drawn from benign data (0 = pure safety SFT).
        seed: the training seed: torch's global RNG and the batch-order generator (nothing else).
        precision: where each step's forward and backward run. "float32" (default): the model
            itself. "bf16": a bfloat16 copy of the model whose trainable weights are refreshed from
            the float32 ones before each step; its gradients are cast to float32 for the float32
            weights and AdamW state (mixed precision: the weights, moments, clipping norm and frozen
            restore stay float32). "bf16-autocast": the float32 model under
            `torch.autocast(dtype=bfloat16)` (matmuls in bf16, weights cast at every call).
            Which bf16 form is faster depends on the machine (`benchmarks/bench_precision.py`);
            check a bf16 run's curves against float32 seeds (`precision_checks.check_curves`)
            before using it.
        group_by_length: run each step's examples as length-sorted micro-batches (`length_groups`)
            instead of one right-padded batch: the same examples and the same token-mean loss
            (up to float rounding), far fewer padded tokens. The step's batch, its fingerprint and
            the data order do not change.
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
    kv_policy: Optional[str] = None
    benign_mix: float = 0.0
    seed: int = 0
    precision: Precision = "float32"
    group_by_length: bool = False

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("optimizer", self.optimizer, get_args(Optimizer))
        _check_choice("schedule", self.schedule, get_args(Schedule))
        _check_choice("scope", self.scope, get_args(Scope))
        _check_kv_policy(self.kv_policy)
        check_types(self)
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_number("lr", self.lr, lo=0, lo_open=True)
        check_number("weight_decay", self.weight_decay, lo=0)
        # A negative norm would flip the clipped gradient's sign (gradient ascent).
        check_number("max_grad_norm", self.max_grad_norm, lo=0, none_ok=True)
        if not (isinstance(self.benign_mix, (int, float)) and 0.0 <= self.benign_mix < 1.0):
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
        skip_heads: the skipped query heads (layer, head).
        n_trainable: scalar parameters that could change (in scope, minus frozen and absent ones).
        n_frozen_in_scope: in-scope scalar parameters frozen by the skipped units (the budget).
        config: `TuningConfig.to_dict()` plus model_id, data `describe()`s, eval_every, time_s,
            monitor_time_s.
        grad_norms: global norm of the (masked) gradient per step, before clipping.
        lrs: learning rate used at each step.
        skip_groups: the skipped key/value groups (layer, group).
        n_absent: in-scope parameters the architecture does not have (never trained).
        batch_fingerprints: per step, a hash of the batch's tokens and loss mask: equal lists mean
            the same batches in the same order.
        curve: the monitor's values along training, `[{"step": updates done, **values}]`.
    """

    losses: list[float]
    skip_heads: list[Unit]
    n_trainable: int
    n_frozen_in_scope: int
    config: dict
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    skip_groups: list[Unit] = field(default_factory=list)
    n_absent: int = 0
    batch_fingerprints: list[str] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip_heads"] = [list(h) for h in self.skip_heads]
        d["skip_groups"] = [list(g) for g in self.skip_groups]
        return to_jsonable(d)

    @classmethod
    def from_dict(cls, d: dict) -> "TuningResult":
        d = dict(d)
        check_fields(cls, d)
        d["skip_heads"] = [tuple(h) for h in d["skip_heads"]]
        d["skip_groups"] = [tuple(g) for g in d.get("skip_groups", [])]
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


def _scope_names(model: Model, scope: Scope) -> Optional[set[str]]:
    """Names of the parameters in scope (None: all). "attention": every attention parameter,
    including what no unit owns (`b_O`, QK-norm weights), per `backend.attention_param_names`."""
    return None if scope == "all" else backend.attention_param_names(model)


def _in_scope(name: str, names: Optional[set[str]]) -> bool:
    return names is None or name in names


def frozen_masks(
    model: Model, skip_heads: Sequence[Sequence[int]] = (),
    skip_groups: Sequence[Sequence[int]] = (), *, kv_policy: Optional[str] = None,
) -> dict[str, Tensor]:
    """`{full parameter name: bool mask}` (True = frozen) for skipping these units.

    Default: exactly what the units own (`units.unit_masks`). `kv_policy` (deprecated) uses the v1
    head masks (`heads.head_param_masks`), which also freeze K/V groups; it takes no groups.
    Absent biases are left out of the masks (they never train anyway).
    """
    if kv_policy is None:
        masks = U.unit_masks(model, heads=skip_heads, groups=skip_groups)
    else:
        if list(skip_groups):
            raise ValueError("kv_policy (deprecated) applies to heads only; to skip key/value "
                             "groups leave kv_policy=None.")
        masks = head_param_masks(model, U.validate_units(model, skip_heads, "head"),
                                 kv_policy=kv_policy)
    absent = U.absent_param_names(model)
    return {n: m for n, m in masks.items() if n not in absent}


def trainable_parameters(
    model: Model, skip_heads: Sequence[Sequence[int]] = (), *,
    skip_groups: Sequence[Sequence[int]] = (), scope: Scope = "attention",
    kv_policy: Optional[str] = None,
) -> tuple[list[Parameter], dict[str, Tensor]]:
    """The parameters to optimise and the frozen masks of the partly frozen ones.

    Returns:
        params: in-scope parameters with at least one entry free to change. Left out: a parameter
            entirely frozen by the skip (e.g. `W_Q` of a layer whose every head is skipped) and the
            biases the architecture does not have (`units.absent_param_names`).
        masks: `{name: bool mask}` (True = frozen) for each returned parameter that is partly frozen.
    """
    _check_choice("scope", scope, get_args(Scope))
    _check_kv_policy(kv_policy)
    all_masks = frozen_masks(model, skip_heads, skip_groups, kv_policy=kv_policy)
    absent = U.absent_param_names(model)
    in_scope = _scope_names(model, scope)
    params, masks = [], {}
    for name, p in model.named_parameters():
        if not _in_scope(name, in_scope) or name in absent:
            continue
        m = all_masks.get(name)
        if m is not None and bool(m.all()):
            continue
        params.append(p)
        if m is not None and bool(m.any()):
            masks[name] = m.to(p.device)
    return params, masks


def parameter_budget(
    model: Model, skip_heads: Sequence[Sequence[int]] = (),
    skip_groups: Sequence[Sequence[int]] = (), *, scope: Scope = "attention",
    kv_policy: Optional[str] = None,
) -> dict[str, int]:
    """Scalar parameter counts of an arm: {"n_trainable", "n_frozen", "n_absent", "n_scope"}.

    n_scope: in-scope parameters; n_absent: of those, biases the architecture lacks (never
    trained); n_frozen: frozen by the skipped units; n_trainable = n_scope - n_absent - n_frozen.
    """
    absent = U.absent_param_names(model)
    in_scope = _scope_names(model, scope)
    named = [(n, p) for n, p in model.named_parameters() if _in_scope(n, in_scope)]
    n_scope = sum(p.numel() for _, p in named)
    n_absent = sum(p.numel() for n, p in named if n in absent)
    n_frozen = sum(int(m.sum()) for n, m in frozen_masks(model, skip_heads, skip_groups,
                                                         kv_policy=kv_policy).items()
                   if _in_scope(n, in_scope))
    return {"n_trainable": n_scope - n_absent - n_frozen, "n_frozen": n_frozen,
            "n_absent": n_absent, "n_scope": n_scope}


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


def _as_examples(model: Model, data: Union[ChatDataset, Sequence[ChatBatch]],
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


def batch_fingerprint(batch: ChatBatch) -> str:
    """A short hash of a batch's tokens and loss mask (equal batches, equal fingerprints)."""
    h = hashlib.sha256(batch.tokens.cpu().numpy().tobytes())
    h.update(batch.loss_mask.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Safety and utility cost along training (generation-free)
# --------------------------------------------------------------------------------------------------


class ValidationMonitor:
    """Generation-free safety and utility cost of a model, for curves along training.

    The same measures as the final evaluation's generation-free endpoints, on validation data.
    Safety: the refusal score of each harmful validation prompt (`safety.refusal_logprobs`: log
    P(a refusal opening | prompt), higher is safer). Utility cost: KL(original || model) on the
    benign validation examples (prompt + answer, teacher forced), mean over each example's content
    tokens (`utility.utility_per_prompt`). Call it on a model for the means over prompts
    {"refusal_score", "kl"}; `per_prompt` gives the values per prompt. Deterministic: no sampling,
    no random numbers.

    Args:
        original: a frozen copy of the model before training (same tokenizer).
        harmful: harmful prompts (responses unused).
        benign: benign prompts with answers (ours: the model's own, `data.self_reference`).
        group_by_length: batch the benign examples sorted by length (less padding, the same
            per-prompt values to float rounding, in dataset order); the harmful prompts are
            always batched by length (`safety.prefix_logprobs`).
    """

    def __init__(self, original: Model, harmful: ChatDataset, benign: ChatDataset, *,
                 batch_size: int = 8, group_by_length: bool = False):
        if len(harmful) == 0 or len(benign) == 0:
            raise ValueError("ValidationMonitor needs at least one harmful and one benign example.")
        from .utility import OriginalLogprobs

        benign.require_responses()
        self.harmful, self.batch_size = harmful, batch_size
        self.benign_batches = make_batches(original, benign, batch_size=batch_size,
                                           group_by_length=group_by_length)
        # The original is frozen: its log-probs on the benign answers are computed once, so each
        # point of a curve costs one forward of the tuned model, not two.
        self.original_logprobs = OriginalLogprobs(original, self.benign_batches,
                                                  batch_size=batch_size, tokens="content")
        self.describe = {"harmful": harmful.describe(), "benign": benign.describe()}

    def per_prompt(self, model: Model) -> dict[str, Tensor]:
        from .registry.metrics import curve_key
        from .safety import refusal_logprobs
        from .utility import utility_per_prompt

        with backend.inference_layout(model):  # once for both measures
            kl = utility_per_prompt(model, self.benign_batches, original=self.original_logprobs,
                                    batch_size=self.batch_size, tokens="content")["kl_to_original"]
            # The curves' keys are the metrics registry's (`registry/metrics.py`).
            return {curve_key("refusal_score"): refusal_logprobs(model, self.harmful,
                                                                 batch_size=self.batch_size),
                    curve_key("kl_to_original"): kl}

    def __call__(self, model: Model) -> dict[str, float]:
        return {k: float(v.nanmean()) for k, v in self.per_prompt(model).items()}


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


def _restore(params: list[Parameter], saved: Optional[list[Tensor]]) -> None:
    if saved is None:
        return
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


class _BatchSource:
    """Each step's batch: `n_safe` safety + `n_benign` benign examples from seeded per-epoch
    permutations of one generator (seeded by the training seed alone)."""

    def __init__(self, model, safety_data, benign_data, cfg: TuningConfig):
        if cfg.benign_mix > 0 and benign_data is None:
            raise ValueError(f"benign_mix={cfg.benign_mix} needs benign_data.")
        self.n_benign = int(round(cfg.benign_mix * cfg.batch_size)) if benign_data is not None \
            else 0
        self.n_safe = cfg.batch_size - self.n_benign
        if self.n_safe < 1:
            raise ValueError(f"benign_mix={cfg.benign_mix} leaves no safety example in a batch of "
                             f"{cfg.batch_size}; lower benign_mix or raise batch_size.")
        self.safe, self.safe_desc = _as_examples(model, safety_data, "safety")
        self.benign, self.benign_desc = (_as_examples(model, benign_data, "benign")
                                         if self.n_benign else ([], None))
        gen = torch.Generator().manual_seed(cfg.seed)
        self.safe_stream = _Stream(len(self.safe), gen)
        self.benign_stream = _Stream(len(self.benign), gen) if self.n_benign else None
        tok = model.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def next(self) -> ChatBatch:
        ex = [self.safe[i] for i in self.safe_stream.take(self.n_safe)]
        if self.benign_stream is not None:
            ex += [self.benign[i] for i in self.benign_stream.take(self.n_benign)]
        return _collate(ex, self.pad)


def _global_norm(params: list[Parameter]) -> tuple[Tensor, list[Tensor]]:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(()), grads
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    return torch.linalg.vector_norm(norms), grads


LENGTH_GROUP_RATIO = 0.875  # ours: a micro-batch's shortest example is >= 7/8 of its longest


def length_groups(lengths: Sequence[int], *, ratio: float = LENGTH_GROUP_RATIO) -> list[list[int]]:
    """Indices of examples cut into micro-batches of similar length, longest first.

    Examples are sorted by length (longest first, ties in their given order); a micro-batch takes
    the next example while it is at least `ratio` of the micro-batch's longest, so at most
    `1 - ratio` of each micro-batch's tokens are padding. Deterministic.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and int(lengths[i]) >= ratio * int(lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


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
        self.work, self.pairs = model, []
        self.n_tokens = {"computed": 0, "real": 0}
        if cfg.precision != "float32" and any(p.dtype != torch.float32 for p in params):
            raise ValueError(f"precision={cfg.precision!r} keeps float32 master weights, but the "
                             "model's trainable weights are "
                             f"{sorted({str(p.dtype) for p in params})}: load it in float32.")
        if cfg.precision == "bf16":
            name_of = {id(p): n for n, p in model.named_parameters()}
            self.work = backend.copy_in_dtype(model, torch.bfloat16)
            working = dict(self.work.named_parameters())
            for w in working.values():
                w.requires_grad_(False)
                w.grad = None
            self.pairs = [(p, working[name_of[id(p)]]) for p in params]
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


def _rows(batch: ChatBatch, rows: list[int], width: int) -> ChatBatch:
    """Rows of a right-padded batch, cut to `width` tokens (their longest example)."""
    idx = torch.tensor(rows)
    return ChatBatch(batch.tokens[idx, :width], batch.loss_mask[idx, :width],
                     [batch.prompt_lengths[i] for i in rows], batch.content_mask[idx, :width])


def _check_units_source(model: HookedTransformer, **units) -> None:
    """`UnitError` when units selected from a conflict map (`ConflictMap.top_units` remembers its
    model) are given to another model, even one of the same shape."""
    from .conflict_map import model_difference

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
    optimizer = _make_optimizer(params, cfg)
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
        lr = cfg.lr * _lr_factor(step, cfg)
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


# --------------------------------------------------------------------------------------------------
# Budget-matched arms
# --------------------------------------------------------------------------------------------------


class _HasScores(Protocol):
    O: Tensor
    S: Tensor
    C: Tensor


# Arm selection lives in the arms registry (`registry/arms.py`: one table of selectors and styles);
# these names stay importable from here.
from .registry.arms import (  # noqa: E402,F401  (re-exported)
    _scores, k_from_fraction, layer_band_heads, ranked as _ranked, select_arm_units,
)


def select_arm_heads(arm: ArmMethod, conflict_map: Optional[_HasScores], k: Union[int, float], *,
                     seed: int = 0, model: Optional[Model] = None,
                     start_layer: Optional[int] = None) -> list[Unit]:
    """`select_arm_units(..., unit="head")`: the query heads an arm skips."""
    return select_arm_units(arm, conflict_map, k, unit="head", seed=seed, model=model,
                            start_layer=start_layer)
