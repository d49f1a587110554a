"""The token cache: a data source read, converted and tokenised once through `datasets`, into Arrow files that every
run, rank and sweep job with the same key memory-maps.

The key covers everything that decides the tokens: the data's bytes (a Hub data set: its `datasets` fingerprint) and
its path (rows are named by it), the format, ``max_length``, ``limit``, the salvage and bad-row settings, the
tokenizer's files with its chat template, and `ENCODING_VERSION`. An entry is built in a temporary directory beside
it and renamed into place under a file lock: a second process with the same key waits for the first and maps its
result, and a build that dies leaves no entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
from transformers import PreTrainedTokenizerBase

from qtuning.data.examples import (
    DataReport,
    DataSource,
    Example,
    encode_example,
    read_conversations,
    response_token_count,
)
from qtuning.data.readers import HUB_PREFIX, fingerprint, resolve_path

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

ENCODING_VERSION = 1  # bump when the encoding rules (qtuning.data.tokenize, .examples) change what a row becomes
META = "meta.json"  # written last: an entry without it is no entry
ROWS_PER_WORKER = 1_000  # num_proc=null starts no more workers than this many rows each keep busy
READ_CHUNK = 1_000  # rows per Arrow record batch while reading
# rows per call of the tokenising map, and so per record batch of the entry: a process that maps the entry touches
# each batch's header (and the pages around it), so fewer, larger batches keep its resident memory flat
ENCODE_BATCH = 1_000
READ_BATCH = 1_024  # rows per read when iterating a split
# tokenizer_config.json keys that say where the tokenizer was loaded from, not what it does
TOKENIZER_LOAD_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir")


def default_cache_dir() -> str:
    """``$QTUNING_CACHE_DIR/data`` (``~/.cache/qtuning/data`` without it)."""
    return os.path.join(os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning"), "data")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of the files ``save_pretrained`` writes (vocabulary, merges, special tokens, chat template)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(Path(tmp).iterdir()):
            content = file.read_bytes()
            if file.name == "tokenizer_config.json":
                config = {k: v for k, v in json.loads(content).items() if k not in TOKENIZER_LOAD_KEYS}
                content = json.dumps(config, sort_keys=True).encode()
            digest.update(file.name.encode() + b"\0" + content)
    return digest.hexdigest()


def cache_key(source: DataSource, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Everything that decides the tokens of ``source`` (hashes the data: every byte of a local file)."""
    path = source.path if source.path.startswith(HUB_PREFIX) else str(resolve_path(source.path).resolve())
    return {
        **asdict(source),
        "path": path,
        "data": fingerprint(source.path, source.split, source.subset),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "encoding": ENCODING_VERSION,
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def entry_name(source: DataSource, key: dict[str, Any]) -> str:
    """``<data name>-<digest of the key>``: readable in a listing, different for every key."""
    stem = Path(source.path.removeprefix(HUB_PREFIX)).name.split(".")[0] or "data"
    return f"{stem}-{key_digest(key)}"


def map_workers(num_proc: int | None, rows: int) -> int:
    """``num_proc``, or for None one per CPU core this process may use, at most one per `ROWS_PER_WORKER` rows."""
    if num_proc is not None:
        return num_proc
    return max(1, min(len(os.sched_getaffinity(0)), rows // ROWS_PER_WORKER))


def prepare(
    source: DataSource,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> Path:
    """The cache entry of ``source`` under ``tokenizer``: built (with ``num_proc`` tokenising workers) unless it is
    there; bad data raises as `qtuning.data.examples.load_examples` does, and leaves no entry."""
    from filelock import FileLock

    source.check()
    key = cache_key(source, tokenizer)
    root = Path(cache_dir or default_cache_dir()).expanduser()
    entry = root / entry_name(source, key)
    if (entry / META).is_file():
        log.info("token cache: %s", entry)
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{entry}.lock"):
        if (entry / META).is_file():  # built by another process while this one waited
            log.info("token cache: %s (built by another process)", entry)
            return entry
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        staging.chmod(0o755)  # mkdtemp's 0700 would keep other users' jobs out of a shared cache
        try:
            _build(source, tokenizer, key, staging, num_proc)
            staging.rename(entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("token cache: built %s", entry)
    return entry


def _rows_schema() -> Any:
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("location", pa.string()), ("messages", pa.list_(message))])


def _token_features() -> datasets.Features:
    from datasets import Features, List, Value

    return Features(
        {
            "location": Value("string"),
            "instruction": Value("string"),
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "truncated": Value("bool"),
            "response_tokens": Value("int32"),  # loss targets; 0: the row is dropped
        }
    )


def _write_rows(source: DataSource, report: DataReport, path: Path) -> None:
    """Read and convert every row into an Arrow file of ``(location, messages)``, a chunk at a time."""
    import pyarrow as pa

    schema = _rows_schema()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        chunk: list[dict] = []
        for location, messages in read_conversations(source, report):
            chunk.append({"location": location, "messages": messages})
            if len(chunk) == READ_CHUNK:
                writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema))
                chunk.clear()
        if chunk:
            writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema))


def _encode_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in _token_features()}
    for location, messages in zip(batch["location"], batch["messages"], strict=True):
        example, truncated = encode_example(tokenizer, messages, max_length, location)
        columns["location"].append(location)
        columns["instruction"].append(example.instruction)
        columns["input_ids"].append(example.input_ids)
        columns["labels"].append(example.labels)
        columns["truncated"].append(truncated)
        columns["response_tokens"].append(response_token_count(example.labels))
    return columns


def _build(
    source: DataSource, tokenizer: PreTrainedTokenizerBase, key: dict[str, Any], staging: Path, num_proc: int | None
) -> None:
    import datasets

    report = DataReport()
    rows_file = staging / "rows.arrow"
    log.info("token cache: reading %s", source.path)
    _write_rows(source, report, rows_file)
    report.check_usable(report.rows - report.skipped_bad_rows, source)
    rows = datasets.Dataset.from_file(str(rows_file))
    workers = map_workers(num_proc, len(rows))
    tokens = rows.map(
        _encode_batch,
        batched=True,
        batch_size=ENCODE_BATCH,
        num_proc=workers if workers > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "max_length": source.max_length},
        remove_columns=["messages"],
        features=_token_features(),
        cache_file_name=str(staging / "tokens.arrow"),
        load_from_cache_file=False,
        new_fingerprint=key_digest(key),
        desc="tokenising",
    )
    response = np.asarray(tokens.data.column("response_tokens"))
    dropped = np.flatnonzero(response == 0)
    report.truncated = int(np.asarray(tokens.data.column("truncated")).sum())
    report.dropped_no_response = len(dropped)
    report.dropped_locations = tokens.data.column("location").take(dropped).to_pylist()
    report.check_usable(len(response) - len(dropped), source)
    files = [Path(f["filename"]).name for f in tokens.cache_files]
    del rows, tokens
    rows_file.unlink()
    meta = {"key": key, "files": files, "report": asdict(report)}
    (staging / META).write_text(json.dumps(meta, indent=1) + "\n")


def load(entry: Path) -> tuple[datasets.Dataset, DataReport]:
    """A cache entry's token table, memory-mapped, and the report of its build."""
    import datasets

    meta = json.loads((entry / META).read_text())
    parts = [datasets.Dataset.from_file(str(entry / name)) for name in meta["files"]]
    return datasets.concatenate_datasets(parts), DataReport(**meta["report"])


class TextColumn(Sequence[str]):
    """One text column of some rows, read on demand."""

    def __init__(self, tokens: datasets.Dataset, name: str, rows: np.ndarray) -> None:
        self.tokens, self.name, self.rows = tokens, name, rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        rows = np.atleast_1d(self.rows[index])
        texts = self.tokens.data.fast_gather(rows).column(self.name).to_pylist() if len(rows) else []
        return texts if isinstance(index, slice) else texts[0]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), READ_BATCH):
            yield from self[start : start + READ_BATCH]


class TokenizedSplit(Sequence[Example]):
    """Some rows of a memory-mapped token table as examples, read on demand a batch at a time: nothing per token is
    held in Python between reads. Pickles by the table's file names (for loader workers)."""

    def __init__(self, tokens: datasets.Dataset, rows: np.ndarray) -> None:
        self.tokens = tokens
        self.rows = rows  # [N] int64: the table rows of this split, in split order

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> TokenizedSplit: ...
    def __getitem__(self, index: int | slice) -> Example | TokenizedSplit:
        if isinstance(index, slice):
            return TokenizedSplit(self.tokens, self.rows[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} of a split of {len(self)} rows")
        return self.take([index])[0]

    def take(self, indices: Sequence[int]) -> list[Example]:
        """The examples at ``indices`` of this split, in one read."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        if not len(rows):
            return []
        table = self.tokens.data.fast_gather(rows)  # slices of the mapped batches (Table.take would copy them all)
        fields = [table.column(name).to_pylist() for name in ("input_ids", "labels", "location", "instruction")]
        return [Example(*values) for values in zip(*fields, strict=True)]

    def __iter__(self) -> Iterator[Example]:
        for start in range(0, len(self), READ_BATCH):
            yield from self.take(range(start, min(start + READ_BATCH, len(self))))

    def response_tokens(self) -> np.ndarray:
        """``[N]`` loss targets of each row."""
        return np.asarray(self.tokens.data.table.column("response_tokens"))[self.rows]

    def instructions(self) -> TextColumn:
        return TextColumn(self.tokens, "instruction", self.rows)
