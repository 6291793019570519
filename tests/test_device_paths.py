"""The CUDA paths' device handling, checked on CPU: LoRA init under a device context, collectives
on the module's device, fp32 RoPE in a bf16 model, transformers references that cannot pick GPU
kernels, the causal-conv1d kernel's rules, and packed attention without a [T, T] mask."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lora_trainer.kernels import attention as attention_kernel
from lora_trainer.kernels import causal_attention, causal_conv1d
from tests.checkpoints import KIND_MOE_VL
from tests.device_paths_runner import run_device_context_checks
from tests.multirank import run_multirank

REPO = Path(__file__).resolve().parents[1]
conv_kernel = importlib.import_module("lora_trainer.kernels.causal_conv1d")


@pytest.fixture(scope="module")
def device_checks(checkpoints: dict[str, str]) -> dict[str, Any]:
    return run_multirank(run_device_context_checks, 1, checkpoints[KIND_MOE_VL])[0]


def test_lora_built_under_a_device_context_is_the_lora_built_without(
    device_checks: dict[str, Any],
) -> None:
    plain, in_context = device_checks["plain"], device_checks["in_context"]
    assert plain.keys() == in_context.keys() and len(plain) > 10
    assert any(perm is not None for _, perm in plain.values())
    for name, (a, perm) in plain.items():
        a_context, perm_context = in_context[name]
        assert a_context.device.type == "cpu", name
        assert torch.equal(a_context, a), name
        assert (perm is None and perm_context is None) or torch.equal(perm_context, perm), name


def test_lora_init_does_not_sync_per_element(device_checks: dict[str, Any]) -> None:
    """`int(tensor)` per row is one host sync each on a GPU."""
    assert device_checks["int_calls"] == 0


def test_bf16_model_keeps_fp32_rope_angles_at_32k_positions(device_checks: dict[str, Any]) -> None:
    assert device_checks["bf16_param_dtypes"] == {torch.bfloat16}
    for fp32, bf16 in zip(device_checks["fp32_rotary"], device_checks["bf16_rotary"], strict=True):
        assert bf16.dtype == torch.float32
        assert torch.equal(bf16, fp32)


class _CollectiveDevice(Exception):
    """Raised by the fake collective with the device it was given."""


def test_global_loss_reduces_on_the_module_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL takes CUDA tensors only: the loss totals must live where the module lives."""
    from lora_trainer.parallel.config import ParallelConfig
    from lora_trainer.training import module as training_module
    from lora_trainer.training.config import TrainConfig

    def all_reduce(tensor: torch.Tensor, group: Any = None) -> None:
        raise _CollectiveDevice(tensor.device)

    monkeypatch.setattr(training_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(training_module.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(training_module.parallel_state, "get_data_parallel_group", lambda: None)
    lightning_module = training_module.LoraTrainingModule(
        TrainConfig(), "unused", 1, ParallelConfig()
    )
    lightning_module._device = torch.device("meta")
    losses = [{"loss": torch.ones(2, device="meta")}]
    for stage_losses in (losses, []):
        with pytest.raises(_CollectiveDevice) as raised:
            lightning_module._global_loss(stage_losses)
        assert raised.value.args[0] == torch.device("meta")


FAKE_KERNEL = """
class GpuKernelCalled(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise GpuKernelCalled("a CUDA-only kernel was called by a CPU reference")
"""


def _fake_gpu_kernel_packages(root: Path) -> None:
    """Importable `fla` and `causal_conv1d` whose kernels raise when called."""
    gdr = root / "fla" / "ops" / "gated_delta_rule"
    gdr.mkdir(parents=True)
    (root / "fla" / "__init__.py").write_text('__version__ = "0.4.0"\n')
    (root / "fla" / "ops" / "__init__.py").write_text("")
    (gdr / "__init__.py").write_text(
        FAKE_KERNEL + "chunk_gated_delta_rule = fused_recurrent_gated_delta_rule = _refuse\n"
    )
    (root / "causal_conv1d").mkdir()
    (root / "causal_conv1d" / "__init__.py").write_text(
        '__version__ = "1.6.0"\n'
        + FAKE_KERNEL
        + "causal_conv1d_fn = causal_conv1d_update = _refuse\n"
    )


REFERENCE_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import transformers
    from lora_trainer.export.check import _logits
    from tests.checkpoints import build_hf_model, fixed_batch

    model = {build}.eval()
    if not {{"fla", "causal_conv1d"}} <= sys.modules.keys():
        sys.exit("transformers did not import the fake GPU kernels: the test proves nothing")
    input_ids = fixed_batch(vocab_size=256)
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    except RuntimeError as error:
        # transformers up to 5.24 calls the kernels it bound whatever the device.
        assert "CUDA-only kernel" in str(error), error
    torch.save(_logits(model, input_ids), sys.argv[1])
""")


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_check_reference_never_calls_gpu_kernels(kind: str, tmp_path: Path) -> None:
    """With `fla` / `causal_conv1d` importable, transformers binds them (up to 5.24 at import,
    with no device check; from 5.25 behind a device check); the export check's logits must come
    from the torch path, equal to a run where those packages are absent."""
    from lora_trainer.export.check import _logits
    from tests.checkpoints import build_hf_model, fixed_batch

    _fake_gpu_kernel_packages(tmp_path / "site")
    out = tmp_path / "logits.pt"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO)]),
        TORCHDYNAMO_DISABLE="1",
    )
    script = REFERENCE_SCRIPT.format(build=f"build_hf_model({kind!r})")
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    expected = _logits(build_hf_model(kind).eval(), fixed_batch(vocab_size=256))
    assert torch.equal(torch.load(out), expected)


def _conv_inputs(channels: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x as the GDN layer passes it ([B, C, T] view of a [B, T, C] tensor), weight, and packing."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1, seq_len, channels, generator=generator).transpose(1, 2)
    weight = torch.randn(channels, 4, generator=generator)
    return x, weight, torch.tensor([0, 7, 7, 19, seq_len])


def _fake_causal_conv1d_fn(calls: list[str]) -> Any:
    """causal-conv1d's `causal_conv1d_fn` with the checks of its CUDA entry point, computed by the
    torch path (the layout it was given is recorded)."""

    def causal_conv1d_fn(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Any = None,
        seq_idx: Any = None,
        activation: str | None = None,
    ) -> torch.Tensor:
        assert 2 <= weight.shape[1] <= 4, "causal_conv1d only supports width between 2 and 4"
        channel_last = x.stride(1) == 1 and x.shape[1] > 1
        assert channel_last or x.stride(2) == 1, "x must be contiguous in T or in C"
        if channel_last:
            assert x.shape[1] % 8 == 0, (
                "causal_conv1d only supports channel dimension divisible by 8"
            )
            assert x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0, (
                "channel-last strides must be multiples of 8"
            )
        assert seq_idx is None or channel_last, "seq_idx is only supported for channel last layout"
        calls.append("channel_last" if channel_last else "channel_first")
        cu_seqlens = None
        if seq_idx is not None:
            counts = torch.bincount(seq_idx[0].long(), minlength=int(seq_idx.max()) + 1)
            cu_seqlens = F.pad(counts.cumsum(0), (1, 0))
        return conv_kernel._torch_causal_conv1d(x, weight, activation, cu_seqlens)

    return causal_conv1d_fn


@pytest.mark.parametrize("channels", [96, 100], ids=["multiple-of-8", "tiny-model-tp2"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_causal_conv1d_kernel_only_gets_calls_it_accepts(
    channels: int, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    calls: list[str] = []
    fake = types.ModuleType("causal_conv1d")
    fake.causal_conv1d_fn = _fake_causal_conv1d_fn(calls)
    monkeypatch.setitem(sys.modules, "causal_conv1d", fake)
    monkeypatch.setattr(conv_kernel, "_use_cuda_kernel", lambda x: True)
    x, weight, cu_seqlens = _conv_inputs(channels, 40)
    cu_seqlens = cu_seqlens if packed else None
    out = causal_conv1d(x, weight, cu_seqlens=cu_seqlens)
    assert torch.allclose(
        out, conv_kernel._torch_causal_conv1d(x, weight, "silu", cu_seqlens), atol=1e-6
    )
    expected = {
        (96, False): ["channel_last"],
        (96, True): ["channel_last"],
        (100, False): ["channel_first"],
        (100, True): [],
    }
    assert calls == expected[channels, packed]


def test_packed_attention_runs_per_segment_without_a_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """One causal SDPA per packed sample, never a masked product over the whole packed sequence."""
    shapes: list[tuple[int, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(
            (q.shape[2], kwargs.get("attn_mask") is None and kwargs.get("is_causal", False))
        )
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention_kernel.F, "scaled_dot_product_attention", recording_sdpa)
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(1, 40, 4, 8, generator=generator)
    k, v = (torch.randn(1, 40, 2, 8, generator=generator) for _ in range(2))
    causal_attention(q, k, v, scale=0.3, cu_seqlens=torch.tensor([0, 7, 7, 19, 40]))
    assert shapes == [(7, True), (12, True), (21, True)]
