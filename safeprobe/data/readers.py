"""Read rows (dicts) from JSON, JSONL, CSV, Parquet files or Hugging Face datasets.

JSON/JSONL/CSV are parsed with the standard library so that a bad row is reported with its file and line;
Parquet goes through pyarrow and Hub names / saved datasets through `datasets`.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..errors import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark (Excel, Notepad) is not part of the first field
HUB_PREFIX = "hf:"


def read_rows(source: str | Path, split: str = "train") -> list[dict]:
    """All rows of a file, a saved `datasets` directory, or `hf:NAME` (a Hub dataset), as dicts."""
    return [row for row, _ in read_located_rows(source, split)]


def read_located_rows(source: str | Path, split: str = "train") -> list[tuple[dict, str]]:
    """`read_rows`, each row with where it is, for error messages: 'FILE:LINE' for JSONL and CSV (the line an editor
    shows, blank lines and the header counted; a CSV row spanning lines gives its last), 'FILE: item N' for JSON,
    'FILE: row N' otherwise (1-based)."""
    source = str(source)
    if source.startswith(HUB_PREFIX):
        return _numbered(_read_hub(source[len(HUB_PREFIX):], split), source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        return _numbered(_read_saved_dataset(path, split), path)
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")
    try:
        rows = reader(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:  # the stdlib parsers recurse once per nesting level
        raise UserError(f"{path}: nested too deeply to be a dataset") from None
    if not rows:
        raise UserError(f"{path}: dataset is empty")
    return rows


def _numbered(rows: list[dict], source) -> list[tuple[dict, str]]:
    return [(row, f"{source}: row {i}") for i, row in enumerate(rows, start=1)]


def _located_object(row, where: str) -> tuple[dict, str]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row, where


def _read_json(path: Path) -> list[tuple[dict, str]]:
    text = path.read_text(encoding=ENCODING)
    if not text.strip():
        raise UserError(f"{path}: dataset is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} or a columnar {"col": [...]} file
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, values)) for values in zip(*data.values())]
        else:
            raise UserError(f"{path}: expected a JSON list of objects")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects")
    return [_located_object(row, f"{path}: item {i}") for i, row in enumerate(data, start=1)]


def _read_jsonl(path: Path) -> list[tuple[dict, str]]:
    rows = []
    with open(path, encoding=ENCODING) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            rows.append(_located_object(row, f"{path}:{lineno}"))
    return rows


def _read_csv(path: Path) -> list[tuple[dict, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding=ENCODING, newline="") as f:
        reader = csv.DictReader(f)
        try:
            if not reader.fieldnames:
                return []
            names = reader.fieldnames
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:  # DictReader would keep only the last column of each repeated name
                column = f"column '{repeated[0]}'" if repeated[0] else "an unnamed column"
                raise UserError(f"{path}:1: the header names {column} more than once")
            header = [name if name else "index" for name in names]  # unnamed index column
            rows = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):  # extra fields go under None
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                    raise UserError(f"{path}:{reader.line_num}: row has {fields} fields, header has {len(header)}")
                rows.append((dict(zip(header, row.values())), f"{path}:{reader.line_num}"))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        return _numbered(pq.read_table(path).to_pylist(), path)
    except Exception as e:  # pyarrow raises many types for corrupt files
        raise UserError(f"{path}: unreadable Parquet file ({type(e).__name__})") from None


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception:
        raise UserError(f"{path}: directory is not a saved Hugging Face dataset") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split '{split}'; available: {', '.join(ds)}")
        ds = ds[split]
    return ds.to_list()


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:
        raise UserError(f"hf:{name}: could not load split '{split}' from the Hub ({type(e).__name__}); "
                        "offline? download it first or pass a local file") from None
