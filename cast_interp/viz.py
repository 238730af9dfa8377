"""Interactive views for notebooks: a conflict map you can hover, a head's attention you can read.

Optional: the `viz` extra (`pip install "cast_interp[viz]"`: plotly, circuitsvis). Without it every
view falls back to the static matplotlib figure of `figures` / `head_attention.py`, so a notebook
runs either way and `import cast_interp` never needs the extra.

- `head_table(cmap, k)`: one row per unit (layer, index, O with its 95% CI, S with its CI in
  nats/token, C, rank by C, skipped or not): the numbers every view shows.
- `head_map(cmap, k)`: layer x head heatmaps of O (diverging, centred at 1), S (centred at 0) and C,
  the top-k by C (the units CAST skips) outlined; hovering a cell shows its row of `head_table`.
- `attention_view(model, prompt, layer, head)`: the head's attention pattern on the chat-formatted
  prompt (circuitsvis, as TransformerLens users know it; a plotly heatmap without circuitsvis).
- `prompt_table(model, head, benign, harmful)`: per prompt, the head's S (mean ablation) on benign
  prompts and the model's refusal score on harmful ones; `head_picker` menus of heads and prompts.
- `to_html(view)`: a view as HTML (scripts from a CDN), to save or to test.

`interactive=None` uses the extra when it is installed; `True` requires it (a clear ImportError
otherwise); `False` gives the static figure.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence, Union

import numpy as np


INSTALL_HINT = 'pip install "cast_interp[viz]"  (plotly, circuitsvis)'


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def has_plotly() -> bool:
    return _importable("plotly")


def has_circuitsvis() -> bool:
    return _importable("circuitsvis")


def _want(interactive: Optional[bool], available: bool, what: str) -> bool:
    if interactive and not available:
        raise ImportError(f"The interactive {what} needs the viz extra: {INSTALL_HINT}.")
    return available if interactive is None else bool(interactive)


class HTMLView:
    """HTML that a notebook displays (`_repr_html_`), with its source as `.html`."""

    def __init__(self, html: str, title: str = ""):
        self.html, self.title = html, title

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html


def to_html(view: Any) -> str:
    """A view's HTML: plotly figures with plotly.js from its CDN, circuitsvis and `HTMLView` as
    they display. A matplotlib figure (the static fallback) has no HTML: a `TypeError`."""
    if isinstance(view, HTMLView):
        return view.html
    if hasattr(view, "to_html"):  # plotly
        return view.to_html(include_plotlyjs="cdn", full_html=False)
    raise TypeError(f"{type(view).__name__} is not an interactive view (the viz extra is absent?): "
                    "save a static figure with figures.save_figure instead.")


# --------------------------------------------------------------------------------------------------
# The conflict map
# --------------------------------------------------------------------------------------------------


def head_table(conflict_map: Any, k: Union[int, float] = 0.1, *, unit: str = "head"):
    """One row per unit, in (layer, index) order: `layer`, `index`, `label` (`L3H5`, `L3G1`), `O`,
    `O_low`, `O_high`, `S`, `S_low`, `S_high` (nats/token), `C`, `rank` (1 = highest C) of `n`,
    `skipped` (in the top k by C; k a count or a fraction). CIs are NaN where the map has none."""
    import pandas as pd

    d = conflict_map.units(unit)
    L, n = tuple(d["C"].shape)
    top = {tuple(u) for u in conflict_map.top_units(k, by="C", unit=unit)} if k else set()
    order = [tuple(u) for u in conflict_map.top_units(L * n, by="C", unit=unit)]
    rank = {u: i + 1 for i, u in enumerate(order)}
    get = lambda name: (d[name].detach().float().cpu().numpy() if name in d  # noqa: E731
                        else np.full((L, n), np.nan))
    vals = {name: get(name) for name in ("O", "O_low", "O_high", "S", "S_low", "S_high", "C")}
    tag = "H" if unit == "head" else "G"
    rows = [{"layer": l, "index": i, "label": f"L{l}{tag}{i}",
             **{name: float(v[l, i]) for name, v in vals.items()},
             "rank": rank.get((l, i), L * n), "n": L * n, "skipped": (l, i) in top}
            for l in range(L) for i in range(n)]
    return pd.DataFrame(rows)


def _hover_text(r) -> str:
    ci = lambda lo, hi: "" if np.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]"  # noqa: E731
    return (f"<b>{r.label}</b><br>O = {r.O:.3f}{ci(r.O_low, r.O_high)}<br>"
            f"S = {r.S:.4f}{ci(r.S_low, r.S_high)} nats/token<br>C = {r.C:.3f}<br>"
            f"rank {r.rank} of {r.n} by C<br>{'skipped by CAST' if r.skipped else 'trained'}")


def head_map(conflict_map: Any, k: Union[int, float] = 0.1, *, unit: str = "head",
             interactive: Optional[bool] = None):
    """Layer x head heatmaps of O, S and C with hover (plotly), the top-k units by C outlined.

    Returns a plotly Figure; without plotly (or `interactive=False`), the static
    `figures.plot_conflict_maps`. The hover of each cell is `head_table`'s row: O and S with their
    95% CIs, C, the rank by C, skipped or not.
    """
    if not _want(interactive, has_plotly(), "head map"):
        from .figures import plot_conflict_maps

        return plot_conflict_maps(conflict_map, k=k)
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = head_table(conflict_map, k, unit=unit)
    L, n = int(t["layer"].max()) + 1, int(t["index"].max()) + 1
    grid = lambda col: t[col].to_numpy(dtype=float).reshape(L, n)  # noqa: E731
    hover = np.array([_hover_text(r) for r in t.itertuples()], dtype=object).reshape(L, n)
    kind = "head" if unit == "head" else "K/V group"
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.11,
                        subplot_titles=("O, conflict (1 = orthogonal)", "S, sensitivity (nats/token)",
                                        "C, conflict score"))
    O, S = grid("O"), grid("S")
    o_dev = float(np.nanmax(np.abs(O - 1))) or 1.0
    s_dev = float(np.nanmax(np.abs(S))) or 1.0
    specs = [(O, "RdBu_r", 1 - o_dev, 1 + o_dev, 0.26), (S, "RdBu_r", -s_dev, s_dev, 0.64),
             (grid("C"), "Viridis", None, None, 1.0)]
    for col, (z, scale, lo, hi, x) in enumerate(specs, start=1):
        fig.add_trace(go.Heatmap(z=z, text=hover, hoverinfo="text", colorscale=scale, zmin=lo,
                                 zmax=hi, colorbar=dict(x=x, len=0.9, thickness=10),
                                 name=["O", "S", "C"][col - 1]), row=1, col=col)
        skipped = t[t["skipped"]]
        fig.add_trace(go.Scatter(x=skipped["index"], y=skipped["layer"], mode="markers",
                                 marker=dict(symbol="square-open", size=11, color="black",
                                             line=dict(width=1.5)),
                                 text=[_hover_text(r) for r in skipped.itertuples()],
                                 hoverinfo="text", name="skipped by CAST",
                                 showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text=kind, dtick=1, row=1, col=col)
        fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=col)
    fig.update_layout(height=max(320, 22 * L + 140), width=980, template="simple_white",
                      font=dict(size=12), legend=dict(orientation="h", y=-0.12),
                      title=dict(text=f"Conflict map: top {int(t['skipped'].sum())} {kind}s by C "
                                      "outlined (hover a cell)", font=dict(size=13)))
    return fig


# --------------------------------------------------------------------------------------------------
# Attention of one head on one prompt
# --------------------------------------------------------------------------------------------------


def attention_view(model: Any, prompt: str, layer: int, head: int, *,
                   system_prompt: Optional[str] = None, interactive: Optional[bool] = None):
    """The attention pattern of head (layer, head) on the chat-formatted `prompt`.

    circuitsvis's `attention_heads` view (an `HTMLView`, its script from a CDN) when circuitsvis is
    installed; else a plotly heatmap (query rows x key columns, hover: the two tokens and the
    weight); else (or `interactive=False`) `head_attention.plot_attention_pattern`'s static figure.
    """
    from .head_attention import attention_pattern, plot_attention_pattern

    pats = attention_pattern(model, prompt, [(layer, head)], system_prompt=system_prompt)
    name = f"L{layer}H{head}"
    if not _want(interactive, has_circuitsvis() or has_plotly(), "attention view"):
        return plot_attention_pattern(pats, title=f"{name}: {prompt[:40]!r}")
    tokens = [t.replace("\n", "\\n") for t in pats.prompt.tokens]
    if has_circuitsvis():
        import circuitsvis as cv

        html = cv.attention.attention_heads(attention=pats.patterns, tokens=tokens,
                                            attention_head_names=[name])
        return HTMLView(str(html), title=name)  # str: the CDN script, not 1.3 MB of inline JS
    import plotly.graph_objects as go

    A = pats.patterns[0].numpy()
    labels = [f"{i}: {t}" for i, t in enumerate(tokens)]
    hover = [[f"query {labels[q]}<br>key {labels[j]}<br>weight {A[q, j]:.3f}"
              for j in range(len(tokens))] for q in range(len(tokens))]
    fig = go.Figure(go.Heatmap(z=A, x=labels, y=labels, text=hover, hoverinfo="text",
                               colorscale="Blues", zmin=0, zmax=1))
    fig.update_yaxes(autorange="reversed", title="query token")
    fig.update_xaxes(title="key token")
    fig.update_layout(title=f"{name} attention", width=700, height=640, template="simple_white")
    return fig


# --------------------------------------------------------------------------------------------------
# Per prompt: a head's S on benign prompts, the refusal score on harmful ones
# --------------------------------------------------------------------------------------------------


def prompt_table(model: Any, head: tuple[int, int], benign: Any, harmful: Any, *,
                 batch_size: int = 4):
    """Per prompt, for a head and a prompt picker: on each benign prompt (with its reference
    answer), the head's S = L_util(head mean-ablated) - L_util in nats/token of the answer's
    content tokens; on each harmful prompt, the model's refusal score (log P of a refusal opening,
    nats). Returns a DataFrame with columns `set`, `prompt`, `S`, `refusal_score`."""
    import pandas as pd

    from .data import make_batches
    from .safety import refusal_logprobs
    from .sensitivity import functional_sensitivity

    l, h = int(head[0]), int(head[1])
    batches = make_batches(model, benign, batch_size=batch_size)
    res = functional_sensitivity(model, batches, units=[(l, h)], method="exact")
    per = (res.per_example[:, l, h] / res.tokens.clamp(min=1)).tolist()
    ref = refusal_logprobs(model, harmful, batch_size=batch_size).tolist()
    rows = ([{"set": "benign", "prompt": e.prompt, "S": s, "refusal_score": np.nan}
             for e, s in zip(benign, per)]
            + [{"set": "harmful", "prompt": e.prompt, "S": np.nan, "refusal_score": r}
               for e, r in zip(harmful, ref)])
    return pd.DataFrame(rows)


def head_picker(model: Any, conflict_map: Any, prompts: Sequence[str], *,
                k: Union[int, float] = 0.1):
    """An ipywidgets picker: a head from the top-k by C and a prompt from `prompts`; each change
    draws `attention_view` of that head on that prompt below the menus (a live notebook only: a
    saved notebook keeps no widget output, so display the first view yourself). `None` without
    ipywidgets."""
    try:
        import ipywidgets as W
    except ImportError:
        return None
    from IPython.display import display

    heads = [tuple(u) for u in conflict_map.top_heads(k)]
    pick_h = W.Dropdown(options=[(f"L{l}H{h} (rank {i + 1} by C)", (l, h))
                                 for i, (l, h) in enumerate(heads)], description="head")
    pick_p = W.Dropdown(options=[(p[:60], p) for p in prompts], description="prompt")
    out = W.Output()

    def draw(*_):
        out.clear_output(wait=True)
        with out:
            display(attention_view(model, pick_p.value, *pick_h.value))

    pick_h.observe(draw, "value")
    pick_p.observe(draw, "value")
    return W.VBox([W.HBox([pick_h, pick_p]), out])


__all__ = ["head_table", "head_map", "attention_view", "prompt_table", "head_picker", "to_html",
           "has_plotly", "has_circuitsvis", "HTMLView", "INSTALL_HINT"]
