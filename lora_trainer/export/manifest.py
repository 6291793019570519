"""`export_manifest.json`: what an HF export holds, from which base, made with which libraries.

Records the base path and the sha256 of its config.json, the adapter profile and hyperparameters,
the library versions, the training step, the sha256 of every exported file, how many modules of
each kind the adapter targets and how many of its lora_B tensors are non-zero, and the export
check result when one ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_trainer.export.check import ExportCheckResult
from lora_trainer.export.hf_adapter_weights import DistributedAdapter, HFAdapter
from lora_trainer.files.atomic import atomic_write_json

MANIFEST_FILE = "export_manifest.json"
FORMAT_VERSION = 1
LIBRARIES = ("torch", "transformers", "peft", "megatron-core", "safetensors", "lora_trainer")
MODULE_KINDS = ("attention", "gdn", "mlp", "shared_expert", "routed_experts", "other")
_HASH_CHUNK = 16 * 2**20


def build_manifest(
    *,
    adapter: HFAdapter | DistributedAdapter,
    base_dir: Path,
    step: int,
    profile: str,
    exported_dirs: Mapping[str, Path],
    check: ExportCheckResult | None = None,
    export_seconds: float | None = None,
) -> dict[str, Any]:
    """The manifest of one export; `exported_dirs` maps each written directory's name
    (`hf_adapter`, `hf_merged`) to its path, whose files are hashed."""
    nonzero = (
        adapter.nonzero_lora_b
        if isinstance(adapter, DistributedAdapter)
        else nonzero_lora_b(adapter)
    )
    adapter = adapter.layout if isinstance(adapter, DistributedAdapter) else adapter
    base_dir = Path(base_dir)
    config = base_dir / "config.json"
    files = {name: hash_files(directory) for name, directory in exported_dirs.items()}
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "base": {
            "path": str(base_dir.resolve()),
            "config_sha256": sha256_file(config) if config.is_file() else None,
        },
        "profile": profile,
        "versions": library_versions(),
        "adapter": {
            "r": adapter.r,
            "alpha": adapter.alpha,
            "use_rslora": adapter.use_rslora,
            "scale": adapter.scale,
            "text_prefix": adapter.text_prefix,
            "modules": module_counts(adapter),
            "nonzero_lora_B": nonzero,
        },
        "files": files,
        "sizes_bytes": {
            name: sum((directory / file).stat().st_size for file in files[name])
            for name, directory in exported_dirs.items()
        },
        "export_seconds": export_seconds,
        "check": None if check is None else dataclasses.asdict(check),
    }


def write_manifest(manifest: Mapping[str, Any], save_dir: Path) -> Path:
    """Write `manifest` atomically as `save_dir/export_manifest.json`; returns its path."""
    path = Path(save_dir) / MANIFEST_FILE
    atomic_write_json(path, manifest)
    return path


def module_kind(path: str) -> str:
    """The kind of an adapted HF module path (below the text prefix)."""
    if "self_attn." in path:
        return "attention"
    if "linear_attn." in path:
        return "gdn"
    if "mlp.shared_expert." in path:
        return "shared_expert"
    if "mlp.experts." in path:
        return "routed_experts"
    if "mlp." in path:
        return "mlp"
    return "other"


def module_counts(adapter: HFAdapter) -> dict[str, int]:
    """Adapted modules per kind; each packed routed-expert projection of a layer counts once."""
    counts = Counter(module_kind(path) for path in (*adapter.linears, *adapter.experts))
    return {kind: counts[kind] for kind in MODULE_KINDS}


def nonzero_lora_b(adapter: HFAdapter) -> int:
    """How many lora_B tensors (one per linear module, one per packed expert projection) are not
    all zero."""
    linears = sum(1 for w in adapter.linears.values() if bool(w.b.any()))
    return linears + sum(1 for w in adapter.experts.values() if bool(w.b.any()))


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries an export depends on (None where not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by path relative to it (files hashed in parallel)."""
    directory = Path(directory)
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    workers = max(1, min(8, os.cpu_count() or 1, len(files)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(sha256_file, files))
    return {
        path.relative_to(directory).as_posix(): digest
        for path, digest in zip(files, digests, strict=True)
    }


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
