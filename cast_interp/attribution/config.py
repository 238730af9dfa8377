"""`AttributionConfig`: the settings of one post-hoc attribution (`attribute`), checked on
construction and saved with `to_dict` / `from_dict`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from ..checks import check_int, check_number, check_types
from ..config_io import config_from_dict, config_to_dict
from ..data import UTILITY_REFERENCES, UtilityReference

ExactScope = Literal["screened", "all"]
EXACT_SCOPES = ("screened", "all")
MIN_DRAWS = 20


@dataclass
class AttributionConfig:
    """How `attribute` measures (its defaults are ours, sized for a standalone call; the pipeline's
    presets size it down: `pipeline.config.PIPELINE_DEFAULTS`).

    n_examples: utility examples (the first n; >= 4, None: all), split into halves A (choose) and
        B (measure).
    utility_reference: "self" (the original's own greedy answers to their natural end, at most
        `max_new_tokens`, as the diagnosis) or "dataset" (the examples' answers as given).
    max_new_tokens: cap on those self-reference answers (256: most end on their own).
    exact: "screened" (exact reverts of the candidates and the spread sample) or "all" (every unit;
        slow, and the sum of exact singles is then complete).
    n_candidates: exact reverts from the top of the first-order estimate on half A (None: 2k); the
        top-k is chosen among them, so at least k.
    n_spread: units per kind at evenly spaced first-order ranks, reverted exactly (the check of
        first order against exact beyond the candidates).
    n_draws: random k-sets reverted jointly (>= 20: a percentile among fewer is too coarse).
    n_bootstrap, ci: every CI, a bootstrap over examples (and as many permutations for the
        Spearman p-values).
    batch_size: examples per forward pass; each half is batched longest first, so small batches
        waste little on padding (a CPU pass gains nothing from more).
    seed: the split, the random draws, the bootstraps and the tie-breaks.
    """

    FORMAT: ClassVar[str] = "attribution-config-1"

    n_examples: Optional[int] = 16
    utility_reference: UtilityReference = "self"
    max_new_tokens: int = 256
    exact: ExactScope = "screened"
    n_candidates: Optional[int] = None
    n_spread: int = 30
    n_draws: int = MIN_DRAWS
    n_bootstrap: int = 1000
    ci: float = 0.95
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.exact not in EXACT_SCOPES:
            raise ValueError(f"exact must be 'screened' or 'all', got {self.exact!r}.")
        if self.utility_reference not in UTILITY_REFERENCES:
            raise ValueError(f"utility_reference must be 'self' or 'dataset', got "
                             f"{self.utility_reference!r}.")
        check_types(self)
        if self.n_draws < MIN_DRAWS:
            raise ValueError(f"n_draws must be >= {MIN_DRAWS} (METHOD v2): a percentile among "
                             f"fewer random sets is too coarse to read; got {self.n_draws}.")
        check_int("n_examples", self.n_examples, 4, none_ok=True, what=" (None: all)")
        check_int("n_candidates", self.n_candidates, 1, none_ok=True, what=" (None: 2k)")
        for name, lo in (("n_spread", 1), ("n_bootstrap", 2), ("max_new_tokens", 1),
                         ("batch_size", 1), ("seed", 0)):
            check_int(name, getattr(self, name), lo)
        check_number("ci", self.ci, lo=0, hi=1, lo_open=True, hi_open=True)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AttributionConfig":
        return config_from_dict(cls, d)
