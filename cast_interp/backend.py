"""Backend: the one place that knows which TransformerLens line is installed.

CAST runs on TransformerLens 3.x (`HookedTransformer`) and on TransformerLens 4.x
(`TransformerBridge`, which wraps a Hugging Face model in place and exposes TransformerLens's hook
names in compatibility mode). The stages never ask which one they run on: everything that differs
lives here, behind a handful of functions.

- **Building a model** (`bridge_from_hf`, `tiny_hf_llama`): under TL 4 a model is a Hugging Face
  causal LM booted into a bridge with `enable_compatibility_mode(no_processing=True)`: unfolded
  weights, as METHOD.md asks (folding would change the parameter coordinates and so the cosines).
- **Where a unit's parameters live** (`component_params`): TL 3 stores per-head tensors
  `W_Q[h]`, `_W_K[g]`, `W_O[h]`; the bridge trains the Hugging Face module's own fused projections
  (`q_proj.weight`, `[n_heads * d_head, d_model]`), where head h owns rows `h*d_head:(h+1)*d_head`
  of `q_proj` and the same columns of `o_proj`. `UnitParam` describes either layout, so a mask, a
  slice or a flattened gradient of "unit i" is one call on both.
- **Forward pieces** (`forward_from_layer`, `final_residual`, `logits_from_residual`): resuming a
  pass from a cached `resid_pre`, stopping before `ln_final`, unembedding selected rows.
- **Key/value caches** (`new_kv_cache`, `cached_forward`, `cache_rows`): TransformerLens's own cache
  under TL 3, Hugging Face's `DynamicCache` (with positions from the padding mask) under TL 4.

Hook names are TransformerLens's own on both lines (`blocks.{l}.attn.hook_z`,
`blocks.{l}.hook_resid_pre`, `blocks.{l}.attn.hook_pattern`), so they are not wrapped here.
"""

from __future__ import annotations

import importlib.metadata
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])
#: True when the installed TransformerLens builds `TransformerBridge`s (4.x) rather than
#: `HookedTransformer`s (3.x).
USES_BRIDGE: bool = TL_MAJOR >= 4

if USES_BRIDGE:
    from transformer_lens.model_bridge import TransformerBridge

    HookedTransformer = None  # removed in TransformerLens 4
    HookedTransformerConfig = None
    Model = TransformerBridge
else:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    TransformerBridge = None
    Model = HookedTransformer

Component = Literal["q", "k", "v", "o"]


def is_bridge(model: Any) -> bool:
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def backend_name(model: Any) -> str:
    """`"HookedTransformer"` or `"TransformerBridge"`, with the TransformerLens version (metadata)."""
    return f"{'TransformerBridge' if is_bridge(model) else 'HookedTransformer'} (TL {TL_VERSION})"


def architecture(model: Any) -> Optional[str]:
    """The Hugging Face architecture name (`"LlamaForCausalLM"`, ...), on either line."""
    cfg = model.cfg
    return getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)


# --------------------------------------------------------------------------------------------------
# Where a unit's parameters live
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitParam:
    """One parameter tensor that a kind of unit (query head or K/V group) is laid out along.

    Unit i owns `param.narrow(dim, i * width, width)`: TL 3's per-head tensors (`W_Q`,
    `[n_heads, d_model, d_head]`) have `dim=0, width=1, stacked=True` (unit i is `W_Q[i]`); the
    bridge's fused Hugging Face projections have `width=d_head` along their head axis (rows of
    `q_proj.weight`, columns of `o_proj.weight`).
    """

    name: str  # full name in model.named_parameters()
    param: torch.nn.Parameter
    dim: int
    width: int
    n_units: int
    stacked: bool = False  # a leading unit axis (TL 3): unit i is param[i]

    def unit(self, i: int, t: Optional[Tensor] = None) -> Tensor:
        """The view of unit i in `t` (default: the parameter itself); writes go through."""
        t = self.param if t is None else t
        return t.select(self.dim, i) if self.stacked else t.narrow(self.dim, i * self.width,
                                                                   self.width)

    def per_unit(self, t: Optional[Tensor] = None) -> Tensor:
        """`t` (default: the parameter) as `[n_units, numel per unit]`, each row one unit's entries
        (in a fixed order; cosines and dot products between two such rows do not depend on it)."""
        t = self.param if t is None else t
        if self.stacked:
            return t.reshape(self.n_units, -1)
        return t.unflatten(self.dim, (self.n_units, self.width)).movedim(self.dim, 0).reshape(
            self.n_units, -1)


def _hf_attention(model: Any, layer: int) -> Any:
    """The Hugging Face attention module of a bridge block (q_proj, k_proj, v_proj, o_proj)."""
    attn = model.blocks[layer].attn
    hf = getattr(attn, "original_component", None)
    return hf if hf is not None else attn._original_component


def _param_names(model: Any) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def has_attn_bias(model: Any) -> bool:
    """Whether the architecture has Q/K/V biases (False for Llama-style models)."""
    if is_bridge(model):
        return getattr(_hf_attention(model, 0).q_proj, "bias", None) is not None
    from .registry.models import bias_free_architectures  # these and the model families'

    return architecture(model) not in bias_free_architectures()


# Architectures whose attention has no Q/K/V biases (TransformerLens 3 keeps zero tensors for them);
# a model family (`registry/models.py`) adds its own with `bias_free=True`.
BIAS_FREE_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
    "Phi3ForCausalLM", "CohereForCausalLM", "StableLmForCausalLM",
})


def component_params(model: Any, layer: int, component: Component, *, n_kv: int,
                     names: Optional[dict[int, str]] = None) -> list[UnitParam]:
    """The parameters of one attention component in one layer (biases the architecture lacks left
    out), laid out along the component's units: query heads for q and o, K/V groups for k and v
    (`n_kv` of them)."""
    cfg = model.cfg
    n = n_kv if component in ("k", "v") else cfg.n_heads
    if is_bridge(model):
        names = names if names is not None else _param_names(model)
        lin = getattr(_hf_attention(model, layer), f"{component}_proj")
        out = [UnitParam(names[id(lin.weight)], lin.weight, 1 if component == "o" else 0,
                         cfg.d_head, n)]
        if component != "o" and getattr(lin, "bias", None) is not None:
            out.append(UnitParam(names[id(lin.bias)], lin.bias, 0, cfg.d_head, n))
        return out
    attn = model.blocks[layer].attn
    w = {"q": "W_Q", "k": "W_K", "v": "W_V", "o": "W_O"}[component]
    attrs = [w] + ([f"b_{w[-1]}"] if component != "o" and has_attn_bias(model) else [])
    if component in ("k", "v") and n != cfg.n_heads:
        attrs = ["_" + a for a in attrs]  # TL 3 stores shared K/V per group under GQA
    return [UnitParam(f"blocks.{layer}.attn.{a}", getattr(attn, a), 0, 1, n, stacked=True)
            for a in attrs]


def attention_param_names(model: Any) -> set[str]:
    """Every parameter of the attention modules (the "attention" training scope): the unit-owned
    projections plus what the layer shares (`b_O`, Gemma's QK-norm weights)."""
    # The same rule on both lines, only the module differs: the bridge's Hugging Face attention,
    # or TL 3's attention block (per-head and per-group tensors, b_O, Gemma 3's `q_norm`/`k_norm`).
    attn = ((lambda l: _hf_attention(model, l)) if is_bridge(model)
            else (lambda l: model.blocks[l].attn))
    names = _param_names(model)
    return {names[id(p)] for l in range(model.cfg.n_layers) for p in attn(l).parameters()}


def absent_param_names(model: Any) -> set[str]:
    """Attention biases TransformerLens 3 keeps as zero parameters although the architecture has
    none (never trained, owned by no unit). The bridge has no such parameters."""
    if is_bridge(model) or has_attn_bias(model):
        return set()
    names = ("b_Q", "b_K", "b_V", "_b_K", "_b_V")
    return {f"blocks.{l}.attn.{n}" for l in range(model.cfg.n_layers) for n in names
            if isinstance(getattr(model.blocks[l].attn, n, None), torch.nn.Parameter)}


# --------------------------------------------------------------------------------------------------
# Forward pieces
# --------------------------------------------------------------------------------------------------


def _stop_before_ln_final():
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def stop(resid, hook):
        # The bridge's own early exit: forward() returns what the exception carries.
        raise StopAtLayerException(resid)

    return [("ln_final.hook_in", stop)]


def forward_inputs(model: Any, tokens: Tensor) -> dict[str, Optional[Tensor]]:
    """What `forward` derives from the tokens besides the residual (attention mask under left
    padding, TL 3's shortformer positions), as keyword arguments for `forward_from_layer`."""
    _, _, shortformer, attn_mask = model.input_to_embed(tokens)
    return {"shortformer_pos_embed": shortformer, "attention_mask": attn_mask}


def forward_from_layer(model: Any, resid: Tensor, layer: int, *,
                       shortformer_pos_embed: Optional[Tensor] = None,
                       attention_mask: Optional[Tensor] = None) -> Tensor:
    """The final residual (before `ln_final`) of a pass resumed at block `layer` from `resid`
    (`blocks.{layer}.hook_resid_pre`). Hooks of the enclosing `model.hooks(...)` fire.

    TL 4's `start_at_layer` still runs blocks 0..layer-1 on the injected residual and discards
    their output (half the cost of an exact S sweep, on average); here those blocks are
    swapped for a pass-through while the forward runs, so only blocks layer.. compute.
    """
    if not is_bridge(model):
        return model(resid, start_at_layer=layer, stop_at_layer=model.cfg.n_layers,
                     shortformer_pos_embed=shortformer_pos_embed, attention_mask=attention_mask)
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    with model.hooks(fwd_hooks=_stop_before_ln_final()), _skip_blocks_before(model, layer):
        return model(resid, start_at_layer=layer, **kw)


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer whose output `start_at_layer` would discard anyway."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def _skip_blocks_before(model: Any, layer: int):
    """Temporarily replace the Hugging Face decoder layers before `layer` by a pass-through (only
    where the bridge's blocks are exactly the model's `model.layers`; otherwise nothing changes)."""
    inner = getattr(model.original_model, "model", None)
    layers = getattr(inner, "layers", None)
    blocks = list(getattr(model, "blocks", []))
    if (layer == 0 or not isinstance(layers, torch.nn.ModuleList) or len(layers) != len(blocks)
            or any(a is not b for a, b in zip(layers, blocks))):
        yield
        return
    saved = [layers[j] for j in range(layer)]
    try:
        for j in range(layer):
            layers[j] = _PassThrough()
        yield
    finally:
        for j, block in enumerate(saved):
            layers[j] = block


def final_residual(model: Any, tokens: Tensor, **forward_kwargs) -> Tensor:
    """The residual after the last block (before `ln_final`): a forward without the unembedding."""
    if not is_bridge(model):
        return model(tokens, stop_at_layer=model.cfg.n_layers, **forward_kwargs)
    with model.hooks(fwd_hooks=_stop_before_ln_final()):
        return model(tokens, **forward_kwargs)


def unembed_weights(model: Any) -> tuple[Tensor, Optional[Tensor]]:
    """`(W_U [d_model, d_vocab], b_U or None)`, as views (no copy of a 49k-262k vocabulary)."""
    if is_bridge(model):
        head = model.unembed.original_component
        return head.weight.T, getattr(head, "bias", None)
    return model.unembed.W_U, model.unembed.b_U


def logits_from_residual(model: Any, resid: Tensor) -> Tensor:
    """Logits of final-residual rows `[..., d_model]`: `ln_final` as a module (its hooks fire), then
    the unembedding from its weights, then the output soft-cap where the model has one."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    squeeze = resid.dim() == 2
    x = resid[None] if squeeze else resid
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    w, b = unembed_weights(model)
    logits = x @ w
    if b is not None:
        logits = logits + b
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    logits = apply_softcap(logits, cap)
    return logits[0] if squeeze else logits


# --------------------------------------------------------------------------------------------------
# Key/value caches (generation, prefix scoring)
# --------------------------------------------------------------------------------------------------


class _HFCache:
    """Hugging Face's `DynamicCache` plus the attention mask of every cached position (positions
    follow the mask, so left padding gets the same rotary positions as TransformerLens gives it).
    A frozen cache is cropped back after each use: it serves many continuations of one prefix."""

    def __init__(self, past: Any, mask: Tensor, frozen: bool = False):
        self.past, self.mask, self.frozen = past, mask, frozen


#: TransformerLens 3 weights that its forward copies on every call (`F.linear(x, W.T.contiguous())`
#: in the gated MLP and the unembedding).
_COPIED_EACH_CALL = ("mlp.W_in", "mlp.W_gate", "mlp.W_out", "unembed.W_U")


@contextmanager
def inference_layout(model: Any):
    """Inside: TransformerLens 3's MLP and unembedding matrices stored transposed (same values).

    Its gated MLP and unembedding compute `F.linear(x, W.T.contiguous())`, a copy of those
    matrices in every forward call, as long as a short forward on a CPU (benchmarks/README.md),
    so it dominates one-token decoding steps and small cached forwards. With `W.T` already
    contiguous the copy does not happen and the call computes the same product. Re-entrant;
    the layout is restored on exit; for inference only (no training step inside). A no-op on
    the bridge.
    """
    changed = []
    if not is_bridge(model):
        for name, p in model.named_parameters():
            if name.endswith(_COPIED_EACH_CALL) and p.dim() == 2 and p.is_contiguous():
                p.data = p.data.t().contiguous().t()
                changed.append(p)
    try:
        yield model
    finally:
        for p in changed:
            p.data = p.data.contiguous()


def new_kv_cache(model: Any, batch: int) -> Any:
    if not is_bridge(model):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)
    from transformers import DynamicCache

    hf = model.original_model
    past = DynamicCache(config=hf.config)
    return _HFCache(past, torch.zeros((batch, 0), dtype=torch.long, device=model.cfg.device))


def cached_forward(model: Any, tokens: Tensor, cache: Any, *,
                   attention_mask: Optional[Tensor] = None, residual: bool = False) -> Tensor:
    """Logits `[batch, pos, d_vocab]` of `tokens` after what `cache` holds (with `residual`, the
    final residual before `ln_final` instead); the cache grows by these tokens unless it is
    frozen."""
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    if not is_bridge(model):
        stop = {"stop_at_layer": model.cfg.n_layers} if residual else {}
        return model(tokens, attention_mask=attention_mask, past_kv_cache=cache, **stop)
    full = torch.cat([cache.mask, attention_mask.to(cache.mask.dtype)], dim=1)
    before = cache.past.get_seq_length()
    # The bridge's forward hands Hugging Face its own cache and derives positions from the full
    # mask (cached prefix + new tokens), as TransformerLens 3 does under left padding. (Calling
    # the wrapped Hugging Face model directly would bypass that and mis-place left-padded rows.)
    with model.hooks(fwd_hooks=_stop_before_ln_final() if residual else []):
        out = model(tokens, attention_mask=full, past_key_values=cache.past)
    if cache.frozen:
        grown = cache.past.get_seq_length() - before
        if grown:
            cache.past.crop(-grown)  # transformers 5.2x: a negative length removes that many
    else:
        cache.mask = full
    return out


def cache_rows(cache: Any, rows: Tensor, *, frozen: bool = True) -> Any:
    """A copy of `cache` whose batch row j is row `rows[j]` of the original; frozen (each use
    leaves it as it is) unless `frozen=False` (a forward on it appends its tokens)."""
    if isinstance(cache, _HFCache):
        import copy

        past = copy.deepcopy(cache.past)
        past.reorder_cache(rows.to(cache.mask.device))
        return _HFCache(past, cache.mask[rows.to(cache.mask.device)], frozen=frozen)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(e.past_keys[rows.to(e.past_keys.device)],
                                                 e.past_values[rows.to(e.past_values.device)],
                                                 frozen=frozen) for e in cache.entries]
    mask = cache.previous_attention_mask
    return TransformerLensKeyValueCache(entries, mask[rows.to(mask.device)], frozen=frozen)


# --------------------------------------------------------------------------------------------------
# Building a bridge (TransformerLens 4)
# --------------------------------------------------------------------------------------------------


def require_bridge_line(what: str) -> None:
    if not USES_BRIDGE:
        raise RuntimeError(f"{what} needs TransformerLens 4 (TransformerBridge); TransformerLens "
                           f"{TL_VERSION} is installed. pip install 'transformer-lens>=4,<5'")


def bridge_from_hf(hf_model: Any, tokenizer: Any, *, name: str,
                   device: Optional[Union[str, torch.device]] = None,
                   dtype: torch.dtype = torch.float32) -> Any:
    """A Hugging Face causal LM as a `TransformerBridge` in compatibility mode, unfolded.

    `no_processing=True`: no LayerNorm folding, no centering (ours, as for TL 3's
    `fold_ln=False`): the trained parameters are the Hugging Face module's own, and its logits are
    the Hugging Face model's.
    """
    require_bridge_line("bridge_from_hf")
    import logging

    if hf_model is not None:  # None: boot_transformers downloads `name` from the hub
        hf_model = hf_model.to(dtype=dtype).eval()
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # boot logs alias deprecations at WARNING
    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                     device=str(device or "cpu"), dtype=dtype)
        bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    finally:
        logging.getLogger().setLevel(level)
    bridge.cfg.model_name = name
    _pass_cache_to_attention(bridge)
    bridge.eval()
    return bridge


def copy_model(model: Any) -> Any:
    """An independent deep copy (the model before training, a tuned copy to attribute).

    For a bridge, `copy.deepcopy` alone is not enough in TL 4.3: the copy's compatibility hooks
    still hold weak references to the source's blocks, so a forward of the copy fails with
    `ReferenceError` once the source is freed (measured: a copy of a copy in attribution). The
    copy's hooks are set up again on its own blocks.
    """
    import copy

    new = copy.deepcopy(model)
    if is_bridge(new):
        new.enable_compatibility_mode(no_processing=True, disable_warnings=True)
        _pass_cache_to_attention(new)
    return new


def copy_in_dtype(model: Any, dtype: torch.dtype) -> Any:
    """The model itself when its weights are already `dtype`, else a copy with weights in
    `dtype` (`cfg.dtype` follows, so hooks and ablation values take it too)."""
    if model.cfg.dtype == dtype:
        return model
    new = copy_model(model)
    if is_bridge(new):
        new.to(dtype)
        new.cfg.dtype = dtype
    else:
        new.to(dtype, print_details=False)
    return new


def check_n_devices(n_devices: int) -> None:
    """A clear error unless `n_devices` model-parallel devices can be used: TransformerLens 3
    splits a `HookedTransformer`'s blocks over `n_devices` GPUs (`cfg.n_devices`); the
    TransformerLens 4 bridge has no such option here (its Hugging Face model would need
    `device_map`, which the bridge's hooks and our per-unit slices are not tested with)."""
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be an integer >= 1, got {n_devices!r}.")
    if n_devices == 1:
        return
    if USES_BRIDGE:
        raise ValueError(f"n_devices={n_devices} (a model split over GPUs) needs TransformerLens 3 "
                         f"(HookedTransformer); TransformerLens {TL_VERSION} is installed, whose "
                         "bridge is not supported for this here. pip install "
                         "'transformer-lens>=3.9,<4', or use one device per rank.")
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu < n_devices:
        raise ValueError(f"n_devices={n_devices} splits the model over that many CUDA GPUs, but "
                         f"this machine has {n_gpu}: use n_devices <= {n_gpu} (1 on CPU).")


def place_on_devices(model: Any) -> None:
    """Put a `HookedTransformer` on its `cfg.device`, its blocks split over `cfg.n_devices` GPUs
    from there (TransformerLens's pipeline layout: embeddings with the first blocks, the unembedding
    with the last)."""
    if getattr(model.cfg, "n_devices", 1) > 1:
        model.move_model_modules_to_device()
    else:
        model.to(model.cfg.device, print_details=False)


def _update_kv_cache_compat(self, k: Tensor, v: Tensor, **kwargs):
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
    return type(self)._update_kv_cache(self, k, v, **kwargs)


def _pass_cache_to_attention(bridge: Any) -> None:
    """Work around TL 4.3 with transformers >= 5.2x: the bridge's attention reads the key/value
    cache from the keyword `past_key_values` (or `layer_past`), but transformers now hands its
    decoder layers the cache as `cache`, so a cached forward silently attends to the new tokens
    only (measured: the second token of a cached generation ignored the prompt). Per instance
    (`MethodType`, so `copy.deepcopy` rebinds it); a no-op where the keyword already arrives."""
    import types

    for block in getattr(bridge, "blocks", []):
        attn = getattr(block, "attn", None)
        if attn is not None and hasattr(type(attn), "_update_kv_cache"):
            attn._update_kv_cache = types.MethodType(_update_kv_cache_compat, attn)


def tiny_hf_llama(*, n_layers: int, n_heads: int, d_model: int, d_head: int, d_mlp: int,
                  n_key_value_heads: Optional[int], n_ctx: int, d_vocab: int,
                  eps: float = 1e-5) -> Any:
    """A Hugging Face `LlamaForCausalLM` with the shapes of `model.tiny_config` (random weights
    from the current torch RNG, at TransformerLens's initialisation scale 0.8 / sqrt(d_model)
    rather than Hugging Face's 0.02, so that heads matter as much as in TL 3's tiny models)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=d_vocab, hidden_size=d_model, intermediate_size=d_mlp,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads, head_dim=d_head,
                      num_key_value_heads=n_key_value_heads or n_heads,
                      max_position_embeddings=n_ctx, rms_norm_eps=eps, tie_word_embeddings=False,
                      attention_bias=False, hidden_act="silu",
                      initializer_range=0.8 / d_model ** 0.5)
    return LlamaForCausalLM(cfg).eval()
