"""Read rows from JSONL / JSON / Parquet (/ CSV for the converter) files or folders, labelled ``file:row``.

JSONL rows are labelled with their 1-based line number; Parquet, JSON-array and CSV rows with their
0-based row index. pyarrow/pandas are imported inside functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptoss_hpc.data.rows import RawRow, parse_json_line
from gptoss_hpc.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def data_files(path: str | Path, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> list[Path]:
    """The file itself, or the data files directly inside a folder (sorted by name)."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() not in suffixes:
            raise DataError(f"{p}: unsupported file type {p.suffix!r}; expected one of {', '.join(suffixes)}")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{p}: folder holds no {', '.join(suffixes)} files")
        stems = [f.stem for f in files]
        twins = sorted({s for s in stems if stems.count(s) > 1})
        if twins:
            raise DataError(
                f"{p}: holds the same name in several formats ({', '.join(twins)}), e.g. the converter's "
                ".parquet and .jsonl of one set; point data.path at one file"
            )
        return files
    raise DataError(f"{p}: no such file or folder (checked from {Path.cwd()})")


def read_rows(path: str | Path, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> Iterator[RawRow]:
    for f in data_files(path, suffixes):
        yield from read_file(f)


def read_file(path: Path) -> Iterator[RawRow]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}")


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            value, error = parse_json_line(line)
            yield RawRow(f"{path}:{lineno}", value, error)


def _read_json(path: Path) -> Iterator[RawRow]:
    text = path.read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        # datasets' "json" builder also accepts JSON Lines in a .json file
        yield from _read_jsonl(path)
        return
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows (or JSON Lines), got {type(data).__name__}")
    for i, value in enumerate(data):
        yield RawRow(f"{path}:{i}", value)


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise DataError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from e
    for i, value in enumerate(table.to_pylist()):
        yield RawRow(f"{path}:{i}", value)


def _read_csv(path: Path) -> Iterator[RawRow]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises ParserError/UnicodeDecodeError/EmptyDataError
        raise DataError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e
    for i, value in enumerate(frame.to_dict(orient="records")):
        yield RawRow(f"{path}:{i}", value)
