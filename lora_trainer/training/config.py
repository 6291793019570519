"""The run configuration: one dataclass per Hydra group under `conf/`, composed in `TrainConfig`.

These field names are the public contract of `python train.py key=value` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lora_trainer.lora.config import LoraConfig
from lora_trainer.parallel.config import ParallelConfig


@dataclass
class ModelConfig:
    """`hf_path`: a local Hugging Face Qwen3.5 checkpoint directory. Left empty, the embedded
    tiny random model of kind `tiny` is built once and cached under `tiny_cache_dir`."""

    hf_path: Optional[str] = None
    tiny: Optional[str] = "moe"
    tiny_cache_dir: str = ".cache/tiny_models"
    dtype: str = "auto"


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32.0
    rslora: bool = False
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "in_proj", "out_proj", "linear_fc1", "linear_fc2"]
    )
    style: str = "fused"
    seed: int = 0

    def to_lora_config(self) -> LoraConfig:
        """The validated library config (LoraConfigError for bad values)."""
        return LoraConfig(
            r=self.r, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout,
            targets=tuple(self.targets), style=self.style, seed=self.seed,  # type: ignore[arg-type]
        )


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False

    def to_parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp, sp=self.sp)


@dataclass
class DataSection:
    """`train_path` empty means the small chat dataset shipped with lora_trainer."""

    train_path: Optional[str] = None
    val_path: Optional[str] = None
    max_seq_len: int = 256
    pack: bool = True
    seed: int = 0


@dataclass
class TrainerSection:
    devices: int = 1
    num_nodes: int = 1
    max_steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 1
    log_every_n_steps: int = 1
    val_every_n_steps: int = 0


@dataclass
class OptimSection:
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class CheckpointSection:
    every_n_steps: int = 50
    keep_last: int = 2


@dataclass
class ExportSection:
    adapter: bool = True
    merged: bool = True
    profile: str = "peft"
    check: bool = False


@dataclass
class LoggerSection:
    """`kind`: wandb or none. Without wandb credentials the run logs offline and says so."""

    kind: str = "wandb"
    project: str = "lora_trainer"
    name: Optional[str] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    export: ExportSection = field(default_factory=ExportSection)
    logger: LoggerSection = field(default_factory=LoggerSection)
    output_dir: str = "outputs/run"
    resume: Optional[str] = None
    seed: int = 1234
