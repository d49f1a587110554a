"""Reading rows from JSON, JSONL, Parquet, a saved `datasets` directory or a Hub data set, each with a location for
errors; and the fingerprint of what a path holds, for the token cache's key."""

from __future__ import annotations

import codecs
import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtuning.errors import QTuningError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg://"
HUB_PREFIX = "hf://"
HASH_CHUNK = 1 << 24  # 16 MiB read at a time: hashing a file never holds it whole


@dataclass(frozen=True)
class Row:
    location: str  # "file:line" (JSON/JSONL) or "file:row N" (Parquet, datasets dir)
    data: Any
    error: str | None = None  # why the row could not be read (data is None); see iter_rows(keep_bad_rows=True)


def resolve_path(path: str) -> Path:
    """A filesystem path, or ``pkg://<module>/<file>`` for a data file shipped inside an installed package."""
    if not path.startswith(PACKAGE_PREFIX):
        return Path(path).expanduser()
    module, _, rel = path[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QTuningError(f"data.path={path}: package '{module}' is not installed (see README, 'Setup')")
    return Path(spec.submodule_search_locations[0]) / rel


def load_hub_dataset(path: str, split: str, subset: str | None) -> Any:
    """The ``split`` (and ``subset``) of the Hub data set ``hf://org/name``, through `datasets.load_dataset`: from the
    Hub, or from the local `datasets` cache when offline (``HF_DATASETS_OFFLINE=1``)."""
    import datasets

    name = path[len(HUB_PREFIX) :]
    try:
        return datasets.load_dataset(name, subset, split=split)
    except ConnectionError:
        raise QTuningError(
            f"data.path={path}: the Hugging Face Hub cannot be reached and no copy of '{name}' is in the datasets "
            "cache; load it once where the Hub is reachable, or point data.path at a local file"
        ) from None
    except (FileNotFoundError, ValueError) as err:  # no such data set (FileNotFoundError), no such split or subset
        raise QTuningError(f"data.path={path} (data.subset={subset}, data.split={split}): {err}") from None


def fingerprint(path: str, split: str = "train", subset: str | None = None) -> str:
    """What decides a path's rows, as a hex digest: every byte of a file, or of every file below a directory with its
    name (an edit that keeps the size and the modification time still changes it); a Hub data set's `datasets`
    fingerprint (its revision and files)."""
    import xxhash

    if path.startswith(HUB_PREFIX):
        return load_hub_dataset(path, split, subset)._fingerprint
    root = resolve_path(path)
    if not root.exists():
        raise QTuningError(f"data.path={path}: no such file or directory")
    digest = xxhash.xxh3_128()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _iter_json_array(text: str, source: str, salvage_truncated: bool) -> Iterator[Row]:
    """Decode a JSON array element by element, so each row knows its line and a truncated file can be salvaged."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:].startswith("["):
        raise QTuningError(f"{source}:1: expected a JSON array of rows (or use a .jsonl file)")
    pos += 1
    line, counted_to = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        if pos < len(text) and text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            err_line = text.count("\n", 0, err.pos) + 1
            if salvage_truncated:
                log.warning(
                    "%s:%d: file is truncated or malformed from here on (%s); kept the rows before it",
                    source,
                    err_line,
                    err.msg,
                )
                return
            raise QTuningError(f"{source}:{err_line}: malformed JSON: {err.msg}") from None
        yield Row(f"{source}:{line}", obj)


def _iter_jsonl(data: bytes, source: str, keep_bad_rows: bool) -> Iterator[Row]:
    # Decoded line by line, so that one line of bad bytes is one bad row, not a bad file.
    for line_no, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        location = f"{source}:{line_no}"
        try:
            row = Row(location, json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as err:
            row = Row(location, None, f"not valid UTF-8 ({err.reason})")
        except json.JSONDecodeError as err:
            row = Row(location, None, f"malformed JSON: {err.msg} (column {err.colno})")
        if row.error and not keep_bad_rows:
            raise QTuningError(f"{location}: {row.error}")
        yield row


def iter_rows(
    path: str,
    salvage_truncated: bool = False,
    keep_bad_rows: bool = False,
    split: str = "train",
    subset: str | None = None,
) -> Iterator[Row]:
    """Rows of a data file, a `datasets` directory or a Hub data set (``hf://org/name``: its ``split`` and
    ``subset``), in file order.

    A JSONL line that is not UTF-8 or not JSON raises, or with ``keep_bad_rows`` comes as a row with its ``error``.
    A file that cannot be read as a whole (missing, unreadable, not UTF-8 or a broken JSON array) always raises.
    """
    if path.startswith(HUB_PREFIX):
        yield from (Row(f"{path}:row {i}", row) for i, row in enumerate(load_hub_dataset(path, split, subset)))
        return
    file = resolve_path(path)
    if not file.exists():
        raise QTuningError(f"data.path={path}: no such file or directory")
    source = str(file)
    if file.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(source)
        except (FileNotFoundError, ValueError) as err:
            raise QTuningError(f"data.path={path}: not a saved `datasets` directory ({err})") from None
        if isinstance(dataset, datasets.DatasetDict):
            raise QTuningError(f"data.path={path}: holds splits {list(dataset)}; point at one split's directory")
        yield from (Row(f"{source}:row {i}", row) for i, row in enumerate(dataset))
        return
    if file.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except (OSError, pa.ArrowException) as err:
            raise QTuningError(f"data.path={path}: cannot read it as Parquet ({err})") from None
        yield from (Row(f"{source}:row {i}", row) for i, row in enumerate(table.to_pylist()))
        return
    if file.suffix not in (".json", ".jsonl"):
        raise QTuningError(f"data.path={path}: unsupported file type '{file.suffix}' (use .json, .jsonl, .parquet)")
    try:
        data = file.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as err:
        raise QTuningError(f"data.path={path}: cannot read it ({err.strerror})") from None
    if file.suffix == ".jsonl":
        yield from _iter_jsonl(data, source, keep_bad_rows)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise QTuningError(f"{source}:{line}: not valid UTF-8 ({err.reason})") from None
    if text.strip():  # an empty file has no rows, which the caller reports
        yield from _iter_json_array(text, source, salvage_truncated)
