"""LoRA (Hu et al. 2021) on the attention projections, inside the hooked model, on both lines.

A rank-r adapter on a projection W `[d_out, d_in]` (the Hugging Face layout, y = W x) adds
(alpha / r) B A x, with A `[r, d_in]` and B `[d_out, r]`. B starts at zero, so the adapted model
starts as the original, exactly; A starts seeded uniform(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's
default, kaiming_uniform(a=sqrt(5))), drawn from the training seed. Only A and B train: no weight
of the model changes during training.

The adapters act on activations through TransformerLens hooks, so one code path serves TL 3's
`HookedTransformer` and TL 4's `TransformerBridge`:

- the attention input x `[batch, pos, d_model]` is the output of `blocks.{l}.ln1` (a forward hook
  on that module);
- Q, K, V: `blocks.{l}.attn.hook_q` / `hook_k` / `hook_v` (`[batch, pos, n_heads or n_kv,
  d_head]`, before the rotary) get + (alpha/r) x A^T B^T, cut per head (head h: columns
  h*d_head..(h+1)*d_head, the Hugging Face order);
- O: `blocks.{l}.hook_attn_out` `[batch, pos, d_model]` gets + (alpha/r) z A^T B^T, with z =
  `blocks.{l}.attn.hook_z` flattened over heads `[batch, pos, n_heads * d_head]`.

For evaluation the adapters are merged (`merge_lora`): (alpha/r) B A is added to W_Q / W_K / W_V /
W_O (TL 3's per-head tensors, W_Q[h] = rows h*d_head.. of the Hugging Face weight, transposed; the
bridge's `q_proj.weight` itself), after which the model is an ordinary model without hooks. A
test checks that the merged model's logits equal the hooked model's.

Defaults: rank 8 on Q and V, alpha 16 (alpaca-lora's defaults, the recipe issue 25 names after
Bianchi et al.); no adapter dropout (ours: nothing random in training but the seeded data order
and the seeded init).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from .. import units as U
from ..backend import Model
from ..data import ChatBatch, ChatDataset
from ..io import check_fields
from ..model import model_id
from ..sparse_tuning import TuningConfig, TuningResult, batch_fingerprint, parameter_budget
from .loop import (Batches, Compute, Recorder, check_config, frozen_model, global_norm,
                   lr_factor, make_optimizer, nonfinite, update_)

COMPONENTS = ("q", "k", "v", "o")


@dataclass
class LoraConfig:
    """Where the adapters sit and their size (saved with the result).

    Attributes:
        rank: r, the adapters' inner dimension.
        alpha: the update is scaled by alpha / rank.
        components: which projections get an adapter: any of "q", "k", "v", "o".
        layers: the layers adapted (None: all).
    """

    rank: int = 8
    alpha: float = 16.0
    components: list = field(default_factory=lambda: ["q", "v"])
    layers: Optional[list] = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}.")
        comps = list(self.components)
        if not comps or len(set(comps)) != len(comps) or any(c not in COMPONENTS for c in comps):
            raise ValueError(f"components must be distinct names from {list(COMPONENTS)}, got "
                             f"{self.components!r}.")
        self.components = [c for c in COMPONENTS if c in comps]  # one canonical order
        if self.layers is not None:
            layers = list(self.layers)
            if not layers or len(set(layers)) != len(layers) or any(
                    isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise ValueError(f"layers must be None (all) or distinct ints >= 0, got "
                                 f"{self.layers!r}.")
            self.layers = sorted(layers)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        check_fields(cls, d)
        return cls(**d)


def _check_model(model: Model, components: Sequence[str]) -> None:
    """A one-line error where the hooks would not compute what the merged weights do."""
    cfg = model.cfg
    for flag in ("use_split_qkv_input", "use_attn_in"):
        if getattr(cfg, flag, False):
            raise ValueError(f"LoRA's hooks read the attention input from ln1, but this model has "
                             f"cfg.{flag}=True (another input per projection): turn it off.")
    if any(c in components for c in "qk") and getattr(cfg, "positional_embedding_type",
                                                     None) == "shortformer":
        raise ValueError("LoRA on q/k: this model adds shortformer positions to the query/key "
                         "input after ln1, which the hooks do not see; adapt v/o only.")
    if "o" in components and getattr(cfg, "use_normalization_before_and_after", False):
        raise ValueError("LoRA on o: this model normalises the attention output before "
                         "hook_attn_out (a post-attention norm), so an adapter added there is not "
                         "an adapter on W_O; adapt q/k/v only.")


class LoraAdapters(torch.nn.Module):
    """The adapters of one model: A `[r, d_in]` and B `[d_out, r]` per (layer, component), float32
    on the model's device, keyed "{layer}_{component}" in `A` and `B`.

    d_in, d_out: q `[d_model -> n_heads * d_head]`, k and v `[d_model -> n_kv * d_head]`,
    o `[n_heads * d_head -> d_model]`.
    """

    def __init__(self, model: Model, config: Optional[LoraConfig] = None, *, seed: int = 0):
        super().__init__()
        self.config = config or LoraConfig()
        if not isinstance(self.config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(self.config).__name__}.")
        _check_model(model, self.config.components)
        cfg = model.cfg
        layers = self.config.layers if self.config.layers is not None else list(
            range(cfg.n_layers))
        bad = [l for l in layers if l >= cfg.n_layers]
        if bad:
            raise ValueError(f"LoRA layers {bad} do not exist: the model has {cfg.n_layers} "
                             f"layers (0..{cfg.n_layers - 1}).")
        self.layers, self.model_id = layers, model_id(model)
        q_out, kv_out = cfg.n_heads * cfg.d_head, U.n_kv_heads(model) * cfg.d_head
        dims = {"q": (cfg.d_model, q_out), "k": (cfg.d_model, kv_out),
                "v": (cfg.d_model, kv_out), "o": (q_out, cfg.d_model)}
        gen = torch.Generator().manual_seed(seed)
        r, dev = self.config.rank, torch.device(cfg.device)
        self.A, self.B = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for l in layers:
            for c in self.config.components:
                d_in, d_out = dims[c]
                bound = 1.0 / math.sqrt(d_in)
                a = (torch.rand(r, d_in, generator=gen) * 2 - 1) * bound
                self.A[f"{l}_{c}"] = torch.nn.Parameter(a.to(dev))
                self.B[f"{l}_{c}"] = torch.nn.Parameter(torch.zeros(d_out, r, device=dev))

    @property
    def n_parameters(self) -> int:
        """Scalar parameters that train: sum of r * (d_in + d_out) over the adapters."""
        return sum(p.numel() for p in self.parameters())

    def keys(self) -> list[tuple[int, str]]:
        return [(l, c) for l in self.layers for c in self.config.components]

    def delta(self, layer: int, component: str) -> Float[Tensor, "d_out d_in"]:
        """(alpha / r) B A: the change of the projection's weight, Hugging Face layout."""
        key = f"{layer}_{component}"
        return self.config.scale * (self.B[key] @ self.A[key])

    def _apply(self, key: str, x: Tensor) -> Tensor:
        a, b = self.A[key].to(x.dtype), self.B[key].to(x.dtype)  # bf16 copies keep float32 grads
        return (x @ a.T) @ b.T * self.config.scale

    def check_model(self, model: Model) -> None:
        if model_id(model) != self.model_id:
            raise ValueError(f"These adapters were built for {self.model_id}, not for "
                             f"{model_id(model)}: build LoraAdapters on this model.")

    @contextmanager
    def attached(self, model: Model) -> Iterator[Model]:
        """Inside, `model`'s forward includes the adapters (hooks; the weights are untouched)."""
        self.check_model(model)
        comps = self.config.components
        x: dict[int, Tensor] = {}
        z: dict[int, Tensor] = {}

        def grab(l: int):
            def hook(module, inputs, output):
                x[l] = output
            return hook

        def add_qkv(l: int, c: str):
            def hook(t: Tensor, hook) -> Tensor:
                return t + self._apply(f"{l}_{c}", x[l].to(t.dtype)).view(t.shape)
            return hook

        def grab_z(l: int):
            def hook(t: Tensor, hook) -> None:
                z[l] = t
            return hook

        def add_o(l: int):
            def hook(t: Tensor, hook) -> Tensor:
                return t + self._apply(f"{l}_o", z[l].flatten(-2).to(t.dtype))
            return hook

        fwd = []
        for l in self.layers:
            fwd += [(f"blocks.{l}.attn.hook_{c}", add_qkv(l, c)) for c in comps if c != "o"]
            if "o" in comps:
                fwd += [(f"blocks.{l}.attn.hook_z", grab_z(l)),
                        (f"blocks.{l}.hook_attn_out", add_o(l))]
        handles = [model.blocks[l].ln1.register_forward_hook(grab(l)) for l in self.layers
                   if any(c != "o" for c in comps)]
        try:
            with model.hooks(fwd_hooks=fwd):
                yield model
        finally:
            for h in handles:
                h.remove()


def _weight(model: Model, layer: int, component: str) -> U.UnitParam:
    return U.component_params(model, layer, component)[0]  # the weight (biases follow it)


def _write(model: Model, adapters: LoraAdapters, sign: float = 1.0) -> None:
    cfg = model.cfg
    with torch.no_grad():
        for l, c in adapters.keys():
            w = _weight(model, l, c)
            d = sign * adapters.delta(l, c).to(w.param.dtype)
            if not w.stacked:  # the bridge: the Hugging Face weight [d_out, d_in] itself
                w.param.add_(d)
            elif c == "o":  # TL 3 W_O [n_heads, d_head, d_model]; d is [d_model, n_heads*d_head]
                w.param.add_(d.T.reshape(w.n_units, cfg.d_head, cfg.d_model))
            else:  # TL 3 W_Q / W_K / W_V [n, d_model, d_head]; d is [n*d_head, d_model]
                w.param.add_(d.reshape(w.n_units, cfg.d_head, cfg.d_model).transpose(1, 2))


def _n_adapted(model: Model, adapters: LoraAdapters) -> int:
    """Weight entries a merge changes (d_out * d_in per adapter)."""
    return sum(_weight(model, l, c).param.numel() for l, c in adapters.keys())


def merge_lora(model: Model, adapters: LoraAdapters) -> dict:
    """Add each adapter's (alpha / r) B A to its projection's weight, in place: the model then
    computes what the adapted model computed (up to float rounding), with no hooks.

    Returns {"merged": ["L0q", ...], "n_adapted": weight entries changed}.
    """
    if not isinstance(adapters, LoraAdapters):
        raise TypeError(f"adapters must be LoraAdapters, got {type(adapters).__name__}.")
    adapters.check_model(model)
    _write(model, adapters)
    return {"merged": [f"L{l}{c}" for l, c in adapters.keys()],
            "n_adapted": _n_adapted(model, adapters)}


@contextmanager
def merged(model: Model, adapters: LoraAdapters) -> Iterator[Model]:
    """Inside, the adapters are merged into `model`'s weights; on exit the weights are restored
    bit for bit (from a copy, not by subtracting)."""
    adapters.check_model(model)
    saved = [(w.param, w.param.detach().clone()) for w in
             (_weight(model, l, c) for l, c in adapters.keys())]
    _write(model, adapters)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, s in saved:
                p.copy_(s)


def lora_finetune(
    model: Model,
    safety_data: Union[ChatDataset, Sequence[ChatBatch]],
    *,
    lora: Optional[LoraConfig] = None,
    config: Optional[TuningConfig] = None,
    merge: bool = True,
    monitor: Optional[Callable[[Model], dict]] = None,
    eval_every: int = 0,
    curve_start: Optional[dict] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> tuple[TuningResult, LoraAdapters]:
    """Safety fine-tuning by LoRA: train adapters on `safety_data`, the model's weights fixed.

    The same batches for `config.seed` as `safety_finetune` (benign share 0), the same schedule,
    optimizer (over A and B only, with its weight decay), clipping and precision; the adapters'
    init is drawn from `config.seed` too. `on_step` and `monitor` see the model with the adapters
    merged (and restored after); with `merge` (default) the model ends merged, like
    `safety_finetune` leaves its tuned weights in place; `merge=False` leaves it untouched.

    Returns:
        (result, adapters). result: a `TuningResult` (n_trainable: the adapters' parameters;
        n_frozen_in_scope: every in-scope model parameter) whose `config["peer"]` records the
        method, the `LoraConfig`, the budget and whether the model was merged.
    """
    cfg = check_config(config, "LoRA")
    lcfg = lora or LoraConfig()
    if not isinstance(lcfg, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig, got {type(lcfg).__name__}.")
    t0 = time.perf_counter()
    adapters = LoraAdapters(model, lcfg, seed=cfg.seed)
    batches = Batches(model, safety_data, cfg.batch_size, cfg.seed, "safety")
    compute = Compute(model, cfg, ())  # a bf16 copy is made once: its weights never change
    params = list(adapters.parameters())
    torch.manual_seed(cfg.seed)  # as safety_finetune (nothing here draws from it)
    optimizer = make_optimizer(params, cfg)
    rec = Recorder(model, lambda: merged(model, adapters), monitor=monitor, eval_every=eval_every,
                   curve_start=curve_start, on_step=on_step, steps=cfg.steps)
    log: dict[str, list] = {k: [] for k in ("losses", "grad_norms", "lrs", "fingerprints")}
    last_good: Optional[list[Tensor]] = None

    def bad(msg: str, step: int):
        if last_good is not None:
            with torch.no_grad():
                for p, s in zip(params, last_good):
                    p.copy_(s)
        return nonfinite(msg + "; the adapters were restored to before the last update. Lower "
                         "the learning rate or check the data.", step, log["losses"])

    with frozen_model(model):
        rec.start()
        for step in range(cfg.steps):
            batch = batches.next()
            lr = cfg.lr * lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with adapters.attached(compute.work):
                loss, grads = compute.loss_and_grads(batch, params)
            if not grads:
                raise bad(f"The safety loss is {loss} at step {step}", step)
            norm = global_norm(grads)
            if not bool(torch.isfinite(norm)):
                raise bad(f"The adapters' gradient norm is {float(norm)} at step {step}", step)
            last_good = update_(optimizer, params, grads, norm, cfg)
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise bad(f"The update at step {step} made the adapters NaN/inf", step)
            log["losses"].append(loss)
            log["grad_norms"].append(float(norm))
            log["lrs"].append(lr)
            log["fingerprints"].append(batch_fingerprint(batch))
            rec.after(step, loss)
    info = merge_lora(model, adapters) if merge else None
    scope = parameter_budget(model, scope=cfg.scope)
    budget = {"n_trainable": adapters.n_parameters,
              "n_adapted": _n_adapted(model, adapters),
              "n_scope": scope["n_scope"], "n_absent": scope["n_absent"]}
    peer = {"method": "lora", "lora": lcfg.to_dict(), "merged": merge,
            "adapters": info["merged"] if info else [f"L{l}{c}" for l, c in adapters.keys()],
            "budget": budget}
    meta = {**cfg.to_dict(), "model": model_id(model), "safety_data": batches.describe,
            "benign_data": None, "n_benign_per_batch": 0, "eval_every": eval_every,
            "compute": compute.describe(), "time_s": time.perf_counter() - t0, "peer": peer}
    result = TuningResult(log["losses"], [], adapters.n_parameters,
                          scope["n_scope"] - scope["n_absent"], meta, log["grad_norms"],
                          log["lrs"], [], scope["n_absent"], log["fingerprints"], rec.curve)
    return result, adapters
