"""Every figure of a finished run, from its saved files alone (`run_figures`; `read_results` checks
the fields they read)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..io import read_json
from .markdown import attribution_figure_name


def plot_safety_curves(pieces: dict[str, dict], *, k: Optional[int] = None):
    """Safety and utility cost along training per arm (`figures.plot_safety_curves`)."""
    from ..figures import plot_safety_curves as _plot

    return _plot(pieces, k=k)


def plot_paired_differences(comparisons: dict, *, ref: str = "random"):
    """Every endpoint, each arm minus `ref`, paired 95% CIs (`figures.plot_paired_differences`)."""
    from ..figures import plot_paired_differences as _plot

    return _plot(comparisons, ref=ref)


def plot_endpoints(comparisons: dict):
    """End points per arm with their own (unpaired) 95% CIs (`figures.plot_endpoints`)."""
    from ..figures import plot_endpoints as _plot

    return _plot(comparisons)


def _save(fig, path: Path) -> None:
    from ..figures import save_figure

    for ext in ("png", "pdf"):
        save_figure(fig, path.with_suffix(f".{ext}"))


def read_results(path) -> dict:
    """A run's results.json with the fields the report and figures read checked: a wrong schema
    (a hand edit, another version) is a one-line ValueError naming the file and field."""
    from ..io import json_field

    doc = read_json(path, expect=dict)
    json_field(doc, "config", dict, path)
    json_field(doc["config"], "unit", str, path, where="config.")
    comp = json_field(doc, "comparisons", dict, path)
    json_field(comp, "ks", list, path, where="comparisons.")
    json_field(doc, "summary", list, path)
    for name, arm in json_field(doc, "arms", dict, path).items():
        json_field(arm, "eval", dict, path, where=f"arms.{name}.")
        json_field(arm, "per_prompt", dict, path, where=f"arms.{name}.")
    return doc


def run_figures(out_dir, fig_dir=None) -> list[Path]:
    """Every figure of a finished run, regenerated from its saved files alone (no model needed).

    Reads `out_dir/results.json`, `diagnosis/` and `attribution/`; writes PNG and PDF into
    `fig_dir` (default `out_dir/figures`). Returns the written paths."""
    from .. import figures
    from ..conflict_map import ConflictMap
    from ..pipeline.rundir import RunDir

    run = RunDir(out_dir)
    fig_dir = Path(fig_dir) if fig_dir is not None else run.figures
    doc = read_results(run.results)
    cmap = ConflictMap.load(run.diagnosis)
    k = doc["comparisons"]["ks"][0] if doc["comparisons"]["ks"] else 1
    figures.diagnosis_figures(cmap, fig_dir, k=k if doc["config"]["unit"] == "head" else 0.1)
    _save(plot_safety_curves(doc["arms"]), fig_dir / "safety_curves")
    _save(plot_paired_differences(doc["comparisons"]), fig_dir / "paired_differences")
    _save(plot_endpoints(doc["comparisons"]), fig_dir / "endpoints")
    _save(figures.plot_training_curves(doc["arms"]), fig_dir / "training_curves")
    if len(doc["comparisons"]["ks"]) > 1:  # one budget: nothing to draw against k
        _save(figures.plot_drop_vs_k(doc["summary"]), fig_dir / "drop_vs_k")
    from ..attribution import META_FILE, AttributionResult

    for meta in sorted(run.attribution.glob(f"*/{META_FILE}")):
        res = AttributionResult.load(meta.parent)
        name = attribution_figure_name(res.config.get("label") or meta.parent.name)
        _save(figures.plot_attribution_vs_map(res, cmap, k=k), fig_dir / name)
    return sorted(fig_dir.glob("*.p*"))
