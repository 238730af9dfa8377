import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from cast_interp import figures
from cast_interp.conflict_map import ConflictMap, combine, summarize

matplotlib.use("Agg")
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _units(g, L, n):
    O = 2 * torch.rand(L, n, generator=g)
    S = torch.randn(L, n, generator=g) * 0.1
    d = {"O": O, "S": S, "C": combine(O, S), "O_low": O - 0.1, "O_high": O + 0.1,
         "S_low": S - 0.02, "S_high": S + 0.02}
    return d


@pytest.fixture
def cmap():
    """A GQA-shaped map (6 layers x 4 heads, 2 groups) with intervals and a summary."""
    g = torch.Generator().manual_seed(0)
    head, group = _units(g, 6, 4), _units(g, 6, 2)
    head["O"][2, 1] = float("nan")  # an undefined head must not break a figure
    head["C"] = combine(head["O"], head["S"])
    summary = {k: summarize(d, how="rank_product", alpha=0.5, seed=0)
               for k, d in (("head", head), ("group", group))}
    return ConflictMap(head=head, group=group, summary=summary,
                       config={"combine": {"how": "rank_product"}})


def test_diagnosis_figures_write_files(cmap, tmp_path):
    made = {
        "heat": figures.plot_head_heatmap(cmap.S, "S", diverging=True),
        "maps": figures.plot_conflict_maps(cmap),
        "scatter": figures.plot_o_vs_s(cmap, 3),
        "sorted": figures.plot_sorted_c(cmap),
    }
    for name, fig in made.items():
        assert isinstance(fig, Figure)
        exts = ("png", "pdf", "svg") if name == "maps" else ("png",)
        for ext in exts:
            path = figures.save_figure(fig, tmp_path / f"{name}.{ext}", dpi=100)
            assert path.stat().st_size > 1000
    assert (tmp_path / "maps.pdf").read_bytes()[:4] == b"%PDF"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # the top-k heads are labelled in the scatter, with their CIs as error bars
    ax = made["scatter"].axes[0]
    assert {t.get_text() for t in ax.texts} == {f"L{l}H{h}" for l, h in cmap.top_heads(3)}
    assert any("95% CI" in (c.get_label() or "") for c in ax.containers)
    # group boundaries: one white line between the two groups of every head heatmap; a group row
    maps = made["maps"].axes
    assert len([a for a in maps if a.get_xlabel() == "head"]) == 3
    assert len([a for a in maps if a.get_xlabel() == "K/V group"]) == 3
    assert all(len(a.lines) == 1 for a in maps if a.get_xlabel() == "head")
    # the null band and the verdict on the sorted-C figure
    ax2 = made["sorted"].axes[1]
    assert any("null" in (c.get_label() or "") for c in ax2.collections)
    text = " ".join(t.get_text() for t in ax2.texts)
    assert "null" in text and ("concentrated" in text or "not beyond the null" in text)


def test_committed_map_figures_regenerate_from_the_committed_map(tmp_path):
    from matplotlib.image import imread
    import numpy as np

    diag = REPO / "figures" / "run" / "diagnosis"
    if not (diag / "conflict_map.json").exists():
        pytest.skip("no committed conflict map")
    figures.diagnosis_figures(ConflictMap.load(diag), tmp_path, k=0.1)
    for name in ("conflict_maps", "o_vs_s", "sorted_c"):
        a, b = imread(REPO / "figures" / f"{name}.png"), imread(tmp_path / f"{name}.png")
        assert a.shape == b.shape and float(np.abs(a - b).max()) < 0.02, name


def test_save_option_and_bad_suffix(cmap, tmp_path):
    figures.plot_sorted_c(cmap, save=tmp_path / "c.svg")
    assert (tmp_path / "c.svg").exists()
    with pytest.raises(ValueError, match="Unsupported figure format"):
        figures.save_figure(figures.plot_sorted_c(cmap), tmp_path / "c.jpg")
    with pytest.raises(ValueError, match="n_layers, n_heads"):
        figures.plot_head_heatmap(torch.zeros(3), "bad")


def test_vector_output_has_no_creation_date(cmap, tmp_path):
    fig = figures.plot_head_heatmap(cmap.C, "C")
    assert b"CreationDate" not in figures.save_figure(fig, tmp_path / "a.pdf").read_bytes()
    assert b"<dc:date>" not in figures.save_figure(fig, tmp_path / "a.svg").read_bytes()
