"""The one place the run's Lightning callbacks are made: `instantiate_callbacks`.

Each entry of `TrainConfig.callbacks` is a Hydra `_target_` node (the import path of a callback
class or factory, and its arguments) or null (left out); `hydra.utils.instantiate` makes it after
resolving its interpolations (`${checkpoint.every_n_steps}`) against the whole configuration, read
as plain values (the values themselves are checked by `validate_config`). The
training package never imports the `callbacks/` package: the defaults name it by `_target_`
(`lora_trainer.training.config.default_callbacks`).

The launching process makes them once before any rank starts (`validate_config`), so that an
entry that cannot be made (a `_target_` that does not import, an unknown argument, a failed
interpolation, something that is not a Lightning callback) ends the run with one `error:` line
naming its key; every rank then makes its own in `train`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_trainer.errors import ConfigError
from lora_trainer.training.config import TrainConfig


def instantiate_callbacks(config: TrainConfig) -> list[pl.Callback]:
    """The callbacks of `config.callbacks`, in their order; ConfigError naming the entry that
    cannot be made."""
    root = OmegaConf.create(asdict(config))
    made: list[pl.Callback] = []
    for name in config.callbacks:
        node = root.callbacks[name]
        if node is None:
            continue
        key = f"callbacks.{name}"
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(
                f"{key} has no _target_: give the import path of a Lightning callback class "
                f"(+{key}._target_=package.module.Class), or leave it out with ~{key}"
            )
        target = node._get_node("_target_")
        try:
            callback = instantiate(node)
        except (InstantiationException, OmegaConfBaseException) as error:
            raise ConfigError(
                f"{key} (_target_={target}) cannot be made: {_cause(error)}"
            ) from error
        if not isinstance(callback, pl.Callback):
            raise ConfigError(
                f"{key}._target_={target} makes a {type(callback).__name__}, not a Lightning "
                "callback (lightning.pytorch.Callback)"
            )
        made.append(callback)
    return made


def _cause(error: BaseException) -> str:
    """The innermost cause of `error`, on one line: what is really wrong."""
    cause: Any = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    line = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {line}" if line else type(cause).__name__
