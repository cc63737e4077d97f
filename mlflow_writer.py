"""MLflow writer process: utils.MetricsSink's MLflow backend, off the training process.

Importing MLflow and creating its embedded SQLite store (schema migrations) took tens of
seconds and added about 170 MiB to the training process's peak memory. The sink starts
this script as a separate process instead and sends it JSON lines on stdin; the training
process neither imports MLflow nor waits for the store (README: Training, tracking cost).

Protocol, one JSON object per line:

    {"uri", "experiment", "artifact_location", "run_name", "tags", "params": {k: str}}  first
    {"step": int, "timestamp": ms, "metrics": {name: float}}                            any
    {"end": "FINISHED" | "FAILED" | "KILLED"}                                            last

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

PARAM_VALUE_LIMIT = 6000   # MLflow's limit on a parameter value's length
BATCH_LIMIT = 100          # MLflow's limit on parameters per log_batch call


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
    setup = json.loads(first)
    from mlflow.entities import Metric, Param
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
    status = "FAILED"  # unless the training process says otherwise
    for line in sys.stdin:
        message = json.loads(line)
        if "end" in message:
            status = message["end"]
            break
        client.log_batch(run_id, metrics=[Metric(k, v, message["timestamp"], message["step"])
                                          for k, v in message["metrics"].items()])
    client.set_terminated(run_id, status=status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
