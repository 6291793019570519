"""The LightningModule: builds the Qwen3.5 stage with LoRA on each rank, runs one global batch
per training step through megatron's (pipeline-aware) schedule, and steps AdamW. It is the
`AdaptedModel` (`lora_trainer.export.source`) the save callback exports: `adapters`, `hf_path`,
`lora_config`, `spec`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from lora_trainer.bridge.build import LoadedModel, build_model_from_hf
from lora_trainer.errors import CheckpointError
from lora_trainer.lora.experts import Adapter
from lora_trainer.lora.inject import inject_lora
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.qwen35.model import Qwen35Model
from lora_trainer.qwen35.spec import Qwen35Spec
from lora_trainer.training.config import TrainConfig
from lora_trainer.training.loss import masked_token_loss
from lora_trainer.training.optim import build_optimizer, clip_gradients, warmup_cosine
from lora_trainer.training.resume import TRAIN_LOG


def params_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on GPU, fp32 on CPU (names checked against MODEL_DTYPES before launch)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


class LoraTrainingModule(pl.LightningModule):
    def __init__(
        self, config: TrainConfig, hf_path: str, num_microbatches: int, parallel: ParallelConfig
    ) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.hf_path = hf_path
        self.lora_config = config.lora.to_lora_config()
        self.num_microbatches = num_microbatches
        self.automatic_optimization = False
        self.strict_loading = False
        self.loaded: LoadedModel | None = None
        self.adapters: list[Adapter] = []
        self.ddp: DistributedDataParallel | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.tokens_seen = 0
        self._val_totals = [0.0, 0.0]

    def configure_model(self) -> None:
        if self.loaded is not None:
            return
        self.loaded = build_model_from_hf(
            self.hf_path,
            self.parallel,
            params_dtype(self.config.model.dtype),
            self.config.model.recompute,
        )
        self.adapters = inject_lora(self.loaded.model, self.lora_config)
        model_config = self.loaded.model.config
        model_config.calculate_per_token_loss = True
        model_config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=False
        )
        self.ddp = DistributedDataParallel(
            config=model_config, ddp_config=ddp_config, module=self.loaded.model
        )

    def built(self) -> LoadedModel:
        """The model `configure_model` built on this rank."""
        if self.loaded is None:
            raise RuntimeError("the model is built by configure_model, which has not run yet")
        return self.loaded

    @property
    def spec(self) -> Qwen35Spec:
        """The base model's spec (once `configure_model` built it)."""
        return self.built().spec

    @property
    def megatron_model(self) -> Qwen35Model:
        """This rank's stage of the model (once `configure_model` built it)."""
        return self.built().model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.built().model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = build_optimizer(self.trainable_parameters(), self.config.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.config.optim, self.config.trainer.max_steps)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"},
        }

    # torch's overloads return the `destination` argument's type; this one takes no destination.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Only the LoRA factors of this rank (the base is the HF checkpoint, never saved)."""
        return {
            name: p.detach().clone()
            for name, p in self.built().model.named_parameters()
            if p.requires_grad
        }

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        params = dict(self.built().model.named_parameters())
        missing = [name for name, p in params.items() if p.requires_grad and name not in state_dict]
        unexpected = [name for name in state_dict if name not in params]
        if missing or unexpected:
            raise CheckpointError(
                f"the checkpoint's LoRA parameters do not match this model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; resume with the same lora.* and parallel.* settings"
            )
        with torch.no_grad():
            for name, value in state_dict.items():
                params[name].copy_(value)

    def _microbatches(self, dataloader_iter: Iterator[Any]) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(self.num_microbatches):
            batch, _, _ = next(dataloader_iter)
            yield {key: value.to(self.device) for key, value in batch.items()}

    def _forward_step(
        self, data_iterator: Iterator[dict[str, torch.Tensor]], model: Any
    ) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        cu_seqlens = batch.get("cu_seqlens")
        output = model(
            batch["input_ids"],
            batch["position_ids"],
            None if cu_seqlens is None else cu_seqlens.long(),
        )

        def loss_func(
            logits: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
            loss_sum, tokens = masked_token_loss(logits, batch["labels"])
            return (
                loss_sum,
                tokens.int(),
                {"loss": torch.stack([loss_sum.detach(), tokens.float()])},
            )

        return output, loss_func

    def training_step(self, dataloader_iter: Iterator[Any]) -> None:
        start = time.perf_counter()
        optimizer = self.optimizers()
        assert isinstance(optimizer, LightningOptimizer), "configure_optimizers returns one"
        assert self.ddp is not None and self.scheduler is not None, "set up by Lightning first"
        self.ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = self._run_schedule(
            self._microbatches(dataloader_iter), self.num_microbatches, forward_only=False
        )
        params = self.trainable_parameters()
        for param in params:
            # megatron's DDP accumulates each trainable parameter's gradient in `main_grad`.
            param.grad = param.main_grad.to(param.dtype)  # type: ignore[attr-defined]
        norm = clip_gradients(params, self.config.optim.clip_grad)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        self.scheduler.step()
        loss, tokens = self._global_loss(losses)
        self.tokens_seen += int(tokens)
        elapsed = time.perf_counter() - start
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": norm.item(),
            "train/tokens_per_s": tokens / elapsed,
            "train/tokens_seen": float(self.tokens_seen),
        }
        self.log_dict(metrics, prog_bar=True, rank_zero_only=True, batch_size=1)
        if self.trainer.is_global_zero:
            self._append_metrics(metrics)

    def _append_metrics(self, metrics: dict[str, float]) -> None:
        """One JSON line per step in `output_dir/train_log.jsonl` (with `time`, unix seconds),
        readable without any logger."""
        path = Path(self.config.output_dir) / TRAIN_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as log_file:
            log_file.write(
                json.dumps({"step": self.trainer.global_step, "time": time.time(), **metrics})
                + "\n"
            )

    def _global_loss(self, losses: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Token-weighted mean loss over the global batch and its trained-token count, on every
        rank (the losses live on the last pipeline stage). The sums are made on this module's
        device, which NCCL's collectives need on GPUs."""
        totals = torch.zeros(2, device=self.device)
        for item in losses or []:
            totals += item["loss"].to(totals.device)
        if dist.is_initialized():
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast(
                totals, src=last, group=parallel_state.get_pipeline_model_parallel_group()
            )
        loss_sum, tokens = totals.tolist()
        return loss_sum / max(tokens, 1.0), tokens

    def _run_schedule(
        self, batches: Iterator[dict[str, torch.Tensor]], count: int, forward_only: bool
    ) -> list[dict[str, torch.Tensor]]:
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=batches,
            model=[self.ddp],
            num_microbatches=count,
            seq_length=self.config.data.max_seq_len,
            micro_batch_size=self.config.trainer.micro_batch_size,
            forward_only=forward_only,
        )

    def on_validation_epoch_start(self) -> None:
        self._val_totals = [0.0, 0.0]

    def validation_step(self, dataloader_iter: Iterator[Any]) -> None:
        batch, _, _ = next(dataloader_iter)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        loss, tokens = self._global_loss(self._run_schedule(iter([batch]), 1, forward_only=True))
        self._val_totals[0] += loss * tokens
        self._val_totals[1] += tokens

    def on_validation_epoch_end(self) -> None:
        loss_sum, tokens = self._val_totals
        metrics = {"val/loss": loss_sum / max(tokens, 1.0)}
        self.log_dict(metrics, rank_zero_only=True, batch_size=1)
        if self.trainer.is_global_zero:
            self._append_metrics(metrics)

    def on_train_start(self) -> None:
        """Set the learning rate of the next step from this run's schedule: a resume restores the
        rate the saved run's schedule set, which differs when trainer.max_steps changed."""
        scheduler = self.scheduler
        assert scheduler is not None, "configure_optimizers runs before on_train_start"
        for group, base, factor in zip(
            scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
