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
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

Split = Literal["calibration", "train", "test"]
BundledKind = Literal["harmful", "benign", "over_refusal"]

PROMPT_COLUMNS = ("prompt", "instruction", "goal", "Goal", "question", "input", "text")
RESPONSE_COLUMNS = ("response", "output", "answer", "target", "completion")


class DataError(ValueError):
    """Bad or missing data; the message names the problem and the fix."""


@dataclass(frozen=True)
class ChatExample:
    """One user turn and (optionally) the assistant's reference response."""

    prompt: str
    response: Optional[str] = None
    category: Optional[str] = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


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

    def fingerprint(self) -> str:
        """Short hash of the prompts and responses, so a result names exactly which data it used."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(e.prompt.encode())
            h.update(b"\x00")
            h.update((e.response or "").encode())
            h.update(b"\x01")
        return h.hexdigest()[:12]

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "n": len(self), "sha": self.fingerprint()}

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
    return p


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
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
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .json or .jsonl).")


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
    for r in rows:
        prompt = str(r[pc]).strip()
        if input_column and str(r.get(input_column) or "").strip():
            prompt = f"{prompt}\n\n{str(r[input_column]).strip()}"
        resp = r.get(rc) if rc else None
        cat = r.get(cc) if cc else None  # JSON null / empty cell: no category, not "None"
        examples.append(ChatExample(prompt, str(resp).strip() if resp else None,
                                    str(cat) if cat not in (None, "") else None))
    return _nonempty(ChatDataset(name or p.stem, examples, source=str(p)))


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
    ex = [ChatExample(str(r[pc]), str(r[rc]) if rc and r.get(rc) else None) for r in rows]
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
                        ("harmful_", load_refusal_direction)):
        if key in stem:
            return loader(path)
    return load_table(path)


# --------------------------------------------------------------------------------------------------
# Tokenization with the chat template, loss on response tokens only
# --------------------------------------------------------------------------------------------------


@dataclass
class ChatBatch:
    """Right-padded token ids and a mask of the response tokens.

    `loss_mask[b, p]` is True where token p is part of the response (including the end-of-turn
    token): the loss at p is `-log P(tokens[b, p] | tokens[b, :p])`. Right padding needs no attention
    mask under causal attention, so a batch is run as `model(batch.tokens)`.
    """

    tokens: Int[Tensor, "batch pos"]
    loss_mask: Bool[Tensor, "batch pos"]
    prompt_lengths: list[int]

    @property
    def n_response_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device) -> "ChatBatch":
        return ChatBatch(self.tokens.to(device), self.loss_mask.to(device), self.prompt_lengths)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def format_prompt(tokenizer: Any, prompt: str, *, system_prompt: Optional[str] = None) -> str:
    """The chat-formatted text of a user turn, ending where the assistant's answer begins."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # Base models without a template: a plain instruction format (ours).
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn (EOS / `<|im_end|>`)."""
    return int(tokenizer.eos_token_id)


def encode_example(tokenizer: Any, example: ChatExample, *,
                   system_prompt: Optional[str] = None) -> tuple[list[int], int]:
    """(token ids of prompt + response + end-of-turn, number of prompt tokens).

    Prompt and response are tokenized separately so the boundary is exact.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, example.prompt, system_prompt=system_prompt),
                           add_special_tokens=False)["input_ids"]
    if example.response is None:
        return list(prompt_ids), len(prompt_ids)
    resp_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    return list(prompt_ids) + list(resp_ids) + [end_of_turn_id(tokenizer)], len(prompt_ids)


def make_batches(
    tokenizer_or_model: Any,
    dataset: ChatDataset,
    *,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    system_prompt: Optional[str] = None,
    require_response: bool = True,
) -> list[ChatBatch]:
    """Tokenize a dataset into right-padded `ChatBatch`es, in dataset order (deterministic).

    Args:
        tokenizer_or_model: a `HookedTransformer` (its tokenizer and context length) or a tokenizer.
        max_length: longest allowed sequence; defaults to the model's `n_ctx`. A longer example is
            an error naming it (we never truncate silently: a cut response changes the loss).
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
            limit = "the model's context" if max_length == n_ctx else "max_length"
            raise DataError(
                f"Example #{i} of {dataset.name!r} is {len(ids)} tokens, longer than {limit} "
                f"({max_length}). Shorten or drop it (prompt starts: {ex.prompt[:60]!r})."
            )
        encoded.append((ids, n_prompt))
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for b, (ids, n_prompt) in enumerate(chunk):
            tokens[b, : len(ids)] = torch.tensor(ids)
            mask[b, n_prompt: len(ids)] = True
        if require_response and not mask.any():
            raise DataError(f"A batch of {dataset.name!r} has no response tokens; the loss would "
                            "be undefined. Check that responses are non-empty.")
        batches.append(ChatBatch(tokens, mask, [n for _, n in chunk]))
    return batches


# --------------------------------------------------------------------------------------------------
# Self-reference answers
# --------------------------------------------------------------------------------------------------


def self_reference(
    model: Any, dataset: ChatDataset, *, max_new_tokens: int = 48, batch_size: int = 16,
    cache_path: Optional[Union[str, Path]] = None,
) -> ChatDataset:
    """Replace each reference answer with the model's own greedy answer (before any training).

    L_util on these measures *preservation* of what the model does. Answers are cached as JSONL at
    `cache_path` (keyed by the model name, prompts and generation length) so they are made once.
    """
    from .generation import generate

    key = hashlib.sha256(json.dumps([getattr(model.cfg, "model_name", ""), max_new_tokens,
                                     dataset.prompts]).encode()).hexdigest()[:16]
    if cache_path is not None:
        cache_path = Path(cache_path)
        if cache_path.exists():
            try:
                rows = [json.loads(x) for x in cache_path.read_text("utf-8").splitlines() if x]
                if rows and rows[0].get("key") == key and len(rows) == len(dataset) + 1:
                    answers = [r["response"] for r in rows[1:]]
                    return _with_answers(dataset, answers)
            except (json.JSONDecodeError, KeyError):
                pass  # stale or corrupt: regenerate
    answers = generate(model, dataset.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if cache_path is not None:
        from .io import atomic_write_text

        lines = [json.dumps({"key": key})] + [json.dumps({"response": a}) for a in answers]
        atomic_write_text("\n".join(lines) + "\n", cache_path)
    return _with_answers(dataset, answers)


def _with_answers(dataset: ChatDataset, answers: list[str]) -> ChatDataset:
    # An empty greedy answer would give a batch with no loss tokens but the end-of-turn token,
    # which is still a valid (if short) reference.
    ex = [ChatExample(e.prompt, a, e.category, e.meta) for e, a in zip(dataset.examples, answers)]
    return ChatDataset(dataset.name + "+self-ref", ex, dataset.source)
