"""Loaders of public formats: AdvBench, JailbreakBench, XSTest, Alpaca, refusal-direction splits,
GSM8K, safety-tuning pairs, CoCoNot, MMLU folders, any CSV/JSON/JSONL with named columns, Hugging
Face datasets; `load_dataset` reads a dataset spec string (see the package docstring)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from .examples import ChatDataset, ChatExample, DataError, _nonempty, load_bundled

PROMPT_COLUMNS = ("prompt", "instruction", "goal", "Goal", "question", "input", "text")
RESPONSE_COLUMNS = ("response", "output", "answer", "target", "completion")


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
    candidates += [str(Path(__file__).resolve().parents[3] / "shared" / "datasets"),
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
    from ..utility import load_mmlu_csv

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


_FORMATS.update({"safety-pairs": load_safety_pairs, "coconot": load_coconot})
