"""Data: the two calibration sets of CAST, and the loaders and tokenization every stage shares.

CAST needs prompt/response pairs, formatted with the model's chat template, with the loss taken on
response tokens only:

- D_safe: harmful prompts paired with refusals (safety objective L_safe);
- D_util: benign prompts paired with reference answers (utility objective L_util), either a dataset's
  answer or the model's own greedy answer before training ("self-reference", see `self_reference`);
- safe-but-alarming prompts (XSTest-style) to measure over-refusal.

The package ships its own small bundled data (`load_bundled`), written for this project, split into
`calibration` (diagnosis), `train` (safety fine-tuning) and `test` (evaluation). Loaders read the
standard public formats (AdvBench, JailbreakBench, XSTest, Alpaca, refusal-direction splits, GSM8K,
any CSV/JSON/JSONL with named columns) and Hugging Face dataset names when the hub is reachable.

A dataset spec string, as the CLI takes it:
    "bundled:harmful:test"      bundled file and split (split optional)
    "advbench:/path/file.csv"   a format name and a path (format inferred from the name if omitted)
    "/path/file.jsonl"          a local file; columns guessed (prompt/instruction/goal/question...)
    "hf:org/name[:split]"       a Hugging Face dataset (needs the hub)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union, get_args

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .checks import check_int

Split = Literal["calibration", "train", "test"]
BundledKind = Literal["harmful", "benign", "over_refusal"]

PROMPT_COLUMNS = ("prompt", "instruction", "goal", "Goal", "question", "input", "text")
RESPONSE_COLUMNS = ("response", "output", "answer", "target", "completion")


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
# Loaders for standard formats
# --------------------------------------------------------------------------------------------------


def _check_file(path: Union[str, Path]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"Data file {p} does not exist. Check the path (or use a bundled dataset, "
                        "e.g. 'bundled:harmful:test').")
    if p.is_dir():
        raise DataError(f"Data path {p} is a folder: pass a .csv, .json or .jsonl file in it.")
    return p


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # strict: an unclosed quote is an error, not every later row merged into one cell.
            with open(path, newline="", encoding="utf-8") as f:
                return _check_csv_rows(list(csv.DictReader(f, strict=True)), path)
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
            bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r, dict)]
            if bad:
                raise DataError(f"{path}: row {bad[0]} is not a JSON object ({len(bad)} such rows); "
                                "each line must be an object with named fields, e.g. "
                                '{"prompt": "..."}.')
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text("utf-8"))
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{path}: JSON object must hold exactly one list of rows.")
                data = lists[0]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: JSON must be a list of objects (rows with named fields).")
            return list(data)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} could not be parsed as {suffix[1:].upper()}: {exc}") from exc
    except RecursionError as exc:
        raise DataError(f"{path} could not be parsed as {suffix[1:].upper()}: nested too deeply "
                        "to be rows of data.") from exc
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .json or .jsonl).")


def _check_csv_rows(rows: list[dict], path: Path) -> list[dict]:
    """A row whose number of cells differs from the header's (a stray comma or quote): an error."""
    for i, r in enumerate(rows):
        if None in r or any(v is None for v in r.values()):
            raise DataError(f"{path}: row {i + 2} has a different number of cells than the header; "
                            "check its commas and quotes (a cell with a comma must be quoted).")
    return rows


def _column(rows: list[dict], wanted: Optional[str], candidates: Sequence[str], path: Path,
            what: str, required: bool = True) -> Optional[str]:
    if not rows:
        return None
    cols = list(rows[0].keys())
    if wanted is not None:
        if wanted not in cols:
            raise DataError(f"{path} has no column {wanted!r} (columns: {cols}).")
        return wanted
    for c in candidates:
        if c in cols:
            return c
    if required:
        raise DataError(f"{path}: no {what} column found among {cols}; name it explicitly "
                        f"(e.g. prompt_column=...). Looked for {list(candidates)}.")
    return None


def load_table(
    path: Union[str, Path], *, prompt_column: Optional[str] = None,
    response_column: Optional[str] = None, input_column: Optional[str] = None,
    category_column: Optional[str] = None, name: Optional[str] = None,
    filter: Optional[dict[str, str]] = None,
) -> ChatDataset:
    """Any CSV / JSON / JSONL file of rows with named columns.

    Columns are guessed when not given (prompt: prompt/instruction/goal/question...; response:
    response/output/answer/...). `input_column` (Alpaca's `input`) is appended to the prompt when
    non-empty; `filter` keeps rows whose columns equal the given values.
    """
    p = _check_file(path)
    rows = _read_rows(p)
    if filter:
        for k in filter:
            if rows and k not in rows[0]:
                raise DataError(f"{p} has no column {k!r} to filter on (columns: {list(rows[0])}).")
        rows = [r for r in rows if all(str(r.get(k)) == v for k, v in filter.items())]
    pc = _column(rows, prompt_column, PROMPT_COLUMNS, p, "prompt")
    rc = _column(rows, response_column, RESPONSE_COLUMNS, p, "response", required=False)
    cc = _column(rows, category_column, ("category", "Category", "type"), p, "category",
                 required=False)
    examples = []
    for i, r in enumerate(rows):
        prompt = _prompt_of(r, pc, p, i)
        if input_column and str(r.get(input_column) or "").strip():
            prompt = f"{prompt}\n\n{str(r[input_column]).strip()}"
        resp = r.get(rc) if rc else None
        cat = r.get(cc) if cc else None  # JSON null / empty cell: no category, not "None"
        examples.append(ChatExample(prompt, str(resp).strip() if resp else None,
                                    str(cat) if cat not in (None, "") else None))
    return _nonempty(ChatDataset(name or p.stem, examples, source=str(p)))


def _prompt_of(row: dict, column: str, path: Path, i: int) -> str:
    """The row's prompt, stripped; a missing, null, non-text or empty prompt is an error naming the
    row (a JSON null would otherwise become the prompt "None", and an empty one be scored)."""
    v = row.get(column)
    if not isinstance(v, str):
        # A number (NaN included) would become the prompt "12345" / "nan": refused, not guessed.
        what = ("no" if column not in row else "a null" if v is None else
                f"a non-text ({type(v).__name__} {v!r:.20})")
        raise DataError(f"{path}: row {i + 1} has {what} {column!r} value; every row needs a "
                        "text prompt (fix or drop the row; quote a number to use it as text).")
    prompt = str(v).strip()
    if not prompt:
        raise DataError(f"{path}: row {i + 1} has an empty {column!r}; drop the row or fill it in.")
    return prompt


def load_advbench(path: Union[str, Path]) -> ChatDataset:
    """AdvBench harmful behaviours (`goal,target`). `target` is affirmative, so it is dropped:
    pair the prompts with refusals via `with_refusals` for training."""
    ds = load_table(path, prompt_column="goal", response_column=None, name="advbench")
    return ChatDataset(ds.name, [ChatExample(e.prompt, None, "advbench") for e in ds], ds.source)


def load_jailbreakbench(path: Union[str, Path]) -> ChatDataset:
    """JBB-Behaviors (`Goal,Target,Behavior,Category,...`); affirmative `Target` dropped."""
    ds = load_table(path, prompt_column="Goal", category_column="Category", name="jailbreakbench")
    return ChatDataset(ds.name, [ChatExample(e.prompt, None, e.category) for e in ds], ds.source)


def load_xstest(path: Union[str, Path], *, label: Literal["safe", "unsafe"] = "safe") -> ChatDataset:
    """XSTest prompts with the given label; `safe` ones measure over-refusal."""
    return load_table(path, prompt_column="prompt", category_column="type", name=f"xstest-{label}",
                      filter={"label": label})


def load_alpaca(path: Union[str, Path]) -> ChatDataset:
    """Alpaca `{instruction, input, output}`; `input` appended to the instruction when present."""
    return load_table(path, prompt_column="instruction", input_column="input",
                      response_column="output", name="alpaca")


def load_refusal_direction(path: Union[str, Path]) -> ChatDataset:
    """refusal-direction splits (`[{instruction, category}]`, Arditi et al. 2024)."""
    return load_table(path, prompt_column="instruction", category_column="category",
                      name=Path(path).stem)


def load_gsm8k(path: Union[str, Path]) -> ChatDataset:
    """GSM8K JSONL `{question, answer}`; the numeric answer (after `####`) is kept in `meta`."""
    ds = load_table(path, prompt_column="question", response_column="answer", name="gsm8k")
    ex = [ChatExample(e.prompt, e.response, "gsm8k",
                      {"final_answer": (e.response or "").split("####")[-1].strip().replace(",", "")})
          for e in ds]
    return ChatDataset(ds.name, ex, ds.source)


def load_hf(name: str, *, split: str = "train", prompt_column: Optional[str] = None,
            response_column: Optional[str] = None) -> ChatDataset:
    """A Hugging Face dataset by name (needs the `datasets` package and the hub)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("Loading a Hugging Face dataset needs `pip install datasets`.") from exc
    try:
        hf = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(f"Could not load Hugging Face dataset {name!r} (split {split!r}): {exc}. "
                        "Without the hub, download it as a file and pass its path.") from exc
    rows = [dict(r) for r in hf]
    pc = _column(rows, prompt_column, PROMPT_COLUMNS, Path(name), "prompt")
    rc = _column(rows, response_column, RESPONSE_COLUMNS, Path(name), "response", required=False)
    ex = [ChatExample(_prompt_of(r, pc, Path(name), i), str(r[rc]) if rc and r.get(rc) else None)
          for i, r in enumerate(rows)]
    return _nonempty(ChatDataset(f"hf:{name}:{split}", ex, source=f"hf:{name}"))


_FORMATS = {
    "advbench": load_advbench,
    "jailbreakbench": load_jailbreakbench,
    "xstest": load_xstest,
    "alpaca": load_alpaca,
    "refusal_direction": load_refusal_direction,
    "gsm8k": load_gsm8k,
    "table": load_table,
}


def load_dataset(spec: Union[str, ChatDataset]) -> ChatDataset:
    """A dataset from a spec string (see module docstring) or a `ChatDataset` (returned as is)."""
    if isinstance(spec, ChatDataset):
        return _nonempty(spec)
    if spec.startswith("bundled:"):
        parts = spec.split(":")
        return load_bundled(parts[1], parts[2] if len(parts) > 2 else None)  # type: ignore[arg-type]
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        return load_hf(parts[0], split=parts[1] if len(parts) > 1 else "train")
    fmt, _, rest = spec.partition(":")
    if rest and fmt in _FORMATS:
        return _FORMATS[fmt](rest)
    path = Path(spec)
    stem = path.stem.lower()
    for key, loader in (("advbench", load_advbench), ("jailbreakbench", load_jailbreakbench),
                        ("xstest", load_xstest), ("alpaca", load_alpaca), ("gsm8k", load_gsm8k),
                        ("harmful_", load_refusal_direction), ("coconot", load_coconot),
                        ("safety_only_data", load_safety_pairs)):
        if key in stem:
            return loader(path)
    return load_table(path)


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


# --------------------------------------------------------------------------------------------------
# Tokenization with the chat template, loss on response tokens only
# --------------------------------------------------------------------------------------------------


@dataclass
class ChatBatch:
    """Right-padded token ids, the mask of the tokens the loss is on, and the mask of content tokens.

    `loss_mask[b, p]` is True where the loss is taken at token p: `-log P(tokens[b, p] |
    tokens[b, :p])`. From `make_batches`, that is the response and (by default) its end-of-turn
    token. `content_mask[b, p]` is True on the response's own tokens only: never the end-of-turn
    token, the chat template or padding; it is always a subset of `loss_mask`. The diagnosis losses
    use content tokens (METHOD v2). Right padding needs no attention mask under causal attention, so a
    batch is run as `model(batch.tokens)`.

    `content_mask=None` (for callers that build batches without it, e.g. `sparse_tuning._collate`)
    means "the same as `loss_mask`": such a batch does not know which of its loss tokens are
    end-of-turn tokens, so build diagnosis batches with `make_batches`.

    `indices` (from `make_batches(..., group_by_length=True)`): the dataset index of each row, so
    per-prompt results can be put back in dataset order (`in_dataset_order`). None: the rows are
    the batches' examples in dataset order.
    """

    tokens: Int[Tensor, "batch pos"]
    loss_mask: Bool[Tensor, "batch pos"]
    prompt_lengths: list[int]
    content_mask: Optional[Bool[Tensor, "batch pos"]] = None
    indices: Optional[list[int]] = None

    def __post_init__(self):
        if self.content_mask is None:
            self.content_mask = self.loss_mask
        if self.content_mask.shape != self.loss_mask.shape:
            raise DataError(f"content_mask has shape {tuple(self.content_mask.shape)} but "
                            f"loss_mask has {tuple(self.loss_mask.shape)}; they must match (one "
                            "per token).")

    @property
    def n_response_tokens(self) -> int:
        """Tokens the loss is on (`loss_mask`), the weight of this batch in a token mean."""
        return int(self.loss_mask.sum())

    @property
    def n_content_tokens(self) -> int:
        return int(self.content_mask.sum())

    def to(self, device) -> "ChatBatch":
        return ChatBatch(self.tokens.to(device), self.loss_mask.to(device), self.prompt_lengths,
                         self.content_mask.to(device), self.indices)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def example_lengths(batch: ChatBatch) -> Tensor:
    """Number of tokens of each example up to its last loss token (the end-of-turn when it is in
    the loss; the last content token with `end_of_turn_in_loss=False`), at least its prompt.

    Computed from the masks, not from the pad id (SmolLM2 pads with a token that also ends turns).
    """
    T = batch.tokens.shape[1]
    pos = torch.arange(1, T + 1).expand_as(batch.loss_mask)
    last_resp = (pos * batch.loss_mask.cpu()).amax(dim=1)
    prompt = torch.tensor(batch.prompt_lengths, dtype=torch.long)
    return torch.maximum(last_resp, prompt)


def padded_token_share(batches: Sequence[ChatBatch]) -> float:
    """Share of the tokens a forward over `batches` computes (rows x width) that are padding: 0
    when every row fills its batch. An example's tokens are counted by `example_lengths` (up to
    its last loss token)."""
    computed = sum(b.tokens.numel() for b in batches)
    real = sum(int(example_lengths(b).sum()) for b in batches)
    return (computed - real) / computed if computed else 0.0


def in_dataset_order(values: Tensor, batches: Sequence[ChatBatch]) -> Tensor:
    """Per-row values `[n, ...]`, concatenated in the batches' row order, put back in dataset order
    (rows of batches without `indices` are taken to be in dataset order already)."""
    if all(b.indices is None for b in batches):
        return values
    if any(b.indices is None for b in batches):
        raise DataError("Some batches record their dataset order (group_by_length) and some do "
                        "not: build all of them with one make_batches call.")
    order = torch.tensor([i for b in batches for i in b.indices], dtype=torch.long)
    if len(order) != len(values) or not torch.equal(order.sort().values,
                                                    torch.arange(len(values))):
        raise DataError("The batches' indices are not a permutation of their rows: build them "
                        "with one make_batches(..., group_by_length=True) call.")
    out = torch.empty_like(values)
    out[order.to(values.device)] = values
    return out


def format_prompt(tokenizer: Any, prompt: str, *, system_prompt: Optional[str] = None) -> str:
    """The chat-formatted text of a user turn, ending where the assistant's answer begins."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # Base models without a template: a plain instruction format (ours).
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: its model family's (`registry/models.py`; e.g.
    `<|eot_id|>` for Llama 3, `<|im_end|>` for SmolLM2), else EOS."""
    from .registry.models import end_of_turn_token

    token = end_of_turn_token(tokenizer)
    if token is not None:
        tid = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(tid, int) and tid >= 0 and (tid != unk or token == tokenizer.unk_token):
            return int(tid)
    return int(tokenizer.eos_token_id)


def _ends_turn(example: ChatExample) -> bool:
    """Whether an end-of-turn token follows the response: not without a response, nor after a cut
    one (a truncated answer did not end, so teaching "stop here" at its cut would be false)."""
    return example.response is not None and not example.truncated


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (end-of-turn, role markers, padding...): text that
    tokenizes into one of them acts as chat-template control, not as words."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def check_special_tokens(tokenizer: Any, dataset: "ChatDataset", *, allow: bool = False) -> None:
    """DataError naming the first example whose prompt or response holds text that the tokenizer
    turns into a special token (e.g. "<|end|><|assistant|>Sure" ends the user's turn and opens a
    forged assistant turn), unless `allow` (the option to keep them as control tokens)."""
    if allow:
        return
    special = special_token_ids(tokenizer)
    if not special:
        return
    for i, ex in enumerate(dataset):
        for field_name, text in (("prompt", ex.prompt), ("response", ex.response)):
            if not text:
                continue
            found = [t for t in tokenizer(text, add_special_tokens=False)["input_ids"]
                     if t in special]
            if found:
                names = sorted({tokenizer.convert_ids_to_tokens(t) for t in found})
                raise DataError(
                    f"{dataset.name}: example #{i + 1}'s {field_name} holds the chat template's "
                    f"special token(s) {names} ({len(found)} in all): as text they would act as "
                    "turn markers (a forged turn). Remove them, or allow them explicitly "
                    "(allow_special_tokens=True, --allow-special-tokens).")


def encode_example(tokenizer: Any, example: ChatExample, *,
                   system_prompt: Optional[str] = None) -> tuple[list[int], int]:
    """(token ids of prompt + response [+ end-of-turn], number of prompt tokens).

    The end-of-turn token is appended unless the example has no response or is truncated
    (`meta["truncated"]`). Prompt and response are tokenized separately so the boundary is exact.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, example.prompt, system_prompt=system_prompt),
                           add_special_tokens=False)["input_ids"]
    if example.response is None:
        return list(prompt_ids), len(prompt_ids)
    resp_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    eot = [end_of_turn_id(tokenizer)] if _ends_turn(example) else []
    return list(prompt_ids) + list(resp_ids) + eot, len(prompt_ids)


def make_batches(
    tokenizer_or_model: Any,
    dataset: ChatDataset,
    *,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    system_prompt: Optional[str] = None,
    require_response: bool = True,
    end_of_turn_in_loss: bool = True,
    group_by_length: bool = False,
) -> list[ChatBatch]:
    """Tokenize a dataset into right-padded `ChatBatch`es, in dataset order (deterministic).

    Args:
        tokenizer_or_model: a `HookedTransformer` (its tokenizer and context length) or a tokenizer.
        max_length: longest allowed sequence; defaults to the model's `n_ctx`. A longer example is
            an error naming it (we never truncate silently: a cut response changes the loss).
        end_of_turn_in_loss: True (default; training, where the model must learn to stop) puts the
            end-of-turn token in `loss_mask`; False makes `loss_mask` equal `content_mask`, as the
            diagnosis losses L_safe and L_util use (METHOD v2). The token stays in `tokens` either
            way, so both settings run the same sequences.
        group_by_length: batch the examples sorted by length (shortest first, ties in dataset
            order) so a batch pads little (`padded_token_share`); each batch records its rows'
            dataset indices (`ChatBatch.indices`) and per-prompt results go back to dataset order
            with `in_dataset_order`. Same examples, same values up to float rounding.
    """
    tokenizer = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    n_ctx = getattr(getattr(tokenizer_or_model, "cfg", None), "n_ctx", None)
    max_length = max_length or n_ctx
    if tokenizer is None:
        raise DataError("The model has no tokenizer; pass one (model.set_tokenizer(...)).")
    _nonempty(dataset)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    if require_response:
        dataset.require_responses()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for i, ex in enumerate(dataset):
        ids, n_prompt = encode_example(tokenizer, ex, system_prompt=system_prompt)
        if max_length is not None and len(ids) > max_length:
            _too_long(dataset, i, len(ids), max_length, "the model's context"
                      if max_length == n_ctx else "max_length")
        content_end = len(ids) - int(_ends_turn(ex))
        encoded.append((ids, n_prompt, content_end))
    order = (sorted(range(len(encoded)), key=lambda i: len(encoded[i][0])) if group_by_length
             else list(range(len(encoded))))
    batches = []
    for start in range(0, len(encoded), batch_size):
        rows = order[start:start + batch_size]
        chunk = [encoded[i] for i in rows]
        width = max(len(ids) for ids, _, _ in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        loss = torch.zeros((len(chunk), width), dtype=torch.bool)
        content = torch.zeros((len(chunk), width), dtype=torch.bool)
        for b, (ids, n_prompt, content_end) in enumerate(chunk):
            tokens[b, : len(ids)] = torch.tensor(ids)
            content[b, n_prompt:content_end] = True
            loss[b, n_prompt: len(ids) if end_of_turn_in_loss else content_end] = True
        if require_response and not loss.any():
            raise DataError(f"A batch of {dataset.name!r} has no response tokens; the loss would "
                            "be undefined. Check that responses are non-empty.")
        batches.append(ChatBatch(tokens, loss, [n for _, n, _ in chunk], content,
                                 rows if group_by_length else None))
    return batches


def _too_long(ds: ChatDataset, i: int, n: int, limit: int, what: str, extra: str = "") -> None:
    raise DataError(
        f"Example #{i} of {ds.name!r} is {n} tokens{extra}, longer than {what} ({limit}) (prompt "
        f"starts: {ds.examples[i].prompt[:60]!r}). Drop or shorten such examples, or use a model "
        "with a longer context.")


def check_fits(model: Any, dataset: ChatDataset, *, new_tokens: int = 0,
               with_response: bool = True) -> None:
    """DataError, before any work, for the first example that does not fit the model's context:
    prompt (+ response and end-of-turn if `with_response`) + `new_tokens` to generate."""
    n_ctx = model.cfg.n_ctx
    for i, ex in enumerate(dataset):
        if not with_response:
            ex = ChatExample(ex.prompt)
        n = len(encode_example(model.tokenizer, ex)[0])
        if n + new_tokens > n_ctx:
            extra = f" + {new_tokens} to generate" if new_tokens else ""
            _too_long(dataset, i, n, n_ctx, "the model's context", extra)


# --------------------------------------------------------------------------------------------------
# Self-reference answers
# --------------------------------------------------------------------------------------------------


UtilityReference = Literal["self", "dataset"]
"""Where L_util's responses come from: "self", the model's own greedy answers before training
(`self_reference`), or "dataset", the utility set's own responses."""
UTILITY_REFERENCES: tuple[str, ...] = get_args(UtilityReference)

SELF_REFERENCE_FORMAT = 2
"""Version of the self-reference cache: 2 = answers to their natural end with a `truncated` flag
(METHOD v2). Version 1 files (48-token answers, no flag) have another key and are regenerated."""


def self_reference(
    model: Any, dataset: ChatDataset, *, max_new_tokens: int = 256, batch_size: int = 16,
    cache_path: Optional[Union[str, Path]] = None,
) -> ChatDataset:
    """Replace each reference answer with the model's own greedy answer (before any training).

    L_util on these measures *preservation* of what the model does. Answers run to their natural
    end (the model's end-of-turn token), up to `max_new_tokens` (256, ours) and, per generation
    batch, the room the model's context leaves after the batch's longest prompt and one end-of-turn
    token (so a long prompt gives a shorter answer instead of an error). An answer cut by either
    limit is marked `meta["truncated"] = True` and gets no end-of-turn token when tokenized; count
    them with `n_truncated`. Answers are cached as JSONL at `cache_path`, keyed by the cache format
    version, model name, context length, limits, batch size (it sets the per-batch cap) and prompts.
    """
    from .generation import generate

    key = _self_reference_key(model, dataset, max_new_tokens, batch_size)
    cached = _read_self_reference(Path(cache_path), key, len(dataset)) if cache_path else None
    if cached is not None:
        return _with_answers(dataset, *_fit_answers(model, dataset, *cached))
    answers, finished = generate(model, dataset.prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, context_limit="cap", return_finished=True)
    answers, truncated = _fit_answers(model, dataset, answers, [not f for f in finished])
    if cache_path is not None:
        from .io import atomic_write_text

        head = {"key": key, "format": SELF_REFERENCE_FORMAT, "max_new_tokens": max_new_tokens,
                "n_truncated": sum(truncated)}
        lines = [json.dumps(head)] + [json.dumps({"response": a, "truncated": t})
                                      for a, t in zip(answers, truncated)]
        atomic_write_text("\n".join(lines) + "\n", Path(cache_path))
    return _with_answers(dataset, answers, truncated)


def _fit_answers(model: Any, dataset: ChatDataset, answers: list[str],
                 truncated: list[bool]) -> tuple[list[str], list[bool]]:
    """Answers cut (and marked truncated) until prompt + answer tokenize within the context: decoded
    text can re-tokenize longer than the generated ids (an invalid UTF-8 byte becomes a 3-byte
    replacement character), which would make the example too long for the model that wrote it."""
    n_ctx, tok = model.cfg.n_ctx, model.tokenizer
    answers, truncated = list(answers), list(truncated)
    for i, e in enumerate(dataset.examples):
        while True:
            ex = ChatExample(e.prompt, answers[i], meta={"truncated": truncated[i]})
            excess = len(encode_example(tok, ex)[0]) - n_ctx
            if excess <= 0 or not answers[i]:
                break
            answers[i], truncated[i] = answers[i][:max(0, len(answers[i]) - excess)], True
    return answers, truncated


def _self_reference_key(model: Any, dataset: ChatDataset, max_new_tokens: int,
                        batch_size: int) -> str:
    what = [SELF_REFERENCE_FORMAT, getattr(model.cfg, "model_name", ""), model.cfg.n_ctx,
            max_new_tokens, batch_size, dataset.prompts]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _read_self_reference(path: Path, key: str, n: int) -> Optional[tuple[list[str], list[bool]]]:
    """(answers, truncated) from a cache file with this key, or None (absent, stale, corrupt, or
    in a run directory and not as the run wrote it: regenerated, and the log says why)."""
    if not path.exists():
        return None
    from .io import changed_since_written

    why = changed_since_written(path)
    if why is not None:
        print(f"{why}: regenerated", flush=True)
        return None
    try:
        rows = [json.loads(x) for x in path.read_text("utf-8").splitlines() if x]
        if not rows or rows[0].get("key") != key or len(rows) != n + 1:
            return None
        answers = [r["response"] for r in rows[1:]]
        truncated = [r["truncated"] for r in rows[1:]]
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
        return None  # corrupt: regenerate
    if not all(isinstance(t, bool) for t in truncated):
        return None
    return answers, truncated


def _with_answers(dataset: ChatDataset, answers: list[str], truncated: list[bool]) -> ChatDataset:
    # An empty greedy answer has no content tokens: it adds nothing to a content-token loss (and
    # only its end-of-turn token to a loss that includes it).
    ex = [ChatExample(e.prompt, a, e.category, {**e.meta, "truncated": t})
          for e, a, t in zip(dataset.examples, answers, truncated)]
    return ChatDataset(dataset.name + "+self-ref", ex, dataset.source)


# --------------------------------------------------------------------------------------------------
# v3 data: larger safety-tuning sets, over-refusal contrast sets, the team's shared datasets
# --------------------------------------------------------------------------------------------------

SHARED_DATASETS_ENV = "CAST_SHARED_DATASETS"


def shared_datasets_dir(path: Union[str, Path, None] = None) -> Optional[Path]:
    """The folder of public datasets (`advbench.csv`, `xstest_prompts.csv`, ...), or None.

    Looked up in order: `path`, the environment variable CAST_SHARED_DATASETS, `../shared/datasets`
    beside the repository and beside the working directory. None when absent (a user's machine):
    callers fall back to the bundled data and say so.
    """
    if path is not None:
        p = Path(path)
        if not p.is_dir():
            raise DataError(f"Datasets folder {p} does not exist or is not a folder.")
        return p
    candidates = [os.environ.get(SHARED_DATASETS_ENV)]
    candidates += [str(Path(__file__).resolve().parents[2] / "shared" / "datasets"),
                   str(Path.cwd().parent / "shared" / "datasets")]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def load_safety_pairs(path: Union[str, Path]) -> ChatDataset:
    """Safety-tuning pairs `[{instruction, input, output}]` (Bianchi et al. 2024's
    `safety_only_data_Instructions.json`): harmful instruction (plus input) -> refusal-style answer.

    Rows with an empty answer are an error (D_safe needs a response). The answers are GPT-3.5
    refusals: the refusal judge and openings must not be built from them (ours are not).
    """
    ds = load_table(path, prompt_column="instruction", input_column="input",
                    response_column="output", name="safety-pairs")
    missing = [i for i, e in enumerate(ds) if not e.response]
    if missing:
        raise DataError(f"{path}: row {missing[0] + 1} (and {len(missing) - 1} more) has no "
                        "'output'; every safety pair needs a refusal answer.")
    return ChatDataset(ds.name, [ChatExample(e.prompt, e.response, "safety-pairs") for e in ds],
                       ds.source)


def load_coconot(path: Union[str, Path]) -> ChatDataset:
    """CoCoNot contrast set (JSONL `{id, category, subcategory, prompt, response}`, Brahman et al.
    2024): benign prompts that resemble ones a model should decline. Answering is expected, so a
    refusal here is over-refusal. The (often empty) `response` is dropped."""
    ds = load_table(path, prompt_column="prompt", response_column=None,
                    category_column="category", name="coconot-contrast")
    return ChatDataset(ds.name, [ChatExample(e.prompt, None, e.category) for e in ds], ds.source)


def load_mmlu_dir(path: Union[str, Path], *, n_per_subject: Optional[int] = None) -> list[dict]:
    """Multiple-choice items from every `<subject>_test.csv` in a folder (MMLU layout), subjects in
    name order, the first `n_per_subject` of each (`utility.load_mmlu_csv`)."""
    from .utility import load_mmlu_csv

    p = Path(path)
    if not p.is_dir():
        raise DataError(f"MMLU folder {p} does not exist or is not a folder.")
    files = sorted(p.glob("*_test.csv"))
    if not files:
        raise DataError(f"{p} has no '<subject>_test.csv' files (MMLU layout).")
    return [it for f in files for it in load_mmlu_csv(f, n=n_per_subject)]


def dedup_against(ds: ChatDataset, *others: ChatDataset, name: Optional[str] = None) -> ChatDataset:
    """`ds` without prompts that occur in `others` (compared case- and space-normalised), and
    without repeats of its own prompts: a held-out split must share no prompt with training."""
    def key(s: str) -> str:
        return " ".join(s.lower().split())

    seen = {key(e.prompt) for o in others for e in o}
    kept = []
    for e in ds:
        k = key(e.prompt)
        if k not in seen:
            seen.add(k)
            kept.append(e)
    return ChatDataset(name or ds.name, kept, ds.source)


def truncate_responses(tokenizer_or_model: Any, ds: ChatDataset, max_tokens: int) -> ChatDataset:
    """Responses cut to their first `max_tokens` tokens (decoded back to text), marked truncated so
    no end-of-turn token follows them. Bounds the cost of training on long answers; the opening,
    where a refusal is decided, is kept."""
    check_int("max_tokens", max_tokens, 1)
    tok = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    out = []
    for e in ds:
        if e.response is None:
            out.append(e)
            continue
        ids = tok(e.response, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            out.append(e)
        else:
            text = tok.decode(ids[:max_tokens], skip_special_tokens=True).rstrip()
            out.append(ChatExample(e.prompt, text, e.category, {**e.meta, "truncated": True}))
    return ChatDataset(ds.name, out, ds.source)


_FORMATS.update({"safety-pairs": load_safety_pairs, "coconot": load_coconot})
