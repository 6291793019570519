"""Check a whole `TrainConfig` in the launching process, before any rank starts.

`validate_config` raises a `LoraTrainerError` subclass naming the offending key and the fix
(`ConfigError`, `ParallelConfigError`, `LoraConfigError`, `CheckpointError`, `DataError`), builds
the tiny model when the config asks for it, reads and tokenizes the data into its cache (bad rows,
a missing chat template and overlong samples with `data.overlong=error` fail here), and returns the
`ResolvedRun` that every rank trains with. Once the single values are checked it makes the run's
callbacks (`lora_trainer.training.instantiate`), so an entry of `callbacks` that cannot be made
fails here.
`resolve_run` computes the same `ResolvedRun` without building or reading data, for the local
ranks Lightning relaunches after validation passed.

Saves and resume: `lora_trainer.saves` (the layout, intact saves) and
`lora_trainer.training.resume` (which save `resume` names, and the checks against it).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

from lora_trainer.bridge.safetensors_io import CheckpointReader
from lora_trainer.data.datamodule import SFTDataModule
from lora_trainer.data.pipeline import SourceSpec, parse_sources
from lora_trainer.demo.model import ensure_tiny_checkpoint, tiny_checkpoint_path
from lora_trainer.demo.tokenizer import TINY_SFT_PATH
from lora_trainer.errors import CheckpointError, ConfigError, ParallelConfigError
from lora_trainer.export.peft_adapter import Profile
from lora_trainer.lora.config import LoraConfig
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.qwen35.parallel_fit import check_parallel_fits
from lora_trainer.qwen35.spec import Qwen35Spec
from lora_trainer.saves import checkpoints_dir, is_complete_save, save_dir_name
from lora_trainer.training.choices import LoggerKind, ModelDtype
from lora_trainer.training.config import TrainConfig
from lora_trainer.training.instantiate import instantiate_callbacks
from lora_trainer.training.resume import check_resume, find_resume

log = logging.getLogger(__name__)

__all__ = ["ResolvedRun", "is_complete_save", "resolve_run", "validate_config"]

EXPORT_PROFILES: tuple[str, ...] = get_args(Profile)
LOGGER_KINDS: tuple[str, ...] = tuple(LoggerKind)
MODEL_DTYPES: tuple[str, ...] = tuple(ModelDtype)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ResolvedRun:
    """What the configuration resolves to: the facts every rank needs, all paths absolute.

    - `hf_path`: the base checkpoint directory (the tiny one, built, when `model.hf_path` is null);
    - `spec`: its `Qwen35Spec`; `parallel`, `lora`: the validated parallel and LoRA settings;
    - `world_size` = trainer.devices * trainer.num_nodes; `dp_size` = world / (tp * pp);
      `expert_dp_size` = world / (etp * ep * pp);
    - `num_microbatches` = global_batch_size / (micro_batch_size * dp_size) per optimizer step;
    - `train_sources`, `val_sources`: the data paths with their mixture weights (the shipped tiny
      dataset when data.train_path is null);
    - `output_dir`; `resume_path`: the complete save to resume from, or None to start fresh.
    """

    hf_path: Path
    spec: Qwen35Spec
    parallel: ParallelConfig
    lora: LoraConfig
    world_size: int
    dp_size: int
    expert_dp_size: int
    num_microbatches: int
    train_sources: tuple[SourceSpec, ...]
    val_sources: tuple[SourceSpec, ...] | None
    output_dir: Path
    resume_path: Path | None

    @property
    def checkpoints_dir(self) -> Path:
        """`output_dir/checkpoints`, the parent of every `step-N` save."""
        return checkpoints_dir(self.output_dir)

    def save_dir(self, step: int) -> Path:
        """`output_dir/checkpoints/step-{step}`, the save of optimizer step `step`."""
        return self.checkpoints_dir / save_dir_name(step)


def validate_config(config: TrainConfig) -> ResolvedRun:
    """Check everything checkable before ranks start; build the tiny model if it is used; read,
    check and tokenize the data into its cache (the ranks load it from there)."""
    _check_settings(config)
    instantiate_callbacks(config)
    run = _resolve(config, build_tiny=True)
    _check_shards(run.hf_path)
    _check_data(config, run)
    if run.resume_path is not None:
        check_resume(run.resume_path, config, run.hf_path, run.world_size, run.parallel)
    return run


def resolve_run(config: TrainConfig) -> ResolvedRun:
    """The `ResolvedRun` of an already validated config, without building or reading data."""
    _check_settings(config)
    return _resolve(config, build_tiny=False)


def _resolve(config: TrainConfig, build_tiny: bool) -> ResolvedRun:
    lora = config.lora.to_lora_config()
    hf_path = _model_dir(config, build_tiny)
    spec = _spec(hf_path)
    lora.check_model(spec.is_moe)
    if spec.is_moe and config.export.check and config.export.profile == "per_expert":
        raise ConfigError(
            "export.check=true needs export.profile=peft on a MoE model: PEFT does not load the "
            "per_expert layout onto transformers' Qwen3.5-MoE experts, so the check cannot "
            "compare it"
        )
    parallel, world = _parallel(config, spec)
    dp = parallel.dp_size(world)
    num_microbatches = _num_microbatches(config, dp)
    output_dir = Path(config.output_dir).expanduser().absolute()
    return ResolvedRun(
        hf_path=hf_path,
        spec=spec,
        parallel=parallel,
        lora=lora,
        world_size=world,
        dp_size=dp,
        expert_dp_size=parallel.expert_dp_size(world),
        num_microbatches=num_microbatches,
        train_sources=parse_sources(config.data.train_path or TINY_SFT_PATH, "data.train_path"),
        val_sources=_data_sources(config.data.val_path, "data.val_path"),
        output_dir=output_dir,
        resume_path=find_resume(config.resume, checkpoints_dir(output_dir), announce=build_tiny),
    )


def _check_settings(config: TrainConfig) -> None:
    """Checks on single values and value pairs that need no files."""
    positive = {
        "trainer.devices": config.trainer.devices,
        "trainer.num_nodes": config.trainer.num_nodes,
        "trainer.max_steps": config.trainer.max_steps,
        "trainer.global_batch_size": config.trainer.global_batch_size,
        "trainer.micro_batch_size": config.trainer.micro_batch_size,
        "data.max_seq_len": config.data.max_seq_len,
        "checkpoint.every_n_steps": config.checkpoint.every_n_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if config.export.profile not in EXPORT_PROFILES:
        raise ConfigError(
            f"export.profile={config.export.profile!r} is unknown; use one of "
            f"{', '.join(EXPORT_PROFILES)} (peft: packed routed-expert layout that peft and vLLM "
            "load; per_expert: 2D keys per expert)"
        )
    if not config.export.check_memory_gb > 0:
        raise ConfigError(
            f"export.check_memory_gb={config.export.check_memory_gb} must be positive: it is the "
            "size (GB) above which the export check holds one decoder layer at a time"
        )
    if config.model.dtype not in MODEL_DTYPES:
        raise ConfigError(
            f"model.dtype={config.model.dtype!r} is unknown; use one of {', '.join(MODEL_DTYPES)} "
            "(auto: bfloat16 on GPU, float32 on CPU)"
        )
    if config.logger.kind not in LOGGER_KINDS:
        raise ConfigError(
            f"logger.kind={config.logger.kind!r} is unknown; use logger=wandb or logger=none"
        )
    tp, sp, seq = config.parallel.tp, config.parallel.sp, config.data.max_seq_len
    if sp and tp > 1 and seq % tp:
        raise ConfigError(
            f"data.max_seq_len={seq} is not divisible by parallel.tp={tp}; sequence parallelism "
            f"(parallel.sp=true) splits each sequence over the tp ranks: use data.max_seq_len="
            f"{seq - seq % tp or tp} or {seq + tp - seq % tp}"
        )


def _model_dir(config: TrainConfig, build_tiny: bool) -> Path:
    model = config.model
    if model.hf_path is not None:
        return Path(model.hf_path).expanduser().absolute()
    if model.tiny is None:
        raise ConfigError(
            "model.hf_path is not set and model.tiny is null: set "
            "model.hf_path=/path/to/checkpoint (a local Hugging Face Qwen3.5 directory), or "
            "model=tiny_moe / model=tiny_dense"
        )
    if build_tiny:
        return ensure_tiny_checkpoint(model.tiny, model.tiny_cache_dir)  # type: ignore[arg-type]
    path = tiny_checkpoint_path(model.tiny, model.tiny_cache_dir)
    if not path.is_dir():
        raise CheckpointError(
            f"the tiny model {path} (model.tiny={model.tiny}) has not been built; the launching "
            "process builds it: start the run with `python train.py`, not as a single rank"
        )
    return path


def _spec(hf_path: Path) -> Qwen35Spec:
    try:
        spec = Qwen35Spec.from_hf_dir(hf_path)
    except CheckpointError as err:
        raise CheckpointError(f"model.hf_path={hf_path}: {err}") from err
    if not any((hf_path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"model.hf_path={hf_path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer files of the model into it"
        )
    return spec


def _check_shards(hf_path: Path) -> None:
    """Every safetensors file of the model has a readable header and the size it announces."""
    with CheckpointReader(hf_path) as reader:
        files = sorted({reader.file_of(name) for name in reader.names()})
    for file in files:
        problem = _shard_problem(file)
        if problem:
            raise CheckpointError(
                f"model.hf_path={hf_path}: {file.name} {problem}: the file is truncated or "
                "corrupt; download it again"
            )


def _shard_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"has {size} bytes, too few for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"has {size} bytes, less than its {length}-byte header"
        try:
            header = json.loads(handle.read(length))
            end = max(
                (
                    entry["data_offsets"][1]
                    for key, entry in header.items()
                    if key != "__metadata__"
                ),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return "has an unreadable header"
    if size != 8 + length + end:
        return f"has {size} bytes, its header announces {8 + length + end}"
    return None


def _parallel(config: TrainConfig, spec: Qwen35Spec) -> tuple[ParallelConfig, int]:
    section, trainer = config.parallel, config.trainer
    parallel = section.to_parallel_config()
    if not spec.is_moe and (parallel.ep, parallel.etp) != (1, 1):
        log.info(
            "parallel.ep=%s and parallel.etp=%s split routed experts, which this dense model "
            "does not have: the run uses ep=1, etp=1",
            parallel.ep,
            parallel.etp,
        )
        parallel = replace(parallel, ep=1, etp=1)
    world = trainer.devices * trainer.num_nodes
    model_parallel = parallel.tp * parallel.pp
    if parallel.tp >= 1 and parallel.pp >= 1 and world % model_parallel:
        raise ParallelConfigError(
            f"trainer.devices * trainer.num_nodes = {trainer.devices} * {trainer.num_nodes} = "
            f"{world} ranks is not parallel.tp * parallel.pp = {parallel.tp} * {parallel.pp} = "
            f"{model_parallel} times a whole data-parallel size (dp would be "
            f"{world}/{model_parallel}); use a multiple of {model_parallel} ranks "
            f"({model_parallel} for dp=1, {2 * model_parallel} for dp=2) or other parallel.tp / "
            "parallel.pp"
        )
    try:
        parallel.validate(world)
    except ParallelConfigError as err:
        raise ParallelConfigError(
            f"parallel.* does not fit trainer.devices * trainer.num_nodes = {world} ranks: {err}"
        ) from err
    check_parallel_fits(spec, parallel)
    return parallel, world


def _num_microbatches(config: TrainConfig, dp: int) -> int:
    global_batch, micro = config.trainer.global_batch_size, config.trainer.micro_batch_size
    per_step = micro * dp
    if global_batch % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch} is not divisible by "
            f"trainer.micro_batch_size * dp = {micro} * {dp} = {per_step}; use a multiple of "
            f"{per_step} (trainer.global_batch_size={(global_batch // per_step + 1) * per_step}) "
            "or another trainer.micro_batch_size"
        )
    return global_batch // per_step


def _data_sources(value: Any, key: str) -> tuple[SourceSpec, ...] | None:
    return None if value is None else parse_sources(value, key)


def _check_data(config: TrainConfig, run: ResolvedRun) -> None:
    """Tokenize every data source into the cache: bad rows, unknown formats, empty sources,
    overlong samples with data.overlong=error and a missing chat template fail here."""
    data = SFTDataModule.from_config(
        config.data,
        default_train_path=TINY_SFT_PATH,
        model_dir=run.hf_path,
        micro_batch_size=config.trainer.micro_batch_size,
        global_batch_size=config.trainer.global_batch_size,
    )
    data.samples("data.train_path", announce=True)
    if config.data.val_path is not None:
        data.samples("data.val_path", announce=True)
