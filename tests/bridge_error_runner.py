"""What the spawned rank of the bridge error tests runs (module level, so spawn can import it).

Loading needs megatron's parallel state, so every load check shares one world-1 process: it
builds the model from each checkpoint directory in turn and reports how each load ended.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadOutcome:
    """How one `build_model_from_hf` call ended: `error_type` is None when the load succeeded."""

    error_type: str | None
    message: str
    num_parameters: int


def try_loads(rank: int, world_size: int, checkpoints: dict[str, str]) -> dict[str, LoadOutcome]:
    """Build the TP=1 model from every checkpoint; the outcome of each, by case name.

    Only lora_trainer's own input errors (`LoraTrainerError`) are reported as outcomes; any other
    exception is a bug and propagates to the test."""
    from lora_trainer.bridge.build import build_model_from_hf
    from lora_trainer.errors import LoraTrainerError
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.parallel.state import destroy_parallel, initialize_parallel

    config = ParallelConfig()
    initialize_parallel(config)
    outcomes: dict[str, LoadOutcome] = {}
    try:
        for case, path in checkpoints.items():
            try:
                loaded = build_model_from_hf(path, config)
            except LoraTrainerError as error:
                outcomes[case] = LoadOutcome(type(error).__name__, str(error), 0)
            else:
                count = sum(p.numel() for p in loaded.model.parameters())
                outcomes[case] = LoadOutcome(None, "", count)
    finally:
        destroy_parallel()
    return outcomes
