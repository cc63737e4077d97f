"""The meta-training loop: reproducibility, exact resume, non-finite guard, checkpoints, sinks."""

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

import config
import runs
import trainer
import utils

TINY = ["models.selected_model=tiny-bert", "datasets.synthetic_only=true", "tasks.n_way=3",
        "tasks.k_shot=2", "tasks.q_query=2", "models.max_length=16",
        "meta_learning.default_meta_batch_size=2", "meta_learning.inner.default_num_steps=2",
        "meta_learning.outer.default_lr=0.01", "training.save_every=2",
        "tracking.mlflow=false", "tracking.tensorboard=false"]


def tiny_cfg(tmp_path, *extra):
    return config.load_config(overrides=TINY + [f"training.output_dir={tmp_path}", *extra])


def train(cfg, run_dir, resume=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    return trainer.run_training(cfg, run_dir, resume=resume)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(line):
    """A metrics line without wall-clock and memory readings."""
    return {k: v for k, v in line.items() if k not in ("seconds", "peak_memory_mb")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Four iterations in one go, second-order (diagonal) with dropout on."""
    tmp = tmp_path_factory.mktemp("full")
    cfg = tiny_cfg(tmp, "meta_learning.num_iterations=4")
    train(cfg, tmp / "run")
    return tmp / "run"


# ---- reproducibility and resume -----------------------------------------------------

def test_resume_repeats_the_uninterrupted_run_exactly(uninterrupted, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path, "meta_learning.num_iterations=2"), run)
    # Same seed -> same losses: the first two iterations match the other run's.
    assert [numbers(m) for m in metrics(run)] == [numbers(m) for m in metrics(uninterrupted)[:2]]
    summary = train(tiny_cfg(tmp_path, "meta_learning.num_iterations=4"), run,
                    resume=run / "checkpoints" / "checkpoint_iter_2.pt")
    ours = runs.load_checkpoint(summary["last_checkpoint"])
    theirs = runs.load_checkpoint(uninterrupted / "checkpoints" / "checkpoint_iter_4.pt")
    assert ours["iteration"] == theirs["iteration"] == 4
    for name, tensor in theirs["theta"].items():
        assert torch.equal(ours["theta"][name], tensor), name
    assert [numbers(m) for m in metrics(run)] == [numbers(m) for m in metrics(uninterrupted)]
    assert metrics(run)[-1]["meta_loss"] != metrics(run)[0]["meta_loss"]  # it did train


def test_another_seed_gives_other_losses(uninterrupted, tmp_path):
    train(tiny_cfg(tmp_path, "meta_learning.num_iterations=1", "training.seed=7"), tmp_path / "run")
    assert metrics(tmp_path / "run")[0]["meta_loss"] != metrics(uninterrupted)[0]["meta_loss"]


def test_resume_refuses_another_model_or_rank(uninterrupted, tmp_path):
    checkpoint = uninterrupted / "checkpoints" / "checkpoint_iter_2.pt"
    for extra, named in ((["models.selected_model=tiny-gpt2"], "tiny-gpt2"),
                         (["lora.default_rank=2"], "LoRA rank 2")):
        cfg = tiny_cfg(tmp_path, "meta_learning.num_iterations=4", *extra)
        with pytest.raises(utils.UserError, match="tiny-bert") as err:
            train(cfg, tmp_path / "run", resume=checkpoint)
        assert named in str(err.value) and "LoRA rank 8" in str(err.value)


def test_resume_warns_on_changed_keys_and_keeps_model_keys(uninterrupted, tmp_path):
    state = runs.load_checkpoint(uninterrupted / "checkpoints" / "checkpoint_iter_2.pt")
    cfg = tiny_cfg(tmp_path, "lora.alpha=3.0", "meta_learning.outer.default_lr=0.5",
                   "meta_learning.num_iterations=9")
    with pytest.warns(UserWarning) as record:
        merged = trainer.reconcile_config(cfg, state, "ckpt")
    text = " ".join(str(w.message) for w in record)
    assert "lora.alpha" in text and "meta_learning.outer.default_lr" in text
    assert "num_iterations" not in text  # run-control keys may change silently
    assert merged.lora.alpha == 16.0 and merged.meta_learning.outer.default_lr == 0.5


def test_resume_config_starts_from_the_checkpoint(uninterrupted):
    checkpoint = uninterrupted / "checkpoints" / "checkpoint_iter_2.pt"
    cfg = trainer.resume_config(checkpoint, None, {"meta_learning.num_iterations": 8})
    assert cfg.models.selected_model == "tiny-bert" and cfg.tasks.n_way == 3
    assert cfg.meta_learning.num_iterations == 8


def test_resume_of_a_finished_run_says_how_to_continue(uninterrupted, tmp_path):
    cfg = tiny_cfg(tmp_path, "meta_learning.num_iterations=4")
    with pytest.raises(utils.UserError, match="--num_iterations"):
        train(cfg, tmp_path / "run", resume=uninterrupted / "checkpoints" / "checkpoint_iter_4.pt")


# ---- checkpoints ----------------------------------------------------------------------

def test_checkpoint_layout(uninterrupted):
    state = runs.load_checkpoint(uninterrupted / "checkpoints" / "checkpoint_iter_4.pt")
    assert state["model"] == "tiny-bert" and state["n_way"] == 3 and state["seed"] == 42
    assert state["lora"]["rank"] == 8 and "attention.self.query" in state["lora"]["target_modules"]
    assert state["optimizer"]["state"] and state["nonfinite_streak"] == 0
    assert json.loads(state["config"])["tasks"]["k_shot"] == 2
    assert trainer.latest_checkpoint(uninterrupted).name == "checkpoint_iter_4.pt"
    model, _, cfg, inner_lr = trainer.restore_model(uninterrupted / "checkpoints" / "checkpoint_iter_4.pt")
    assert inner_lr == cfg.meta_learning.inner.default_lr
    assert torch.equal(dict(model.named_parameters())["head.weight"], state["theta"]["head.weight"])


def test_load_checkpoint_refuses_bad_files(tmp_path):
    with pytest.raises(utils.UserError, match="does not exist"):
        runs.load_checkpoint(tmp_path / "missing.pt")
    good = runs.save_checkpoint(tmp_path / "good.pt", {"theta": {"a": torch.ones(3)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(utils.UserError, match="truncated.pt.*truncated"):
        runs.load_checkpoint(truncated)
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(utils.UserError, match="foreign.pt.*not a MELoRA checkpoint"):
        runs.load_checkpoint(tmp_path / "foreign.pt")
    _Exploit.target = str(tmp_path / "pwned")
    torch.save({"format": runs.CHECKPOINT_FORMAT, "x": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(utils.UserError, match="evil.pt.*refused"):
        runs.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


class _Exploit:
    """Unpickling it would create a file: what a malicious checkpoint could do."""
    target = ""

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_run_dir_refuses_an_existing_run(tmp_path):
    run = runs.prepare_run_dir(tmp_path, "exp", overwrite=False, resume=False)
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(utils.UserError, match="--overwrite.*--resume"):
        runs.prepare_run_dir(tmp_path, "exp", overwrite=False, resume=False)
    assert (runs.prepare_run_dir(tmp_path, "exp", overwrite=False, resume=True) / "metrics.jsonl").exists()
    replaced = runs.prepare_run_dir(tmp_path, "exp", overwrite=True, resume=False)
    assert [p.name for p in replaced.iterdir()] == [runs.RUN_MARKER]  # a new, marked folder


# ---- non-finite meta-batches ------------------------------------------------------------

def poison(monkeypatch, bad_iterations, where="loss"):
    """Make compute_meta_gradient non-finite during the given (0-based) iterations."""
    real, calls = trainer.compute_meta_gradient, {"n": 0}

    def fake(*args, **kwargs):
        loss, grads = real(*args, **kwargs)
        iteration = calls["n"] // 2  # two tasks per meta-batch
        calls["n"] += 1
        if iteration in bad_iterations:
            if where == "loss":
                loss = loss * float("nan")
            else:
                grads = {n: g * float("inf") for n, g in grads.items()}
        return loss, grads
    monkeypatch.setattr(trainer, "compute_meta_gradient", fake)


def all_finite(run_dir):
    for path in (run_dir / "checkpoints").glob("*.pt"):
        state = runs.load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in state["theta"].values()), path


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_meta_batch_is_skipped_with_a_warning(monkeypatch, tmp_path, where):
    poison(monkeypatch, {1}, where)
    cfg = tiny_cfg(tmp_path, "meta_learning.num_iterations=3", "meta_learning.inner.default_num_steps=1",
                   "memory_optimization.hessian_approximation.method=none", "training.save_every=1")
    with pytest.warns(RuntimeWarning, match="iteration 2: non-finite.*skipped"):
        train(cfg, tmp_path / "run")
    lines = metrics(tmp_path / "run")
    assert [m["skipped"] for m in lines] == [0, 1, 0]
    assert lines[1]["meta_loss" if where == "loss" else "grad_norm"] is None  # null in JSON
    all_finite(tmp_path / "run")
    a = runs.load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_iter_1.pt")["theta"]
    b = runs.load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_iter_2.pt")["theta"]
    assert all(torch.equal(a[n], b[n]) for n in a)  # the skipped step left theta alone


def test_consecutive_nonfinite_meta_batches_stop_with_a_clear_error(monkeypatch, tmp_path):
    poison(monkeypatch, set(range(1, 100)))
    cfg = tiny_cfg(tmp_path, "meta_learning.num_iterations=6", "meta_learning.inner.default_num_steps=1",
                   "memory_optimization.hessian_approximation.method=none", "training.save_every=1",
                   "training.max_nonfinite=3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(trainer.NonFiniteError, match="iteration 4: 3 meta-batches in a row") as err:
            train(cfg, tmp_path / "run")
    assert "outer.default_lr" in str(err.value)
    assert isinstance(err.value, utils.UserError)
    assert trainer.latest_checkpoint(tmp_path / "run").name == "checkpoint_iter_3.pt"
    all_finite(tmp_path / "run")


# ---- learned inner rates and tracking -------------------------------------------------------

def test_learned_inner_rates_are_trained_and_saved(tmp_path):
    cfg = tiny_cfg(tmp_path, "meta_learning.num_iterations=2", "meta_learning.inner.learn_lr=true",
                   "memory_optimization.hessian_approximation.method=none")
    summary = train(cfg, tmp_path / "run")
    state = runs.load_checkpoint(summary["last_checkpoint"])
    assert state["inner_lr"].shape == (2,)
    assert not torch.allclose(state["inner_lr"], torch.full((2,), 0.01, dtype=state["inner_lr"].dtype))
    assert "inner_lr_0" in metrics(tmp_path / "run")[-1]


def test_metrics_go_to_jsonl_tensorboard_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg(tmp_path, "meta_learning.num_iterations=1", "tracking.mlflow=true",
                   "tracking.tensorboard=true", "meta_learning.inner.default_num_steps=1",
                   "memory_optimization.hessian_approximation.method=none",
                   "training.log_query_acc_before=true")
    run = tmp_path / "run"
    summary = train(cfg, run)
    line = metrics(run)[0]
    for key in ("iteration", "meta_loss", "query_acc_before", "query_acc_after", "grad_norm",
                "outer_lr", "peak_memory_mb", "seconds"):
        assert isinstance(line[key], (int, float)), key
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["mlflow"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    from mlflow.tracking import MlflowClient
    client = MlflowClient(summary["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("melora").experiment_id])
    assert runs[0].info.status == "FINISHED"
    assert math.isclose(runs[0].data.metrics["meta_loss"], line["meta_loss"], rel_tol=1e-6)
    assert runs[0].data.params["lora.default_rank"] == "8"
    assert (run / "config.yml").is_file() and (run / "summary.json").is_file()


# ---- model selection on meta-val, anchor, LoRA frozen in the outer loop (issue 30) ------

def test_best_checkpoint_keeps_the_early_meta_val_peak(tmp_path, monkeypatch):
    """A run whose meta-val peaks at iteration 2 of 6 keeps iteration 2's theta as best.pt,
    although later evaluations are written (and checkpoints saved) after it."""
    scores = iter([0.30, 0.40, 0.90, 0.50])  # frozen encoder, then iterations 2, 4, 6: an early peak
    monkeypatch.setattr(trainer.ModelSelection, "validate", lambda self, t: next(scores))
    run = tmp_path / "run"
    cfg = tiny_cfg(tmp_path, "meta_learning.num_iterations=6", "training.val_every=2",
                   "training.save_every=2")
    summary = train(cfg, run)
    best = runs.load_checkpoint(run / "checkpoints" / "best.pt")
    at_4 = runs.load_checkpoint(run / "checkpoints" / "checkpoint_iter_4.pt")
    last = runs.load_checkpoint(run / "checkpoints" / "checkpoint_iter_6.pt")
    assert best["iteration"] == 4 and best["val_accuracy"] == 0.90
    assert best["frozen_val_accuracy"] == 0.30 and last["val_iteration"] == 6
    assert "frozen encoder 30.00%" in trainer.val_summary(best)
    assert json.loads((run / "checkpoints" / "best.json").read_text())["iteration"] == 4
    assert summary["best_checkpoint"] == str(run / "checkpoints" / "best.pt")
    for name, tensor in at_4["theta"].items():
        assert torch.equal(best["theta"][name], tensor), name
    assert any(not torch.equal(last["theta"][n], t) for n, t in at_4["theta"].items())
    assert [m["val_accuracy"] for m in metrics(run) if "val_accuracy" in m] == [0.40, 0.90, 0.50]


def test_validate_equals_the_evaluation_adaptation(tmp_path):
    """validate() adapts as baseline.MELoRA.adapt does (same phi_0, steps, learned rates,
    dropout seeding), so best.pt is chosen by the accuracy evaluation would report."""
    import baseline
    from utils import episode_seed, set_seed
    cfg = tiny_cfg(tmp_path, "training.val_every=1", "training.val_episodes=4",
                   "meta_learning.inner.learn_lr=true")
    meta = trainer.MetaTrainer.from_config(cfg)
    for it in range(2):
        meta.train_step(it)
    method = baseline.MELoRA(meta.model, meta.inner_lr, meta.inner_steps, meta.method,
                             meta.micro_batch, head_init=cfg.meta_learning.head_init)
    reference = []
    for i in range(4):
        set_seed(episode_seed(meta.seed, i))
        reference.append(method.adapt(meta.selection.loader.episode("meta_val", i), meta.inner_steps)[-1])
    assert meta.selection.validate(meta) == pytest.approx(sum(reference) / 4, abs=1e-12)


def test_val_every_without_meta_val_sources_is_refused(tmp_path):
    cfg = config.load_config(overrides=TINY[:1] + TINY[2:] + [
        f"training.output_dir={tmp_path}", "training.val_every=5", "datasets.meta_val=[]"])
    with pytest.raises(utils.ConfigError, match="val_every"):
        trainer.MetaTrainer.from_config(cfg)


def test_anchor_gradient_matches_the_closed_form(tmp_path):
    """d/dB (l/2)||s B A||^2 = l s^2 (B A) A^T and d/dA = l s^2 B^T (B A), in float64."""
    meta = trainer.MetaTrainer.from_config(tiny_cfg(tmp_path))
    with torch.no_grad():
        for layer in trainer.M.lora_layers(meta.model):
            layer.lora_B.normal_()
    penalty, grads = trainer.anchor_gradient(meta.model, meta.theta, 0.3)
    expected = 0.0
    names = {id(p): n for n, p in meta.theta.items()}
    for layer in trainer.M.lora_layers(meta.model):
        A, B, s = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.scaling
        expected += 0.15 * float((s * B @ A).pow(2).sum())
        tol = dict(rtol=1e-5, atol=1e-5)  # float32 autograd against the float64 closed form
        torch.testing.assert_close(grads[names[id(layer.lora_B)]].double(), 0.3 * s * s * (B @ A) @ A.T, **tol)
        torch.testing.assert_close(grads[names[id(layer.lora_A)]].double(), 0.3 * s * s * B.T @ (B @ A), **tol)
    assert penalty == pytest.approx(expected, rel=1e-5)


def _update_norm(model):
    return sum(float(layer.delta_weight().norm()) for layer in trainer.M.lora_layers(model))


def test_anchor_keeps_the_lora_update_smaller(tmp_path):
    norms = {}
    for anchor in (0.0, 50.0):
        meta = trainer.MetaTrainer.from_config(tiny_cfg(tmp_path, f"meta_learning.anchor={anchor}"))
        for it in range(3):
            stats = meta.train_step(it)
        norms[anchor] = _update_norm(meta.model)
        assert ("anchor_penalty" in stats) == (anchor > 0)
    assert 0 < norms[50.0] < norms[0.0]


def test_learn_lora_false_meta_learns_the_head_only(tmp_path):
    meta = trainer.MetaTrainer.from_config(tiny_cfg(
        tmp_path, "meta_learning.outer.learn_lora=false", "meta_learning.head=cosine",
        "meta_learning.inner.learn_lr=true"))
    before = {n: t.detach().clone() for n, t in meta.theta.items()}
    rates = meta.inner_lr.detach().clone()
    for it in range(2):
        meta.train_step(it)
    for name, tensor in meta.theta.items():
        moved = not torch.equal(tensor, before[name])
        assert moved == (name == "head.scale"), name
    assert not torch.equal(meta.inner_lr.detach(), rates)


def test_resume_keeps_selecting_against_the_stored_best(tmp_path, monkeypatch):
    scores = iter([0.30, 0.90, 0.50, 0.60])  # frozen, it 2, it 4; after resume: it 6
    monkeypatch.setattr(trainer.ModelSelection, "validate", lambda self, t: next(scores))
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path, "meta_learning.num_iterations=4", "training.val_every=2"), run)
    train(tiny_cfg(tmp_path, "meta_learning.num_iterations=6", "training.val_every=2"), run,
          resume=run / "checkpoints" / "checkpoint_iter_4.pt")
    best = runs.load_checkpoint(run / "checkpoints" / "best.pt")
    last = runs.load_checkpoint(run / "checkpoints" / "checkpoint_iter_6.pt")
    assert best["iteration"] == 2 and best["val_accuracy"] == 0.90
    assert last["frozen_val_accuracy"] == 0.30 and last["val_accuracy"] == 0.60
    assert next(scores, None) is None  # the frozen encoder was not scored again on resume


def test_a_checkpoint_saved_before_the_head_key_keeps_its_euclidean_head(tmp_path):
    """Checkpoints from before `meta_learning.head` existed had the Euclidean head. Evaluate,
    adapt and resume read them with that head (runs.PRE_KEY_VALUES, the format's migration
    from version 1), not today's cosine
    default: config layering used to fill in cosine and then refuse the checkpoint's own
    tensors as "another model"."""
    import evaluation
    cfg = tiny_cfg(tmp_path, "meta_learning.num_iterations=2", "meta_learning.head=euclidean")
    train(cfg, tmp_path / "run")
    state = runs.load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_iter_2.pt")
    saved = json.loads(state["config"])
    del saved["meta_learning"]["head"], saved["meta_learning"]["head_scale"]  # as an old release wrote it
    old = tmp_path / "old.pt"
    torch.save({**state, "config": json.dumps(saved), "version": 1}, old)
    state = runs.load_checkpoint(old)
    evaluated = evaluation.evaluation_config(tiny_cfg(tmp_path), state, old)
    assert evaluated.meta_learning.head == "euclidean"
    model, _, _, _ = trainer.restore_model(old, "cpu", evaluated, state)  # no "another model"
    assert model.head_kind == "euclidean"
    resumed = trainer.resume_config(old, None, {"meta_learning.num_iterations": 3})
    assert resumed.meta_learning.head == "euclidean"
    train(resumed, tmp_path / "run", resume=old)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_iter_3.pt").is_file()


V1_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint_v1.pt"  # see tests/data/README.md


def test_a_checkpoint_of_the_previous_format_version_is_migrated_evaluates_and_resumes(tmp_path):
    """tests/data/checkpoint_v1.pt was written by release 33 (format version 1), not made
    up by this test: load_checkpoint migrates it in memory to CHECKPOINT_VERSION, leaving the
    file as it was, and evaluate and resume use it; what resume writes is the new version."""
    import evaluation
    before = V1_CHECKPOINT.read_bytes()
    assert torch.load(V1_CHECKPOINT, weights_only=True)["version"] == 1
    state = runs.load_checkpoint(V1_CHECKPOINT)
    assert state["version"] == runs.CHECKPOINT_VERSION == 2
    assert json.loads(state["config"])["meta_learning"]["head"] == "cosine"  # recorded, kept
    evaluated = evaluation.evaluation_config(tiny_cfg(tmp_path), state, V1_CHECKPOINT)
    model, _, _, _ = trainer.restore_model(V1_CHECKPOINT, "cpu", evaluated, state)
    assert model.head_kind == "cosine"
    resumed = trainer.resume_config(V1_CHECKPOINT, None, {"meta_learning.num_iterations": 3,
                                                          "training.output_dir": str(tmp_path)})
    train(resumed, tmp_path / "run", resume=V1_CHECKPOINT)
    written = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_iter_3.pt", weights_only=True)
    assert written["version"] == runs.CHECKPOINT_VERSION and written["iteration"] == 3
    assert V1_CHECKPOINT.read_bytes() == before


@pytest.mark.parametrize("version, says", [(3, "newer than this MELoRA reads (2)"),
                                           (0, "format version 0, which no MELoRA wrote"),
                                           ("2", "format version '2', which no MELoRA wrote")])
def test_a_checkpoint_of_an_unknown_format_version_is_refused_naming_it(tmp_path, version, says):
    state = torch.load(V1_CHECKPOINT, weights_only=True)
    torch.save({**state, "version": version}, tmp_path / "odd.pt")
    with pytest.raises(utils.UserError, match=re.escape(says)):
        runs.load_checkpoint(tmp_path / "odd.pt")
