"""Evaluation (stage 3): how safe a model is, and how much utility it kept.

The measures live in two modules: `safety` (refusal score, refusal rate and the refusal judge) and
`utility` (KL to the original, reference NLL, over-refusal, task accuracy). This module runs the
standard set, `evaluate`, and returns an `EvalResult` that carries its configuration, the data
fingerprints, the model id, the judge's measured accuracy, the time of each part, and **(v2)** the
per-prompt value of every metric, so that arms and seeds can be compared by paired bootstrap over
prompts. The utility drop of a method is `tuned.delta(original)`.

Primary endpoints are generation-free (refusal score, over-refusal score, KL, NLL, task accuracy):
cheap, smooth and deterministic. The generated refusal rates (greedy, >= 32 tokens) are secondary;
`EvalConfig(generation=False)` skips them. Everything is deterministic (greedy decoding, teacher
forcing, fixed data order).

Every name that lived here before the split is re-exported, so `from cast_interp.evaluate import
refusal_score` keeps working.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Literal, Optional, Sequence, Union

import torch

from . import backend
from .backend import Model

from .data import ChatDataset
from .checks import check_int, check_types
from .config_io import config_from_dict, config_to_dict
from .io import atomic_write_json, read_json
from .registry.metrics import computed as _registered_metrics, metric_names
from .safety import (  # noqa: F401  (re-exported)
    PUBLIC_REFUSAL_PREFIXES,
    REFUSAL_OPENINGS,
    REFUSAL_PHRASES,
    DataLike,
    MetricValue,
    as_dataset,
    is_refusal,
    judge_accuracy,
    judge_answers,
    refusal_logprobs,
    refusal_rate,
    refusal_reason,
    refusal_score,
)
from .utility import (  # noqa: F401  (re-exported)
    BatchesLike,
    check_same_vocab,
    gsm8k_accuracy,
    kl_to_original,
    last_number,
    load_mc_items,
    load_mmlu_csv,
    multiple_choice_accuracy,
    OriginalLogprobs,
    over_refusal_rate,
    reference_nll,
    task_accuracy,
    utility_per_prompt,
)

#: Generation of the refusal rates needs at least this many new tokens (METHOD v2): refusals that
#: open with a sentence of empathy or context show only later.
MIN_NEW_TOKENS = 32


@dataclass
class EvalConfig:
    """What `evaluate` measures on which data (kept in every `EvalResult`).

    n_*: how many examples of each set (the first n; None = all, the default: METHOD v2 evaluates
    on all test prompts). max_new_tokens: greedy tokens per answer for the refusal rates (>= 32;
    fewer warns). generation: False skips the generated refusal rates (generation-free metrics
    only, e.g. along training). task: multiple-choice items for task accuracy ("bundled", an MMLU
    .csv, a .jsonl; None skips it), scored by `task_normalize`. tokens: "content" (v2) or
    "response" (v1, with the end-of-turn token) for KL and NLL. `seed` seeds torch before
    evaluating; greedy evaluation draws no random numbers, so it is recorded for completeness.
    group_by_length: KL and NLL batch the benign examples sorted by length (less padding, the same
    per-prompt values to float rounding; an `original=OriginalLogprobs` must be built with the same
    setting). The refusal scores' prompts are always batched by length.
    """

    n_harmful: Optional[int] = None
    n_benign: Optional[int] = None
    n_over_refusal: Optional[int] = None
    n_task: Optional[int] = None
    max_new_tokens: int = MIN_NEW_TOKENS
    batch_size: int = 16
    generation_batch_size: int = 64
    harmful: str = "bundled:harmful:test"
    benign: str = "bundled:benign:test"
    over_refusal: str = "bundled:over_refusal"
    task: Optional[str] = "bundled"
    task_normalize: Literal["sum", "mean"] = "sum"
    generation: bool = True
    refusal_scope: Literal["opening", "anywhere"] = "opening"
    tokens: Literal["content", "response"] = "content"
    openings: tuple[str, ...] = REFUSAL_OPENINGS
    n_examples: int = 3
    seed: int = 0
    group_by_length: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("n_harmful", "n_benign", "n_over_refusal", "n_task"):
            check_int(name, getattr(self, name), 1, none_ok=True, what=" (None: all)")
        for name in ("batch_size", "generation_batch_size"):
            check_int(name, getattr(self, name), 1)
        check_int("n_examples", self.n_examples, 0)
        # 0 new tokens judges empty answers: every refusal rate would read 0.
        check_int("max_new_tokens", self.max_new_tokens, 1 if self.generation else 0)
        choices = {"task_normalize": ("sum", "mean"), "refusal_scope": ("opening", "anywhere"),
                   "tokens": ("content", "response")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.generation and self.max_new_tokens < MIN_NEW_TOKENS:
            warnings.warn(f"max_new_tokens={self.max_new_tokens} < {MIN_NEW_TOKENS}: METHOD v2 "
                          "judges refusals on at least 32 generated tokens.", stacklevel=3)

    FORMAT: ClassVar[str] = "eval-config-1"

    def to_dict(self) -> dict:
        return config_to_dict(self)  # openings as a list

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        return config_from_dict(cls, d, convert=lambda d: {
            **d, **({"openings": tuple(d["openings"])} if "openings" in d else {})})


#: The built-in metric names in table order (generation-free endpoints first). The metrics
#: registry (`registry/metrics.py`) is the source: `metric_names()` adds registered ones.
METRICS = tuple(metric_names())


@dataclass
class EvalResult:
    """Metrics of one model, with everything needed to trace and re-analyse them.

    metrics: refusal_score and over_refusal_score (mean log-prob of a refusal opening on harmful /
    over-refusal prompts; higher refuses more), refusal_rate (higher safer) and over_refusal_rate
    (lower better; both None without generation), kl_to_original (None without an original),
    reference_nll (lower better), task_accuracy and task_chance (None without a task).
    per_prompt: the per-prompt values behind each mean, in dataset order ("refusal_score",
    "refusal" 0/1, "over_refusal_score", "over_refusal" 0/1, "kl_to_original", "reference_nll",
    "content_tokens", "task_correct" 0/1); the mean of a list is its metric. answers: the generated
    answers (so they can be re-judged). judge: the refusal judge and its accuracy on the labelled
    set. data: `describe()` of each set; model: `model_id`; timings_s: seconds per part, with the
    totals "generation" and "generation_free"; examples: a few prompts with answers.
    """

    metrics: dict[str, Optional[float]]
    config: dict
    data: dict[str, dict]
    model: dict
    time_s: float
    timings_s: dict[str, float] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    per_prompt: dict[str, list[Optional[float]]] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    judge: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        d = dict(d)
        if "timings" in d and "timings_s" not in d:  # v1 files
            d["timings_s"] = d.pop("timings")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def save_json(self, path: Union[str, Path]) -> None:
        """Write the result as JSON, atomically (NaN per-prompt values become null)."""
        atomic_write_json(self.to_dict(), path)

    @classmethod
    def load_json(cls, path: Union[str, Path]) -> "EvalResult":
        return cls.from_dict(read_json(path))

    def delta(self, other: "EvalResult") -> dict[str, Optional[float]]:
        """Metric differences self - other (e.g. tuned.delta(original)); None where one is None."""
        keys = list(self.metrics) + [k for k in other.metrics if k not in self.metrics]
        a, b = self.metrics, other.metrics
        return {k: (a[k] - b[k] if a.get(k) is not None and b.get(k) is not None else None)
                for k in keys}


def _eval_sets(config: EvalConfig, harmful, benign, over_refusal) -> dict[str, ChatDataset]:
    given = {"harmful": harmful, "benign": benign, "over_refusal": over_refusal}
    n = {"harmful": config.n_harmful, "benign": config.n_benign,
         "over_refusal": config.n_over_refusal}
    sets = {k: as_dataset(v if v is not None else getattr(config, k), k).take(n[k])
            for k, v in given.items()}
    sets["benign"].require_responses()
    return sets


def _describe_items(spec: str, items: Sequence[dict]) -> dict:
    sha = hashlib.sha256(json.dumps([[it["question"], list(it["choices"]), it["answer_index"]]
                                     for it in items]).encode()).hexdigest()[:12]
    return {"name": spec, "source": spec, "n": len(items), "sha": sha}


def _judge_summary(scope: str) -> dict:
    acc = judge_accuracy(scope=scope)  # type: ignore[arg-type]
    return {"name": "cast_interp.safety.is_refusal", "scope": scope,
            "labelled_set": "bundled/refusal_judge_labels.jsonl",
            **{k: acc[k] for k in ("accuracy", "precision", "recall", "n", "n_refusal")}}


def evaluate(
    model: Model,
    *,
    original: Union[Model, OriginalLogprobs, None] = None,
    config: Optional[EvalConfig] = None,
    harmful: Optional[DataLike] = None,
    benign: Optional[DataLike] = None,
    over_refusal: Optional[DataLike] = None,
    task_items: Optional[Sequence[dict]] = None,
    progress: bool = False,
) -> EvalResult:
    """Safety and utility of `model` (stage 3), with per-prompt values.

    Datasets default to the config's specs (all bundled test prompts); each is cut to the config's
    n. harmful -> refusal_score, refusal_rate; over_refusal -> over_refusal_score,
    over_refusal_rate; benign (with reference responses) -> reference_nll and, with `original` (a
    frozen pre-tuning copy, or its `OriginalLogprobs` on this benign set, which saves its forward
    passes when many models are evaluated), kl_to_original, from the same forward passes;
    task_items (default: the config's task) -> task_accuracy and task_chance.
    """
    config = config or EvalConfig()
    if original is not None:
        check_same_vocab(model, original.model if isinstance(original, OriginalLogprobs)
                         else original)
    with backend.inference_layout(model):  # once for all its measures
        return _evaluate(model, original, config, harmful, benign, over_refusal, task_items,
                         progress)


def _evaluate(model: Model, original, config: EvalConfig, harmful, benign, over_refusal,
              task_items, progress: bool) -> EvalResult:
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    sets = _eval_sets(config, harmful, benign, over_refusal)
    task_spec = "memory" if task_items is not None else config.task
    if task_items is None and config.task is not None:
        task_items = load_mc_items(config.task, n=config.n_task)
    timings: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t, 3)
        return out

    score = {k: timed(f"{k.replace('harmful', 'refusal')}_score", lambda k=k: refusal_score(
        model, sets[k], openings=config.openings, batch_size=config.batch_size))
        for k in ("harmful", "over_refusal")}
    util = timed("reference_nll+kl", lambda: utility_per_prompt(
        model, sets["benign"], original=original, batch_size=config.batch_size,
        tokens=config.tokens, group_by_length=config.group_by_length))
    task = timed("task_accuracy", lambda: task_accuracy(
        model, task_items, normalize=config.task_normalize, batch_size=config.batch_size)
    ) if task_items is not None else None
    # Metrics registered from outside the package (`register_metric`): each on its own set.
    extra = {spec: timed(spec.name, lambda spec=spec: _registered_values(spec, model, sets[spec.on],
                                                                         original))
             for spec in _registered_metrics() if not spec.generation}
    timings["generation_free"] = round(sum(timings.values()), 3)
    gen = timed("generation", lambda: _generated_refusals(model, sets, config, progress)
                ) if config.generation else None
    if config.generation:
        extra.update({spec: timed(spec.name, lambda spec=spec: _registered_values(
            spec, model, sets[spec.on], original)) for spec in _registered_metrics()
            if spec.generation})

    def mean(values):
        return None if values is None else float(torch.as_tensor(values, dtype=torch.float64
                                                                 ).nanmean())

    per_prompt = {
        "refusal_score": score["harmful"].per_prompt,
        "over_refusal_score": score["over_refusal"].per_prompt,
        "reference_nll": util["reference_nll"].tolist(),
        "content_tokens": util["n_tokens"].tolist(),
    }
    if original is not None:
        per_prompt["kl_to_original"] = util["kl_to_original"].tolist()
    if gen is not None:
        per_prompt["refusal"] = [float(r) for r in gen["harmful"]["refused"]]
        per_prompt["over_refusal"] = [float(r) for r in gen["over_refusal"]["refused"]]
    if task is not None:
        per_prompt["task_correct"] = [float(c) for c in task["correct"]]
    metrics = {
        "refusal_score": float(score["harmful"]), "refusal_rate": mean(per_prompt.get("refusal")),
        "over_refusal_score": float(score["over_refusal"]),
        "over_refusal_rate": mean(per_prompt.get("over_refusal")),
        "kl_to_original": mean(per_prompt.get("kl_to_original")),
        "reference_nll": mean(per_prompt["reference_nll"]),
        "task_accuracy": task["accuracy"] if task else None,
        "task_chance": task["chance"] if task else None,
    }
    for spec, values in extra.items():
        per_prompt[spec.key] = values
        metrics[spec.name] = mean(values)
    timings["generation_free_share"] = round(
        timings["generation_free"] / max(timings["generation_free"] + timings.get("generation", 0),
                                         1e-9), 3)
    from .model import model_id

    data = {k: v.describe() for k, v in sets.items()}
    if task_items is not None:
        data["task"] = _describe_items(task_spec or "memory", task_items)
    answers = {k: v["answers"] for k, v in gen.items()} if gen else {}
    examples = {k: [{"prompt": p, "answer": a, "refused": r} for p, a, r in zip(
        sets[k].prompts, gen[k]["answers"], gen[k]["refused"])][: config.n_examples]
        for k in ("harmful", "over_refusal")} if gen else {}
    return EvalResult(
        metrics=metrics, config=config.to_dict(), data=data, model=model_id(model),
        time_s=round(time.perf_counter() - t0, 3), timings_s=timings, examples=examples,
        per_prompt=per_prompt, answers=answers,
        judge=_judge_summary(config.refusal_scope) if gen else {},
    )


def _registered_values(spec, model: Model, data: ChatDataset, original) -> list[float]:
    """A registered metric's per-prompt values on its set (None -> NaN: undefined), checked."""
    values = list(spec.compute(model, data, original=original))
    if len(values) != len(data):
        raise ValueError(f"Metric {spec.name!r} returned {len(values)} values for the "
                         f"{len(data)} examples of its set {spec.on!r}: its compute function "
                         "must return one value per example, in dataset order.")
    return [float("nan") if v is None else float(v) for v in values]


def _generated_refusals(model: Model, sets: dict[str, ChatDataset],
                        config: EvalConfig, progress: bool) -> dict[str, dict]:
    """Greedy answers to the harmful and over-refusal prompts, judged, per set."""
    # Both sets are generated in one call: on CPU each decoding step has a fixed cost, so one batch
    # of both sets is nearly twice as fast as two (same answers: batched greedy generation equals
    # unbatched).
    both = ChatDataset("harmful+over_refusal",
                       sets["harmful"].examples + sets["over_refusal"].examples)
    joint = refusal_rate(model, both, max_new_tokens=config.max_new_tokens,
                         batch_size=config.generation_batch_size, scope=config.refusal_scope,
                         progress=progress)
    n_h = len(sets["harmful"])
    parts = {"harmful": slice(0, n_h), "over_refusal": slice(n_h, None)}
    return {k: {key: joint[key][s] for key in ("refused", "reasons", "answers")}
            for k, s in parts.items()}


def format_table(results: Union[dict[str, EvalResult], Sequence[EvalResult]], *,
                 digits: int = 3) -> str:
    """A markdown table, one row per result (named by the dict key, else by the model name)."""
    if isinstance(results, dict):
        named = list(results.items())
    else:
        named = [(str(r.model.get("model_name") or f"#{i}"), r) for i, r in enumerate(results)]
    if not named:
        raise ValueError("No results to tabulate.")
    names = metric_names()
    cols = names + sorted({k for _, r in named for k in r.metrics} - set(names))
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in named:
        cells = ["-" if r.metrics.get(c) is None else f"{r.metrics[c]:.{digits}f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
