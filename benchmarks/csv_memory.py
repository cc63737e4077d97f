"""Benchmark: peak memory of reading a large CSV, per MB of input (issue 27).

Writes a CSV of `--mb` megabytes with a text column, a label column and `--extra`
columns MELoRA never reads (as an export of a ticketing system has), then reads it in a
fresh child process each way and records the child's peak resident memory above its own
floor (the same imports, no file read):

- `training`: `dataset_loader._read_file`, what `--dataset`/`datasets.meta_*` sources use;
- `adapt`: `dataset_loader.read_table`, what `--support`, `--predict` and `--eval_dataset` use;
- `whole_text`: the reader before issue 27 (the whole file as one string, parsed with
  every column kept), for comparison.

    python benchmarks/csv_memory.py              # 100 MB, 4 extra columns
    python benchmarks/csv_memory.py --mb 200

Prints a table and writes benchmarks/results/csv_memory.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WAYS = ("training", "adapt", "whole_text")


def write_csv(path: Path, megabytes: float, extra: int, seed: int = 0) -> int:
    """A CSV of about `megabytes` MB: text, label and `extra` unread columns; its rows."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    header = ["text", "label"] + [f"extra_{j}" for j in range(extra)]
    rows, size, target = 0, 0, megabytes * 1e6
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(header) + "\n")
        while size < target:
            text = " ".join(rng.choices(words, k=12))
            cells = [text, f"intent_{rng.randrange(150)}"] + \
                [" ".join(rng.choices(words, k=6)) for _ in range(extra)]
            line = ",".join(cells) + "\n"
            f.write(line)
            size += len(line)
            rows += 1
    return rows


def _child(way: str, path: str, send) -> None:
    """Read the file one way (or not at all: way 'floor'); send (peak MB, rows, seconds)."""
    import io

    import pandas  # noqa: F401  (the floor holds the same imports)

    import dataset_loader as D
    start, rows = time.perf_counter(), 0
    if way == "training":
        entry = D._Source(source=path, config="", split="train", text_column="text",
                          label_column="label", group_file="", groups=(), weight=1.0)
        texts, _ = D._read_file(Path(path), entry, Path(tempfile.gettempdir()))
        rows = len(texts)
    elif way == "adapt":
        rows = len(D.read_table(path, "text", "label", "--support")[1])
    elif way == "whole_text":
        text = Path(path).read_text(encoding="utf-8")
        rows = len(pandas.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    send.send((peak_mb, rows, time.perf_counter() - start))


def measure(way: str, path: Path) -> tuple[float, int, float]:
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(way, str(path), send))
    child.start()
    result = receive.recv()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the CSV to read")
    parser.add_argument("--extra", type=int, default=4, help="columns MELoRA does not read")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "csv_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.csv"
        rows = write_csv(path, args.mb, args.extra)
        size_mb = path.stat().st_size / 1e6
        floor = measure("floor", path)[0]
        results = {}
        for way in WAYS:
            peak, read, seconds = measure(way, path)
            assert read == rows, (way, read, rows)
            results[way] = {"peak_mb": peak, "above_floor_mb": peak - floor,
                            "mb_per_input_mb": (peak - floor) / size_mb, "seconds": seconds}
    out = {"input_mb": size_mb, "rows": rows, "extra_columns": args.extra, "floor_mb": floor,
           "ways": results}
    from utils import atomic_write_json
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, out)
    print(f"CSV of {size_mb:.0f} MB ({rows} rows, text + label + {args.extra} unread columns); "
          f"child floor {floor:.0f} MB\n")
    print("| reader | peak above floor (MB) | MB per MB of input | seconds |")
    print("|---|---:|---:|---:|")
    for way, r in results.items():
        print(f"| {way} | {r['above_floor_mb']:.0f} | {r['mb_per_input_mb']:.2f} | {r['seconds']:.1f} |")
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
