"""How the tests compare numbers: one measure of difference, a measured noise floor, and asserts
that report the measured difference with its bound.

Two computations that are equal in exact arithmetic still differ in fp32 by rounding, and the tiny
random fixtures amplify rounding: their fp32 logits are up to ~3e-4 off their float64 logits, and
how far depends on torch's kernel choice (ATEN_CPU_CAPABILITY, the number of threads). A fixed
fp32 bound is therefore either loose or flaky. The model tests instead measure the noise floor of
the computation in the test itself, the fp32 result against the same computation in float64
(`noise_floor`), and allow `FLOOR_FACTOR` times it; where both sides can run in float64 they are
compared in float64, far below that bound (transformers and our model still run their norms and
the gated delta rule in fp32, so float64 is not exact there either). A wrong layout (misordered
factors or experts, swapped projections) moves the results by O(0.1-1), orders of magnitude above.
"""

from __future__ import annotations

import torch

# Two fp32 results that each carry up to about one floor of rounding noise differ by up to about
# two floors; kernel choice moves the floor of one path by up to ~1.5x on another.
FLOOR_FACTOR = 4.0
# fp32 rounding, even amplified by the fixtures, stays below 1e-3 of the values.
MAX_RELATIVE_FLOOR = 1e-2


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over all elements, computed in float64."""
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.detach().double() - b.detach().double()).abs().max().item()


def noise_floor(fp32: torch.Tensor, fp64: torch.Tensor) -> float:
    """The rounding noise of an fp32 computation: its largest difference from the same computation
    run in float64. A floor of a percent of the values or more means the float64 side computes
    something else, which would make any bound on it meaningless, so that is refused."""
    if fp32.dtype != torch.float32 or fp64.dtype != torch.float64:
        raise AssertionError(
            f"a noise floor compares fp32 with float64, got {fp32.dtype} and {fp64.dtype}"
        )
    floor = max_abs_diff(fp32, fp64)
    scale = fp64.detach().abs().max().item()
    assert floor < MAX_RELATIVE_FLOOR * scale, (
        f"noise floor {floor:.3g} is not small against values of {scale:.3g}"
    )
    return floor


def assert_close(got: torch.Tensor, want: torch.Tensor, bound: float, what: str) -> float:
    """Assert max |got - want| <= bound; return the measured difference."""
    diff = max_abs_diff(got, want)
    assert diff <= bound, f"{what}: max |diff| {diff:.3g} > bound {bound:.3g}"
    return diff


def assert_within_floor(
    got: torch.Tensor, want: torch.Tensor, floor: float, what: str, factor: float = FLOOR_FACTOR
) -> float:
    """Assert max |got - want| <= factor * floor, the floor measured by the caller; return the
    measured difference."""
    diff = max_abs_diff(got, want)
    bound = factor * floor
    assert diff <= bound, (
        f"{what}: max |diff| {diff:.3g} > {factor:g} x noise floor {floor:.3g} = {bound:.3g}"
    )
    return diff


def assert_differs(got: torch.Tensor, want: torch.Tensor, at_least: float, what: str) -> float:
    """Assert max |got - want| > at_least (a real change, not rounding); return the difference."""
    diff = max_abs_diff(got, want)
    assert diff > at_least, (
        f"{what}: max |diff| {diff:.3g} <= {at_least:.3g}, expected a real change"
    )
    return diff


def to_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers (or PEFT-wrapped) model converted in place to float64, its routed experts on
    the eager (looped) implementation: transformers' default `grouped_mm` has no float64 CPU
    kernel."""
    model.double()
    model.set_experts_implementation("eager")
    return model
