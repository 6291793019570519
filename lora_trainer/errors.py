"""Errors raised for bad user input. Each message names the offending thing and the fix."""


class LoraTrainerError(Exception):
    """Base class of every error lora_trainer raises for bad input."""


class CheckpointError(LoraTrainerError):
    """A model directory, config.json or safetensors file is missing, corrupt or does not fit."""


class ParallelConfigError(LoraTrainerError):
    """Parallel sizes that do not fit the world size or the model's heads, experts or layers."""


class ExportError(LoraTrainerError):
    """An export could not be written: disk full, no permission, or an unusable output directory."""


class DataError(LoraTrainerError):
    """A dataset file, sample, tokenizer or data setting that cannot be used for training."""


class ConfigError(LoraTrainerError):
    """A run configuration value that is missing, out of range or inconsistent with the others."""


class PeerExportError(ExportError):
    """This rank's export step stopped because another rank's failed; that rank reports the
    cause."""
