import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from cast_interp import figures
from cast_interp.conflict_map import ConflictMap, combine

matplotlib.use("Agg")


@pytest.fixture
def cmap():
    g = torch.Generator().manual_seed(0)
    O = 2 * torch.rand(6, 4, generator=g)
    S = torch.randn(6, 4, generator=g) * 0.1
    O[2, 1] = float("nan")  # an undefined head must not break a figure
    return ConflictMap(O=O, S=S, C=combine(O, S), config={"combine": {"how": "product"}})


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
    # the top-k heads are labelled in the scatter
    texts = {t.get_text() for t in made["scatter"].axes[0].texts}
    assert texts == {f"L{l}H{h}" for l, h in cmap.top_heads(3)}


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
