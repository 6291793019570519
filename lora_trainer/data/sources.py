"""Where training rows come from: one path -> a memory-mapped `datasets.Dataset` and row locations.

`data.train_path` / `data.val_path` name one of:

- a JSONL file (``.jsonl``; ``.json`` holding one object per line) or a JSON file holding one
  array of objects; rows are located as ``file:line`` (``file[i]`` in an array);
- a Parquet file (``.parquet``);
- a folder of Parquet or JSONL shards, read in file-name order (``.parquet`` or ``.jsonl`` /
  ``.json``, one kind per folder); rows are located per shard;
- a folder written by `datasets.Dataset.save_to_disk` (``dataset_info.json`` and
  ``state.json``), or a `DatasetDict` folder with a single split.

JSON lines are kept as text in an Arrow table (`shard`, `line`, `text`) and parsed where they are
tokenized, so a row whose fields change type from line to line is read as written and a bad line
is reported with its number; Parquet rows are copied as they are into an Arrow file, a thousand
rows at a time, and `datasets` folders are opened in place. Either way the rows are memory-mapped
from disk, never all in RAM (a JSON array file is parsed whole: use JSONL or Parquet for large
data).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
PARQUET_BATCH_ROWS = 1_000
SUPPORTED = (
    "a .jsonl/.json file, a .parquet file, a folder of .parquet or .jsonl shards, "
    "or a datasets.save_to_disk folder"
)


@dataclass(frozen=True)
class Source:
    """A resolved data path: `kind` is jsonl, json_array, parquet or arrow; `files` in read
    order."""

    path: Path
    kind: str
    files: tuple[Path, ...]

    def fingerprint(self) -> list[Any]:
        """What identifies the data for the cache: every file's path, size and modification time."""
        files = self.files if self.kind != "arrow" else tuple(sorted(self.path.rglob("*")))
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        for raw in f:
            stripped = raw.strip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def resolve_source(path: str | Path) -> Source:
    """The `Source` at `path`; `DataError` naming what is supported when it is none of them."""
    path = Path(path).expanduser().absolute()
    if path.is_file():
        if path.suffix in PARQUET_SUFFIXES:
            return Source(path, "parquet", (path,))
        if path.suffix in JSONL_SUFFIXES:
            try:
                array = _is_json_array(path)
            except OSError as err:
                raise DataError(f"cannot read {path}: {err.strerror or err}") from err
            return Source(path, "json_array" if array else "jsonl", (path,))
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use {SUPPORTED}")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return Source(path, "arrow", ())
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        parquet = tuple(p for p in files if p.suffix in PARQUET_SUFFIXES)
        jsonl = tuple(p for p in files if p.suffix in JSONL_SUFFIXES)
        if parquet and jsonl:
            raise DataError(f"{path} holds both Parquet and JSONL shards; keep one kind per folder")
        if parquet:
            return Source(path, "parquet", parquet)
        if jsonl:
            return Source(path, "jsonl", jsonl)
        raise DataError(f"{path} holds no data shards; use {SUPPORTED}")
    raise DataError(f"the dataset path {path} does not exist; use {SUPPORTED}")


def _has_line(path: Path) -> bool:
    with path.open("rb") as f:
        return any(raw.strip() for raw in f)


def _json_lines(files: list[str]) -> Iterator[dict[str, Any]]:
    for shard, name in enumerate(files):
        with open(name, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{name}:{lineno}: not valid UTF-8 ({err.reason})") from err
                if line.strip():
                    yield {"shard": shard, "line": lineno, "text": line}


def _json_array(files: list[str]) -> Iterator[dict[str, Any]]:
    for shard, name in enumerate(files):
        try:
            records = json.loads(Path(name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{name}: not a valid JSON array: {err}") from err
        if not isinstance(records, list):
            raise DataError(f"{name}: expected a JSON array of objects")
        for i, record in enumerate(records):
            yield {"shard": shard, "line": i, "text": json.dumps(record, ensure_ascii=False)}


@dataclass(frozen=True)
class Locator:
    """Names a row: ``file:line`` (JSONL), ``file[i]`` (JSON array), ``file row i`` (Parquet,
    Arrow).

    JSON rows are named by their `shard` and `line` columns, the others by the row index.
    """

    source: Source
    starts: tuple[int, ...] = (0,)

    def __call__(self, index: int, shard: int = 0, line: int = 0) -> str:
        if self.source.kind == "jsonl":
            return f"{self.source.files[shard]}:{line}"
        if self.source.kind == "json_array":
            return f"{self.source.files[shard]}[{line}]"
        if self.source.kind == "arrow":
            return f"{self.source.path} row {index}"
        shard = bisect.bisect_right(self.starts, index) - 1
        return f"{self.source.files[shard]} row {index - self.starts[shard]}"


def load_rows(source: Source, cache_dir: Path) -> tuple[Any, Locator]:
    """The source's rows as a memory-mapped `datasets.Dataset`, and its `Locator`.

    JSON sources have the columns `shard`, `line` and `text` (a JSON object); the others have the
    file's own columns. Intermediate Arrow files go under `cache_dir`.
    """
    import datasets

    files = [str(f) for f in source.files]
    if source.kind == "jsonl" and not any(_has_line(f) for f in source.files):
        raise DataError(f"{source.path} has no rows")
    try:
        if source.kind in ("jsonl", "json_array"):
            generator = _json_lines if source.kind == "jsonl" else _json_array
            rows = datasets.Dataset.from_generator(
                generator,
                gen_kwargs={"files": files},
                features=datasets.Features(
                    {
                        "shard": datasets.Value("int32"),
                        "line": datasets.Value("int64"),
                        "text": datasets.Value("string"),
                    }
                ),
                cache_dir=str(cache_dir),
                fingerprint=_fingerprint(source),
            )
            starts: tuple[int, ...] = (0,)
        elif source.kind == "parquet":
            rows, counts = _parquet_rows(files, cache_dir / "rows.arrow")
            starts = tuple(sum(counts[:k]) for k in range(len(counts)))
        else:
            loaded = datasets.load_from_disk(str(source.path))
            if isinstance(loaded, datasets.DatasetDict):
                if len(loaded) != 1:
                    raise DataError(
                        f"{source.path} is a DatasetDict with splits {', '.join(loaded)}; point "
                        "the data path at one split folder, e.g. "
                        f"{source.path / next(iter(loaded))}"
                    )
                loaded = next(iter(loaded.values()))
            rows, starts = loaded, (0,)
    except DataError:
        raise
    except Exception as err:  # pyarrow and datasets raise many kinds for unreadable files
        raise DataError(f"cannot read {source.path}: {type(err).__name__}: {err}") from err
    return rows, Locator(source, starts)


def _parquet_rows(files: list[str], path: Path) -> tuple[Any, list[int]]:
    """The Parquet files' rows copied into one Arrow file at `path`, memory-mapped, and each
    file's row count.

    The rows are read `PARQUET_BATCH_ROWS` at a time, on this thread, without buffering a file's
    column chunks ahead (Arrow's pre-buffering and its scanner threads keep allocator memory that
    grows with the file), and cast to the first file's schema, as `datasets.Dataset.from_parquet`
    does.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import table_cast

    features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
    schema = features.arrow_schema
    counts = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(features=features, path=str(path)) as writer:
        for name in files:
            with pq.ParquetFile(name, pre_buffer=False) as parquet:
                counts.append(parquet.metadata.num_rows)
                for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, use_threads=False):
                    writer.write_table(table_cast(pa.Table.from_batches([batch]), schema))
        writer.finalize()
    info = datasets.DatasetInfo(features=features)
    return datasets.Dataset.from_file(str(path), info=info), counts


def _fingerprint(source: Source) -> str:
    blob = json.dumps([source.kind, source.fingerprint()]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
