"""Silence third-party messages that say nothing to a user of this app: megatron-core's notes
about optional NVIDIA packages and its DDP bucket listing, Lightning's tips, and Lightning log
lines printed twice (once by its own handlers, once by Hydra's). Call before importing
megatron-core or Lightning."""

from __future__ import annotations

import logging
import warnings

_IGNORED_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"You are using the `dataloader_iter` step flavor",
    r"full scope is deprecated",
    r"Found `dataloader_iter` argument",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_third_party_noise() -> None:
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron.core.distributed").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


def route_lightning_logs_to_root() -> None:
    """Lightning adds its own console handlers; Hydra's root handler already prints its records."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
