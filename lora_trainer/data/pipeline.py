"""Data paths -> tokenized, cached, mixed samples: what `SFTDataModule` packs and batches.

`parse_sources` reads `data.train_path` / `data.val_path`: a path, or a list whose items are a
path or ``{path: ..., weight: w}`` / ``{path: ..., samples: n}``. `tokenize_source` tokenizes one
source in parallel (`datasets.Dataset.map`, `num_proc` processes, with a progress bar) into an
Arrow folder under `cache_dir` named by a hash of everything the tokens depend on: the source
files (paths, sizes, modification times), the tokenizer files and chat template, the
`TokenizeSettings` and the column names. Later runs, restarts and every rank load that folder,
memory-mapped. The folder is written to a temporary sibling and renamed when complete, under a
file lock, so concurrent processes tokenize once.

`mix` combines several tokenized sources: a source with `weight: w` contributes
``round(w * rows)`` samples, with `samples: n` exactly `n` (a random subset, or whole passes in
fresh random orders and a random remainder when `n` exceeds its rows), and the result is shuffled;
all of it is a function of `seed`, so a resumed run sees the same mixture. A single plain path is
used whole and in file order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_trainer.data.formats import ChatSample, Columns, parse_record
from lora_trainer.data.sources import Locator, Source, load_rows, resolve_source
from lora_trainer.data.tokenize import (
    SampleTokenizer,
    Status,
    TokenizeSettings,
    load_tokenizer,
    require_chat_template,
)
from lora_trainer.errors import DataError

CACHE_VERSION = 1
MAX_LOCATIONS = 5
ROWS_PER_PROCESS = 10_000
MAP_BATCH_ROWS = 1_000
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class SourceSpec:
    """One data path and how much of it a mixture takes (`weight` or `samples`, not both)."""

    path: Path
    weight: float | None = None
    samples: int | None = None


@dataclass(frozen=True)
class Summary:
    """Counts of a tokenized source by `Status`, and the first locations of each non-kept kind."""

    rows: int
    counts: dict[str, int]
    examples: dict[str, list[str]] = field(default_factory=dict)

    def line(self, key: str, source: Path, settings: TokenizeSettings) -> str:
        """One line saying what was kept, truncated and dropped, with the first locations."""
        kept = self.counts.get("KEPT", 0) + self.counts.get("TRUNCATED", 0)
        parts = [f"{key}: {source}: {kept} of {self.rows} samples kept"]
        described = {
            "TRUNCATED": (
                f"longer than data.max_seq_len={settings.max_seq_len} tokens, truncated "
                "(data.overlong=truncate)"
            ),
            "OVERLONG": (
                f"longer than data.max_seq_len={settings.max_seq_len} tokens, dropped "
                "(data.overlong=drop)"
            ),
            "UNTRAINED": "train no token (within data.max_seq_len), dropped",
        }
        for name, what in described.items():
            if self.counts.get(name):
                parts.append(
                    f"{self.counts[name]} {what}: {', '.join(self.examples.get(name, []))}"
                )
        return "; ".join(parts)


def parse_sources(value: Any, key: str) -> tuple[SourceSpec, ...]:
    """`data.train_path` / `data.val_path` as `SourceSpec`s; `DataError` for a malformed value."""
    if isinstance(value, str | Path):
        return (SourceSpec(Path(value).expanduser().absolute()),)
    if not isinstance(value, Sequence) or not value:
        raise DataError(
            f"{key} must be a path or a non-empty list of paths / {{path, weight}} / "
            f"{{path, samples}} entries, got {value!r}"
        )
    specs = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, str | Path):
            specs.append(SourceSpec(Path(item).expanduser().absolute(), weight=1.0))
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("path"), str):
            raise DataError(f"{where} must be a path or {{path: ..., weight: ...}}, got {item!r}")
        unknown = sorted(set(item) - {"path", "weight", "samples"})
        if unknown:
            raise DataError(
                f"{where} has unknown key(s) {', '.join(unknown)}; use path, weight or samples"
            )
        weight, samples = item.get("weight"), item.get("samples")
        if weight is not None and samples is not None:
            raise DataError(f"{where} has both weight and samples; give one")
        if weight is not None and (not isinstance(weight, int | float) or weight <= 0):
            raise DataError(f"{where}.weight={weight!r} must be a positive number")
        if samples is not None and (not isinstance(samples, int) or samples < 1):
            raise DataError(f"{where}.samples={samples!r} must be a positive integer")
        path = Path(item["path"]).expanduser().absolute()
        specs.append(SourceSpec(path, None if samples else float(weight or 1.0), samples))
    return tuple(specs)


def _tokenizer_fingerprint(model_dir: Path, tokenizer: Any) -> list[Any]:
    files = [
        [name, hashlib.sha256((model_dir / name).read_bytes()).hexdigest()]
        for name in TOKENIZER_FILES
        if (model_dir / name).is_file()
    ]
    return [files, getattr(tokenizer, "chat_template", None)]


def cache_key(
    source: Source, model_dir: Path, tokenizer: Any, settings: TokenizeSettings, columns: Columns
) -> str:
    """The hash naming a source's tokenized folder (see the module docstring)."""
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "source": [source.kind, source.fingerprint()],
            "tokenizer": _tokenizer_fingerprint(model_dir, tokenizer),
            "settings": asdict(settings),
            "columns": asdict(columns),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_WORKER_TOKENIZERS: dict[tuple[str, TokenizeSettings], SampleTokenizer] = {}


def _sample_tokenizer(model_dir: str, settings: TokenizeSettings) -> SampleTokenizer:
    key = (model_dir, settings)
    if key not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[key] = SampleTokenizer(load_tokenizer(model_dir), settings)
    return _WORKER_TOKENIZERS[key]


def _tokenize_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    locator: Locator,
    model_dir: str,
    settings: TokenizeSettings,
    columns: Columns,
) -> dict[str, list[Any]]:
    tokenize = _sample_tokenizer(model_dir, settings)
    json_rows = "text" in batch and locator.source.kind in ("jsonl", "json_array")
    out: dict[str, list[Any]] = {"input_ids": [], "loss_mask": [], "length": [], "status": []}
    for k, index in enumerate(indices):
        shard, line = (batch["shard"][k], batch["line"][k]) if json_rows else (0, 0)
        location = locator(index, shard, line)
        if json_rows:
            try:
                record = json.loads(batch["text"][k])
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{location}: invalid JSON: {err.msg} (column {err.colno})"
                ) from err
        else:
            record = {name: values[k] for name, values in batch.items()}
        try:
            sample = parse_record(record, columns, location)
        except ValueError as err:
            raise DataError(f"{location}: {err}") from err
        if isinstance(sample, ChatSample):
            require_chat_template(tokenize.tokenizer, model_dir)
        tokenized, status = tokenize(sample)
        keep = status in (Status.KEPT, Status.TRUNCATED)
        out["input_ids"].append(np.asarray(tokenized.input_ids if keep else [], dtype=np.int32))
        out["loss_mask"].append(np.asarray(tokenized.loss_mask if keep else [], dtype=np.int8))
        out["length"].append(len(tokenized))
        out["status"].append(int(status))
    return out


def _features() -> Any:
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "loss_mask": datasets.Sequence(datasets.Value("int8")),
            "length": datasets.Value("int32"),
            "status": datasets.Value("int8"),
        }
    )


def _summarize(tokenized: Any, rows: Any, locator: Locator) -> Summary:
    """Counts by `Status` and the first locations of each dropped or truncated kind, reading the
    status column chunk by chunk (memory does not grow with the row count); JSON rows are
    located by their `shard` and `line` in `rows`."""
    counts = np.zeros(len(Status), dtype=np.int64)
    firsts: dict[Status, list[int]] = {kind: [] for kind in Status if kind != Status.KEPT}
    offset = 0
    for chunk in tokenized.data.column("status").chunks:
        status = chunk.to_numpy()
        counts += np.bincount(status, minlength=len(Status))
        for kind, indices in firsts.items():
            if len(indices) < MAX_LOCATIONS:
                found = np.flatnonzero(status == kind)[: MAX_LOCATIONS - len(indices)]
                indices += (found + offset).tolist()
        offset += len(status)
    examples = {}
    for kind, indices in firsts.items():
        if not indices:
            continue
        if locator.source.kind in ("jsonl", "json_array"):
            lines = rows.select(indices).select_columns(["shard", "line"])
            examples[kind.name] = [
                locator(index, line["shard"], line["line"])
                for index, line in zip(indices, lines, strict=True)
            ]
        else:
            examples[kind.name] = [locator(index) for index in indices]
    return Summary(
        offset, {kind.name: int(counts[kind]) for kind in Status if counts[kind]}, examples
    )


def _kept(statuses: list[int]) -> list[bool]:
    return [status <= Status.TRUNCATED for status in statuses]


def _num_proc(rows: int, num_proc: int | None) -> int | None:
    wanted = num_proc if num_proc is not None else (os.cpu_count() or 1)
    procs = min(wanted, rows // ROWS_PER_PROCESS)
    return procs if procs > 1 else None


def tokenize_source(
    spec: SourceSpec,
    *,
    model_dir: Path,
    settings: TokenizeSettings,
    columns: Columns,
    cache_dir: Path,
    key: str,
    num_proc: int | None = None,
) -> tuple[Any, Summary]:
    """The source's kept samples (`input_ids`, `loss_mask`, `length`), memory-mapped, and its
    `Summary`; tokenized now or loaded from the cache. `key` (e.g. ``data.train_path``) names
    the setting in errors and in the summary line.
    """
    try:
        return _tokenize_source(
            spec, Path(model_dir), settings, columns, Path(cache_dir), key, num_proc
        )
    except DataError as err:
        if str(err).startswith(f"{key}: "):
            raise
        raise DataError(f"{key}: {err}") from err


def _tokenize_source(
    spec: SourceSpec,
    model_dir: Path,
    settings: TokenizeSettings,
    columns: Columns,
    cache_dir: Path,
    key: str,
    num_proc: int | None,
) -> tuple[Any, Summary]:
    import datasets
    from filelock import FileLock

    source = resolve_source(spec.path)
    tokenizer = load_tokenizer(model_dir)
    folder = (
        cache_dir.absolute()
        / f"tokenized-{cache_key(source, model_dir, tokenizer, settings, columns)}"
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "summary.json").is_file():
            _build(source, folder, model_dir, settings, columns, num_proc)
    summary = Summary(**json.loads((folder / "summary.json").read_text()))
    if settings.overlong == "error" and summary.counts.get("OVERLONG"):
        raise DataError(
            f"{key}: {summary.counts['OVERLONG']} of {summary.rows} samples in {source.path} are "
            f"longer than data.max_seq_len={settings.max_seq_len} tokens: "
            f"{', '.join(summary.examples['OVERLONG'])}; raise data.max_seq_len or set "
            "data.overlong=drop or data.overlong=truncate"
        )
    kept = summary.counts.get("KEPT", 0) + summary.counts.get("TRUNCATED", 0)
    if not kept:
        raise DataError(
            f"{key}: no sample of {source.path} ({summary.rows} rows) trains any token within "
            f"data.max_seq_len={settings.max_seq_len}"
        )
    return datasets.load_from_disk(str(folder / "samples")), summary


def _build(
    source: Source,
    folder: Path,
    model_dir: Path,
    settings: TokenizeSettings,
    columns: Columns,
    num_proc: int | None,
) -> None:
    work = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        rows, locator = load_rows(source, work / "rows")
        if len(rows) == 0:
            raise DataError(f"{source.path} has no rows")
        tokenized = rows.map(
            _tokenize_batch,
            batched=True,
            batch_size=MAP_BATCH_ROWS,
            with_indices=True,
            remove_columns=rows.column_names,
            features=_features(),
            num_proc=_num_proc(len(rows), num_proc),
            fn_kwargs={
                "locator": locator,
                "model_dir": str(model_dir),
                "settings": settings,
                "columns": columns,
            },
            cache_file_name=str(work / "tokenized" / "map.arrow"),
            new_fingerprint=folder.name,
            desc=f"Tokenizing {source.path.name}",
        )
        summary = _summarize(tokenized, rows, locator)
        kept = tokenized.filter(
            _kept,
            input_columns="status",
            batched=True,
            batch_size=10_000,
            cache_file_name=str(work / "tokenized" / "kept.arrow"),
            new_fingerprint=f"{folder.name}-kept",
            desc="Keeping samples",
        )
        kept.select_columns(["input_ids", "loss_mask", "length"]).save_to_disk(
            str(work / "samples")
        )
        (work / "summary.json").write_text(json.dumps(asdict(summary)))
        shutil.rmtree(work / "rows", ignore_errors=True)
        shutil.rmtree(work / "tokenized", ignore_errors=True)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mix(parts: Sequence[tuple[Any, SourceSpec]], seed: int, key: str) -> Any:
    """One dataset of the parts' samples as their specs ask (module docstring)."""
    import datasets

    if len(parts) == 1 and parts[0][1].weight is None and parts[0][1].samples is None:
        return parts[0][0]
    picks, offset = [], 0
    for number, (dataset, spec) in enumerate(parts):
        rows = len(dataset)
        wanted = spec.samples if spec.samples is not None else round((spec.weight or 1.0) * rows)
        if wanted < 1:
            raise DataError(f"{key}: {spec.path} with weight {spec.weight} contributes no sample")
        passes = [
            np.random.default_rng([seed, number, p]).permutation(rows)
            for p in range(-(-wanted // rows))
        ]
        picks.append(np.concatenate(passes)[:wanted] + offset)
        offset += rows
    order = np.concatenate(picks)
    order = order[np.random.default_rng([seed, len(parts)]).permutation(len(order))]
    return datasets.concatenate_datasets([dataset for dataset, _ in parts]).select(order)
