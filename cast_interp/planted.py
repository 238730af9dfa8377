"""Tiny models with a planted safety-utility conflict, for tests and teaching.

A real model's conflict map has no answer key. This module builds one that does: a one-layer,
four-head model whose heads were set by hand so that each plays a known role in CAST's diagnosis,

    H_STAR    conflict and dependence: high O (safety and utility pull it apart) and high S
              (utility needs it), so the top head by C = norm(O) * norm(S);
    H_WEAK    the same conflict (high O) but a small output: low S;
    H_ALIGN   no conflict (O ~ 0) but the largest S;
    H_UNUSED  random weights with a negligible output: S ~ 0,

and datasets on which those roles hold (`planted_data`: the same prompts, utility answers "a",
safety answers "b"). Neither O alone (top: H_WEAK) nor S alone (top: H_ALIGN) finds H_STAR; C does.

As built, safety and utility ask for opposite answers to the *same* prompts, so no head can learn
to refuse without costing utility: fine for diagnosis, useless for showing what skipping heads buys.
`trigger=True` (both functions) adds a conflict-free route: safety prompts carry a trigger token "x"
and H_UNUSED (alias H_TRIGGER) becomes a head that, at `<|assistant|>`, attends to the trigger. It
still writes almost nothing (S ~ 0, C ~ 0), but fine-tuning can grow its output into "refuse when
the prompt is harmful", which leaves utility prompts alone. Full safety tuning also moves the
conflict heads (H_STAR, H_WEAK) and pays in utility; skipping them routes the update through
H_TRIGGER. The O, S, C ranking above is the same with the trigger.

The tests use it as a known answer; `notebooks/01_teaching_demo.ipynb` uses it to teach CAST.
"""

from __future__ import annotations

import random

import torch

from . import backend
from .backend import Model

from .data import ChatDataset, ChatExample
from .model import tiny_model

__all__ = ["H_STAR", "H_ALIGN", "H_WEAK", "H_UNUSED", "H_TRIGGER", "TRIGGER", "planted_model",
           "planted_data"]

# Planted heads of the known-answer model (one layer, four heads).
H_STAR, H_ALIGN, H_WEAK, H_UNUSED = 0, 1, 2, 3
H_TRIGGER = H_UNUSED  # its role with trigger=True
TRIGGER = "x"  # the trigger token of harmful prompts (trigger=True); not in the prompt alphabet


def planted_model(*, trigger: bool = False, gqa: bool = False) -> Model:
    """A one-layer model whose heads have hand-set roles (MLP off, features on reserved dims).

    Tokens: `<|assistant|>` carries feature dim 0, the response tokens "a" and "b" (identical
    embeddings) feature dim 1; every token has dim 5 = 1; prompt tokens are random in dims 8+.
    Unembedding: dim 0 -> "a" and "b" equally (so at the first response position almost all mass is
    on {a, b}: then the safety target "b" and the utility target "a" give exactly opposed logit
    gradients), dim 2 -> "a" minus "b", dims 1 and 3 -> end of turn.

    H_STAR:  at `<|assistant|>` attends to itself and writes +dim 2 (prefers "a"): utility uses it,
             its gradient comes from the opposed position -> high O and high S.
    H_WEAK:  the same with a 6x smaller output: same high O, small S.
    H_ALIGN: at "a"/"b" attends to itself and writes dim 3 (prefers end of turn), which both sets
             want after identical contexts -> O ~ 0, yet the largest S.
    H_UNUSED: random Q/K/V, output scaled by 1e-6 -> S ~ 0.

    trigger=True: the token `TRIGGER` gets its own feature dim 4, and H_UNUSED (= H_TRIGGER) queries
    from `<|assistant|>` for it (on d_head dim 3, whose rotary frequency is lowest, so the match
    barely depends on distance); its value is the trigger feature (1 with the trigger, 0 without)
    plus a small constant, and its output stays scaled by 1e-6: S ~ 0, O ~ 1.

    gqa=True: two key/value groups, {H_STAR, H_ALIGN} and {H_WEAK, H_UNUSED}. A group's K/V serve
    both its heads (keys and values on both features), so H_STAR and H_ALIGN share K/V but keep their
    own Q/O: a per-head O must tell the opposed head from the aligned one (METHOD.md v2 units).
    Not combined with `trigger`.
    """
    if gqa and trigger:
        raise ValueError("planted_model: gqa=True and trigger=True are not built together.")
    m = tiny_model(seed=0, n_layers=1, n_heads=4, d_model=32, d_head=8, d_mlp=16,
                   n_key_value_heads=2 if gqa else None)
    tok = m.tokenizer
    ida, idb = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    end, asst = tok.eos_token_id, tok.convert_tokens_to_ids("<|assistant|>")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        blk = m.blocks[0]
        blk.mlp.W_out.zero_()
        if blk.mlp.b_out is not None:  # the bridge's Llama MLP has no bias
            blk.mlp.b_out.zero_()
        E = torch.zeros_like(m.embed.W_E)
        E[:, 8:] = 0.3 * torch.randn(E.shape[0], 24, generator=g)
        E[:, 5] = 1.0
        E[asst] = 0.0
        E[asst, 0] = E[asst, 5] = 1.0
        for t in (ida, idb):
            E[t] = 0.0
            E[t, 1] = E[t, 5] = 1.0
        m.embed.W_E.copy_(E)
        U = torch.zeros_like(m.unembed.W_U)
        U[8:] = 0.05 * torch.randn(24, U.shape[1], generator=g)
        U[0, ida] = U[0, idb] = 4.0
        U[2, ida], U[2, idb] = 0.5, -0.5
        U[1, end] = U[3, end] = 1.0
        m.unembed.W_U.copy_(U)
        if m.unembed.b_U is not None:
            m.unembed.b_U.zero_()
        a = blk.attn
        # K/V per group: TL 3 keeps them as `_W_K`, ... under GQA; the bridge's `W_K` is per group
        # (a view of k_proj, so writes reach the trained weights). Head h reads group h // 2.
        per_group = gqa and not backend.USES_BRIDGE
        WK, WV, bK, bV = ((a._W_K, a._W_V, a._b_K, a._b_V) if per_group
                          else (a.W_K, a.W_V, a.b_K, a.b_V))
        kv = (lambda h: h // 2) if gqa else (lambda h: h)
        for p in (a.W_Q, WK, WV, a.W_O, a.b_Q, bK, bV, a.b_O):
            if p is not None:  # the bridge's Llama has no attention biases
                p.zero_()
        for h, feature, out_dim, scale in ((H_STAR, 0, 2, 0.3), (H_WEAK, 0, 2, 0.05),
                                           (H_ALIGN, 1, 3, 0.4)):
            a.W_Q[h, feature, 0] = WK[kv(h), feature, 0] = 1.5  # self-attention on the feature
            WV[kv(h), feature, 0] = 1.0
            a.W_O[h, 0, out_dim] = scale
        a.W_Q[H_UNUSED] = 0.3 * torch.randn(32, 8, generator=g)
        if not gqa:  # under GQA H_UNUSED reads H_WEAK's group
            WK[H_UNUSED] = 0.3 * torch.randn(32, 8, generator=g)
            WV[H_UNUSED] = 0.3 * torch.randn(32, 8, generator=g)
        a.W_O[H_UNUSED] = 1e-6 * torch.randn(8, 32, generator=g)
        if trigger:
            x = tok.convert_tokens_to_ids(TRIGGER)
            m.embed.W_E[x] = 0.0
            m.embed.W_E[x, 4] = m.embed.W_E[x, 5] = 1.0
            h = H_TRIGGER
            for p in (a.W_Q, a.W_K, a.W_V):
                p[h] = 0.0
            a.W_Q[h, 0, 3] = a.W_K[h, 4, 3] = 3.0  # <|assistant|> looks for the trigger
            a.W_V[h, 4, 0] = 1.0  # "the trigger is here"
            # A small constant value, so utility prompts give a (nearly orthogonal) gradient too:
            # without it g_util(h) = 0 and O would be undefined (NaN).
            a.W_V[h, 5, 1] = 0.1
    return m


def planted_data(n: int = 8, *, trigger: bool = False) -> tuple[ChatDataset, ChatDataset]:
    """(safety, utility): the same prompts (no "a"/"b" in them); utility answers "a", safety "b".

    trigger=True: each safety prompt also carries the token `TRIGGER` at a seeded random place (the
    "harmful" marker `planted_model(trigger=True)` can see). The first n prompts are the same for
    every n, so `planted_data(2 * n)` holds `planted_data(n)` plus n held-out prompts.
    """
    rng = random.Random(0)
    alphabet = "CDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(8, 16))) for _ in range(n)]
    safe_prompts = prompts
    if trigger:
        places = random.Random(1)
        safe_prompts = []
        for p in prompts:
            i = places.randint(0, len(p))
            safe_prompts.append(p[:i] + TRIGGER + p[i:])
    return (ChatDataset("planted-safe" + ("-trigger" if trigger else ""),
                        [ChatExample(p, "b") for p in safe_prompts]),
            ChatDataset("planted-util", [ChatExample(p, "a") for p in prompts]))
