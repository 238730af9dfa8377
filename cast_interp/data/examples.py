"""Prompt/response examples and datasets (`ChatExample`, `ChatDataset`), the bundled data shipped
with the package (`load_bundled`), and splitting one set into calibration / train / test."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterator, Literal, Optional, Sequence

Split = Literal["calibration", "train", "test"]
BundledKind = Literal["harmful", "benign", "over_refusal"]


class DataError(ValueError):
    """Bad or missing data; the message names the problem and the fix."""


@dataclass(frozen=True)
class ChatExample:
    """One user turn and (optionally) the assistant's reference response.

    `meta["truncated"] = True` marks a response cut by a length limit (it did not end): it is
    tokenized without an end-of-turn token after it (see `encode_example`).
    """

    prompt: str
    response: Optional[str] = None
    category: Optional[str] = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def truncated(self) -> bool:
        """Whether the response was cut by a length limit (`meta["truncated"]`, False if absent)."""
        flag = self.meta.get("truncated", False)
        if not isinstance(flag, bool):
            raise DataError(f"meta['truncated'] must be True or False, got {flag!r} (prompt starts: "
                            f"{self.prompt[:60]!r}); a string such as 'False' would read as true.")
        return flag


@dataclass
class ChatDataset:
    """A named list of `ChatExample`s with where it came from (kept in every result's metadata)."""

    name: str
    examples: list[ChatExample]
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[ChatExample]:
        return iter(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ChatDataset(f"{self.name}[{i.start}:{i.stop}]", self.examples[i], self.source)
        return self.examples[i]

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    @property
    def n_truncated(self) -> int:
        """How many responses were cut by a length limit (`meta["truncated"]`)."""
        return sum(e.truncated for e in self.examples)

    def fingerprint(self) -> str:
        """Short hash of the prompts, responses and truncated flags, so a result names exactly which
        data it used (a cut answer is different data: it is tokenized without end-of-turn)."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(e.prompt.encode())
            h.update(b"\x00")
            h.update((e.response or "").encode())
            # Only a truncated example adds a byte, so fingerprints of untruncated data are unchanged.
            h.update(b"\x01\x02" if e.truncated else b"\x01")
        return h.hexdigest()[:12]

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "n": len(self), "sha": self.fingerprint(),
                "n_truncated": self.n_truncated}

    def take(self, n: Optional[int]) -> "ChatDataset":
        """The first `n` examples (all if `n` is None)."""
        if n is None or n >= len(self):
            return self
        return ChatDataset(f"{self.name}[:{n}]", self.examples[:n], self.source)

    def require_responses(self) -> "ChatDataset":
        missing = [i for i, e in enumerate(self.examples) if not e.response]
        if missing:
            raise DataError(
                f"Dataset {self.name!r} has {len(missing)} examples without a response (first: "
                f"#{missing[0]}). A loss needs reference responses: use `with_refusals` for harmful "
                "prompts or `self_reference` for benign ones."
            )
        return self


def _nonempty(ds: ChatDataset) -> ChatDataset:
    if len(ds) == 0:
        raise DataError(f"Dataset {ds.name!r} from {ds.source or 'memory'} is empty.")
    return ds


# --------------------------------------------------------------------------------------------------
# Bundled data
# --------------------------------------------------------------------------------------------------


def load_bundled(kind: BundledKind, split: Optional[Split] = None) -> ChatDataset:
    """The project's own data: `harmful` (prompt + refusal), `benign` (prompt + answer),
    `over_refusal` (safe prompts that look unsafe; no split)."""
    if kind not in ("harmful", "benign", "over_refusal"):
        raise DataError(f"Unknown bundled dataset {kind!r}: use 'harmful', 'benign' or 'over_refusal'.")
    if split not in (None, "calibration", "train", "test"):
        raise DataError(f"Unknown split {split!r}: use 'calibration', 'train' or 'test'.")
    text = resources.files("cast_interp").joinpath("bundled", f"{kind}.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
    examples = [ChatExample(r["prompt"], r.get("response"), r.get("category")) for r in rows]
    name = f"bundled:{kind}" + (f":{split}" if split else "")
    return _nonempty(ChatDataset(name, examples, source=f"cast_interp/bundled/{kind}.jsonl"))


def bundled_refusals() -> list[str]:
    """The refusal responses of the bundled harmful data (used to pair external harmful prompts)."""
    return [e.response for e in load_bundled("harmful", "train") if e.response]


def with_refusals(ds: ChatDataset, *, seed: int = 0) -> ChatDataset:
    """Pair each prompt that has no response with a refusal drawn (seeded) from the bundled ones.

    External harmful sets (AdvBench's `target` is an affirmative "Sure, here is ...") carry no
    refusal, and D_safe needs one.
    """
    rng = random.Random(seed)
    refusals = bundled_refusals()
    ex = [e if e.response and not _affirmative(e.response) else
          ChatExample(e.prompt, rng.choice(refusals), e.category, e.meta) for e in ds.examples]
    return ChatDataset(ds.name + "+refusals", ex, ds.source)


def _affirmative(text: str) -> bool:
    return text.strip().lower().startswith(("sure", "here is", "here's", "certainly"))


# --------------------------------------------------------------------------------------------------
# Splits of one set into calibration / train / test
# --------------------------------------------------------------------------------------------------

SPLITS: tuple[Split, ...] = ("calibration", "train", "test")
SPLIT_FRACTIONS = (0.25, 0.5, 0.25)
"""Shares of a single data file given to calibration, train and test (ours: the bundled sets'
50/100/50), so no example is both trained on or diagnosed with and then evaluated."""


def split_dataset(ds: ChatDataset, *, seed: int = 0,
                  fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, ChatDataset]:
    """{"calibration", "train", "test"}: disjoint parts of `ds` from a seeded permutation (the
    same seed gives the same split; names record the seed)."""
    n = len(ds)
    n_cal, n_train = round(fractions[0] * n), round(fractions[1] * n)
    sizes = (n_cal, n_train, n - n_cal - n_train)
    if min(sizes) < 2:
        raise DataError(f"{ds.name!r} has {n} examples: too few to split into calibration, train "
                        f"and test ({sizes}); give at least 8, or three specs (one per split).")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for name, size in zip(SPLITS, sizes):
        idx = sorted(order[start:start + size])  # file order within a split
        out[name] = ChatDataset(f"{ds.name}:{name}(split seed {seed})",
                                [ds.examples[i] for i in idx], ds.source)
        start += size
    return out


def check_held_out(splits: dict[str, ChatDataset]) -> None:
    """DataError if the test split shares a prompt with calibration or train (not held out)."""
    seen = {e.prompt for name in ("calibration", "train") for e in splits[name]}
    shared = [e.prompt for e in splits["test"] if e.prompt in seen]
    if shared:
        raise DataError(f"The test set {splits['test'].name!r} shares {len(shared)} prompt(s) with "
                        f"calibration or train (first: {shared[0][:60]!r}): it is not held out. "
                        "Pass disjoint files, or one file to be split.")
