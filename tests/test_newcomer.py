"""A newcomer's first hour (issue 19): the repository alone runs, quietly, within its cores.

- nothing tracked refers to a path outside the repository, every config reads its data
  from the repository, and a copy of the tracked files alone (no folder beside it)
  loads CLINC150 without opening any file outside the copy but Python's own;
- the README's first command uses configs/clinc150.yml: real data, MiniLM, baselines;
- third-party progress bars and logs are hidden unless --verbose;
- the thread budget splits the cores among concurrent processes, and evaluation's child
  process uses its share and shows a progress bar of its episodes.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
import metrics
import utils
from conftest import REPO

TEXT_SUFFIXES = {".py", ".yml", ".yaml", ".md", ".txt", ".cfg", ".toml", ".ini", ""}


def tracked_files() -> list[Path]:
    """The repository's files a commit would hold (tracked, and new ones git does not
    ignore): a clone's content. Every file when git is absent."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode()
        return [REPO / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts
                and "results" not in p.parts and "__pycache__" not in p.parts]


# This workplace's folders and the old location of the data. Spelled in pieces so that this
# file, which holds the rule, is no match for a search for such paths.
OUTSIDE = re.compile("|".join(re.escape(part) for part in ("/" + "work/", "shared" + "/data")))
# A parent-relative path (a docs/ page linking ../README.md) is fine while it stays inside.
PARENT_RELATIVE = re.compile(r"(?:\.\./)+[^\s)\"'`\]]*")


def escapes(path: Path, line: str) -> bool:
    """Does `line` of `path` name a path outside the repository?"""
    if OUTSIDE.search(line):
        return True
    return any(not (path.parent / m).resolve().is_relative_to(REPO.resolve())
               for m in PARENT_RELATIVE.findall(line))


def test_no_tracked_file_names_a_path_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if path.suffix not in TEXT_SUFFIXES or not path.is_file() or \
                path.parts[-3:-1] == ("data", "clinc150"):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if escapes(path, line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def local_sources(cfg) -> list[str]:
    """The local files a config's datasets name (hub names and URLs left out)."""
    out = []
    for split in ("meta_train", "meta_val", "meta_test"):
        for entry in cfg.datasets[split]:
            for value in (entry["source"], entry["group_file"]):
                if value and "://" not in value and not value.startswith("custom:") and \
                        ("/" in value or Path(value).suffix):
                    out.append(value)
    return out


@pytest.mark.parametrize("name", ["config.yml"] + sorted(
    p.name for p in (REPO / "configs").glob("*.yml")))
def test_every_config_reads_its_data_from_the_repository(name):
    path = REPO / name if name == "config.yml" else REPO / "configs" / name
    cfg = config.load_config(path)
    for value in local_sources(cfg):
        resolved = (REPO / value).resolve()  # relative paths resolve against the repository root
        assert not Path(value).is_absolute(), (name, value)
        assert resolved.is_relative_to(REPO) and resolved.is_file(), (name, value)


def test_the_first_command_runs_clinc150_on_minilm_with_the_baselines():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)  # the first command
    assert "--mode full" in block and "--config configs/clinc150.yml" in block, block
    cfg = config.load_config(REPO / "configs" / "clinc150.yml")
    assert cfg.models.selected_model == "minilm-l6" and not cfg.datasets.synthetic_only
    assert cfg.datasets.synthetic_weight == 0.0
    train = set(cfg.datasets.meta_train[0]["groups"])
    test = set(cfg.datasets.meta_test[0]["groups"]) | set(cfg.datasets.meta_val[0]["groups"])
    assert train and test and not train & test  # evaluated on held-out domains
    assert cfg.evaluation.baselines  # with the baselines
    # The synthetic quick-start stays as the second example.
    assert "configs/quickstart.yml" in readme


AUDIT = r"""
import json, os, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.path.realpath(os.fsdecode(args[0])))
sys.addaudithook(hook)
sys.path.insert(0, os.getcwd())
import config, model
from dataset_loader import DatasetLoader
from transformers import AutoTokenizer
cfg = config.load_config("configs/clinc150.yml")
tokenizer = AutoTokenizer.from_pretrained(str(model.minilm_path()))  # the installed package's
loader = DatasetLoader(cfg.datasets, cfg.tasks, cfg.synthetic, tokenizer, 16, sys.argv[1],
                       cfg.training.seed, splits=("meta_test",))
episode = loader.episode("meta_test", 0)
print(json.dumps(opened))
"""


def test_a_copy_of_the_repository_alone_loads_its_data_and_opens_nothing_outside(tmp_path):
    clone, cache = tmp_path / "clone", tmp_path / "cache"
    for path in tracked_files():
        if path.is_file():
            target = clone / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", AUDIT, str(cache)], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    opened = json.loads(done.stdout.strip().splitlines()[-1])
    assert str((clone / "data" / "clinc150" / "data_full.json").resolve()) in opened
    # Outside the copy: only Python's installation and the system (libraries, /proc, ...).
    allowed = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                    str(tmp_path))} |
                    {"/proc/", "/sys/", "/dev/", "/etc/", "/usr/", "/lib", "/tmp/"})
    outside = sorted({p for p in opened if not p.startswith(allowed)})
    assert not outside, outside
    assert not [p for p in opened if p.startswith(str(REPO) + os.sep)], "read the original repository"


# ------------------------------------------------------------------------------------
# Quiet by default
# ------------------------------------------------------------------------------------

NOISY = r"""
import sys
sys.path.insert(0, {repo!r})
import utils
utils.quiet_third_party(sys.argv[1] == "verbose")
import datasets, model
model.load_model("minilm-l6", 2)
datasets.load_dataset("csv", data_files=sys.argv[2], cache_dir=sys.argv[3])
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_progress_bars_only_with_verbose(tmp_path, verbose):
    table = tmp_path / "t.csv"
    table.write_text("text,label\nhello,a\nbye,b\n")
    env = {k: v for k, v in os.environ.items()
           if k not in utils.QUIET_ENV}  # as a user's shell: none of them set
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", NOISY.format(repo=str(REPO)),
                           "verbose" if verbose else "quiet", str(table), str(tmp_path / "hf")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    noise = ("Loading weights" in done.stderr, "Generating train split" in done.stderr)
    assert noise == ((True, True) if verbose else (False, False)), done.stderr


def test_verbose_is_a_flag_and_quiet_is_the_default():
    import main
    assert main.build_parser().parse_args(["--verbose"]).verbose is True
    assert main.build_parser().parse_args([]).verbose is False


# ------------------------------------------------------------------------------------
# Thread budgets and evaluation progress
# ------------------------------------------------------------------------------------

def test_thread_budget_splits_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(utils, "cpu_cores", lambda: 8)
    assert utils.thread_budget(1) == 8 and utils.thread_budget(3) == 2
    assert utils.thread_budget(16) == 1  # never below one thread
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks on this machine
    assert utils.thread_budget() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's explicit choice wins
    assert utils.thread_budget() == 3
    assert utils.cpu_cores() >= 1


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import trainer
    out = tmp_path_factory.mktemp("newcomer")
    cfg = config.load_config(overrides=[
        "models.selected_model=tiny-bert", "datasets.synthetic_only=true", "tasks.n_way=3",
        "tasks.k_shot=2", "tasks.q_query=2", "models.max_length=16",
        "meta_learning.num_iterations=1", "meta_learning.default_meta_batch_size=1",
        "meta_learning.inner.default_num_steps=1", "tracking.mlflow=false",
        "tracking.tensorboard=false", "memory_optimization.hessian_approximation.method=none",
        f"training.output_dir={out}"])
    summary = trainer.run_training(cfg, out / "run")
    return cfg, summary["last_checkpoint"], out


def test_evaluation_child_uses_its_thread_share_and_shows_progress(tiny_checkpoint, capfd,
                                                                   monkeypatch):
    import evaluation
    cfg, checkpoint, out = tiny_checkpoint
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(utils, "cpu_cores", lambda: 4)  # the parent's view, passed to the child
    cfg = config.load_config(overrides={**cfg.flat(), "evaluation.num_episodes": 3,
                                       "evaluation.adaptation_steps": 1, "evaluation.seeds": 1,
                                       "evaluation.child_process": True})
    results = evaluation.run_evaluation(cfg, checkpoint, True, out / "eval")
    melora = results["methods"]["melora"]
    assert melora["torch_threads"] == 2  # 4 cores / 2 processes, set in the child
    err = capfd.readouterr().err
    assert re.search(r"evaluate melora: 100%.*3/3.*episode", err), err  # the child's bar


def test_evaluation_in_process_shows_progress_and_keeps_its_threads(tiny_checkpoint, capfd):
    import torch
    import evaluation
    cfg, checkpoint, out = tiny_checkpoint
    cfg = config.load_config(overrides={**cfg.flat(), "evaluation.num_episodes": 2,
                                       "evaluation.adaptation_steps": 1, "evaluation.seeds": 1,
                                       "evaluation.tuning_trials": 0,
                                       "evaluation.child_process": False,
                                       "evaluation.baselines": ["reptile_lora"],
                                       "evaluation.baseline_meta_iterations": 2})
    results = evaluation.run_evaluation(cfg, checkpoint, False, out / "eval_in")
    assert results["methods"]["melora"]["torch_threads"] == torch.get_num_threads()
    err = capfd.readouterr().err
    assert re.search(r"evaluate melora: 100%.*2/2", err), err
    # A baseline's meta-training has its bar too (its meta-steps counted), then its episodes.
    assert re.search(r"meta-train reptile_lora: 100%.*2/2", err), err
    assert re.search(r"evaluate reptile_lora: 100%.*2/2", err), err
    assert results["methods"]["reptile_lora"]["meta_train_iterations"] == 2


# ------------------------------------------------------------------------------------
# MLflow off the training process
# ------------------------------------------------------------------------------------

SINK = r"""
import sys
sys.path.insert(0, {repo!r})
import config, metrics
cfg = config.load_config(overrides={{"tracking.mlflow": True, "tracking.tensorboard": False}})
sink = metrics.MetricsSink(sys.argv[1], cfg.tracking, "newcomer", {{"lora.default_rank": 8}})
sink.log(1, {{"meta_loss": 1.5}})
sink.log(2, {{"meta_loss": 0.5}})
assert "mlflow" not in sys.modules, "the training process imported MLflow"
sink.close()
print(sink.mlflow_uri)
"""


def test_mlflow_is_written_by_another_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", SINK.format(repo=str(REPO)), str(tmp_path)],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    from mlflow.tracking import MlflowClient
    client = MlflowClient(done.stdout.strip().splitlines()[-1])
    run = client.search_runs([client.get_experiment_by_name("newcomer").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["lora.default_rank"] == "8"
    history = client.get_metric_history(run.info.run_id, "meta_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.5), (2, 0.5)]


def test_a_failing_mlflow_writer_is_one_warning_and_metrics_jsonl_holds_everything(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    cfg = config.load_config(overrides={"tracking.mlflow": True, "tracking.tensorboard": False})
    sink = metrics.MetricsSink(tmp_path, cfg.tracking, "newcomer")
    sink.log(1, {"meta_loss": 1.5})
    with pytest.warns(UserWarning, match="MLflow logging to nosuchscheme://nowhere failed"):
        sink.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["meta_loss"] == 1.5
