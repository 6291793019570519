"""Wires a validated run into a Lightning Trainer: strategy, module, data, logger, and the callbacks
of `config.callbacks` (made by `lora_trainer.training.instantiate`; the save callback among them
by default)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lora_trainer.data.datamodule import SFTDataModule
from lora_trainer.demo.tokenizer import TINY_SFT_PATH
from lora_trainer.export.background import complete_export, pending_exports
from lora_trainer.saves import TRAINING_STATE, checkpoints_dir, complete_saves, step_of
from lora_trainer.training.config import TrainConfig
from lora_trainer.training.instantiate import instantiate_callbacks
from lora_trainer.training.module import LoraTrainingModule
from lora_trainer.training.quiet import route_lightning_logs_to_root
from lora_trainer.training.resume import run_settings
from lora_trainer.training.strategy import MegatronStrategy

log = logging.getLogger(__name__)


def _wandb_has_credentials() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    )


def build_logger(config: TrainConfig) -> Any:
    """WandbLogger with the full resolved config; offline (and saying so) without credentials."""
    if config.logger.kind == "none":
        return False
    from lightning.pytorch.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE") == "offline" or not _wandb_has_credentials()
    if offline:
        os.environ["WANDB_MODE"] = "offline"
        if os.environ.get("LOCAL_RANK", "0") == "0":
            log.warning(
                "wandb: no credentials found (WANDB_API_KEY or `wandb login`); logging offline "
                "under %s/wandb. Upload later with `wandb sync`. Set logger=none to turn wandb "
                "off.",
                config.output_dir,
            )
    return WandbLogger(
        project=config.logger.project,
        name=config.logger.name,
        save_dir=config.output_dir,
        offline=offline,
        config=dataclasses.asdict(config),
    )


def train(config: TrainConfig, resolved: Any) -> None:
    """Train LoRA on `resolved.hf_path` with `config` and the callbacks of `config.callbacks`
    (by default the saves and exports of `checkpoint.*` / `export.*`); print where the newest
    intact save is."""
    route_lightning_logs_to_root()
    checkpoints = checkpoints_dir(config.output_dir)
    resume = resolved.resume_path
    if resume and (step_of(resume) or 0) >= config.trainer.max_steps:
        finish_exports_only(config, checkpoints, resume, Path(resolved.hf_path))
        return
    p = resolved.parallel
    rank_zero_info(
        f"Training LoRA (r={config.lora.r}, {config.lora.style}) on {resolved.hf_path}: "
        f"{resolved.world_size} ranks = tp {p.tp} x pp {p.pp} x dp {resolved.dp_size} (ep {p.ep}), "
        f"{config.trainer.max_steps} steps of {config.trainer.global_batch_size} rows "
        f"({resolved.num_microbatches} micro-batches per rank)"
    )
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    data = SFTDataModule.from_config(
        config.data,
        default_train_path=TINY_SFT_PATH,
        model_dir=str(resolved.hf_path),
        micro_batch_size=config.trainer.micro_batch_size,
        global_batch_size=config.trainer.global_batch_size,
    )
    module = LoraTrainingModule(
        config, str(resolved.hf_path), resolved.num_microbatches, resolved.parallel
    )
    validate = bool(config.data.val_path) and config.trainer.val_every_n_steps > 0
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=config.trainer.devices,
        num_nodes=config.trainer.num_nodes,
        strategy=MegatronStrategy(
            resolved.parallel,
            seed=config.seed,
            save_settings=run_settings(
                config, Path(resolved.hf_path), resolved.world_size, resolved.parallel
            ),
        ),
        max_steps=config.trainer.max_steps,
        precision="32-true",
        logger=build_logger(config),
        callbacks=instantiate_callbacks(config),
        enable_checkpointing=False,
        use_distributed_sampler=False,
        log_every_n_steps=config.trainer.log_every_n_steps,
        limit_val_batches=None if validate else 0,
        val_check_interval=config.trainer.val_every_n_steps if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        num_sanity_val_steps=0,
        default_root_dir=config.output_dir,
    )
    ckpt_path = str(Path(resume) / TRAINING_STATE) if resume else None
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    saves = complete_saves(checkpoints) if trainer.is_global_zero else []
    if saves:
        print(
            final_message(
                saves[-1], Path(resolved.hf_path), config.export.adapter, config.export.merged
            )
        )


def finish_exports_only(config: TrainConfig, checkpoints: Path, resume: Path, base: Path) -> None:
    """A resume already at `trainer.max_steps`: complete the exports the earlier run left
    unfinished (on global rank 0, in this process), print the final message, train nothing."""
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    log.info(
        "The resumed save is at trainer.max_steps=%d: only completing unfinished exports",
        config.trainer.max_steps,
    )
    for save in pending_exports(checkpoints):
        complete_export(save)
    print(final_message(resume, base, config.export.adapter, config.export.merged))


def auto_class(base: Path) -> str:
    """The transformers Auto class that loads `base` whole: ...ForConditionalGeneration
    checkpoints (vision tower included) load with AutoModelForImageTextToText."""
    architectures = json.loads((base / "config.json").read_text()).get("architectures") or []
    if any(name.endswith("ForConditionalGeneration") for name in architectures):
        return "AutoModelForImageTextToText"
    return "AutoModelForCausalLM"


def final_message(save: Path, base: Path, adapter: bool, merged: bool) -> str:
    """Where this run's last save and its exports are, and how to load them."""
    model = auto_class(base)
    lines = [f"\nTraining done. Latest save: {save}"]
    if adapter:
        lines.append(f"  adapter (PEFT):  {save / 'hf_adapter'}")
    if merged:
        lines.append(f"  merged (HF):     {save / 'hf_merged'}")
    if adapter:
        lines.append(
            f"Load the adapter:  PeftModel.from_pretrained({model}.from_pretrained('{base}'), "
            f"'{save / 'hf_adapter'}')"
        )
    if merged:
        lines.append(f"Load merged:       {model}.from_pretrained('{save / 'hf_merged'}')")
    return "\n".join(lines) + "\n"
