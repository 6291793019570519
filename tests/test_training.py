"""The training app end to end: `python train.py` on 2 CPU ranks, exports that load in
transformers + PEFT, resume equality, and packed sequences against unpacked ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.checkpoints import KIND_DENSE, KIND_MOE_VL
from tests.multirank import run_multirank
from tests.numerics import assert_within_floor, noise_floor, to_float64
from tests.parity_runner import run_packing

REPO = Path(__file__).resolve().parent.parent
TINY_CACHE = REPO / ".cache" / "tiny_models"
COMMON = [
    "data.max_seq_len=64",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=1",
    f"model.tiny_cache_dir={TINY_CACHE}",
]


def train(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(TORCHDYNAMO_DISABLE="1", HOME=str(output_dir))
    run = subprocess.run(
        [sys.executable, "train.py", f"output_dir={output_dir}", *COMMON, *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run


SHIPPED_DATA = (
    Path(__file__).resolve().parents[1] / "lora_trainer" / "demo" / "assets" / "tiny_sft.jsonl"
)


def losses(output_dir: Path, key: str = "train/loss") -> list[float]:
    records = [
        json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()
    ]
    return [record[key] for record in records if key in record]


def adapter_tensors(save: Path) -> dict[str, torch.Tensor]:
    return load_file(str(save / "hf_adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps with TP=2 + SP on 2 ranks, a save every 2 steps, the export check on, wandb
    without credentials (so offline)."""
    out = tmp_path_factory.mktemp("straight")
    run = train(
        out,
        "trainer.max_steps=4",
        "checkpoint.every_n_steps=2",
        "parallel.ep=1",
        "parallel.tp=2",
        "parallel.sp=true",
        "optim.warmup_steps=3",
        "optim.min_lr=3e-3",
        "export.check=true",
    )
    assert "logging offline" in run.stdout + run.stderr
    assert list((out / "wandb").glob("offline-run-*"))
    return out


def test_two_ranks_train_and_export_loadable_adapter_and_merged(straight_run: Path) -> None:
    save = straight_run / "checkpoints" / "step-4"
    assert sorted(p.name for p in save.iterdir()) == [
        "export_manifest.json",
        "hf_adapter",
        "hf_merged",
        "training_state",
    ]
    manifest = json.loads((save / "export_manifest.json").read_text())
    assert manifest["check"]["passed"], manifest["check"]
    tensors = adapter_tensors(save)
    b_norms = [t.abs().sum().item() for k, t in tensors.items() if "lora_B" in k]
    assert b_norms and all(norm > 0 for norm in b_norms)
    base_path = json.loads((save / "hf_adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_path), save / "hf_adapter"
        )
        merged = AutoModelForCausalLM.from_pretrained(save / "hf_merged")
        peft_logits, merged_logits = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        floor = max(
            noise_floor(peft_logits, to_float64(peft_model)(input_ids=ids).logits),
            noise_floor(merged_logits, to_float64(merged)(input_ids=ids).logits),
        )
        assert_within_floor(peft_logits, merged_logits, floor, "PEFT adapter vs merged")
        # Four steps on changing batches move the logged loss less than the batches differ, so
        # learning is checked on fixed rows: the shipped data's first 64 conversations.
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        rows = [json.loads(line)["messages"] for line in SHIPPED_DATA.read_text().splitlines()[:64]]
        batches = [
            tokenizer.apply_chat_template(m, return_tensors="pt", return_dict=True)["input_ids"]
            for m in rows
        ]
        trained = sum(peft_model(input_ids=ids, labels=ids).loss.item() for ids in batches) / len(
            batches
        )
        with peft_model.disable_adapter():
            base = sum(peft_model(input_ids=ids, labels=ids).loss.item() for ids in batches) / len(
                batches
            )
    assert trained < base, (
        f"the adapter does not lower the loss of the training rows: {trained} >= {base}"
    )
    assert len(losses(straight_run)) == 4


def test_resume_gives_the_same_adapter_as_a_straight_run(
    straight_run: Path, tmp_path: Path
) -> None:
    args = [
        "checkpoint.every_n_steps=2",
        "parallel.ep=1",
        "parallel.tp=2",
        "parallel.sp=true",
        "optim.warmup_steps=3",
        "optim.min_lr=3e-3",
    ]
    val = ["data.val_path=lora_trainer/demo/assets/tiny_sft.jsonl", "trainer.val_every_n_steps=2"]
    train(tmp_path, "trainer.max_steps=2", "logger=none", *args, *val)
    train(tmp_path, "trainer.max_steps=4", "resume=latest", "logger=none", *args)
    resumed = adapter_tensors(tmp_path / "checkpoints" / "step-4")
    straight = adapter_tensors(straight_run / "checkpoints" / "step-4")
    assert sorted(resumed) == sorted(straight)
    for key, tensor in straight.items():
        assert torch.allclose(resumed[key], tensor, atol=1e-6, rtol=0), key
    assert losses(tmp_path)[2:] == pytest.approx(losses(straight_run)[2:], abs=1e-6)
    validation = losses(tmp_path, "val/loss")
    assert len(validation) == 1 and 0 < validation[0] < 10


@pytest.mark.parametrize("kind", [KIND_DENSE, KIND_MOE_VL])
def test_packed_samples_give_the_logits_of_each_sample_alone(
    kind: str, checkpoints: dict[str, str]
) -> None:
    generator = torch.Generator().manual_seed(4)
    samples = [torch.randint(1, 256, (n,), generator=generator).tolist() for n in (9, 14, 5, 11, 7)]
    result = run_multirank(run_packing, 1, {}, checkpoints[kind], samples, 32)[0]
    exact = run_multirank(run_packing, 1, {}, checkpoints[kind], samples, 32, torch.float64)[0]
    floor = max(
        noise_floor(alone, alone_fp64)
        for alone, alone_fp64 in zip(result["alone"], exact["alone"], strict=True)
    )
    for i, (alone, packed) in enumerate(zip(result["alone"], result["packed"], strict=True)):
        assert_within_floor(packed, alone, floor, f"{kind}: sample {i} packed vs alone")


def test_default_expert_parallel_layout_trains_and_passes_the_export_check(tmp_path: Path) -> None:
    """The embedded default's layout (EP=2 on 2 ranks) with the export check on."""
    train(
        tmp_path,
        "trainer.max_steps=2",
        "checkpoint.every_n_steps=2",
        "logger=none",
        "export.check=true",
    )
    manifest = json.loads(
        (tmp_path / "checkpoints" / "step-2" / "export_manifest.json").read_text()
    )
    assert manifest["check"]["passed"], manifest["check"]
    tensors = adapter_tensors(tmp_path / "checkpoints" / "step-2")
    expert_b = [t for k, t in tensors.items() if "mlp.experts" in k and "lora_B" in k]
    assert expert_b and all(t.abs().sum() > 0 for t in expert_b)


def test_callbacks_from_the_command_line_replace_the_default_ones(tmp_path: Path) -> None:
    """The save callback left out and a callback added with an argument interpolated from the
    config: every rank makes and calls the added one, and no save is written."""
    probe = tmp_path / "probe"
    run = train(
        tmp_path,
        "trainer.max_steps=2",
        "checkpoint.every_n_steps=1",
        "logger=none",
        "~callbacks.save",
        "+callbacks.probe._target_=tests.callback_probe.StepRecorder",
        f"+callbacks.probe.path={probe}",
        "+callbacks.probe.every=${checkpoint.every_n_steps}",
    )
    records = {path.name: json.loads(path.read_text()) for path in probe.iterdir()}
    assert records == {f"rank-{rank}.json": {"every": 1, "steps": [1, 2]} for rank in (0, 1)}
    assert len(losses(tmp_path)) == 2
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert "Training done" not in run.stdout
