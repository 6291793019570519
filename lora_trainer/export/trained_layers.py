"""What our trained model computes in each decoder layer on the export check's batch.

At a save with `export.check=true` every rank runs the check batch forward once through its
pipeline stage (megatron's schedule, forward only, no dropout) and records, per decoder layer it
holds, the layer's input and output hidden states and, for MoE layers, the experts the router chose
for each token. Sequence-parallel shards are gathered over the tensor-parallel group, so each
record is the full [batch, seq, hidden] tensor in float32 (tokens batch-major, as transformers
orders them; routing [batch * seq, top_k]). One rank per pipeline stage (tensor-parallel and
data-parallel rank 0) writes its stage's records into `trained-layers-stage-KKKKK.safetensors`
of the given directory (the save's export snapshot), with the model's compute dtype in the
metadata. The export check (`check_trained`) reads them back one layer at a time: the export
must compute what this model computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lora_trainer.errors import ExportError
from lora_trainer.files.atomic import atomic_file, export_error

if TYPE_CHECKING:
    from lora_trainer.qwen35.model import Qwen35Model

STAGE_FILE = "trained-layers-stage-{stage:05d}.safetensors"
_STAGE_GLOB = "trained-layers-stage-*.safetensors"
_DTYPE_KEY = "dtype"


@dataclass(frozen=True)
class TrainedLayer:
    """One decoder layer of our model on the check batch: input and output [batch, seq, hidden]
    (float32), and the experts chosen per token [batch * seq, top_k] (MoE layers, else None)."""

    input: Tensor
    output: Tensor
    routing: Tensor | None


def record_trained_layers(model: Qwen35Model, input_ids: Tensor, directory: Path) -> Path | None:
    """Run `input_ids` ([batch, seq]) forward through this rank's stage of `model` (a
    `Qwen35Model`) and write the records of its layers into `directory` (module docstring).
    Collective: every rank of the job calls it. Returns the file this rank wrote, if any."""
    from megatron.core import parallel_state

    records: dict[str, Tensor] = {}
    sequence_parallel = bool(model.config.sequence_parallel)
    top_k = int(model.config.moe_router_topk)
    batch, seq = input_ids.shape

    def full(tensor: Tensor) -> Tensor:
        """[S/tp, B, ...] -> [B, S, ...], float32, on the CPU."""
        if sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            tensor = gather_from_sequence_parallel_region(tensor, tensor_parallel_output_grad=False)
        return tensor.transpose(0, 1).to("cpu", torch.float32).contiguous()

    def layer_hook(index: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            records[f"layers.{index}.input"] = full(args[0])
            records[f"layers.{index}.output"] = full(output)

        return hook

    def router_hook(index: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
            chosen = output[1].float().topk(top_k, dim=-1).indices.sort(dim=-1).values
            # Expert indices are exact in float32; the sequence-parallel gather is for floats.
            routing = full(chosen.float().view(-1, batch, top_k))
            records[f"layers.{index}.routing"] = routing.reshape(batch * seq, top_k).long()

        return hook

    handles = []
    for index, layer in model.layers.items():
        handles.append(layer.register_forward_hook(layer_hook(index)))
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            handles.append(router.register_forward_hook(router_hook(index)))
    try:
        with _eval_mode(model), torch.no_grad():
            _forward_only(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    if (
        parallel_state.get_tensor_model_parallel_rank() != 0
        or parallel_state.get_data_parallel_rank() != 0
    ):
        return None
    stage = parallel_state.get_pipeline_model_parallel_rank()
    dtype = str(model.config.params_dtype).removeprefix("torch.")
    return _write(Path(directory) / STAGE_FILE.format(stage=stage), records, dtype)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _forward_only(model: nn.Module, input_ids: Tensor) -> None:
    """One micro-batch of `input_ids` forward through megatron's schedule (which passes the
    hidden states between pipeline stages); the logits are discarded."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = input_ids.shape
    device = next(model.parameters()).device

    def no_loss(_: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return torch.zeros((), device=device), torch.ones((), dtype=torch.int), {}

    def forward_step(data: Iterator[Tensor], module: nn.Module) -> tuple[Tensor, Any]:
        return module(next(data)), no_loss

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([input_ids.to(device)]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )


def _write(path: Path, records: dict[str, Tensor], dtype: str) -> Path:
    """`records` into `path`, published whole and flushed (`atomic_file`)."""
    with atomic_file(path) as temporary:
        try:
            save_file(records, str(temporary), metadata={_DTYPE_KEY: dtype})
        except Exception as error:
            raise export_error(path, error) from error
    return path


class TrainedLayers:
    """The records of every stage file in a directory; layers are read one at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.files: dict[int, Path] = {}
        dtypes = set()
        for path in sorted(self.directory.glob(_STAGE_GLOB)):
            with safe_open(str(path), framework="pt") as handle:
                dtypes.add((handle.metadata() or {}).get(_DTYPE_KEY))
                keys = handle.keys()  # a safe_open handle is not iterable
                for key in keys:
                    self.files.setdefault(int(key.split(".")[1]), path)
        if not self.files or len(dtypes) != 1 or None in dtypes:
            raise ExportError(
                f"{self.directory} holds no readable records of the trained layers "
                f"({_STAGE_GLOB}): the save's export snapshot is incomplete"
            )
        self.dtype: torch.dtype = getattr(torch, str(dtypes.pop()))

    def layer(self, index: int) -> TrainedLayer:
        path = self.files.get(index)
        if path is None:
            raise ExportError(
                f"the records of the trained layers in {self.directory} lack layer {index}"
            )
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            routing = f"layers.{index}.routing"
            return TrainedLayer(
                input=handle.get_tensor(f"layers.{index}.input"),
                output=handle.get_tensor(f"layers.{index}.output"),
                routing=handle.get_tensor(routing) if routing in keys else None,
            )
