"""Train LoRA adapters on Qwen3.5: `python train.py [key=value ...]` (keys: README.md, conf/)."""

import sys
from pathlib import Path

from lora_trainer.training.quiet import quiet_third_party_noise

quiet_third_party_noise()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lora_trainer.errors import LoraTrainerError  # noqa: E402
from lora_trainer.training.hydra_schema import check_command_line, register_schema, to_train_config  # noqa: E402
from lora_trainer.training.launch import is_relaunched_rank  # noqa: E402
from lora_trainer.training.validate import resolve_run, validate_config  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent / "conf"

register_schema()


def fail(err: LoraTrainerError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    """Validate (in the process the user started; relaunched ranks only resolve), then train."""
    try:
        config = to_train_config(cfg)
        resolved = resolve_run(config) if is_relaunched_rank() else validate_config(config)
    except LoraTrainerError as err:
        fail(err)
    from lora_trainer.training.app import train

    train(config, resolved)


if __name__ == "__main__":
    if not is_relaunched_rank():
        try:
            check_command_line(sys.argv[1:], CONF_DIR)
        except LoraTrainerError as err:
            fail(err)
    main()
