"""Loaders for local data files: GLUE-style classification and LLM-Adapters instruction data.

Files are read into records (one dict per example) from TSV, CSV, JSON (a list of objects),
JSONL, or a directory written by ``datasets.Dataset.save_to_disk`` (only if ``datasets`` is
installed; it is never required). Records then become :class:`ClassificationData` or
:class:`InstructionData`, plain text plus integer labels, which :mod:`fedlora_jax.data.tokenize`
turns into padded arrays. Every error names the file, and the field or record at fault.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Sequence

import numpy as np

FORMATS = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# Tried in order when no text columns are given: GLUE / SuperGLUE / datasets naming conventions.
DEFAULT_TEXT_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"),
                        ("premise", "hypothesis"), ("question", "sentence"), ("sentence",),
                        ("text",))
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides "
                 "further context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")

Record = dict[str, object]


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    """Texts (and optional second texts of a pair) with integer labels into ``label_names``."""

    texts: tuple[str, ...]
    text_pairs: tuple[str, ...] | None
    labels: np.ndarray  # (M,) int32
    label_names: tuple[str, ...]
    source: str


@dataclasses.dataclass(frozen=True)
class InstructionData:
    """Prompts and target responses; ``answers`` keep the short gold answer for evaluation."""

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    answers: tuple[str, ...]
    source: str


def read_records(path: str | os.PathLike, *, fmt: str | None = None,
                 column_names: Sequence[str] | None = None,
                 split: str | None = None) -> list[Record]:
    """Reads one example per record. ``fmt`` defaults to the file suffix (a directory means a
    ``datasets`` save); ``column_names`` names the columns of a header-less TSV/CSV (e.g. CoLA);
    ``split`` picks one split of a saved ``DatasetDict``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    fmt = fmt or ("disk" if os.path.isdir(path) else FORMATS.get(os.path.splitext(path)[1].lower()))
    readers = {"tsv": lambda: _read_delimited(path, "\t", column_names),
               "csv": lambda: _read_delimited(path, ",", column_names),
               "json": lambda: _read_json(path), "jsonl": lambda: _read_jsonl(path),
               "disk": lambda: _read_disk(path, split)}
    if fmt not in readers:
        raise ValueError(f"Cannot tell the format of {path!r}; pass fmt as one of {sorted(readers)}.")
    records = readers[fmt]()
    if not records:
        raise ValueError(f"Data file {path!r} contains no examples.")
    return records


def load_classification(path: str | os.PathLike, *, text_columns: Sequence[str] | None = None,
                        label_column: str = "label", label_names: Sequence[str] | None = None,
                        **read_kwargs) -> ClassificationData:
    """Loads a text (or text-pair) classification file.

    ``text_columns`` holds one or two column names; by default the first complete entry of
    :data:`DEFAULT_TEXT_COLUMNS`. Labels: with ``label_names`` given, a label equal to a name maps
    to its index, and an integer label (``1`` or ``"1"``) that is no name is taken as an index;
    anything else is an error. Without ``label_names``, integer labels are used as ids (names
    ``"0".."K-1"``) and string labels are numbered in sorted order (the names record the mapping).
    """
    source = os.fspath(path)
    records = read_records(path, **read_kwargs)
    columns = _columns(records)
    if text_columns is None:
        text_columns = next((c for c in DEFAULT_TEXT_COLUMNS if set(c) <= set(columns)), None)
        if text_columns is None:
            raise ValueError(f"{source!r} has none of the default text columns "
                             f"{[list(c) for c in DEFAULT_TEXT_COLUMNS]}; columns present: "
                             f"{columns}. Pass text_columns.")
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"text_columns must name one or two columns, got {list(text_columns)}.")
    fields = [_field(records, c, source, columns) for c in text_columns]
    raw_labels = _field(records, label_column, source, columns)
    labels, names = _label_ids(raw_labels, label_names, source, label_column)
    return ClassificationData(texts=tuple(map(str, fields[0])),
                              text_pairs=tuple(map(str, fields[1])) if len(fields) == 2 else None,
                              labels=labels, label_names=names, source=source)


def load_instructions(path: str | os.PathLike, **read_kwargs) -> InstructionData:
    """Loads LLM-Adapters data: records with ``instruction`` and ``output`` (required), ``input``
    and ``answer`` (optional), prompted with the Alpaca template that LLM-Adapters trains with."""
    source = os.fspath(path)
    records = read_records(path, **read_kwargs)
    columns = _columns(records)
    instructions = _field(records, "instruction", source, columns)
    outputs = _field(records, "output", source, columns)
    inputs = [r.get("input") or "" for r in records]
    answers = [r.get("answer") or "" for r in records]
    return InstructionData(prompts=tuple(alpaca_prompt(str(i), str(x))
                                         for i, x in zip(instructions, inputs)),
                           responses=tuple(map(str, outputs)), answers=tuple(map(str, answers)),
                           source=source)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (LLM-Adapters' ``generate_prompt``) up to and including "### Response:"."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _label_ids(values: list, label_names: Sequence[str] | None, source: str,
               column: str) -> tuple[np.ndarray, tuple[str, ...]]:
    empty = next((row for row, v in enumerate(values) if str(v).strip() == ""), None)
    if empty is not None:
        raise ValueError(f"{source!r}: record {empty} has an empty label in column {column!r}; "
                         "remove unlabeled examples (or label them).")
    if label_names is None:
        kinds = {_as_int(v) is not None for v in values}
        if len(kinds) == 2:
            text = next(v for v in values if _as_int(v) is None)
            number = next(v for v in values if _as_int(v) is not None)
            raise ValueError(f"{source!r}: label column {column!r} mixes text and integer labels "
                             f"({text!r} and {number!r}); map them explicitly with "
                             "--set data.label_names=[name0,name1,...] (an integer is an index).")
        if all(_as_int(v) is not None for v in values):
            ids = np.array([_as_int(v) for v in values], np.int64)
            if ids.min() < 0:
                raise ValueError(f"{source!r}: label column {column!r} holds negative label "
                                 f"{ids.min()} (record {int(ids.argmin())}); unlabeled examples "
                                 "must be removed, or pass label_names.")
            return ids.astype(np.int32), tuple(str(i) for i in range(ids.max() + 1))
        label_names = sorted({str(v) for v in values})
    names = tuple(str(n) for n in label_names)
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for row, value in enumerate(values):
        i = index.get(str(value), _as_int(value))
        if i is None or not 0 <= i < len(names):
            raise ValueError(f"{source!r}: label {value!r} in column {column!r} (record {row}) is "
                             f"outside the declared label set {list(names)}.")
        ids.append(i)
    return np.asarray(ids, np.int32), names


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _columns(records: list[Record]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r))


def _field(records: list[Record], name: str, source: str, columns: list[str]) -> list:
    if name not in columns:
        raise ValueError(f"{source!r} has no column {name!r}; columns present: {columns}.")
    missing = next((i for i, r in enumerate(records) if r.get(name) is None), None)
    if missing is not None:
        raise ValueError(f"{source!r}: record {missing} has no value for field {name!r}; fields "
                         f"present there: {list(records[missing])}.")
    return [r[name] for r in records]


def _text(path: str) -> io.StringIO:
    """The file's text; a file that is not UTF-8 names the line at fault."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return io.StringIO(data.decode("utf-8"), newline="")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path!r}, line {line}: not UTF-8 text (byte {data[e.start]:#04x}); "
                         "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None


def _read_delimited(path: str, delimiter: str, column_names: Sequence[str] | None) -> list[Record]:
    # GLUE TSVs hold unbalanced quotes inside sentences, so TSV fields are never quoted.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows = list(csv.reader(_text(path), delimiter=delimiter, quoting=quoting))
    rows = [r for r in rows if r]
    if not column_names:
        column_names, rows = (rows[0], rows[1:]) if rows else ([], [])
    for i, row in enumerate(rows):
        if len(row) != len(column_names):
            raise ValueError(f"{path!r}: data row {i} has {len(row)} fields but there are "
                             f"{len(column_names)} columns: {list(column_names)}.")
    return [dict(zip(column_names, row)) for row in rows]


def _read_json(path: str) -> list[Record]:
    try:
        data = json.loads(_text(path).getvalue())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r}, line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); "
                         "fix the syntax there.") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path!r} must hold a JSON list of objects (one per example).")
    return data


def _read_jsonl(path: str) -> list[Record]:
    records = []
    for line_no, line in enumerate(_text(path), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path!r}, line {line_no}, column {e.colno}: invalid JSON "
                                 f"({e.msg}); each line must be one JSON object.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path!r}: line {line_no} is not a JSON object.")
            records.append(record)
    return records


def _read_disk(path: str, split: str | None) -> list[Record]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path!r} is a directory, read as a `datasets.save_to_disk` folder, "
                          "which needs the optional `datasets` package (pip install datasets); "
                          "or export the data to JSONL/CSV/TSV.") from e
    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in data:
            raise ValueError(f"{path!r} holds splits {splits}; pick one with split=.")
        data = data[split]
    return [dict(r) for r in data]
