"""Backend-neutral handles for tests that edit or compare weights by hand (TransformerLens 3's
`HookedTransformer` or TransformerLens 4's `TransformerBridge`, whose `W_Q`/`W_K`/`W_V`/`W_O`
are views of the Hugging Face projections, so in-place writes reach the trained parameters)."""

from __future__ import annotations

import torch

from cast_interp import backend, units


def kv(attn, which: str, gqa: bool):
    """Per-group K or V weights `[n_kv, d_model, d_head]` (TL 3 keeps them as `_W_K` under GQA)."""
    if gqa and not backend.USES_BRIDGE:
        return getattr(attn, f"_W_{which}")
    return getattr(attn, f"W_{which}")


def weight_name(model, layer: int, component: str) -> str:
    """Full name (model.named_parameters()) of a component's weight in `layer`."""
    return units.component_params(model, layer, component)[0].name


def unit_of(model, layer: int, component: str, index: int, t):
    """Unit `index`'s entries of `t`, a tensor shaped like the component's weight."""
    return units.component_params(model, layer, component)[0].unit(index, t)


def attention_names(model) -> set[str]:
    return backend.attention_param_names(model)


def embed_name(model) -> str:
    ids = {id(p): n for n, p in model.named_parameters()}
    return ids[id(next(model.embed.parameters()))]


def unit_param(model, name: str):
    """The `units.UnitParam` of the parameter called `name`."""
    for l in range(model.cfg.n_layers):
        for c in "qkvo":
            for p in units.component_params(model, l, c):
                if p.name == name:
                    return p
    raise KeyError(name)


def is_weight(name: str) -> bool:
    """A weight matrix, not a bias (`W_Q`/`_W_K` under TL 3, `...weight` on the bridge)."""
    return name.split(".")[-1].lstrip("_").startswith("W") or name.endswith("weight")


def shared_attention_param(model, layer: int):
    """(name, parameter) of something in `layer` that no unit owns: `b_O` under TL 3; the bridge's
    Llama has no output bias, so its block's first norm weight."""
    ids = {id(p): n for n, p in model.named_parameters()}
    p = getattr(model.blocks[layer].attn, "b_O", None)
    if not isinstance(p, torch.nn.Parameter) or id(p) not in ids:
        p = next(model.blocks[layer].ln1.parameters())
    return ids[id(p)], p
