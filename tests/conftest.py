"""Shared fixtures: the three small random checkpoints and the fixed batch every parity test
uses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.checkpoints import (
    KIND_DENSE,
    KIND_MOE,
    KIND_MOE_VL,
    build_hf_model,
    fixed_batch,
    save_checkpoint,
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {
        KIND_DENSE: save_checkpoint(build_hf_model(KIND_DENSE), root / KIND_DENSE),
        KIND_MOE: save_checkpoint(build_hf_model(KIND_MOE), root / KIND_MOE),
        KIND_MOE_VL: save_checkpoint(
            build_hf_model(KIND_MOE_VL), root / KIND_MOE_VL, packed_experts=True, with_mtp=True
        ),
    }
    return {kind: str(path) for kind, path in paths.items()}


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return fixed_batch(vocab_size=256, batch=2, seq=24)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tiny forwards are much slower when threads contend for shared
    cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
