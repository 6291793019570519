"""The export check one decoder layer at a time (`check_export(mode="layer")`), for any model size.

For each decoder layer, in order, with only that layer in memory:

1. the layer is built in the base's own transformers class (`<Model>DecoderLayer`, empty on the
   meta device) and gets the base's weights, in the compute dtype;
2. PEFT's own code attaches the adapter's keys of that layer (`LoraModel` on a module tree with
   the same paths as the full model, `set_peft_model_state_dict`); the layer runs on the hidden
   states the adapter side's previous layer produced (the first layer: the base's embeddings of
   the check batch), recording each compared module's inputs;
3. PEFT merges the adapter into the layer and the merged weights get one rounding's worth of
   noise (`round_like_storage_`): the *rounded* side;
4. the same layer is built from the merged checkpoint: the *merged* side.

Each side runs the whole layer on the same hidden states and every compared module on the same
recorded inputs. The adapter side's layer output feeds the next layer. Expert weights stored per
expert (`experts.{e}.gate_proj.weight`, ...) are packed into the class's 3D parameters.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_trainer.bridge.safetensors_io import CheckpointReader
from lora_trainer.errors import ExportError
from lora_trainer.export.check import (
    ADAPTER_NAME,
    GROUPED_MM_DTYPES,
    Comparison,
    adapted_modules,
    adapted_parameters,
    file_key,
    model_class,
    record_inputs,
    replay,
    round_like_storage_,
)
from lora_trainer.export.peft_adapter import KEY_PREFIX, PER_EXPERT_MODULES, WEIGHTS_FILE

LAYER_OUTPUT = "layer_output"


class _Tree(nn.Module):
    """A module tree that holds one decoder layer at `<text_prefix>layers.<index>`, as in the full
    model, so that the adapter's module paths and keys apply unchanged."""

    def __init__(self, path: str, layer: nn.Module) -> None:
        super().__init__()
        head, _, rest = path.partition(".")
        self.add_module(head, _Tree(rest, layer) if rest else layer)


class HFLayers:
    """What the layers need from the base's transformers modeling module and config."""

    def __init__(self, base_dir: Path, dtype: torch.dtype) -> None:
        import transformers

        cls = model_class(base_dir)
        if cls is transformers.AutoModelForCausalLM:
            config = transformers.AutoConfig.from_pretrained(base_dir)
            cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        self.module = sys.modules[cls.__module__]
        config = transformers.AutoConfig.from_pretrained(base_dir)
        self.text_config = config.get_text_config()
        self.text_config._attn_implementation = "sdpa"
        self.text_config._experts_implementation = (
            "grouped_mm" if dtype in GROUPED_MM_DTYPES else "eager"
        )
        self.prefix = (
            "model.language_model." if "ConditionalGeneration" in cls.__name__ else "model."
        )
        self.dtype = dtype
        self.layer_class = self._class("DecoderLayer")
        self.rotary_class = self._class("TextRotaryEmbedding")

    def _class(self, suffix: str) -> type[nn.Module]:
        found = [
            value
            for name, value in vars(self.module).items()
            if name.endswith(suffix) and "Vision" not in name and isinstance(value, type)
        ]
        if len(found) != 1:
            raise ExportError(
                f"{self.module.__name__} has no single *{suffix} class for the layer-wise "
                "export check"
            )
        return found[0]

    def layer(self, index: int, reader: CheckpointReader) -> nn.Module:
        """Decoder layer `index` with the weights of `reader`'s checkpoint, in the compute dtype."""
        with torch.device("meta"):
            layer = self.layer_class(self.text_config, index)
        prefix = f"{self.prefix}layers.{index}."
        state = {
            name: _read(reader, prefix + name).to(self.dtype)
            for name, _ in layer.named_parameters()
        }
        layer.load_state_dict(state, strict=True, assign=True)
        for parameter in layer.parameters():
            parameter.requires_grad_(False)
        return layer.eval()

    def layer_path(self, index: int) -> str:
        """The path of decoder layer `index` in the PEFT-wrapped model (and in `_Tree`)."""
        return f"{KEY_PREFIX}{self.prefix}layers.{index}"

    def adapter_weights(self, index: int, adapter_file: Any) -> dict[str, Tensor]:
        """The adapter file's tensors of decoder layer `index` (an open safetensors file)."""
        stem = f"{self.layer_path(index)}."
        keys = adapter_file.keys()  # a safe_open handle is not iterable
        return {key: adapter_file.get_tensor(key) for key in keys if key.startswith(stem)}

    def adapted_layer(
        self, index: int, reader: CheckpointReader, weights: dict[str, Tensor], config: Any
    ) -> tuple[nn.Module, Any, Any]:
        """Decoder layer `index` of `reader`'s checkpoint with the adapter `weights` attached by
        PEFT's own code: the `_Tree` holding it, the `LoraModel` and PEFT's load result."""
        from peft import LoraModel, set_peft_model_state_dict

        tree = _Tree(self.layer_path(index), self.layer(index, reader))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = LoraModel(tree, config, ADAPTER_NAME)
            result = set_peft_model_state_dict(tree, weights, ADAPTER_NAME)
        return tree, lora, result

    def layer_kwargs(self, index: int, inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of decoder layer `index` from those `inputs` made."""
        return {
            "position_embeddings": inputs["position_embeddings"],
            "position_ids": inputs["position_ids"],
            "attention_mask": inputs["masks"][self.text_config.layer_types[index]],
        }

    def inputs(self, input_ids: Tensor, reader: CheckpointReader) -> tuple[Tensor, dict[str, Any]]:
        """The embeddings of `input_ids` and the keyword arguments every decoder layer gets, as
        the text model's forward makes them (no cache, no padding)."""
        name = f"{self.prefix}embed_tokens.weight"
        embeddings = torch.stack(
            [_read_row(reader, name, int(token)) for token in input_ids.reshape(-1)]
        )
        hidden = embeddings.view(*input_ids.shape, -1).to(self.dtype)
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq).view(1, 1, -1).expand(4, batch, -1)
        text_position_ids, rope_position_ids = position_ids[0], position_ids[1:]
        mask_kwargs = {
            "config": self.text_config,
            "inputs_embeds": hidden,
            "attention_mask": None,
            "cache": None,
            "position_ids": text_position_ids,
        }
        masks = {
            "full_attention": self.module.create_causal_mask(**mask_kwargs),
            "linear_attention": self.module.create_recurrent_attention_mask(**mask_kwargs),
        }
        rotary = self.rotary_class(config=self.text_config)
        with torch.no_grad():
            position_embeddings = rotary(hidden, rope_position_ids)
        return hidden, {
            "position_embeddings": position_embeddings,
            "position_ids": text_position_ids,
            "masks": masks,
        }


def _read(reader: CheckpointReader, name: str) -> Tensor:
    """A weight by its name in the transformers class; packed experts from per-expert tensors
    when the checkpoint stores them that way."""
    if name in reader:
        return reader.read(name)
    module, _, proj = name.rpartition(".")
    parts = PER_EXPERT_MODULES.get(proj, ())
    if not parts or f"{module}.0.{parts[0]}.weight" not in reader:
        reader.file_of(name)  # raises the checkpoint's own "not in the checkpoint" error
    experts = []
    index = 0
    while f"{module}.{index}.{parts[0]}.weight" in reader:
        experts.append(
            torch.cat([reader.read(f"{module}.{index}.{part}.weight") for part in parts])
        )
        index += 1
    return torch.stack(experts)


def _read_row(reader: CheckpointReader, name: str, row: int) -> Tensor:
    return reader.read_rows(name, row, row + 1)[0]


def check_layers(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    input_ids: Tensor,
    dtype: torch.dtype,
    stored: torch.dtype,
    comparison: Comparison,
) -> tuple[list[str], list[str], list[str]]:
    """Run the layer-wise check, adding every difference to `comparison`; returns the adapter keys
    missing, the adapter keys no layer consumed and the base weights the merged checkpoint lacks."""
    from peft import LoraConfig
    from safetensors import safe_open

    model = HFLayers(base_dir, dtype)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    missing: list[str] = []
    unexpected: list[str] = []
    consumed: set[str] = set()
    with (
        CheckpointReader(base_dir) as base,
        CheckpointReader(merged_dir) as merged,
        safe_open(str(Path(adapter_dir) / WEIGHTS_FILE), framework="pt") as adapter_file,
    ):
        merged_missing = sorted(set(base.names()) - set(merged.names()))
        file_keys = list(adapter_file.keys())
        hidden, layer_kwargs = model.inputs(input_ids, base)
        for index in range(model.text_config.num_hidden_layers):
            weights = model.adapter_weights(index, adapter_file)
            consumed.update(weights)
            hidden, layer_missing, layer_unexpected = _check_layer(
                model,
                index,
                hidden,
                model.layer_kwargs(index, layer_kwargs),
                weights,
                config,
                (base, merged),
                stored,
                comparison,
            )
            missing.extend(layer_missing)
            unexpected.extend(layer_unexpected)
    unexpected.extend(set(file_keys) - consumed)
    return sorted(missing), sorted(unexpected), merged_missing


def _check_layer(
    model: HFLayers,
    index: int,
    hidden: Tensor,
    kwargs: dict[str, Any],
    weights: dict[str, Tensor],
    config: Any,
    readers: tuple[CheckpointReader, CheckpointReader],
    stored: torch.dtype,
    comparison: Comparison,
) -> tuple[Tensor, list[str], list[str]]:
    """One layer, three sides (module docstring); returns the adapter side's output, the adapter
    keys of this layer PEFT expected but the file lacks and those of the file PEFT did not use."""
    from peft import get_peft_model_state_dict

    base, merged = readers
    tree, lora, result = model.adapted_layer(index, base, weights, config)
    path = model.layer_path(index)
    in_model = set(get_peft_model_state_dict(tree, adapter_name=ADAPTER_NAME))
    layer = tree.get_submodule(path)
    missing = (in_model - set(weights)) | {
        file_key(key) for key in result.missing_keys if "lora_" in key
    }
    unexpected = (set(weights) - in_model) | {file_key(key) for key in result.unexpected_keys}
    modules = adapted_modules(layer)
    with record_inputs(layer, modules) as inputs, torch.no_grad():
        adapter_out = layer(hidden, **kwargs).detach()
    adapter_outputs = replay(layer, modules, inputs)
    targets = adapted_parameters(layer)
    lora.merge_and_unload()
    layer = tree.get_submodule(path)
    round_like_storage_(layer, targets, stored)
    with torch.no_grad():
        rounded_out = layer(hidden, **kwargs)
    rounded_outputs = replay(layer, modules, inputs)
    del tree, layer, lora
    merged_layer = model.layer(index, merged)
    with torch.no_grad():
        merged_out = merged_layer(hidden, **kwargs)
    merged_outputs = replay(merged_layer, modules, inputs)
    del merged_layer
    for module, kind in modules:
        if module in adapter_outputs:
            comparison.add(
                kind, adapter_outputs[module], rounded_outputs[module], merged_outputs[module]
            )
    comparison.add(LAYER_OUTPUT, adapter_out, rounded_out, merged_out)
    return adapter_out, sorted(missing), sorted(unexpected)
