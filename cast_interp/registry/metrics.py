"""Evaluation metrics: one table, read by the evaluation, the report, the figures, the validation
monitor and the cost model.

Each `MetricSpec` names a metric once (`name`, as in `EvalResult.metrics`) with the key its
per-prompt values are stored under (`key`, in `EvalResult.per_prompt` and every run file), its
direction, its role (safety or utility), the test set it is measured on and its cost. The stored
keys of the generated rates and the task ("refusal", "over_refusal", "task_correct") and of the
curves' KL ("kl") predate the table; they stay as keys so committed runs still read, and
`get_metric` accepts either name.

A new metric is one call; `evaluate` then measures it on its set, and the report compares it
between arms with paired 95% CIs:

    from cast_interp.registry import register_metric

    def answer_length(model, data, *, original=None):
        # data: the ChatDataset of `on` ("benign": prompts with reference answers)
        return [float(len(ex.response)) for ex in data.examples]

    register_metric("answer_length", answer_length, on="benign", lower_is_better=False,
                    role="utility", label="length of the reference answer", unit="characters",
                    cost_s=0.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

Role = Literal["safety", "utility"]
EvalSet = Literal["harmful", "benign", "over_refusal", "task"]
#: compute(model, data, *, original) -> one float (or None: undefined) per example of `data`, in
#: dataset order. original: the frozen pre-tuning model's `OriginalLogprobs` on the benign set (or
#: the model itself), None when the evaluation has none.
Compute = Callable[..., list]


@dataclass(frozen=True)
class MetricSpec:
    """One metric. `compute` None: measured by `evaluate` itself (the built-ins share forward
    passes); `cost`: seconds per example on SmolLM2 with 2 CPU cores, a number or the name of a
    `pipeline.COST_S` entry (0 when it rides on another metric's pass); `generation`: measured on
    generated answers (secondary, skipped without generation); `curve_key`: its key in the training
    curves (`sparse_tuning.ValidationMonitor`), if the monitor measures it."""

    name: str
    key: str
    label: str
    lower_is_better: bool
    role: Role
    on: EvalSet
    short: str = ""
    unit: str = ""
    cost: Union[float, str] = 0.0
    generation: bool = False
    compute: Optional[Compute] = None
    curve_key: Optional[str] = None
    reported: bool = True

    @property
    def role_label(self) -> str:
        """The report's role: "safety", "utility cost" (lower is better) or "utility"."""
        return "utility cost" if self.role == "utility" and self.lower_is_better else self.role

    def cost_s(self, table: dict) -> float:
        return float(table[self.cost]) if isinstance(self.cost, str) else float(self.cost)


METRIC_REGISTRY: dict[str, MetricSpec] = {}   # name -> spec, in table order
_ALIASES: dict[str, str] = {}                  # stored key / curve key -> name


def register_metric(name: str, compute: Optional[Compute] = None, *, on: EvalSet,
                    lower_is_better: bool, role: Role, label: Optional[str] = None,
                    key: Optional[str] = None, short: Optional[str] = None, unit: str = "",
                    cost_s: Union[float, str] = 0.0, generation: bool = False,
                    curve_key: Optional[str] = None, reported: bool = True,
                    replace: bool = False) -> MetricSpec:
    """Add a metric (see the module docstring). `key` defaults to `name`. A metric from outside
    the package needs `compute`; without one, `evaluate` must measure it itself (the built-ins)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"A metric name must be an identifier, got {name!r}.")
    if (name in METRIC_REGISTRY or name in _ALIASES) and not replace:
        raise ValueError(f"Metric {name!r} is already registered; pass replace=True to redefine "
                         "it.")
    if role not in ("safety", "utility"):
        raise ValueError(f"role must be 'safety' or 'utility', got {role!r}.")
    if on not in ("harmful", "benign", "over_refusal", "task"):
        raise ValueError(f"on must be one of ['harmful', 'benign', 'over_refusal', 'task'], got "
                         f"{on!r}.")
    if compute is not None and on == "task":
        raise ValueError("A registered compute function runs on a chat set ('harmful', 'benign' "
                         "or 'over_refusal'), not on the multiple-choice task.")
    key = key or name
    clash = next((n for n, s in METRIC_REGISTRY.items() if n != name and key in (n, s.key)), None)
    if clash:
        raise ValueError(f"Per-prompt key {key!r} is already metric {clash!r}'s.")
    spec = MetricSpec(name, key, label or name.replace("_", " "), bool(lower_is_better), role, on,
                      short or label or name.replace("_", " "), unit, cost_s, generation, compute,
                      curve_key, reported)
    METRIC_REGISTRY[name] = spec
    for alias in {key, curve_key} - {name, None}:
        _ALIASES[alias] = name
    return spec


def unregister_metric(name: str) -> None:
    spec = METRIC_REGISTRY.pop(name, None)
    if spec is not None:
        for alias in (spec.key, spec.curve_key):
            if _ALIASES.get(alias) == name:
                del _ALIASES[alias]


def get_metric(name: str) -> MetricSpec:
    """A metric by its name, its per-prompt key or its curve key ("refusal" -> refusal_rate)."""
    name = _ALIASES.get(name, name)
    if name not in METRIC_REGISTRY:
        raise ValueError(f"Unknown metric {name!r}; registered: {metric_names()} (add one with "
                         "cast_interp.registry.register_metric).")
    return METRIC_REGISTRY[name]


def metric_names() -> list[str]:
    """Every metric, in table order (generation-free endpoints first)."""
    return list(METRIC_REGISTRY)


def by_key() -> dict[str, MetricSpec]:
    """{per-prompt key: spec} of the reported metrics, in the report's order."""
    return {s.key: s for s in sorted(METRIC_REGISTRY.values(), key=_report_order)
            if s.reported}


def computed() -> list[MetricSpec]:
    """The metrics `evaluate` measures through their `compute` (registered from outside)."""
    return [s for s in METRIC_REGISTRY.values() if s.compute is not None]


def curve_key(name: str) -> str:
    """The training curves' key of a metric the validation monitor measures."""
    spec = get_metric(name)
    if spec.curve_key is None:
        raise ValueError(f"Metric {spec.name!r} is not measured along training.")
    return spec.curve_key


# The report's table order (ours): utility cost on the benign set first, then safety; the order
# the built-ins had in `report.METRICS`. A registered metric goes after them.
_REPORT_FIRST = ("kl_to_original", "refusal_score", "refusal_rate", "over_refusal_score",
                 "over_refusal_rate", "reference_nll", "task_accuracy")


def _report_order(spec: MetricSpec) -> tuple[int, int]:
    names = metric_names()
    first = _REPORT_FIRST.index(spec.name) if spec.name in _REPORT_FIRST else len(_REPORT_FIRST)
    return (first, names.index(spec.name))


# The built-in metrics, in `evaluate`'s table order (generation-free first). Costs: entries of
# `pipeline.COST_S`; KL and the reference NLL come from one forward pass (its cost on KL), the two
# generated rates from one generation.
register_metric("refusal_score", on="harmful", lower_is_better=False, role="safety",
                label="refusal score (log P of a refusal opening) on harmful test prompts",
                short="refusal score, harmful", unit="log P, nats", cost_s="refusal_score",
                curve_key="refusal_score")
register_metric("refusal_rate", on="harmful", key="refusal", lower_is_better=False,
                role="safety", generation=True, cost_s="generate_32",
                label="refusal rate (generated answers, judged) on harmful test prompts",
                short="refusal rate, harmful (generated)", unit="fraction")
register_metric("over_refusal_score", on="over_refusal", lower_is_better=True, role="utility",
                label="refusal score on safe-but-alarming prompts (over-refusal)",
                short="over-refusal score", unit="log P, nats", cost_s="refusal_score")
register_metric("over_refusal_rate", on="over_refusal", key="over_refusal",
                lower_is_better=True, role="utility", generation=True, cost_s="generate_32",
                label="over-refusal rate (generated answers) on safe-but-alarming prompts",
                short="over-refusal rate (generated)", unit="fraction")
register_metric("kl_to_original", on="benign", lower_is_better=True, role="utility",
                label="KL(original ‖ tuned) on benign test prompts",
                short="KL to original, benign", unit="nats/token", cost_s="kl_nll",
                curve_key="kl")
register_metric("reference_nll", on="benign", lower_is_better=True, role="utility",
                label="NLL of held-out benign references", short="NLL of benign references",
                unit="nats/token", cost_s=0.0)
register_metric("task_accuracy", on="task", key="task_correct", lower_is_better=False,
                role="utility", label="task accuracy (multiple choice by log-likelihood)",
                short="task accuracy", unit="fraction", cost_s="task_item")


def report_table() -> dict[str, tuple[str, bool, str]]:
    """{per-prompt key: (label, lower_is_better, role)}: `report.METRICS` as it was, now live."""
    return {k: (s.label, s.lower_is_better, s.role_label) for k, s in by_key().items()}


class LiveTable(dict):
    """A read-only mapping that re-reads `report_table()` on every access (so `report.METRICS`
    and `figures`' lookups see metrics registered after import)."""

    def _t(self) -> dict:
        return report_table()

    def __getitem__(self, k: Any):
        return self._t()[k]

    def __contains__(self, k: object) -> bool:
        return k in self._t()

    def __iter__(self):
        return iter(self._t())

    def __len__(self) -> int:
        return len(self._t())

    def get(self, k: Any, default: Any = None):
        return self._t().get(k, default)

    def keys(self):
        return self._t().keys()

    def items(self):
        return self._t().items()

    def values(self):
        return self._t().values()

    def __repr__(self) -> str:
        return repr(self._t())
