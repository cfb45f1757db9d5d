"""Read rows (dicts) from JSON, JSONL, CSV, Parquet files, dataset folders or Hub datasets.

Hub datasets (`owner/name` or `hf:NAME`), folders (saved with `save_to_disk`, or of data files) and Parquet files
go through `datasets.load_dataset`, with its config, revision, data_files and streaming (`DatasetOptions`).
A single JSON, JSONL or CSV file is read by safeprobe's validating reader instead, which keeps each value as
written and reports a bad row by its line: Arrow's readers would turn `1` into `1.0` in a column that also holds
`1.5`, pad a short CSV row with empty strings, rename a repeated header, and lose the line numbers.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark (Excel, Notepad) is not part of the first field
HUB_PREFIX = "hf:"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
STREAM_BUFFER = 10_000  # rows a streamed dataset is shuffled within


@dataclass(frozen=True)
class DatasetOptions:
    """What `datasets.load_dataset` takes beside a dataset's name and split, for Hub datasets and folders."""

    config: str | None = None  # the dataset's configuration (subset) name
    revision: str | None = None  # a branch, tag or commit of a Hub dataset
    data_files: str | list | dict | None = None  # which of the dataset's files to read
    streaming: bool = False  # read row by row without downloading the whole split
    limit: int | None = None  # streaming: stop after this many rows
    seed: int = 0  # streaming: seed of the shuffle buffer

    def recorded(self) -> dict:
        """The options that differ from the defaults (what a run manifest records)."""
        return {k: v for k, v in vars(self).items() if v != getattr(DEFAULTS, k) and k != "seed"}


DEFAULTS = DatasetOptions()


def read_rows(source: str | Path, split: str = "train", options: DatasetOptions = DEFAULTS) -> list[dict]:
    """All rows of a file, a dataset folder or a Hub dataset (`owner/name` or `hf:NAME`), as dicts."""
    return [row for row, _ in read_located_rows(source, split, options)]


def is_hub_id(source: str) -> bool:
    """`hf:NAME`, or an `owner/name` that is no local path."""
    return source.startswith(HUB_PREFIX) or (HUB_ID.fullmatch(source) is not None and not Path(source).exists()
                                             and Path(source).suffix.lower() not in SUFFIXES)


def read_located_rows(source: str | Path, split: str = "train",
                      options: DatasetOptions = DEFAULTS) -> list[tuple[dict, str]]:
    """`read_rows`, each row with where it is, for error messages: 'FILE:LINE' for JSONL and CSV (the line an editor
    shows, blank lines and the header counted; a CSV row spanning lines gives its last), 'FILE: item N' for JSON,
    'SOURCE: row N' otherwise (1-based)."""
    source = str(source)
    if is_hub_id(source):
        return _numbered(_load_dataset(source.removeprefix(HUB_PREFIX), split, options), source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        return _numbered(_read_folder(path, split, options), path)
    if path.suffix.lower() == ".parquet":
        return _numbered(_read_parquet(path), path)
    if options.config or options.revision or options.data_files:
        raise UserError(f"{path}: a dataset config, revision or data_files apply to a Hub dataset or a folder, "
                        "not to a single file")
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}
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


def _numbered(rows, source) -> list[tuple[dict, str]]:
    out = [(_present(row), f"{source}: row {i}") for i, row in enumerate(rows, start=1)]
    if not out:
        raise UserError(f"{source}: dataset is empty")
    return out


def _present(value):
    """A row from Arrow without the null fields Arrow adds where a row lacks a column (or a message a key)."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_present(v) for v in value]
    return value


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


def _read_parquet(path: Path) -> list[dict]:
    return _load_dataset("parquet", "train", DatasetOptions(data_files=str(path)), str(path))


def _read_folder(path: Path, split: str, options: DatasetOptions) -> list[dict]:
    """A folder saved by `save_to_disk`, else a folder of data files (as `load_dataset` reads one)."""
    import datasets

    if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _load_dataset(str(path), split, options)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception:
        raise UserError(f"{path}: directory is not a saved Hugging Face dataset") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split '{split}'; available: {', '.join(ds)}")
        ds = ds[split]
    return ds.to_list()


def _load_dataset(name: str, split: str, options: DatasetOptions, shown: str | None = None) -> list[dict]:
    """The rows of `datasets.load_dataset(name, ...)`; a streamed split is shuffled within a buffer and cut at
    `options.limit` rows."""
    import datasets

    shown = shown or name
    try:
        ds = datasets.load_dataset(name, options.config, split=split, revision=options.revision,
                                   data_files=options.data_files, streaming=options.streaming)
        if options.streaming:
            ds = ds.shuffle(seed=options.seed, buffer_size=STREAM_BUFFER)
            ds = ds.take(options.limit) if options.limit else ds
        return list(ds)
    except Exception as e:  # datasets raises many types: a missing split, config or file, no network, bad bytes
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        hint = "; offline? download it first or pass a local file" if "/" in name and not Path(name).exists() else ""
        raise UserError(f"{shown}: could not load split '{split}' ({reason}){hint}") from None
