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

    diag = REPO / "figures" / "run_v2" / "diagnosis"
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


# --------------------------------------------------------------------------------------------------
# The one style: sizes, fonts, marks, labels
# --------------------------------------------------------------------------------------------------


def _texts(fig):
    """Every visible text of a figure (titles, labels, ticks, legends, annotations), drawn."""
    from matplotlib.text import Text

    fig.draw_without_rendering()
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_every_diagnosis_figure_is_a_paper_size_with_text_of_at_least_8_pt(cmap):
    from cast_interp import style

    for fig in (figures.plot_conflict_maps(cmap, k=3), figures.plot_o_vs_s(cmap, 3),
                figures.plot_sorted_c(cmap)):
        w = fig.get_size_inches()[0]
        assert w in (pytest.approx(style.ONE_COLUMN), pytest.approx(style.TWO_COLUMN))
        small = [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < 8]
        assert not small


def test_conflict_maps_outline_the_top_k_heads_and_centre_o_at_1(cmap):
    from matplotlib.patches import Rectangle

    fig = figures.plot_conflict_maps(cmap, k=3)
    heads = [a for a in fig.axes if a.get_xlabel() == "head"]
    top = cmap.top_heads(3)
    for ax in heads:  # O, S and C of the heads: one black box per flagged head, at its cell
        boxes = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
        assert sorted((round(b.get_y() + 0.5), round(b.get_x() + 0.5)) for b in boxes) == sorted(top)
    o_norm = heads[0].images[0].norm
    assert o_norm.vcenter == 1.0 and o_norm.vmin == pytest.approx(2 - o_norm.vmax)
    s_norm = heads[1].images[0].norm
    assert s_norm.vcenter == 0.0
    assert "nats/token" in " ".join(a.get_ylabel() for a in fig.axes)  # S's colour bar
    assert [a.get_title("left")[:len("$\\mathbf{a}$")] for a in fig.axes[:1]] == ["$\\mathbf{a}$"]


def test_o_vs_s_labels_do_not_overlap(cmap):
    fig = figures.plot_o_vs_s(cmap, 8, n_labels=6)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    labels = [t for t in ax.texts]
    assert len(labels) == 6
    assert {t.get_text() for t in labels} == {f"L{l}H{h}" for l, h in cmap.top_heads(8)[:6]}
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    r = FigureCanvasAgg(fig).get_renderer()
    boxes = [t.get_window_extent(r) for t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    assert "nats/token" in ax.get_ylabel()


def test_drop_vs_k_needs_a_sweep_of_k():
    rows = [{"method": "full", "k": 0, "kl_to_original": 0.1},
            {"method": "cast", "k": 3, "kl_to_original": 0.05}]
    with pytest.raises(ValueError, match="at least two budgets"):
        figures.plot_drop_vs_k(rows)
    rows.append({"method": "cast", "k": 6, "kl_to_original": 0.07})
    ax = figures.plot_drop_vs_k(rows).axes[0]
    assert list(ax.get_xticks()) == [3, 6]


def _comparisons():
    """A compare_arms-shaped document: two endpoints at k = 3, CAST ranked 2 of 9."""
    def diff(d, lo, hi):
        return {"diff": d, "low": lo, "high": hi, "significant": not lo <= 0 <= hi}

    def block(cast, full):
        return {"rows": [{"arm": "full_k0", "method": "full", "k": 0, "vs_random": diff(*full)},
                         {"arm": "cast_k3", "method": "cast", "k": 3, "vs_random": diff(*cast)},
                         {"arm": "random_k3", "method": "random", "k": 3, "vs_random": None}],
                "cast_rank": {"rank": 2, "n_draws": 8, "p": 0.22}}

    return {"seeds": [0, 1, 2, 3], "ks": [3],
            "metrics": {"kl_to_original": {3: block((-0.002, -0.003, -0.001), (0.005, 0.004, 0.006))},
                        "task_correct": {3: block((0.01, -0.02, 0.04), (-0.01, -0.03, 0.01))}},
            "endpoints": {3: {m: {"kl_to_original": {"mean": v, "low": v - 0.01, "high": v + 0.01},
                                  "refusal_score": {"mean": -2.0, "low": -2.2, "high": -1.8}}
                              for m, v in (("full", 0.1), ("cast", 0.09), ("random", 0.092))}}}


def test_paired_differences_names_arms_marks_better_and_gives_cast_rank():
    fig = figures.plot_paired_differences(_comparisons())
    panels = [a for a in fig.axes if a.axison]
    assert len(panels) == 2  # one per endpoint (and a text panel)
    kl, acc = panels
    names = [t.get_text() for t in kl.get_yticklabels()]
    assert names == ["full tuning", "CAST (k=3)\nrank 2 of 9"]  # CAST on top
    assert "better: ← lower" in kl.get_xlabel() and "nats/token" in kl.get_xlabel()
    assert "better: higher →" in acc.get_xlabel()
    assert "\\times 10^{-3}" in kl.get_xlabel()  # the power in the label, ticks divided by it
    assert kl.xaxis.get_major_formatter()(-0.002, 0) == "-2"
    # the CAST point and its CI, as given
    cast_line = [c for c in kl.containers][1].lines[0]
    assert cast_line.get_xdata()[0] == pytest.approx(-0.002)


def test_endpoints_say_their_cis_are_unpaired():
    fig = figures.plot_endpoints(_comparisons())
    assert "unpaired" in fig.axes[0].get_title()
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {
        "full tuning", "CAST (k=3)", "random (k=3)"}


def test_attribution_figure_quotes_the_exact_spearman_and_marks_frozen_heads():
    run = REPO / "figures" / "run_v2"
    if not (run / "attribution" / "cast").exists():
        pytest.skip("no committed attribution")
    from cast_interp.attribution import AttributionResult

    cmap = ConflictMap.load(run / "diagnosis")
    full = AttributionResult.load(run / "attribution" / "full")
    rho = full.analysis["map"]["head"]["exact"]["C"]["spearman"]
    fig = figures.plot_attribution_vs_map(full, cmap, k=27)
    assert f"= {rho:.2f} [" in fig.axes[0].get_title("left")
    assert "exact reverts" in fig.axes[0].get_title("left")
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "map's top-27 by C: 100th percentile" in legend
    cast = AttributionResult.load(run / "attribution" / "cast")
    fig = figures.plot_attribution_vs_map(cast, cmap, k=27)
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "frozen in this arm" in legend and "map's top-27 by C:" not in legend
