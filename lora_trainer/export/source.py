"""What a save's export reads from the model being trained: the `AdaptedModel` protocol.

The save callback (`callbacks/checkpoint_export.py`) exports any LightningModule with these
members; `lora_trainer.training.module.LoraTrainingModule` is the one `train.py` trains. The
protocol lives in `export/`, below `training/`, so the callbacks need no import of `training`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from lora_trainer.lora.config import LoraConfig
from lora_trainer.lora.experts import Adapter
from lora_trainer.qwen35.model import Qwen35Model
from lora_trainer.qwen35.spec import Qwen35Spec


@runtime_checkable
class AdaptedModel(Protocol):
    """A model with LoRA adapters on a Hugging Face base checkpoint, on one rank.

    - `adapters`: this rank's LoRA modules (what `lora_trainer.lora.inject.inject_lora` returns);
    - `hf_path`: the base checkpoint directory;
    - `lora_config`: the LoRA settings the adapters were built with;
    - `spec`: the base model's `Qwen35Spec` (once the model is built);
    - `megatron_model`: this rank's stage of the model being trained (once built), which the export
      check's comparison with the trained layers runs.
    """

    adapters: list[Adapter]
    hf_path: str
    lora_config: LoraConfig

    @property
    def spec(self) -> Qwen35Spec: ...

    @property
    def megatron_model(self) -> Qwen35Model: ...
