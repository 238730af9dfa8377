"""The notebooks, executed as tests (nbclient, kernel python3, working directory notebooks/).

Each notebook runs with small settings put into its `parameters` cell; a cell appended at the end
prints what the test checks as one JSON line, so the checks are on the notebook's own values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
COMMITTED_RUN = REPO / "figures" / "run_v2"
# One budget k in the smoke and committed runs: no drop_vs_k (it needs a sweep of k).
FIGURES = {"conflict_maps", "o_vs_s", "sorted_c", "safety_curves", "paired_differences",
           "endpoints", "training_curves", "attribution_vs_map"}
MARK = "TEST-RESULT "


def execute(name: str, parameters: str | None = None, report: str | None = None,
            timeout: int = 600) -> tuple[nbformat.NotebookNode, dict]:
    """Run notebooks/`name` with its parameters cell replaced; returns the executed notebook and the
    JSON that the appended `report` expression printed."""
    nb = nbformat.read(NB_DIR / name, as_version=4)
    if parameters is not None:
        [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        cell.source = parameters
    if report is not None:
        nb.cells.append(nbformat.v4.new_code_cell(
            f"import json as _json\nprint({MARK!r} + _json.dumps({report}))"))
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NB_DIR)}}).execute()
    found = {}
    for line in stream_text(nb).splitlines():
        if line.startswith(MARK):
            found = json.loads(line[len(MARK):])
    return nb, found


def stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")


def n_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """A finished tiny-model run (every stage, smallest settings; about a minute)."""
    from cast_interp.pipeline import RunConfig, run_experiment

    out = tmp_path_factory.mktemp("smoke_run")
    run_experiment(RunConfig.from_preset("smoke", model="tiny", out_dir=str(out)), progress=False)
    return out


# --------------------------------------------------------------------------------------------------
# What is committed
# --------------------------------------------------------------------------------------------------


def test_there_are_three_notebooks_each_with_one_parameters_cell():
    assert [p.name for p in NOTEBOOKS] == ["01_teaching_demo.ipynb", "02_explore_smollm2.ipynb",
                                           "03_paper_figures.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_carry_their_outputs_and_run_time(path):
    """Committed executed, top to bottom, without an error, so that they read like articles on
    GitHub; each says how long it took on 2 CPU cores; no local path of the machine that ran it."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), path.name
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], path.name
    assert sum(bool(c.outputs) for c in code) >= len(code) // 2, path.name
    prose = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert re.search(r"Run time: [0-9.]+ (s|min) on 2 CPU cores", prose), path.name
    text = json.dumps([c.outputs for c in code])
    assert "/tmp/" not in text and "/work/" not in text and "/home/" not in text, path.name


def test_notebook_prose_matches_the_code():
    from cast_interp.conflict_map import ConflictMap  # noqa: F401
    from cast_interp.diagnose import DiagnosisConfig
    from cast_interp.pipeline import RunConfig

    text = {p.name: "".join(c.source for c in nbformat.read(p, as_version=4).cells)
            for p in NOTEBOOKS}
    assert DiagnosisConfig().combine == "rank_product"
    assert "product of percentile\nranks" in text["01_teaching_demo.ipynb"] or \
        "product of percentile ranks" in text["01_teaching_demo.ipynb"].replace("\n", " ")
    assert "min-max scaling over all heads" not in text["01_teaching_demo.ipynb"]
    assert "--out-dir" not in text["02_explore_smollm2.ipynb"]
    assert "O_ci_low" not in text["02_explore_smollm2.ipynb"]
    assert RunConfig().out_dir  # `--out` is the run's flag
    assert 'FIG_DIR = "../figures"' not in text["03_paper_figures.ipynb"]


# --------------------------------------------------------------------------------------------------
# 01: the teaching demo on the planted model
# --------------------------------------------------------------------------------------------------


def test_teaching_notebook_finds_the_planted_head_and_skipping_it_keeps_utility():
    nb, got = execute("01_teaching_demo.ipynb", report=(
        '{"L_safe": results["L_safe"].to_dict(), "L_util": results["L_util"].to_dict(), '
        '"recovered": attr.utility_recovered[0].tolist(), "S_by_hand": ablated - base, '
        '"S": float(cmap.S[0, H_STAR])}'))
    text = stream_text(nb)
    # Each score alone picks the wrong head; C needs both (printed by the notebook).
    assert "top head by O: H_WEAK (layer 0, head 2)" in text
    assert "top head by S: H_ALIGN (layer 0, head 1)" in text
    assert "top head by C: H_STAR (layer 0, head 0)" in text
    assert got["S_by_hand"] == pytest.approx(got["S"], rel=0.05)  # mean ablation by hand = diagnose
    safe, util = got["L_safe"], got["L_util"]
    assert safe["original"] > 1.5 and all(safe[a] < 0.1 for a in safe if a != "original")
    assert util["full"] > util["original"] + 1.0  # the alignment tax
    assert util["CAST k=2"] < util["original"] + 0.05  # skipping the top 2 by C: no tax
    assert util["CAST k=2"] < util["CAST k=1"] < util["full"] < util["control"]
    star, align, weak, trigger = got["recovered"]
    assert min(star, weak) > 10 * max(abs(align), abs(trigger))  # the conflict heads caused it
    assert n_images(nb) == 4


# --------------------------------------------------------------------------------------------------
# 02: exploring a model's map (tiny model here; SmolLM2 below)
# --------------------------------------------------------------------------------------------------

REPORT_02 = ('{"top_heads": top_heads, '
             '"prompt_share_harmful": table[("harmful", "prompt")].tolist(), '
             '"n_layers": model.cfg.n_layers}')


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The bootstrap resamples batches")  # 4 examples: one batch
@pytest.mark.parametrize("source", ["saved run", "computed"])
def test_explore_notebook_on_the_tiny_model(source, smoke_run, tmp_path):
    import torch

    from cast_interp.conflict_map import ConflictMap
    from cast_interp.data import load_bundled
    from cast_interp.diagnose import DiagnosisConfig, diagnose
    from cast_interp.head_attention import REGIONS, attention_by_region
    from cast_interp.model import load_model

    run_dir = smoke_run if source == "saved run" else tmp_path / "no_run"
    nb, got = execute("02_explore_smollm2.ipynb",
                      f'RUN_DIR = "{run_dir}"\nMODEL = "tiny"\nN_PROMPTS = 4\nTOP_K = 3\n'
                      'PROMPT_INDEX = 1',
                      report=REPORT_02)
    text = stream_text(nb)
    model = load_model("tiny")
    if source == "saved run":
        assert f"Loaded the conflict map of {run_dir}" in text
        cmap = ConflictMap.load(run_dir / "diagnosis")
    else:
        assert "No diagnosis" in text
        torch.manual_seed(0)
        cmap = diagnose(model, load_bundled("harmful", "calibration"),
                        load_bundled("benign", "calibration"),
                        DiagnosisConfig(n_calibration=4, n_sensitivity=4, batch_size=4,
                                        sensitivity_method="attribution", max_new_tokens=32,
                                        n_bootstrap=50))
    assert [tuple(h) for h in got["top_heads"]] == cmap.top_heads(3)
    att = attention_by_region(model, load_bundled("harmful", "test").take(4))
    want = [float(att[l, h, REGIONS.index("prompt")]) for l, h in cmap.top_heads(3)]
    assert got["prompt_share_harmful"] == pytest.approx(want, abs=1e-6)
    assert n_images(nb) == 6  # 3 map figures, the difference heatmap, 2 patterns
    # the interactive views (the viz extra is in dev): the top head's attention, the map's hover
    html = "".join(o.get("data", {}).get("text/html", "") for c in nb.cells
                   if c.cell_type == "code" for o in c.outputs)
    l, h = cmap.top_heads(1)[0]
    assert f'"attentionHeadNames": ["L{l}H{h}"]' in html
    [plot] = [o["data"]["application/vnd.plotly.v1+json"] for c in nb.cells
              if c.cell_type == "code" for o in c.outputs
              if "application/vnd.plotly.v1+json" in o.get("data", {})]
    heat_c = [t for t in plot["data"] if t["type"] == "heatmap"][2]
    assert heat_c["text"][l][h].startswith(f"<b>L{l}H{h}</b><br>O = ")
    assert "rank 1 of" in heat_c["text"][l][h]


@pytest.mark.slow
@pytest.mark.smollm2
def test_explore_notebook_on_smollm2(tmp_path):
    run_dir = COMMITTED_RUN if (COMMITTED_RUN / "diagnosis").exists() else tmp_path / "no_run"
    nb, got = execute("02_explore_smollm2.ipynb",
                      f'RUN_DIR = "{run_dir}"\nMODEL = "smollm2-135m-instruct"\nN_PROMPTS = 4\n'
                      'TOP_K = 3\nPROMPT_INDEX = 0', report=REPORT_02)
    assert "30 layers x 9 heads, 3 key/value groups" in stream_text(nb)
    assert got["n_layers"] == 30 and len(got["top_heads"]) == 3
    assert all(0.0 <= s <= 1.0 for s in got["prompt_share_harmful"])
    assert n_images(nb) == 6


# --------------------------------------------------------------------------------------------------
# 03: the paper figures from saved files
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_paper_figures_notebook_writes_every_figure(smoke_run, tmp_path):
    from cast_interp.io import read_json

    fig_dir = tmp_path / "figs"
    nb, _ = execute("03_paper_figures.ipynb", f'RUN_DIR = "{smoke_run}"\nFIG_DIR = "{fig_dir}"')
    written = {p.name for p in fig_dir.iterdir()}
    assert written == {f"{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")}
    assert all((fig_dir / n).stat().st_size > 1000 for n in written)
    assert n_images(nb) == len(FIGURES)
    markdown = "".join(o["data"].get("text/markdown", "") for c in nb.cells
                       if c.cell_type == "code" for o in c.outputs if "data" in o)
    assert "## Verdict" in markdown and "| arm | pieces |" in markdown  # the report's tables
    top = read_json(smoke_run / "results.json")["diagnosis"]["top_units"]
    assert "heads CAST skips: " + ", ".join(f"L{l}H{h}" for l, h in top) in stream_text(nb)


@pytest.mark.slow
def test_committed_figures_equal_the_ones_regenerated_from_the_committed_run(tmp_path):
    if not (COMMITTED_RUN / "results.json").exists():
        pytest.skip("figures/run_v2 (the committed v2 run) is absent")
    from matplotlib.image import imread

    fig_dir = tmp_path / "figs"
    execute("03_paper_figures.ipynb", f'RUN_DIR = "{COMMITTED_RUN}"\nFIG_DIR = "{fig_dir}"')
    committed = {p.name for p in (REPO / "figures").glob("*.png")}
    assert committed == {p.name for p in fig_dir.glob("*.png")}
    for name in sorted(committed):
        a, b = imread(REPO / "figures" / name), imread(fig_dir / name)
        assert a.shape == b.shape, name
        assert float(np.abs(a.astype(float) - b.astype(float)).max()) < 0.02, name
