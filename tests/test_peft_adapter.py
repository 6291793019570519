"""PEFT adapter export: peft 0.21 loads what `write_peft_adapter` writes onto the real transformers
class, consumes every key, and reproduces the logits of the base with scale * B @ A folded in."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file

from lora_trainer.export.hf_adapter_weights import HFAdapter, HFExpertLoraWeights, HFLoraWeights
from lora_trainer.export.peft_adapter import (
    CONFIG_FILE,
    EXPERT_PROJECTIONS,
    WEIGHTS_FILE,
    write_peft_adapter,
)
from tests.checkpoints import KIND_DENSE, KIND_MOE, KIND_MOE_VL, KINDS, build_hf_model, fixed_batch
from tests.numerics import assert_differs, assert_within_floor, noise_floor, to_float64

RANK = 4
ALPHA = 8.0
B_SCALE = 0.05  # lora_B size: the adapters move the logits by O(1)
MOVES_LOGITS = 0.5  # a diff above this is a real change, not rounding

TEXT_PREFIX = {KIND_DENSE: "model.", KIND_MOE: "model.", KIND_MOE_VL: "model.language_model."}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
GDN = {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
# module suffix below `layers.N.` of every target each kind must have
MIXER_SUFFIXES = {f"self_attn.{m}" for m in ATTENTION} | {f"linear_attn.{m}" for m in GDN}
EXPECTED_SUFFIXES = {
    KIND_DENSE: MIXER_SUFFIXES | {f"mlp.{m}" for m in MLP},
    KIND_MOE: MIXER_SUFFIXES | {f"mlp.shared_expert.{m}" for m in MLP},
    KIND_MOE_VL: MIXER_SUFFIXES | {f"mlp.shared_expert.{m}" for m in MLP},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_model(kind: str) -> torch.nn.Module:
    """The tiny model of `kind` in float64, routed experts on the eager (looped) implementation.

    Parity runs in float64 because the fixture amplifies rounding: PEFT's unmerged x @ W + (x @ A)
    @ B against the merged x @ (W + dW) differs by up to ~4e-4 in fp32 even with the right layout.
    In float64 (transformers still runs its norms and the gated delta rule in fp32) both sides
    agree far below the merged reference's own fp32-vs-float64 difference (`reference_floor`), the
    scale of the bound, while a wrong layout moves the logits by O(1). The adapter files stay fp32.
    """
    return to_float64(build_hf_model(kind))


def random_adapter(
    model: torch.nn.Module,
    kind: str,
    *,
    use_rslora: bool = False,
    projections: tuple[str, ...] = EXPERT_PROJECTIONS,
    seed: int = 11,
) -> HFAdapter:
    """An adapter on every text linear target and on the routed-expert `projections` of `model`.

    Within a layer, q/k/v and the GDN in_proj parts share one `a` tensor object, as the gather of a
    fused Megatron adapter hands them over.
    """
    prefix = TEXT_PREFIX[kind]
    generator = torch.Generator().manual_seed(seed)
    leaves = ATTENTION | GDN | MLP
    linears: dict[str, HFLoraWeights] = {}
    experts: dict[str, HFExpertLoraWeights] = {}
    shared_a: dict[tuple[str, str], torch.Tensor] = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix):
            continue
        path = name.removeprefix(prefix)
        parent, _, leaf = path.rpartition(".")
        if isinstance(module, torch.nn.Linear) and leaf in leaves:
            fused = leaf in {"q_proj", "k_proj", "v_proj"} or leaf.startswith("in_proj_")
            a_key = (parent, "fused" if fused else leaf)
            if a_key not in shared_a:
                shared_a[a_key] = _random_a((RANK, module.in_features), generator)
            linears[path] = HFLoraWeights(
                shared_a[a_key], _random_b((module.out_features, RANK), generator)
            )
        if path.endswith("mlp.experts"):
            for proj in projections:
                num_experts, fan_out, fan_in = getattr(module, proj).shape
                experts[f"{path}.{proj}"] = HFExpertLoraWeights(
                    _random_a((num_experts, RANK, fan_in), generator),
                    _random_b((num_experts, fan_out, RANK), generator),
                )
    return HFAdapter(linears, experts, RANK, ALPHA, use_rslora, prefix, f"tiny-qwen3.5-{kind}")


def _random_a(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) / math.sqrt(shape[-1])


def _random_b(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return B_SCALE * torch.randn(shape, generator=generator) / math.sqrt(RANK)


def merged_reference(
    model: torch.nn.Module, adapter: HFAdapter, *, with_experts: bool = True
) -> torch.nn.Module:
    """A copy of `model` with W + scale * b @ a (computed in float64) folded into every adapted HF
    weight."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for path, weights in adapter.linears.items():
            delta = weights.b.double() @ weights.a.double()
            reference.get_submodule(adapter.text_prefix + path).weight.add_(adapter.scale * delta)
        for path, expert_weights in adapter.experts.items() if with_experts else ():
            delta = torch.einsum(
                "eor,eri->eoi", expert_weights.b.double(), expert_weights.a.double()
            )
            reference.get_parameter(adapter.text_prefix + path).add_(adapter.scale * delta)
    return reference


def logits(model: torch.nn.Module) -> torch.Tensor:
    vocab_size = model.config.get_text_config().vocab_size
    with torch.no_grad():
        return model(fixed_batch(vocab_size)).logits


def load_peft(base: torch.nn.Module, directory: Path) -> PeftModel:
    """`PeftModel.from_pretrained`, failing on its missing-adapter-keys warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, directory)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    return peft_model.eval()


def assert_fully_consumed(peft_model: PeftModel, directory: Path) -> None:
    """No missing or unexpected key on load, and every file tensor is in the model with its
    value."""
    result = peft_model.load_adapter(directory, adapter_name="check")
    assert result.missing_keys == [] and result.unexpected_keys == []
    in_file = load_file(str(directory / WEIGHTS_FILE))
    in_model = get_peft_model_state_dict(peft_model)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        assert torch.equal(in_model[key], tensor.to(in_model[key].dtype)), key


def reference_floor(reference: torch.nn.Module) -> float:
    """The noise floor of the (float64) merged reference: its fp32 logits against its float64
    ones."""
    return noise_floor(logits(copy.deepcopy(reference).float()), logits(reference))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_profile_loads_and_matches_merged_reference(kind: str, tmp_path: Path) -> None:
    base = build_model(kind)
    adapter = random_adapter(base, kind)
    assert {path.split(".", 2)[2] for path in adapter.linears} == EXPECTED_SUFFIXES[kind]
    assert len(adapter.experts) == (0 if kind == KIND_DENSE else 2 * 4)
    reference = merged_reference(base, adapter)
    base_logits, expected = logits(base), logits(reference)

    write_peft_adapter(adapter, tmp_path)
    peft_model = load_peft(base, tmp_path)
    got = logits(peft_model)

    assert_differs(expected, base_logits, MOVES_LOGITS, f"{kind}: merged reference vs base")
    assert_within_floor(
        got, expected, reference_floor(reference), f"{kind}: PEFT vs merged reference"
    )
    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert not [name for name in wrapped if ".visual." in name]
    assert_fully_consumed(peft_model, tmp_path)


@pytest.mark.parametrize("projections", [("gate_up_proj",), ("down_proj",)])
def test_single_expert_projection_with_rslora(projections: tuple[str, ...], tmp_path: Path) -> None:
    """With one packed projection targeted there is one wrapper, whichever it is (no
    `base_layer.`)."""
    base = build_model(KIND_MOE_VL)
    adapter = random_adapter(base, KIND_MOE_VL, use_rslora=True, projections=projections)
    assert adapter.scale == ALPHA / math.sqrt(RANK)
    reference = merged_reference(base, adapter)
    expected = logits(reference)

    write_peft_adapter(adapter, tmp_path)
    keys = load_file(str(tmp_path / WEIGHTS_FILE))
    assert not [key for key in keys if "experts.base_layer" in key]
    peft_model = load_peft(base, tmp_path)

    floor = reference_floor(reference)
    assert_within_floor(
        logits(peft_model), expected, floor, f"{projections}: PEFT vs merged reference"
    )
    assert_fully_consumed(peft_model, tmp_path)


@pytest.mark.parametrize(
    "target_parameters",
    [
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
    ],
)
def test_expert_keys_match_peft_nesting(target_parameters: list[str], tmp_path: Path) -> None:
    """PEFT nests the wrappers in the experts module's parameter order, whatever the config order:
    down_proj outer (`experts.lora_*`), gate_up_proj inner (`experts.base_layer.lora_*`); the
    writer's keys and shapes equal those PEFT itself saves."""
    base = build_hf_model(KIND_MOE)
    adapter = random_adapter(base, KIND_MOE)
    write_peft_adapter(adapter, tmp_path)
    written = {key: tuple(t.shape) for key, t in load_file(str(tmp_path / WEIGHTS_FILE)).items()}

    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=sorted(ATTENTION | GDN | MLP),
        target_parameters=target_parameters,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(build_hf_model(KIND_MOE), config)
    experts = peft_model.get_submodule("base_model.model.model.layers.0.mlp.experts")
    assert (experts.parameter_name, experts.base_layer.parameter_name) == (
        "down_proj",
        "gate_up_proj",
    )
    saved = {key: tuple(t.shape) for key, t in get_peft_model_state_dict(peft_model).items()}
    assert written == saved

    num_experts, hidden, inter = 4, 64, 24
    stem = "base_model.model.model.layers.0.mlp.experts"
    assert written[f"{stem}.base_layer.lora_A.weight"] == (num_experts * RANK, hidden)
    assert written[f"{stem}.base_layer.lora_B.weight"] == (2 * inter, RANK * num_experts)
    assert written[f"{stem}.lora_A.weight"] == (num_experts * RANK, inter)
    assert written[f"{stem}.lora_B.weight"] == (hidden, RANK * num_experts)


def test_expert_major_lora_b_loads_but_gives_wrong_logits(tmp_path: Path) -> None:
    """The trap: lora_B columns ordered e·r + j (expert-major) have the right shape, load with no
    missing or unexpected key, and give different logits, so the parity test above can fail."""
    base = build_model(KIND_MOE_VL)
    adapter = random_adapter(base, KIND_MOE_VL)
    expected = logits(merged_reference(base, adapter))
    write_peft_adapter(adapter, tmp_path)
    file = tmp_path / WEIGHTS_FILE
    tensors = load_file(str(file))
    for key in [k for k in tensors if ".mlp.experts." in k and ".lora_B." in k]:
        fan_out = tensors[key].shape[0]
        rank_major = tensors[key].reshape(fan_out, RANK, -1)
        tensors[key] = rank_major.transpose(1, 2).reshape(fan_out, -1).contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})

    peft_model = load_peft(base, tmp_path)
    assert_differs(
        logits(peft_model), expected, MOVES_LOGITS, "expert-major lora_B vs merged reference"
    )
    assert_fully_consumed(peft_model, tmp_path)


def test_config_targets_text_modules_only(tmp_path: Path) -> None:
    """`target_modules` lists leaf names; PEFT matches them as whole dotted suffixes, so none of the
    vision tower's modules (`qkv`, `proj`, `linear_fc1`, `linear_fc2`) can match."""
    base = build_hf_model(KIND_MOE_VL)
    adapter = random_adapter(base, KIND_MOE_VL)
    write_peft_adapter(adapter, tmp_path)
    config_json = json.loads((tmp_path / CONFIG_FILE).read_text())

    assert config_json == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-qwen3.5-moe_vl",
        "r": RANK,
        "lora_alpha": 8,
        "use_rslora": False,
        "target_modules": sorted(ATTENTION | GDN | MLP),
        "target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    config = LoraConfig.from_pretrained(tmp_path)
    vision = [name for name, _ in base.named_modules() if name.startswith("model.visual.")]
    assert {"model.visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.proj"} <= set(vision)
    assert not [name for name in vision if check_target_module_exists(config, name)]


@pytest.mark.parametrize("kind", [KIND_MOE, KIND_MOE_VL])
def test_per_expert_profile(kind: str, tmp_path: Path) -> None:
    """The per_expert profile writes 2D `experts.{e}.{gate,up,down}_proj` keys: gate and up share
    lora_A and take the gate / up halves of the packed lora_B rows.

    Measured with peft 0.21.2: PEFT does not apply them to Qwen3.5-MoE and says nothing (no warning
    from `from_pretrained`). On the ConditionalGeneration class they come back verbatim as
    unexpected keys; on the text-only ForCausalLM class PEFT's transformers-v5 conversion first
    packs them into `experts.lora_*` keys, which are then unexpected because no parameter is
    targeted. Either way the logits equal the base with only the linear adapters folded in.
    """
    base = build_model(kind)
    adapter = random_adapter(base, kind)
    write_peft_adapter(adapter, tmp_path, profile="per_expert")
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    config_json = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config_json["target_parameters"] is None
    assert config_json["target_modules"] == sorted(ATTENTION | GDN | MLP)

    stem = f"base_model.model.{adapter.text_prefix}"
    expert_keys = {key for key in tensors if ".mlp.experts." in key}
    assert len(expert_keys) == 4 * 4 * 3 * 2
    split = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    for path, weights in adapter.experts.items():
        module, _, proj = path.rpartition(".")
        rows = weights.b.shape[1] // len(split[proj])
        for e in range(4):
            for i, part in enumerate(split[proj]):
                key = f"{stem}{module}.{e}.{part}"
                assert torch.equal(tensors[f"{key}.lora_A.weight"], weights.a[e])
                assert torch.equal(
                    tensors[f"{key}.lora_B.weight"], weights.b[e, i * rows : (i + 1) * rows]
                )
    assert tensors[f"{stem}layers.0.mlp.experts.0.gate_proj.lora_A.weight"].shape == (RANK, 64)
    assert tensors[f"{stem}layers.0.mlp.experts.0.up_proj.lora_B.weight"].shape == (24, RANK)
    assert tensors[f"{stem}layers.0.mlp.experts.0.down_proj.lora_A.weight"].shape == (RANK, 24)
    assert tensors[f"{stem}layers.0.mlp.experts.0.down_proj.lora_B.weight"].shape == (64, RANK)

    reference = merged_reference(base, adapter, with_experts=False)
    peft_model = load_peft(base, tmp_path)
    floor = reference_floor(reference)
    assert_within_floor(
        logits(peft_model), logits(reference), floor, f"{kind}: PEFT vs linears-only reference"
    )
    result = peft_model.load_adapter(tmp_path, adapter_name="check")
    assert result.missing_keys == []
    assert result.unexpected_keys
    assert all(".mlp.experts." in key for key in result.unexpected_keys)


def test_dtype_contiguity_and_errors(tmp_path: Path) -> None:
    """Tensors are written in the requested dtype and contiguous, each with its own storage (q and k
    share one non-contiguous `a` here, which safetensors would refuse as is)."""
    a = torch.randn(16, 2).t()
    experts = HFExpertLoraWeights(torch.randn(3, 2, 5), torch.randn(3, 16, 2))
    linears = {
        "layers.0.self_attn.q_proj": HFLoraWeights(a, torch.randn(8, 2)),
        "layers.0.self_attn.k_proj": HFLoraWeights(a, torch.randn(4, 2)),
    }
    adapter = HFAdapter(
        linears, {"layers.0.mlp.experts.down_proj": experts}, 2, 2.5, False, "model.", "x"
    )

    files = write_peft_adapter(adapter, tmp_path, dtype=torch.bfloat16)

    assert files == [tmp_path / WEIGHTS_FILE, tmp_path / CONFIG_FILE]
    tensors = load_file(str(files[0]))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert torch.equal(
        tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"], a.bfloat16()
    )
    assert json.loads(files[1].read_text())["lora_alpha"] == 2.5
    with pytest.raises(ValueError, match="profile"):
        write_peft_adapter(adapter, tmp_path, profile="vllm")  # type: ignore[arg-type]
    unknown_projection = HFAdapter(
        {}, {"layers.0.mlp.experts.up_proj": experts}, 2, 2.5, False, "model.", "x"
    )
    with pytest.raises(ValueError, match="routed-expert"):
        write_peft_adapter(unknown_projection, tmp_path)
    with pytest.raises(ValueError, match="rank"):
        HFAdapter(linears, {}, 4, 2.5, False, "model.", "x")
