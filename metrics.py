"""The one sink for numbers: `metrics.jsonl`, MLflow and TensorBoard behind one `log`.

Training, evaluation and the hyperparameter search record numbers here, never through
MLflow directly: `MlflowRun` hands an MLflow run to a separate writer process
(mlflow_writer.py), so no process that trains imports MLflow.

    sink = MetricsSink(run_dir, cfg.tracking, "melora", cfg.flat())
    sink.log(1, {"meta_loss": 1.6})
    sink.close()
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from analysis import METRICS_FILE  # the run-folder file names live in analysis (a torch-free leaf)
from mlflow_writer import mlflow_store
from utils import atomic_write_text, json_default

TENSORBOARD_DIR = "tensorboard"
WRITER_SCRIPT = Path(__file__).resolve().parent / "mlflow_writer.py"


class MetricsSink:
    """One sink for numbers: `metrics.jsonl`, MLflow and TensorBoard behind one `log`.

    MLflow is embedded: a SQLite store `<run_dir>/mlflow.db` (no server, no network),
    unless `MLFLOW_TRACKING_URI` is set. A separate process (mlflow_writer.py) imports
    MLflow, creates the store and writes the run, so tracking adds neither start-up time
    nor memory to this process; `close` waits for it to finish the run. TensorBoard event files go to
    `<run_dir>/tensorboard`. `metrics.jsonl` always gets one JSON line per `log` call.

    Args:
        run_dir: the run folder.
        tracking: the `tracking` config section (`mlflow`, `tensorboard` switches).
        experiment_name: the MLflow experiment and run name.
        params: flat `{"section.key": value}` to record as MLflow parameters.
        start_iteration: on resume, the checkpoint's iteration: `metrics.jsonl` lines and
            TensorBoard events after it (from the interrupted run) are dropped.

    Example:
        >>> sink = MetricsSink(run_dir, cfg.tracking, "melora", cfg.flat())
        >>> sink.log(1, {"meta_loss": 1.6, "query_acc_after": 0.4})
        >>> sink.close()
    """

    def __init__(self, run_dir: str | os.PathLike, tracking, experiment_name: str,
                 params: Mapping[str, Any] | None = None, start_iteration: int = 0):
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / METRICS_FILE
        self._truncate_jsonl(start_iteration)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = self._open_tensorboard(start_iteration) if tracking.tensorboard else None
        self.tensorboard_dir = self.run_dir / TENSORBOARD_DIR if tracking.tensorboard else None
        self._mlflow = None  # the run in the MLflow writer process (mlflow_writer.py)
        self.mlflow_uri = None
        if tracking.mlflow:
            run_name = experiment_name if start_iteration == 0 else \
                f"{experiment_name} (resumed at {start_iteration})"
            self._mlflow = MlflowRun(self.run_dir, experiment_name, run_name, params or {})
            self.mlflow_uri = self._mlflow.uri

    # -- public ------------------------------------------------------------------------

    def log(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        """Record the numbers of one iteration in every enabled backend.

        Non-finite values are written as `null` to `metrics.jsonl` and not sent to
        MLflow or TensorBoard.
        """
        line = {"iteration": int(iteration)}
        line.update({k: _finite_or_none(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(line, default=json_default) + "\n")
        self._jsonl.flush()
        numbers = {k: float(v) for k, v in line.items()
                   if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, iteration)
        if self._mlflow is not None:
            self._mlflow.log(iteration, numbers)

    def locations(self) -> dict[str, str]:
        """Where each backend writes, and how to open it."""
        out = {"metrics": str(self.jsonl_path)}
        if self.tensorboard_dir is not None:
            out["tensorboard"] = str(self.tensorboard_dir)
            out["tensorboard_command"] = f"tensorboard --logdir {self.tensorboard_dir}"
        if self.mlflow_uri is not None:
            out["mlflow"] = self.mlflow_uri
            out["mlflow_command"] = f"mlflow ui --backend-store-uri {self.mlflow_uri}"
        return out

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close every backend; `status` ends the MLflow run (FINISHED, FAILED)."""
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.close(status)

    # -- backends ----------------------------------------------------------------------

    def _truncate_jsonl(self, start_iteration: int) -> None:
        if not self.jsonl_path.is_file():
            return
        kept = [line for line in self.jsonl_path.read_text(encoding="utf-8").splitlines()
                if _iteration_of(line) <= start_iteration]
        atomic_write_text(self.jsonl_path, "".join(f"{line}\n" for line in kept))

    def _open_tensorboard(self, start_iteration: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events after the checkpoint written by an interrupted run.
        purge = start_iteration + 1 if start_iteration > 0 else None
        return SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)


class MlflowRun:
    """One MLflow run, written by a writer process (mlflow_writer.py) fed from a thread.

    MLflow's import and store creation happen in that process, so they cost this process
    no start-up time and no memory; `log` queues lines that a thread feeds to the writer,
    so a writer still creating its store never blocks the caller.

    Args:
        run_dir: the run folder; the store is its mlflow.db (`mlflow_writer.mlflow_store`).
        experiment: the MLflow experiment (created when missing).
        run_name: the run's name.
        params: `{name: value}` to record as parameters (values as strings).

    Example:
        >>> run = MlflowRun(run_dir, "melora-hpo", "trial-0", {"inner_lr": 0.5})
        >>> run.log(1, {"meta_loss": 1.6})
        >>> run.close("FINISHED", tags={"optuna_state": "complete"})
    """

    def __init__(self, run_dir: Path, experiment: str, run_name: str, params: Mapping[str, Any]):
        self.uri = mlflow_store(run_dir)
        self._errors = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, str(WRITER_SCRIPT)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=self._errors, start_new_session=True)
        self._queue: queue.Queue = queue.Queue()
        self._queue.put({
            "uri": self.uri, "experiment": experiment, "run_name": run_name,
            "artifact_location": (run_dir / "mlflow-artifacts").resolve().as_uri(),
            "tags": {"run_dir": str(run_dir.resolve())},
            "params": {k: str(v) for k, v in params.items()}})
        self._feeder = threading.Thread(target=self._feed, daemon=True, name="mlflow-feeder")
        self._feeder.start()

    def log(self, step: int, numbers: Mapping[str, float]) -> None:
        """Queue the metrics of one step."""
        self._queue.put({"step": int(step), "timestamp": int(time.time() * 1000),
                         "metrics": dict(numbers)})

    def close(self, status: str, tags: Mapping[str, str] | None = None, timeout: float = 600.0) -> None:
        """Send `end` (with `tags` to set), wait for the writer to finish the run; a failure
        is a warning."""
        self._queue.put({"end": status, "tags": dict(tags or {})})
        self._feeder.join(timeout)
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        if code != 0:
            self._errors.seek(0)
            tail = self._errors.read().decode(errors="replace").strip().splitlines()[-3:]
            warnings.warn(f"MLflow logging to {self.uri} failed (exit status {code}: "
                          f"{' | '.join(tail) or 'no message'}); metrics.jsonl holds every "
                          "metric", UserWarning, stacklevel=3)
        self._errors.close()

    def _feed(self) -> None:
        """Thread: write queued messages to the writer process until the `end` message."""
        while True:
            message = self._queue.get()
            try:
                self._process.stdin.write((json.dumps(message) + "\n").encode())
                self._process.stdin.flush()
            except (BrokenPipeError, OSError):
                return  # the writer died; close() reports why
            if "end" in message:
                return


def _iteration_of(line: str) -> float:
    """The iteration of a metrics.jsonl line; inf for a torn line (a killed writer)."""
    try:
        return json.loads(line).get("iteration", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value