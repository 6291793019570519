"""Tokenization speed and peak memory of the data pipeline on large generated Parquet datasets.

For each `--rows` count, in a temporary directory: writes a Parquet dataset of that many chat rows
(the tiny SFT generator, in 50,000-row row groups, from a separate process), builds the tiny
tokenizer (Qwen3.5 chat template), then, in a fresh subprocess, tokenizes the dataset with
`lora_trainer.data.pipeline.tokenize_source` (`--num-proc` tokenizer processes) and builds the
packing plan of its samples (`PackedDataset`, 256 tokens a row), and reports the wall time of the
tokenization, rows/s and peak memory (Linux `/proc`):

- peak RSS: the measuring process's `VmHWM`; it counts the pages of the memory-mapped Arrow files
  the process has read (page cache shared with the file system, dropped under memory pressure),
  so it grows with the bytes read even when nothing is held in memory;
- peak anonymous RSS (`RssAnon`, sampled every 20 ms) of the measuring process and of it and its
  tokenizer processes together: the memory the pipeline itself holds, which must not grow with
  the row count.

Then a second run on the same data, which must load the cache instead. Prints one line per size,
then the ratios of the largest size to the smallest (rows/s: goal ~1, tokenization scales
linearly) and the growth of each peak anonymous RSS per row between them, in bytes (goal: no
more than the ~10 bytes below). What still grows with the rows:

- the packing plan, 8 bytes per packed row (its first sample's index), in RAM for the whole run
  (a packed row holds several samples: ~1.3 bytes per sample here);
- the metadata of the Arrow record batches of the memory-mapped tables a process opens (~1 KiB
  per record batch and column, batches of 1,000 rows): ~10 bytes per row in the tokenizing
  process, which opens the source rows, the tokenized rows, the kept rows' indices and the
  samples, and ~3 bytes per row in a training process, which opens the samples;
- what `datasets` writes to disk, memory-mapped, not in RAM: the source rows in Arrow, the
  tokenized rows, the kept rows' indices (8 bytes per row) and the samples.

    python benchmarks/data_tokenize.py [--rows 100000 300000 1000000] [--num-proc 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHUNK = 50_000
SEQ_LEN = 256


def generate(path: Path, rows: int) -> None:
    """Write `rows` chat rows as one Parquet file, `CHUNK` rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lora_trainer.demo.tokenizer import tiny_sft_records

    writer = None
    for start in range(0, rows, CHUNK):
        records = tiny_sft_records(min(CHUNK, rows - start), seed=start)
        table = pa.Table.from_pylist(records)
        if writer is None:
            writer = pq.ParquetWriter(str(path), table.schema)
        writer.write_table(table.cast(writer.schema))
    assert writer is not None
    writer.close()


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _anon_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in task.read_text().split()]
    return found + [grandchild for child in found for grandchild in _children(child)]


class AnonPeak(threading.Thread):
    """Samples the anonymous RSS of this process and of it with its descendants."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.own = self.total = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        pid = os.getpid()
        while not self.stop.wait(0.02):
            own = _anon_mib(pid)
            self.own = max(self.own, own)
            self.total = max(self.total, own + sum(_anon_mib(child) for child in _children(pid)))


def measure(data: Path, tokenizer_dir: Path, cache: Path, num_proc: int) -> None:
    """Tokenize `data` into `cache` and print a JSON line of the figures (imports not timed)."""
    import datasets  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    from lora_trainer.data.formats import Columns
    from lora_trainer.data.packing import PackedDataset, TokenizedRows
    from lora_trainer.data.pipeline import SourceSpec, tokenize_source
    from lora_trainer.data.tokenize import TokenizeSettings

    sampler = AnonPeak()
    sampler.start()
    start = time.perf_counter()
    samples, summary = tokenize_source(
        SourceSpec(data),
        model_dir=tokenizer_dir,
        settings=TokenizeSettings(max_seq_len=SEQ_LEN),
        columns=Columns(),
        cache_dir=cache,
        key="data.train_path",
        num_proc=num_proc,
    )
    seconds = time.perf_counter() - start
    packed = PackedDataset(TokenizedRows(samples), SEQ_LEN, pad_id=0)
    sampler.stop.set()
    sampler.join()
    print(
        json.dumps(
            {
                "rows": summary.rows,
                "kept": len(samples),
                "packed_rows": len(packed),
                "seconds": seconds,
                "rows_per_s": summary.rows / seconds,
                "peak_rss_mib": vm_hwm_mib(),
                "peak_anon_mib": sampler.own,
                "peak_anon_all_mib": sampler.total,
            }
        )
    )


def run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        return
    if args.measure:
        measure(*(Path(p) for p in args.measure), num_proc=args.num_proc)
        return

    from lora_trainer.demo.tokenizer import build_tiny_tokenizer

    results = {}
    with tempfile.TemporaryDirectory(prefix="data_tokenize_") as tmp:
        root = Path(tmp)
        tokenizer_dir = build_tiny_tokenizer(root / "tokenizer")
        for rows in args.rows:
            data = root / f"rows-{rows}.parquet"
            subprocess.run(
                [sys.executable, __file__, "--generate", str(data), str(rows)], check=True
            )
            cache = root / f"cache-{rows}"
            first = run(
                "--measure",
                str(data),
                str(tokenizer_dir),
                str(cache),
                "--num-proc",
                str(args.num_proc),
            )
            again = run(
                "--measure",
                str(data),
                str(tokenizer_dir),
                str(cache),
                "--num-proc",
                str(args.num_proc),
            )
            results[rows] = first
            print(
                f"{rows:>9,} rows: {first['rows_per_s']:6.0f} rows/s ({first['seconds']:.0f} s, "
                f"{args.num_proc} processes), {first['packed_rows']:,} packed rows; peak anonymous "
                f"RSS {first['peak_anon_mib']:.1f} MiB (with the tokenizer processes "
                f"{first['peak_anon_all_mib']:.1f} MiB), peak RSS {first['peak_rss_mib']:.0f} MiB; "
                f"cached reload {again['seconds']:.2f} s",
                flush=True,
            )
            data.unlink()
    small, large = min(results), max(results)

    def ratio(key: str) -> float:
        return results[large][key] / max(results[small][key], 1.0)

    def per_row(key: str) -> float:
        return (results[large][key] - results[small][key]) * 2**20 / max(large - small, 1)

    print(
        f"{large:,} / {small:,} rows: rows/s x{ratio('rows_per_s'):.2f}, peak RSS "
        f"x{ratio('peak_rss_mib'):.2f}; peak anonymous RSS x{ratio('peak_anon_mib'):.2f}, "
        f"{per_row('peak_anon_mib'):+.1f} bytes per row (with the tokenizer processes "
        f"x{ratio('peak_anon_all_mib'):.2f}, {per_row('peak_anon_all_mib'):+.1f} bytes per row)"
    )


if __name__ == "__main__":
    main()
