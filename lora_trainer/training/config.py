"""The run configuration: one dataclass per section, composed in `TrainConfig`.

These dataclasses are the only place a key and its default are written: Hydra uses them as the
schema (`hydra_schema.py`), and the files under `conf/` hold presets only (a model, a parallel
layout, a logger), each setting just the keys that make it that preset. Adding a key is one field
here plus its row in README.md's configuration table. Closed sets are the enums of `choices.py`.

Each section's defaults are the global ones, which every preset starts from. `TrainConfig()` is
the embedded demo run, what `python train.py` runs with no overrides: the `model=tiny_moe` preset
(`conf/model/tiny_moe.yaml`), the tiny random MoE with its 4 experts split over 2 ranks. A test
composes the Hydra config with no overrides and compares it with `TrainConfig()` field by field.

`callbacks` holds the Lightning callbacks of the run, each a `_target_` node that
`lora_trainer.training.instantiate` instantiates with Hydra, its interpolations (`${...}`)
resolved against the whole configuration when the callbacks are made: `TrainConfig.callbacks`
keeps them as written.

These field names are the public contract of `python train.py key=value` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_trainer.data.formats import Columns
from lora_trainer.lora.config import ALL_TARGETS, LoraConfig
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.qwen35.recompute_mode import Recompute
from lora_trainer.training.choices import (
    ExportProfile,
    LoggerKind,
    LoraStyle,
    ModelDtype,
    Overlong,
    TinyKind,
    TrainOn,
)


@dataclass
class ModelConfig:
    """`hf_path`: a local Hugging Face Qwen3.5 checkpoint directory. Left null, the embedded tiny
    random model of kind `tiny` is built once and cached under `tiny_cache_dir`."""

    hf_path: str | None = None
    tiny: TinyKind | None = None
    tiny_cache_dir: str = ".cache/tiny_models"
    dtype: ModelDtype = ModelDtype.auto
    recompute: Recompute = Recompute.none


@dataclass
class LoraSection:
    """LoRA on the Megatron linears in `targets`; scale = alpha / r (alpha / sqrt(r) with
    rslora)."""

    r: int = 16
    alpha: float = 32.0
    rslora: bool = False
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    style: LoraStyle = LoraStyle.fused
    seed: int = 0

    def to_lora_config(self) -> LoraConfig:
        """The validated library config (LoraConfigError for bad values)."""
        return LoraConfig(
            r=self.r,
            alpha=self.alpha,
            rslora=self.rslora,
            dropout=self.dropout,
            targets=tuple(self.targets),
            # A LoraStyle member is its string value, one of LoraConfig's literals.
            style=self.style,  # type: ignore[arg-type]
            seed=self.seed,
        )


@dataclass
class ParallelSection:
    """megatron-core parallel sizes; data parallel is
    (trainer.devices * trainer.num_nodes) / (tp * pp). `ep` and `etp` split the routed experts (a
    dense model has none: they do not apply to it); `sp` (sequence parallel) needs tp > 1."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False

    def to_parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp, sp=self.sp)


@dataclass
class DataSection:
    """SFT data; `train_path` null means the small chat dataset shipped with lora_trainer,
    `val_path` null no validation. `train_path` / `val_path` are a path (JSONL/JSON, Parquet, a
    folder of shards, a datasets folder) or a list of paths / `{path, weight}` /
    `{path, samples}` (a mixture, ordered by `seed`); see `lora_trainer.data.pipeline`. `pack`
    packs several samples into each `max_seq_len` row; `overlong` says what becomes of longer
    samples. Tokenized data is cached under `cache_dir` (`num_proc` tokenizer processes; null: one
    per CPU core)."""

    train_path: Any = None
    val_path: Any = None
    max_seq_len: int = 128
    pack: bool = True
    seed: int = 0
    train_on: TrainOn = TrainOn.all_assistant
    enable_thinking: bool = True
    overlong: Overlong = Overlong.drop
    columns: Columns = field(default_factory=Columns)
    cache_dir: str = ".cache/data"
    num_proc: int | None = None


@dataclass
class TrainerSection:
    """Lightning Trainer settings: devices * num_nodes ranks; global_batch_size rows per optimizer
    step, in micro-batches of micro_batch_size rows per data-parallel rank. val_every_n_steps 0:
    no validation loop."""

    devices: int = 1
    num_nodes: int = 1
    max_steps: int = 40
    global_batch_size: int = 8
    micro_batch_size: int = 2
    log_every_n_steps: int = 1
    val_every_n_steps: int = 0


@dataclass
class OptimSection:
    """Adam over the LoRA parameters: peak lr after warmup_steps, min_lr at the end of the
    schedule."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class CheckpointSection:
    """Save every every_n_steps optimizer steps to output_dir/checkpoints/step-N; keep the last
    keep_last."""

    every_n_steps: int = 20
    keep_last: int = 2


@dataclass
class ExportSection:
    """Written into each save: hf_adapter/ (adapter) and hf_merged/ (base + LoRA folded in);
    `check` compares the export with transformers + peft after writing it, one decoder layer at a
    time when the whole model in the check's dtype exceeds `check_memory_gb`; `background` makes
    them in background processes while training goes on (`export.async` cannot be the key: `async`
    is a Python keyword, not a dataclass field name)."""

    adapter: bool = True
    merged: bool = True
    profile: ExportProfile = ExportProfile.peft
    check: bool = False
    background: bool = True
    check_memory_gb: float = 16.0


@dataclass
class LoggerSection:
    """Without wandb credentials the run logs offline and says so."""

    kind: LoggerKind = LoggerKind.wandb
    project: str = "lora_trainer"
    name: str | None = None


def default_callbacks() -> dict[str, Any]:
    """`save`: the saves and their HF exports (`callbacks/checkpoint_export.py`), wired to
    `output_dir`, `checkpoint.*` and `export.*`; `progress`: a progress bar counted in optimizer
    steps (`callbacks/step_progress.py`)."""
    return {
        "save": {
            "_target_": "callbacks.checkpoint_export.CheckpointExportCallback",
            "output_dir": "${output_dir}",
            "every_n_steps": "${checkpoint.every_n_steps}",
            "keep_last": "${checkpoint.keep_last}",
            "adapter": "${export.adapter}",
            "merged": "${export.merged}",
            "profile": "${export.profile}",
            "check": "${export.check}",
            "check_memory_gb": "${export.check_memory_gb}",
            "background": "${export.background}",
        },
        "progress": {"_target_": "callbacks.step_progress.StepProgressBar"},
    }


@dataclass
class TrainConfig:
    """The run; with no arguments, the embedded demo run (conf/model/tiny_moe.yaml's settings).

    `output_dir`: saves, Hydra's logs and offline wandb runs. `resume`: null starts fresh; latest
    the newest complete save under output_dir/checkpoints (fresh if there is none); a path, that
    save (output_dir/checkpoints/step-N). `callbacks`: name -> `_target_` node (or null, left
    out) of each Lightning callback (`default_callbacks`)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(tiny=TinyKind.moe))
    lora: LoraSection = field(default_factory=LoraSection)
    parallel: ParallelSection = field(default_factory=lambda: ParallelSection(ep=2))
    data: DataSection = field(default_factory=DataSection)
    trainer: TrainerSection = field(default_factory=lambda: TrainerSection(devices=2))
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    export: ExportSection = field(default_factory=ExportSection)
    logger: LoggerSection = field(default_factory=LoggerSection)
    callbacks: dict[str, Any] = field(default_factory=default_callbacks)
    output_dir: str = "outputs/run"
    resume: str | None = None
    seed: int = 1234
