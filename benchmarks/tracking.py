"""Benchmark: what MLflow tracking costs the training process (start-up time, peak memory).

For tracking.mlflow off and on, a fresh child process imports torch and the project (as
the training process has), then opens a `metrics.MetricsSink` on a new run folder, logs
`--iterations` iterations of 12 metrics with `--work` seconds of CPU work between them (a
stand-in for a meta-iteration), and closes it. It reports the seconds the sink's
constructor took (on the training thread's critical path), the seconds of all `log`
calls, the seconds `close` waited, the increase of the process's peak resident memory
over its peak before the sink, and the peak memory of the MLflow writer process (a
separate process since issue 19). The store is then read back to check every metric
arrived. Prints a table and writes benchmarks/results/tracking.json.

    python benchmarks/tracking.py [--iterations 20] [--work 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METRICS = 12


def _peak_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def child(mlflow: bool, iterations: int, work: float) -> dict:
    """One measurement, in this (fresh) process."""
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401  (the training process has it loaded)
    import config
    import metrics
    cfg = config.load_config(overrides={"tracking.mlflow": mlflow, "tracking.tensorboard": False})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as run_dir:
        before = _peak_mib()
        start = time.perf_counter()
        sink = metrics.MetricsSink(run_dir, cfg.tracking, "bench", cfg.flat())
        start_s = time.perf_counter() - start
        log_s = 0.0
        for i in range(1, iterations + 1):
            _busy(work)
            start = time.perf_counter()
            sink.log(i, {f"metric_{m}": i + m / 10 for m in range(METRICS)})
            log_s += time.perf_counter() - start
        start = time.perf_counter()
        sink.close()
        close_s = time.perf_counter() - start
        peak_increase = _peak_mib() - before
        writer_peak = _peak_mib(resource.RUSAGE_CHILDREN)
        logged = None
        if mlflow:  # read the store back (after measuring: this imports MLflow here)
            from mlflow.tracking import MlflowClient
            client = MlflowClient(sink.mlflow_uri)
            run = client.search_runs([client.get_experiment_by_name("bench").experiment_id])[0]
            logged = len(client.get_metric_history(run.info.run_id, "metric_0"))
    return {"mlflow": mlflow, "start_s": start_s, "log_s": log_s, "close_s": close_s,
            "peak_increase_mib": peak_increase, "writer_peak_mib": writer_peak if mlflow else 0.0,
            "metric_0_points_in_store": logged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--work", type=float, default=0.5, help="CPU seconds between logs")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.iterations, args.work)))
        return
    rows = []
    for mode in ("off", "on"):
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--iterations",
                               str(args.iterations), "--work", str(args.work)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    off, on = rows
    print(f"MetricsSink, {args.iterations} iterations of {METRICS} metrics, {args.work} s of "
          "CPU work between them\n")
    print("| tracking.mlflow | constructor (s) | all log calls (s) | close (s) "
          "| peak RSS increase (MiB) | writer process peak (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {'on' if r['mlflow'] else 'off'} | {r['start_s']:.3f} | {r['log_s']:.3f} | "
              f"{r['close_s']:.3f} | {r['peak_increase_mib']:.1f} | {r['writer_peak_mib']:.1f} |")
    added = {"start_s": on["start_s"] - off["start_s"],
             "peak_mib": on["peak_increase_mib"] - off["peak_increase_mib"]}
    print(f"\nMLflow adds {added['start_s']:.3f} s to start-up and {added['peak_mib']:.1f} MiB "
          f"to the training process's peak; the store holds {on['metric_0_points_in_store']} "
          f"of {args.iterations} points of metric_0.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from utils import atomic_write_json
    atomic_write_json(RESULTS / "tracking.json", {
        "iterations": args.iterations, "work_s": args.work, "rows": rows, "added": added,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_cores": os.cpu_count()})


if __name__ == "__main__":
    main()
