"""Interactive views (`cast_interp.viz`): rendered to HTML, the labels and values they carry checked
against the map and the model; and the static fallbacks when the viz extra is absent."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from cast_interp import viz
from cast_interp.conflict_map import ConflictMap, combine, summarize
from cast_interp.head_attention import attention_pattern

plotly = pytest.importorskip("plotly", reason="the viz extra (plotly) is not installed")


@pytest.fixture
def cmap():
    """A 5 layer x 4 head map with CIs, and one head (L3H2) given the highest O and S."""
    g = torch.Generator().manual_seed(1)
    O, S = 2 * torch.rand(5, 4, generator=g), torch.randn(5, 4, generator=g) * 0.01
    O[3, 2], S[3, 2] = 1.9, 0.05
    head = {"O": O, "S": S, "C": combine(O, S), "O_low": O - 0.1, "O_high": O + 0.1,
            "S_low": S - 0.002, "S_high": S + 0.002}
    return ConflictMap(head=head, group={}, summary={"head": summarize(head, how="rank_product",
                                                                       alpha=0.5, seed=0)},
                       config={"combine": {"how": "rank_product"}})


def test_head_table_has_every_head_its_rank_and_whether_it_is_skipped(cmap):
    t = viz.head_table(cmap, k=3)
    assert len(t) == 20 and list(t["label"][:2]) == ["L0H0", "L0H1"]
    top = cmap.top_heads(3)
    assert set(zip(t.loc[t["skipped"], "layer"], t.loc[t["skipped"], "index"])) == set(top)
    assert t.set_index("label").loc["L3H2", "rank"] == 1  # highest O and S: highest C
    ranks = t.set_index(["layer", "index"])["rank"]
    assert [ranks[u] for u in top] == [1, 2, 3]
    row = t.set_index("label").loc["L3H2"]
    assert row["O"] == pytest.approx(1.9) and row["O_low"] == pytest.approx(1.8)
    assert row["S_high"] == pytest.approx(0.052)


def test_head_map_html_carries_each_heads_label_and_values(cmap):
    fig = viz.head_map(cmap, k=3)
    html = viz.to_html(fig)
    assert "cdn.plot.ly" in html and len(html) < 200_000  # plotly.js from its CDN, not inlined
    heat = [tr for tr in fig.data if tr.type == "heatmap"]
    assert [tr.name for tr in heat] == ["O", "S", "C"]
    np.testing.assert_allclose(np.asarray(heat[0].z, dtype=float), cmap.O.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(heat[1].z, dtype=float), cmap.S.numpy(), rtol=1e-6)
    hover = np.asarray(heat[2].text)
    assert hover.shape == (5, 4)
    s = float(cmap.S[3, 2])
    assert hover[3, 2] == (f"<b>L3H2</b><br>O = 1.900 [1.800, 2.000]<br>S = {s:.4f} "
                           f"[{s - 0.002:.3f}, {s + 0.002:.3f}] nats/token<br>C = "
                           f"{float(cmap.C[3, 2]):.3f}<br>rank 1 of 20 by C<br>skipped by CAST")
    assert "trained" in hover[0, 0] or "skipped" in hover[0, 0]
    for l in range(5):
        for h in range(4):
            assert f"L{l}H{h}" in html
    # the skipped heads are outlined in each panel
    marks = [tr for tr in fig.data if tr.type == "scatter"]
    assert len(marks) == 3
    assert sorted(zip(marks[0].y, marks[0].x)) == sorted(cmap.top_heads(3))
    assert heat[0].zmid is None and heat[0].zmin + heat[0].zmax == pytest.approx(2.0)  # O about 1


def _circuitsvis_props(html: str) -> dict:
    start = html.index('{"attention"')
    return json.JSONDecoder().raw_decode(html[start:])[0]


def test_attention_view_shows_the_heads_pattern_on_the_prompt(tiny):
    prompt = "How do I bake bread?"
    want = attention_pattern(tiny, prompt, [(1, 2)])
    view = viz.attention_view(tiny, prompt, 1, 2)
    html = viz.to_html(view)
    if viz.has_circuitsvis():
        props = _circuitsvis_props(html)
        assert props["attentionHeadNames"] == ["L1H2"]
        assert props["tokens"] == [t.replace("\n", "\\n") for t in want.prompt.tokens]
        np.testing.assert_allclose(np.asarray(props["attention"])[0], want.patterns[0].numpy(),
                                   atol=1e-6)
        assert len(html) < 100_000  # the script from the CDN, not inlined


def test_attention_view_with_plotly_only(tiny, monkeypatch):
    monkeypatch.setattr(viz, "has_circuitsvis", lambda: False)
    prompt = "Name a colour."
    want = attention_pattern(tiny, prompt, [(0, 1)])
    fig = viz.attention_view(tiny, prompt, 0, 1)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), want.patterns[0].numpy(),
                               atol=1e-6)
    assert "L0H1 attention" in viz.to_html(fig)


def test_static_fallbacks_without_the_extra(cmap, tiny, monkeypatch):
    monkeypatch.setattr(viz, "has_plotly", lambda: False)
    monkeypatch.setattr(viz, "has_circuitsvis", lambda: False)
    fig = viz.head_map(cmap, k=3)
    assert isinstance(fig, Figure) and len([a for a in fig.axes if a.get_xlabel() == "head"]) == 3
    att = viz.attention_view(tiny, "Hi", 0, 0)
    assert isinstance(att, Figure)
    with pytest.raises(TypeError, match="not an interactive view"):
        viz.to_html(att)
    with pytest.raises(ImportError, match=r"cast_interp\[viz\]"):
        viz.head_map(cmap, interactive=True)
    assert isinstance(viz.head_map(cmap, interactive=False), Figure)


def test_package_imports_without_plotly_or_circuitsvis():
    code = ("import sys; sys.modules['plotly'] = None; sys.modules['circuitsvis'] = None\n"
            "import cast_interp, cast_interp.viz as v, cast_interp.figures\n"
            "assert not v.has_plotly() and not v.has_circuitsvis()\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_prompt_table_per_prompt_s_averages_to_the_heads_s(tiny):
    from cast_interp.data import load_bundled, make_batches
    from cast_interp.sensitivity import functional_sensitivity

    benign, harmful = load_bundled("benign", "test").take(3), load_bundled("harmful", "test").take(2)
    t = viz.prompt_table(tiny, (1, 0), benign, harmful, batch_size=3)
    assert list(t["set"]) == ["benign"] * 3 + ["harmful"] * 2
    assert list(t["prompt"][:3]) == [e.prompt for e in benign]
    res = functional_sensitivity(tiny, make_batches(tiny, benign, batch_size=3), units=[(1, 0)],
                                 method="exact")
    tokens = res.tokens.numpy()
    # per-prompt S, weighted by each prompt's answer tokens, is the head's S over the set
    assert float((t["S"][:3] * tokens).sum() / tokens.sum()) == pytest.approx(float(res.S[1, 0]),
                                                                            rel=1e-4, abs=1e-7)
    assert t["refusal_score"][3:].notna().all() and (t["refusal_score"][3:] < 0).all()
