"""The parallel layouts every parity test runs: (world size, parallel sizes, checkpoint kinds).

MoE with TP needs sequence parallelism, so plain TP=2 runs the dense model only."""

from tests.checkpoints import KIND_DENSE, KIND_MOE, KIND_MOE_VL

LAYOUTS: dict[str, tuple[int, dict[str, object], tuple[str, ...]]] = {
    "tp2": (2, {"tp": 2}, (KIND_DENSE,)),
    "tp2_sp": (2, {"tp": 2, "sp": True}, (KIND_DENSE, KIND_MOE, KIND_MOE_VL)),
    "ep2": (2, {"ep": 2}, (KIND_MOE, KIND_MOE_VL)),
    "pp2": (2, {"pp": 2}, (KIND_DENSE, KIND_MOE_VL)),
    "tp2_ep2": (4, {"tp": 2, "ep": 2, "sp": True}, (KIND_MOE, KIND_MOE_VL)),
}
