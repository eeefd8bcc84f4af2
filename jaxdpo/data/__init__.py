"""Prompt sources through `datasets` (paper §4: TLDR, WebGPT; plus Anthropic HH-RLHF and local JSONL),
left-padded prompt tokenization that reports what it dropped or truncated, and the prompts'
reference responses laid out as generated ones (for the capability guard).

Every loader returns a `datasets.Dataset` with a `prompt` column (and `chosen` / `rejected` where the
source has preference pairs). `path=None` loads from the hub by name; a path loads local JSON/JSONL
files with the hub dataset's schema, so the same code runs offline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import datasets
import fsspec
import numpy as np

from jaxdpo.sequences import Sequences

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
SOURCES = ("tldr", "webgpt", "hh_rlhf", "jsonl")
HUB_DATASETS = {"tldr": ("openai/summarize_from_feedback", "comparisons"), "webgpt": ("openai/webgpt_comparisons", None), "hh_rlhf": ("Anthropic/hh-rlhf", None)}
Schema = Mapping[str, type | tuple[type, ...]]  # a record's fields → the JSON type(s) each value must have


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """`datasets` without its progress bars ("Generating train split", "Map", "Saving the dataset"):
    they would land in the middle of a run's output. `HF_DATASETS_DISABLE_PROGRESS_BARS`, when
    the user set it, has the last word."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if "HF_DATASETS_DISABLE_PROGRESS_BARS" in os.environ or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _load(path: str | Path | None, source: str, split: str, schema: Schema) -> datasets.Dataset:
    """The hub dataset of `source` (`HUB_DATASETS`), or the local JSON / JSON Lines file(s) at `path`,
    whose records must have the `schema` fields: a local file that is empty, not JSON, or has a
    record without one of them raises ValueError naming the file and line (`find_bad_record`)."""
    if path is None:
        return datasets.load_dataset(*HUB_DATASETS[source], split=split)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path.absolute()}")
    files = sorted(str(p) for p in path.glob("*.json*")) if path.is_dir() else [str(path)]
    if not files:
        raise FileNotFoundError(f"no .json/.jsonl files in {path.absolute()}")
    try:
        with _no_error_log():
            data = datasets.load_dataset("json", data_files=files, split="train")
    except Exception as error:  # noqa: BLE001 - datasets raises DatasetGenerationError, StopIteration, ValueError...
        problem = _first_bad_record(files, schema)
        if problem is None:
            raise
        raise ValueError(problem) from error
    if not _fits(data, schema):
        raise ValueError(_first_bad_record(files, schema) or f"{path}: the records lack the fields {list(schema)}")
    return data


@contextlib.contextmanager
def _no_error_log() -> Iterator[None]:
    """`datasets` logs an error of its own for a file it cannot parse; `find_bad_record` tells it once."""
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)


def _fits(data: datasets.Dataset, schema: Schema) -> bool:
    """Every schema field is a column without nulls (strings: a string column)."""
    for field, kind in schema.items():
        if field not in data.column_names or data.data.column(field).null_count:
            return False
        if kind is str and data.features[field] not in (datasets.Value("string"), datasets.Value("large_string")):
            return False
    return True


def _first_bad_record(files: Sequence[str], schema: Schema) -> str | None:
    return next((problem for file in files if (problem := find_bad_record(file, schema)) is not None), None)


def find_bad_record(file: str | Path, schema: Schema) -> str | None:
    """The first problem of a local JSON Lines file (or JSON array) as one line — "FILE is empty",
    "FILE: line N is not valid JSON (…)", "FILE: line N has no 'prompt' field" — or None when every
    record has the `schema` fields. Compressed files (.gz, .zst, …) are read as `datasets` reads them."""
    records = 0
    with fsspec.open(str(file), "rb", compression="infer") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip(b"\r\n"))
            except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
                if records == 0 and line.lstrip()[:1] in (b"[", b"{"):
                    return _bad_document(file, schema)  # perhaps one JSON document over several lines
                return f"{file}: line {number} is not valid JSON: {_why(error)}"
            records += 1
            problem = _record_problem(record, schema)
            if problem:
                return f"{file}: line {number} {problem}"
    return None if records else f"{file} is empty"


def _bad_document(file: str | Path, schema: Schema) -> str | None:
    with fsspec.open(str(file), "rb", compression="infer") as f:
        try:
            document = json.load(f)
        except ValueError as error:
            where = f"line {error.lineno} " if isinstance(error, json.JSONDecodeError) else ""
            return f"{file}: {where}is not valid JSON: {_why(error)}"
    items = document if isinstance(document, list) else []
    return next((f"{file}: item {i} {problem}" for i, item in enumerate(items) if (problem := _record_problem(item, schema))), None)


def _record_problem(record, schema: Schema) -> str | None:
    if not isinstance(record, dict):
        return f"is not a JSON object but {json.dumps(record)[:40]}"
    for field, kind in schema.items():
        if record.get(field) is None:
            return f"has no {field!r} field"
        if not isinstance(record[field], kind) or isinstance(record[field], bool):
            return f"has {field!r} = {json.dumps(record[field])[:40]}, not {_JSON_NAMES.get(kind, 'a number')}"
    return None


_JSON_NAMES = {str: "a string", dict: "an object", list: "a list", int: "an integer"}


def _why(error: ValueError) -> str:
    return f"{error.msg} (column {error.colno})" if isinstance(error, json.JSONDecodeError) else str(error)


def split_dialogue(text: str) -> tuple[str, str]:
    """An HH-RLHF transcript "\\n\\nHuman: … \\n\\nAssistant: …" → (prompt up to and including the
    last "\\n\\nAssistant:", the final assistant reply)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0 or HUMAN not in text[:cut + 1]:
        raise ValueError(f"not an HH-RLHF dialogue (needs {HUMAN!r} then {ASSISTANT!r}): {text[:80]!r}")
    end = cut + len(ASSISTANT)
    return text[:end], text[end:].strip()


def _hh_row(row: Mapping) -> dict:
    """The prompt is the shared dialogue up to its last assistant turn. A few HH-RLHF rows have
    chosen and rejected transcripts that diverge earlier (or whose reply itself contains an
    "Assistant:" turn), so the split is made inside their common prefix."""
    chosen, rejected = row["chosen"], row["rejected"]
    common = 0
    for x, y in zip(chosen, rejected):
        if x != y:
            break
        common += 1
    if ASSISTANT not in chosen[:common]:
        raise ValueError(f"chosen and rejected share no dialogue up to an assistant turn: {chosen[:80]!r}")
    prompt, _ = split_dialogue(chosen[:common])
    end = len(prompt)
    return {"prompt": prompt, "chosen": chosen[end:].strip(), "rejected": rejected[end:].strip()}


def load_hh_rlhf(path: str | Path | None = None, split: str = "test") -> datasets.Dataset:
    """Anthropic HH-RLHF (`Anthropic/hh-rlhf`): prompt = the dialogue up to the last assistant turn,
    chosen / rejected = the two final replies."""
    return _load(path, "hh_rlhf", split, {"chosen": str, "rejected": str}).map(_hh_row, remove_columns=["chosen", "rejected"])


def tldr_prompt(info: dict) -> str:
    """The summarize-from-feedback prompt format."""
    return f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"


def _tldr_row(row: Mapping) -> dict:
    texts = [s["text"] for s in row["summaries"]]
    choice = int(row["choice"])
    return {"prompt": tldr_prompt(row["info"]), "chosen": texts[choice], "rejected": texts[1 - choice]}


def load_tldr(path: str | Path | None = None, split: str = "train") -> datasets.Dataset:
    """TLDR comparisons (`openai/summarize_from_feedback`, "comparisons"): one row per comparison."""
    data = _load(path, "tldr", split, {"info": dict, "summaries": list, "choice": int})
    return data.map(_tldr_row, remove_columns=data.column_names)


def _webgpt_row(row: Mapping) -> dict:
    first_better = row["score_0"] >= row["score_1"]
    a, b = row["answer_0"], row["answer_1"]
    return {"prompt": row["question"]["full_text"], "chosen": a if first_better else b, "rejected": b if first_better else a}


_WEBGPT_SCHEMA = {"question": dict, "answer_0": str, "answer_1": str, "score_0": (int, float), "score_1": (int, float)}


def load_webgpt(path: str | Path | None = None, split: str = "train") -> datasets.Dataset:
    """WebGPT comparisons (`openai/webgpt_comparisons`); ties (equal scores) are dropped."""
    data = _load(path, "webgpt", split, _WEBGPT_SCHEMA)
    data = data.filter(lambda row: row["score_0"] != row["score_1"])
    return data.map(_webgpt_row, remove_columns=data.column_names)


def load_jsonl(path: str | Path, prompt_field: str = "prompt") -> datasets.Dataset:
    """Local JSONL with one prompt per line under `prompt_field`."""
    data = _load(path, "jsonl", "train", {prompt_field: str})
    return data.rename_column(prompt_field, "prompt") if prompt_field != "prompt" else data


def load_prompts(source: str, path: str | Path | None = None, split: str = "train") -> list[str]:
    """The distinct prompts of `source` ("tldr", "webgpt", "hh_rlhf" or "jsonl"), in first-seen order."""
    return list(load_references(source, path, split))


def load_references(source: str, path: str | Path | None = None, split: str = "train") -> dict[str, str | None]:
    """{prompt: its reference response} over the distinct prompts of `source`, in first-seen order:
    the `chosen` response of the prompt's first row (TLDR, WebGPT, HH-RLHF; a JSONL file's
    `chosen` field where it has one), None where the source has none. The capability guard reads
    them (`jaxdpo.experiment.evaluation`)."""
    loaders = {"tldr": load_tldr, "webgpt": load_webgpt, "hh_rlhf": load_hh_rlhf}
    if source == "jsonl" and path is None:
        raise ValueError("data source 'jsonl' needs a path")
    if source != "jsonl" and source not in loaders:
        raise ValueError(f"unknown data source {source!r}; known sources: {', '.join(SOURCES)}")
    with quiet_progress():
        data = load_jsonl(path) if source == "jsonl" else loaders[source](path, split)
    chosen = data["chosen"] if "chosen" in data.column_names else [None] * len(data)
    references: dict[str, str | None] = {}
    for prompt, response in zip(data["prompt"], chosen):
        references.setdefault(prompt, response)
    return references


def tokenize_references(
    tokenizer, prompt_ids: np.ndarray, prompt_mask: np.ndarray, responses: Sequence[str | None], *, max_new_tokens: int
) -> Sequences | None:
    """Prompt + reference response rows laid out as generated ones (`jaxdpo.sampling`): the
    left-padded prompt, the response's first `max_new_tokens` tokens followed by the end token
    when the whole response fits, right padding: one row per prompt whose response (`responses[i]`
    for prompt row i) is not None or empty; None when no prompt has one."""
    kept = [i for i, response in enumerate(responses) if response]
    encoded = tokenizer([responses[i] for i in kept], add_special_tokens=False)["input_ids"] if kept else []
    rows = [(i, ids if len(ids) >= max_new_tokens else [*ids, tokenizer.eos_token_id]) for i, ids in zip(kept, encoded) if ids]
    if not rows:
        return None
    prompt_len = prompt_ids.shape[1]
    input_ids = np.full((len(rows), prompt_len + max_new_tokens), tokenizer.pad_token_id, np.int32)
    response_mask, attention = np.zeros_like(input_ids), np.zeros_like(input_ids)
    for row, (i, ids) in enumerate(rows):
        ids = ids[:max_new_tokens]
        input_ids[row, :prompt_len], attention[row, :prompt_len] = prompt_ids[i], prompt_mask[i]
        input_ids[row, prompt_len : prompt_len + len(ids)] = ids
        response_mask[row, prompt_len : prompt_len + len(ids)] = attention[row, prompt_len : prompt_len + len(ids)] = 1
    return Sequences(input_ids, response_mask, attention)


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
    """Left-padded prompts `[n, max_tokens]`; `kept[i]` is the index in the input list of row i."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    kept: np.ndarray
    dropped_empty: tuple[int, ...]
    dropped_too_long: tuple[int, ...]
    truncated: tuple[int, ...]

    def report(self) -> str:
        total = len(self.kept) + len(self.dropped_empty) + len(self.dropped_too_long)
        return (
            f"{len(self.kept)} of {total} prompts kept; dropped {len(self.dropped_too_long)} longer than "
            f"{self.input_ids.shape[1]} tokens and {len(self.dropped_empty)} empty; truncated {len(self.truncated)} (left)"
        )


def tokenize_prompts(tokenizer, prompts: Sequence[str], *, max_tokens: int, truncate: bool = False) -> TokenizedPrompts:
    """Tokenize and left-pad to `max_tokens`. Prompts longer than that are dropped, or with
    `truncate=True` cut from the left (the end of a prompt — "TL;DR:", "Assistant:" — matters most)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    rows, kept, empty, too_long, truncated = [], [], [], [], []
    for i, ids in enumerate(encoded):
        if not ids:
            empty.append(i)
            continue
        if len(ids) > max_tokens:
            if not truncate:
                too_long.append(i)
                continue
            truncated.append(i)
            ids = ids[-max_tokens:]
        rows.append(ids)
        kept.append(i)
    input_ids = np.full((len(rows), max_tokens), tokenizer.pad_token_id, np.int32)
    attention = np.zeros((len(rows), max_tokens), np.int32)
    for r, ids in enumerate(rows):
        input_ids[r, max_tokens - len(ids) :] = ids
        attention[r, max_tokens - len(ids) :] = 1
    return TokenizedPrompts(input_ids, attention, np.asarray(kept, np.int64), tuple(empty), tuple(too_long), tuple(truncated))
