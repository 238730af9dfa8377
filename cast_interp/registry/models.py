"""Model families: how a name becomes a model, and the constants CAST needs of it.

`model.load_model(name)` resolves `name` here (a family's `names`, then its `matches(name)`, then
the hub) and calls the family's loader, which serves both TransformerLens lines (a
`HookedTransformer` under TL 3, a `TransformerBridge` under TL 4; `load_tl4` where they differ).
The family carries what the rest of the toolkit must not guess:

- `n_ctx`: the context we give the hooked model (TL 3 allocates an [n_ctx, n_ctx] mask per layer);
- `end_of_turn`: the token that ends an assistant turn (`data.end_of_turn_id`; None: EOS). A
  Llama-3-style `<|eot_id|>` is not EOS: loss masks and generation must use it;
- `bias_free`, `architectures`: attention without Q/K/V biases (TL 3 keeps zero tensors for them,
  which must never train; `backend.has_attn_bias`);
- `chat_template`: the prompt format when the tokenizer has none (base models);
- `n_layers`, `n_heads`, `n_kv_heads`: the shape, where the family fixes one (None: it varies by
  name, as in a folder or a hub name); the cost model counts units with it (`n_units_of`).

A new family is one call (the loader returns the model with its tokenizer):

    from cast_interp.registry import register_model_family

    def load_mine(name, *, device=None, dtype=None, cache_dir=None, n_devices=1):
        from cast_interp.model import load_hf_directory
        return load_hf_directory("/models/mine", device=device, n_ctx=4096)

    register_model_family("mine", load_mine, names=("mine-1b",), n_ctx=4096,
                          end_of_turn="<|eot_id|>", bias_free=True,
                          architectures=("LlamaForCausalLM",), n_layers=16, n_heads=32,
                          n_kv_heads=8)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

#: load(name, *, device, dtype, cache_dir, n_devices) -> model with `.tokenizer`.
Loader = Callable[..., Any]
#: The context we give a hooked model when its family sets none (ours): TL 3 allocates an
#: [n_ctx, n_ctx] causal mask per layer, and CAST's prompts are short.
DEFAULT_N_CTX = 2048
_TAG = "cast_model_family"  # the attribute a loaded tokenizer carries: its family's name


@dataclass(frozen=True)
class ModelFamily:
    """One model family (see the module docstring). `names`: names that select it (any case);
    `matches(name)`: other names it takes (a local folder); `detect(tokenizer)`: whether a
    tokenizer loaded by another family (a folder, the hub) is one of this family's, for its
    end-of-turn token (default: `end_of_turn` is in the tokenizer's vocabulary and chat
    template)."""

    name: str
    load: Loader
    names: tuple[str, ...] = ()
    matches: Optional[Callable[[str], bool]] = None
    load_tl4: Optional[Loader] = None
    n_ctx: Optional[int] = None
    end_of_turn: Optional[str] = None
    bias_free: Optional[bool] = None
    architectures: tuple[str, ...] = ()
    chat_template: Optional[str] = None
    detect: Optional[Callable[[Any], bool]] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None

    def loader(self, uses_bridge: bool) -> Loader:
        return self.load_tl4 if uses_bridge and self.load_tl4 is not None else self.load

    def is_tokenizer_of(self, tokenizer: Any) -> bool:
        if self.detect is not None:
            return bool(self.detect(tokenizer))
        if self.end_of_turn is None:
            return False
        template = getattr(tokenizer, "chat_template", None) or ""
        return (self.end_of_turn in template
                and self.end_of_turn in (getattr(tokenizer, "get_vocab", dict)() or {}))


MODEL_FAMILIES: dict[str, ModelFamily] = {}
HUB = "hub"  # the fallback family: any other name is a TransformerLens / hub name


def register_model_family(name: str, load: Loader, *, names: tuple[str, ...] = (),
                          matches: Optional[Callable[[str], bool]] = None,
                          load_tl4: Optional[Loader] = None, n_ctx: Optional[int] = None,
                          end_of_turn: Optional[str] = None, bias_free: Optional[bool] = None,
                          architectures: tuple[str, ...] = (),
                          chat_template: Optional[str] = None,
                          detect: Optional[Callable[[Any], bool]] = None,
                          n_layers: Optional[int] = None, n_heads: Optional[int] = None,
                          n_kv_heads: Optional[int] = None,
                          replace: bool = False) -> ModelFamily:
    """Add a model family: `load_model` dispatches its names to `load`, and the toolkit reads its
    constants. A family or a name already registered is a ValueError unless `replace`."""
    if name in MODEL_FAMILIES and not replace:
        raise ValueError(f"Model family {name!r} is already registered; pass replace=True to "
                         "redefine it.")
    if not callable(load):
        raise TypeError(f"load must be a function (name, *, device, dtype, cache_dir, n_devices) "
                        f"-> model, got {load!r}.")
    names = tuple(n.lower() for n in names)
    taken = {n: f.name for f in MODEL_FAMILIES.values() if f.name != name for n in f.names}
    clash = [n for n in names if n in taken]
    if clash:
        raise ValueError(f"Model name(s) {clash} already belong to family {taken[clash[0]]!r}.")
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
        raise ValueError(f"n_ctx must be a positive int (tokens), got {n_ctx!r}.")
    for what, v in (("n_layers", n_layers), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{what} must be a positive int or None, got {v!r}.")
    if n_kv_heads is not None and (n_heads is None or n_heads % n_kv_heads):
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}).")
    fam = ModelFamily(name, load, names, matches, load_tl4, n_ctx, end_of_turn, bias_free,
                      tuple(architectures), chat_template, detect, n_layers=n_layers,
                      n_heads=n_heads, n_kv_heads=n_kv_heads)
    MODEL_FAMILIES[name] = fam
    if HUB in MODEL_FAMILIES and name != HUB:  # the fallback stays last
        MODEL_FAMILIES[HUB] = MODEL_FAMILIES.pop(HUB)
    return fam


def unregister_model_family(name: str) -> None:
    MODEL_FAMILIES.pop(name, None)


def get_family(name: str) -> ModelFamily:
    if name not in MODEL_FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; registered: {list(MODEL_FAMILIES)}.")
    return MODEL_FAMILIES[name]


def resolve(model_name: str) -> ModelFamily:
    """The family that loads `model_name`: by its names, then by `matches`, else the hub."""
    low = model_name.lower()
    for fam in MODEL_FAMILIES.values():
        if low in fam.names:
            return fam
    for fam in MODEL_FAMILIES.values():
        if fam.name != HUB and fam.matches is not None and fam.matches(model_name):
            return fam
    return MODEL_FAMILIES[HUB]


def tag(model: Any, family: ModelFamily) -> None:
    """Record a loaded model's family on its tokenizer (read by `family_of`)."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        try:
            setattr(tok, _TAG, family.name)
        except (AttributeError, TypeError):  # a tokenizer that takes no attributes: untagged
            pass


def family_of(tokenizer: Any) -> Optional[ModelFamily]:
    """The family of a tokenizer (or a model): the one that loaded it when it has an end-of-turn
    token, else the first family that recognises it (`detect`), else the loading family or None."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    loaded = MODEL_FAMILIES.get(getattr(tokenizer, _TAG, None) or "")
    if loaded is not None and loaded.end_of_turn is not None:
        return loaded
    for fam in MODEL_FAMILIES.values():
        if fam is not loaded and fam.is_tokenizer_of(tokenizer):
            return fam
    return loaded


def end_of_turn_token(tokenizer: Any) -> Optional[str]:
    """The token that ends an assistant turn for this tokenizer's family (None: its EOS)."""
    fam = family_of(tokenizer)
    return None if fam is None else fam.end_of_turn


def bias_free_architectures() -> frozenset:
    """Architectures whose attention has no Q/K/V biases: `backend.BIAS_FREE_ARCHITECTURES` and
    every family's that says `bias_free=True`."""
    from ..backend import BIAS_FREE_ARCHITECTURES

    return BIAS_FREE_ARCHITECTURES | {a for f in MODEL_FAMILIES.values() if f.bias_free
                                      for a in f.architectures}


def n_ctx_of(family: str) -> int:
    """The context a family's hooked models get (`DEFAULT_N_CTX` when it sets none)."""
    return get_family(family).n_ctx or DEFAULT_N_CTX


def n_units_of(model_name: str, kind: str = "head") -> Optional[int]:
    """Units of `kind` ("head": query heads, "group": key/value groups) in all layers of the model
    `model_name` loads, from its family's shape, without loading it; None when the family fixes no
    shape (a folder, a hub name)."""
    fam = resolve(model_name)
    per_layer = fam.n_heads if kind == "head" else fam.n_kv_heads
    if fam.n_layers is None or per_layer is None:
        return None
    return fam.n_layers * per_layer


# --------------------------------------------------------------------------------------------------
# The built-in families (their loaders live in model.py / hf_models.py)
# --------------------------------------------------------------------------------------------------


def _model():
    from .. import model

    return model


def _load_smollm2(name, *, device=None, dtype=None, cache_dir=None, n_devices=1):
    return _model().load_smollm2(device=device, cache_dir=cache_dir, dtype=dtype,
                                 n_devices=n_devices)


def _load_gemma3(name, *, device=None, dtype=None, cache_dir=None, n_devices=1):
    return _model().load_gemma3(device=device, cache_dir=cache_dir, dtype=dtype,
                                n_devices=n_devices)


def _load_tiny(name, *, device=None, dtype=None, cache_dir=None, n_devices=1):
    if n_devices > 1:
        raise ValueError("n_devices > 1 is for models too large for one GPU, not 'tiny'.")
    # A 512-token context (ours) fits the bundled examples (the longest is 279 byte tokens); the
    # weights do not depend on n_ctx.
    return _model().tiny_model(n_key_value_heads=2 if name.lower() == "tiny-gqa" else None,
                               device=device, n_ctx=n_ctx_of("tiny"))


def _load_directory(name, *, device=None, dtype=None, cache_dir=None, n_devices=1):
    # The folder's own context (learned position embeddings fix it), at most DEFAULT_N_CTX for
    # rotary models (`model.hooked_config_from_hf`).
    return _model().load_hf_directory(os.path.expanduser(name), device=device, dtype=dtype,
                                      n_devices=n_devices)


def _load_hub(name, *, device=None, dtype=None, cache_dir=None, n_devices=1):
    return _model().load_hub_model(name, device=device, dtype=dtype, n_devices=n_devices)


def _gemma_template() -> str:
    from ..hf_models import GEMMA3_BASE_TEMPLATE

    return GEMMA3_BASE_TEMPLATE


# SmolLM2 supports 8192 tokens; 2048 (ours) keeps TL 3's masks small (30 x 16 MB). Its chat
# template ends turns with <|im_end|>, its EOS.
register_model_family("smollm2", _load_smollm2,
                      names=("smollm2-135m-instruct", "smollm2", "smollm2-135m"), n_ctx=2048,
                      end_of_turn="<|im_end|>", bias_free=True,
                      architectures=("LlamaForCausalLM",), n_layers=30, n_heads=9, n_kv_heads=3)
# Gemma 3 supports 32k; 2048 as for SmolLM2 (ours; its sliding window, 512, applies within it).
# A base model: its prompt format is `hf_models.GEMMA3_BASE_TEMPLATE`, whose answers end with EOS.
register_model_family("gemma-3", _load_gemma3,
                      names=("gemma-3-270m", "gemma3-270m", "gemma-3-270m-base"), n_ctx=2048,
                      bias_free=True, architectures=("Gemma3ForCausalLM",), n_layers=18, n_heads=4,
                      n_kv_heads=1)
# Its key/value heads differ by name (4 for "tiny", 2 for "tiny-gqa"): no n_kv_heads.
register_model_family("tiny", _load_tiny, names=("tiny", "tiny-gqa"), n_ctx=512, bias_free=True,
                      architectures=("LlamaForCausalLM",), n_layers=2, n_heads=4)
# Llama 3 (and 3.x) instruct models end a turn with <|eot_id|>, not their EOS (<|end_of_text|>).
# They load as a local folder or a hub name; their tokenizer is recognised by that token.
register_model_family("llama-3", _load_directory, end_of_turn="<|eot_id|>", bias_free=True,
                      architectures=("LlamaForCausalLM",))
# A local Hugging Face folder (Llama or GPT-2 under TL 3; what the bridge supports under TL 4).
register_model_family("hf-directory", _load_directory,
                      matches=lambda name: os.path.isdir(os.path.expanduser(name)))
# Any other name: TransformerLens's own config (needs the model hub).
register_model_family(HUB, _load_hub)
