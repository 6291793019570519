"""CPU cost of packed rows against unpacked rows of the same shape, in our model with LoRA.

The model is benchmarks/model_speed.py's (hidden 512, 8 layers, 3 GDN : 1 gated attention),
random weights saved by transformers and loaded with `build_model_from_hf`, LoRA r=16 on every
target, base frozen, fp32, training mode, one torch thread. Both sides run forward + backward of
the next-token loss on `--rows` rows of `--seq` tokens: unpacked, one sample filling each row (no
`cu_seqlens`); packed, `--samples` samples of random lengths spread over the same rows, with the
position ids and `cu_seqlens` of the data pipeline's packing. They alternate step by step so that
load drift hits both alike. Printed: the median CPU time of the process per step (on a machine
shared with other jobs it barely moves with their load, unlike wall time, which is printed too)
and the ratio packed / unpacked (goal <= 1.05: packing should cost what the rows cost).

    python benchmarks/packing_speed.py [--rows 2] [--seq 512] [--samples 24] [--kind dense]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from model_speed import KIND_DENSE, KIND_MOE, build_hf_model
from transformers.utils import logging as hf_logging

from lora_trainer.bridge.build import build_model_from_hf
from lora_trainer.data.packing import build_row, collate
from lora_trainer.data.tokenize import TokenizedSample
from lora_trainer.lora.config import LoraConfig
from lora_trainer.lora.inject import inject_lora
from lora_trainer.parallel.config import ParallelConfig
from lora_trainer.parallel.state import destroy_parallel, initialize_parallel
from lora_trainer.qwen35.model import Qwen35Model


def packed_batch(
    rows: int, seq: int, samples: int, vocab: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """`samples` samples of random lengths filling `rows` rows of `seq` tokens exactly."""
    generator = torch.Generator().manual_seed(seed)
    per_row = [samples // rows + (r < samples % rows) for r in range(rows)]
    built = []
    for count in per_row:
        cuts = (
            torch.randperm(seq - 1, generator=generator)[: count - 1].add(1).sort().values.tolist()
        )
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq], strict=True)]
        tokenized = [
            TokenizedSample(
                input_ids=torch.randint(0, vocab, (n,), generator=generator).tolist(),
                loss_mask=[1] * n,
            )
            for n in lengths
        ]
        built.append(build_row(tokenized, seq, pad_id=0))
    return collate(built)


def step_seconds(
    model: Qwen35Model, batch: dict[str, torch.Tensor], packed: bool
) -> tuple[float, float]:
    """CPU time and wall time of one forward + backward of the next-token loss."""
    model.zero_grad(set_to_none=True)
    cpu_start, start = time.process_time(), time.perf_counter()
    if packed:
        logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"].long())
    else:
        logits = model(batch["input_ids"])
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
    return time.process_time() - cpu_start, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512, help="tokens per row")
    parser.add_argument("--samples", type=int, default=24, help="samples packed into the rows")
    parser.add_argument("--kind", default=KIND_DENSE, choices=[KIND_DENSE, KIND_MOE])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    initialize_parallel(ParallelConfig())
    try:
        with tempfile.TemporaryDirectory(prefix="packing_speed_") as workdir:
            reference = build_hf_model(args.kind)
            vocab = reference.config.vocab_size
            reference.save_pretrained(Path(workdir))
            del reference
            model = build_model_from_hf(Path(workdir), ParallelConfig()).model
        inject_lora(model, LoraConfig(r=16))
        model.train()
        batch = packed_batch(args.rows, args.seq, args.samples, vocab)
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for step in range(args.warmup + args.repeats):
            for is_packed in (False, True):
                seconds = step_seconds(model, batch, is_packed)
                if step >= args.warmup:
                    times[is_packed].append(seconds)
    finally:
        destroy_parallel()
    print(
        f"{args.kind}, 1 thread, fp32, LoRA r=16, forward+backward, {args.rows} rows x {args.seq} "
        f"tokens, median of {args.repeats} after {args.warmup} warm-up"
    )
    for index, clock in enumerate(("CPU time", "wall time")):
        unpacked_ms, packed_ms = (
            statistics.median(t[index] for t in times[key]) * 1e3 for key in (False, True)
        )
        print(
            f"  {clock:9s}: unpacked (1 sample per row) {unpacked_ms:8.1f} ms   packed "
            f"({args.samples} samples) "
            f"{packed_ms:8.1f} ms   ratio packed/unpacked {packed_ms / unpacked_ms:.3f}"
        )


if __name__ == "__main__":
    main()
