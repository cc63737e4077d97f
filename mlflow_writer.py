"""MLflow writer process: the MLflow backend of `metrics.MlflowRun`, off the training process.

Importing MLflow and creating its embedded SQLite store (schema migrations) took tens of
seconds and added about 170 MiB to the training process's peak memory. The sink starts
this script as a separate process instead and sends it JSON lines on stdin; the training
process neither imports MLflow nor waits for the store (README: Training, tracking cost).
`metrics.MetricsSink` (training, evaluation) and the hyperparameter search's trials
(`experiment.py`) both write their MLflow runs through it.

Protocol, one JSON object per line:

    {"uri", "experiment", "artifact_location", "run_name", "tags", "params": {k: str}}  first
    {"step": int, "timestamp": ms, "metrics": {name: float}}                            any
    {"end": "FINISHED" | "FAILED" | "KILLED", "tags": {k: str}}                         last

End of input without an `end` line (the training process died) ends the run FAILED.
It imports nothing of the project, so it starts without torch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

MLFLOW_DB = "mlflow.db"    # a run folder's embedded MLflow store
PARAM_VALUE_LIMIT = 6000   # MLflow's limit on a parameter value's length
BATCH_LIMIT = 100          # MLflow's limit on parameters per log_batch call


def mlflow_store(run_dir: str | os.PathLike) -> str:
    """The MLflow tracking URI of a run folder (``$MLFLOW_TRACKING_URI``, else its
    mlflow.db); telemetry is turned off so MLflow never reaches the network."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(run_dir) / MLFLOW_DB).resolve()}"


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    try:
        os.nice(10)  # the store's set-up yields the CPU to training
    except OSError:
        pass
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # never reach the network
    first = sys.stdin.readline()
    if not first:
        return 0
    client, run_id = open_run(json.loads(first))
    from mlflow.entities import Metric
    status, tags = "FAILED", {}  # unless the training process says otherwise
    for line in sys.stdin:
        message = json.loads(line)
        if "end" in message:
            status, tags = message["end"], message.get("tags", {})
            break
        client.log_batch(run_id, metrics=[Metric(k, v, message["timestamp"], message["step"])
                                          for k, v in message["metrics"].items()])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)
    return 0


def open_run(setup: dict):
    """The one MLflow set-up: a client on `setup["uri"]` (the store's tables created now),
    the experiment (created when missing) and a new run holding the parameters.

    Returns:
        (MlflowClient, run id).
    """
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    for name in ("mlflow", "alembic"):  # set after import: mlflow configures its logger
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():  # SQLAlchemy deprecation notices from MLflow's store
        warnings.simplefilter("ignore", DeprecationWarning)
        client = MlflowClient(tracking_uri=setup["uri"])
        client.search_experiments(max_results=1)  # creates the store's tables now
    experiment = client.get_experiment_by_name(setup["experiment"])
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        setup["experiment"], artifact_location=setup["artifact_location"])
    run_id = client.create_run(experiment_id, run_name=setup["run_name"],
                               tags=setup["tags"]).info.run_id
    params = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in setup["params"].items()]
    for i in range(0, len(params), BATCH_LIMIT):
        client.log_batch(run_id, params=params[i:i + BATCH_LIMIT])
    return client, run_id


if __name__ == "__main__":
    sys.exit(main())
