"""Preference datasets for DPO: load a JSONL file or a `datasets` directory and check every row up front.

TRL fails deep inside tokenisation (or, worse, trains on an empty completion) when a row is malformed, so rows
are validated here and errors name the row (and the line, for JSONL) that is wrong.

A row has `prompt`, `chosen` and `rejected`, either all plain strings or all conversations (lists of
`{"role": ..., "content": ...}` messages), the two formats TRL's DPOTrainer accepts with an explicit prompt.
"""
from __future__ import annotations

import json
import os

FIELDS = ("prompt", "chosen", "rejected")


class PreferenceDataError(ValueError):
    """A preference dataset that cannot be trained on; the message names the source and the row."""


def load_preferences(path: str, split: str | None = None):
    """A validated `datasets.Dataset` with exactly the columns prompt, chosen, rejected.

    `path` is a `.jsonl` file (one JSON object per line, blank lines skipped) or a directory written by
    `Dataset.save_to_disk` / `DatasetDict.save_to_disk`; for a DatasetDict, `split` picks the split (default
    "train", or the only split).
    """
    if os.path.isdir(path):
        return validate_preferences(_load_dataset_dir(path, split), source=path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"preference dataset {path!r}: no such file or directory")
    if split is not None:
        raise ValueError(f"split={split!r} only applies to a datasets directory, not the file {path!r}")
    rows, lines = _read_jsonl(path)
    return validate_preferences(rows, source=path, line_numbers=lines)


def validate_preferences(rows, source: str = "dataset", line_numbers: list[int] | None = None):
    """Check every row and return a `datasets.Dataset` of prompt/chosen/rejected (other columns dropped).

    `rows` is a list of dicts or a `datasets.Dataset`. Raises PreferenceDataError naming the first bad row.
    """
    from datasets import Dataset

    if isinstance(rows, Dataset):
        missing = [f for f in FIELDS if f not in rows.column_names]
        if missing:
            raise PreferenceDataError(
                f"{source}: missing column(s) {missing}; a preference dataset needs {list(FIELDS)}, "
                f"found {rows.column_names}"
            )
        rows = rows.select_columns(list(FIELDS)).to_list()
    if len(rows) == 0:
        raise PreferenceDataError(f"{source}: the dataset is empty")
    first_kind = None
    for i, row in enumerate(rows):
        where = f"{source}: row {i}" + (f" (line {line_numbers[i]})" if line_numbers else "")
        kind = _check_row(row, where)
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise PreferenceDataError(
                f"{where}: is {kind} but row 0 is {first_kind}; all rows must use the same format"
            )
    return Dataset.from_list([{f: row[f] for f in FIELDS} for row in rows])


def is_conversational_dataset(dataset) -> bool:
    """Whether the (validated) dataset holds conversations rather than plain strings."""
    return isinstance(dataset[0]["prompt"], list)


def _check_row(row, where: str) -> str:
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object with {list(FIELDS)}, got {type(row).__name__}")
    missing = [f for f in FIELDS if f not in row or row[f] is None]
    if missing:
        raise PreferenceDataError(f"{where}: missing field(s) {missing}")
    kinds = {f: _field_kind(row[f], f"{where}: field {f!r}") for f in FIELDS}
    if len(set(kinds.values())) != 1:
        raise PreferenceDataError(
            f"{where}: mixes plain strings and conversations ({kinds}); use one format for all three fields"
        )
    return kinds["prompt"]


def _field_kind(value, where: str) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceDataError(f"{where}: empty string")
        return "plain"
    if isinstance(value, list):
        if not value:
            raise PreferenceDataError(f"{where}: empty conversation (no messages)")
        for j, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise PreferenceDataError(f"{where}: message {j} needs a string 'role' and 'content', got {message!r}")
            content = message.get("content")
            if not isinstance(content, str) or not content.strip():
                raise PreferenceDataError(f"{where}: message {j} has an empty or missing 'content'")
        return "conversational"
    raise PreferenceDataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def _read_jsonl(path: str):
    rows, lines = [], []
    with open(path, "rb") as f:  # decoded line by line, so that invalid UTF-8 is reported by its line
        for number, raw in enumerate(f, start=1):
            try:  # a byte-order mark (some Windows editors write one) may open the file
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise PreferenceDataError(f"{path}: line {number} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
            lines.append(number)
    return rows, lines


def _load_dataset_dir(path: str, split: str | None):
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(path)
    except FileNotFoundError as e:
        raise PreferenceDataError(f"{path}: not a datasets directory written by save_to_disk ({e})") from None
    if isinstance(data, DatasetDict):
        names = list(data)
        if split is None:
            split = "train" if "train" in data else (names[0] if len(names) == 1 else None)
        if split not in data:
            raise PreferenceDataError(f"{path}: choose a split with split=..., available: {names}")
        return data[split]
    if split is not None:
        raise ValueError(f"split={split!r} given but {path!r} holds a single Dataset, not a DatasetDict")
    return data
