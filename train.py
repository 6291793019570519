"""Train LoRA adapters on Qwen3.5: `python train.py [key=value ...]` (keys: README.md, conf/)."""

import sys
from pathlib import Path

from lora_trainer.training.quiet import quiet_third_party_noise

quiet_third_party_noise()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lora_trainer.errors import LoraTrainerError  # noqa: E402
from lora_trainer.training.failures import exit_after_launch, exit_before_launch  # noqa: E402
from lora_trainer.training.hydra_schema import check_command_line, register_schema, to_train_config  # noqa: E402
from lora_trainer.training.launch import is_first_process, is_relaunched_rank  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent / "conf"

register_schema()


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    """Validate and prepare the output folder (in the process the user started; relaunched ranks
    only resolve), then train; any failure ends in one `error:` line (failures.py). Everything
    that imports torch, Lightning or megatron is imported here, so a mistyped command line is
    refused within a second or two."""
    launched_in: Path | None = None
    try:
        config = to_train_config(cfg)
        from lora_trainer.training.app import train
        from lora_trainer.training.prepare import prepared_run
        from lora_trainer.training.validate import resolve_run

        if is_relaunched_rank():
            resolved = resolve_run(config)
            launched_in = resolved.output_dir
            train(config, resolved)
            return
        with prepared_run(config, first=is_first_process()) as resolved:
            launched_in = resolved.output_dir
            train(config, resolved)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:
        if launched_in is None:
            exit_before_launch(error)
        exit_after_launch(error, launched_in)


if __name__ == "__main__":
    if not is_relaunched_rank():
        try:
            check_command_line(sys.argv[1:], CONF_DIR)
        except LoraTrainerError as err:
            exit_before_launch(err)
    main()
