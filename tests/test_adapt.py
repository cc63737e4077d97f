"""Adapt and export modes: the CLI flow, equality with evaluation's adaptation, the saved
adapter reloaded by the plain transformers + peft lines of docs/adapt.md, and every bad input."""

import contextlib
import csv
import io
import json
import random
import re

import numpy as np
import pytest
import torch

import adapt
import config
import evaluation
import main
import model as M
import utils
from conftest import CLINC_DIR, REPO
from dataset_loader import Episode

TINY = ["datasets.synthetic_only=true", "tasks.n_way=3", "tasks.k_shot=2", "tasks.q_query=2",
        "models.max_length=16", "meta_learning.default_meta_batch_size=2",
        "meta_learning.inner.default_num_steps=2", "tracking.mlflow=false",
        "tracking.tensorboard=false"]
# Support set of 4 classes (training n_way is 3), names kept exactly as written.
CLASSES = ["Café ☕", "a,b", "42", "UPPER lower"]
WORDS = {"Café ☕": "coffee espresso latte", "a,b": "train bus ticket",
         "42": "rain snow weather", "UPPER lower": "music song play"}
EXAMPLE_INTENTS = ["tell_joke", "do_you_have_pets", "how_old_are_you", "change_volume", "greeting"]


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def checkpoint(train_tiny):
    """A one-iteration tiny-bert checkpoint (3-way), trained through the CLI. (conftest's, shared)"""
    return train_tiny(TINY)


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def task(classes=CLASSES, shots=2, queries=3, seed=0):
    """(support rows, predict rows) of texts made of each class's words."""
    rng = random.Random(seed)

    def text(c):
        return " ".join(rng.choice(WORDS[c].split()) for _ in range(4))
    support = [(text(c), c) for c in classes for _ in range(shots)]
    predict = [(text(c), c) for _ in range(queries) for c in classes]
    return support, predict


def files(tmp_path, support, predict, predict_header=("id", "text", "label")):
    s = write_csv(tmp_path / "support.csv", ["text", "label"], support)
    rows = [(i, *row) for i, row in enumerate(predict)] if predict_header[0] == "id" else predict
    p = write_csv(tmp_path / "predict.csv", list(predict_header), rows)
    return s, p


def adapt_cli(checkpoint, support, predict, out, *extra):
    return main.main(["--mode", "adapt", "--checkpoint", str(checkpoint), "--support", str(support),
                      "--predict", str(predict), "--output_dir", str(out),
                      "--experiment_name", "adapt", *extra])


def readme_lines(path, texts):
    """Run the loading lines of docs/adapt.md (linked from the README) on `path` and `texts`;
    (printed labels, logits)."""
    readme = (REPO / "docs" / "adapt.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
              if "PeftModel.from_pretrained(base, path)" in b]
    assert len(blocks) == 1, "docs/adapt.md's loading lines"
    code = blocks[0]
    assert code.count('path = "results/adapt/adapted"') == 1
    assert len(re.findall(r"^texts = \[.*\]$", code, re.M)) == 1
    code = code.replace('path = "results/adapt/adapted"', f"path = {str(path)!r}")
    code = re.sub(r"^texts = \[.*\]$", f"texts = {list(texts)!r}", code, flags=re.M)
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/adapt.md", "exec"), namespace)
    return eval(printed.getvalue()), namespace["logits"]


def assert_one_paragraph_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------------------------
# The flow
# ------------------------------------------------------------------------------------

def test_adapt_cli_writes_predictions_metrics_and_a_loadable_adapter(checkpoint, tmp_path, capsys):
    support, predict = task()
    s, p = files(tmp_path, support, predict)
    out = tmp_path / "out"
    assert adapt_cli(checkpoint, s, p, out, "--set", "adapt.probabilities=true",
                     "--set", "adapt.batch_size=5") == 0
    assert "accuracy" in capsys.readouterr().out
    run = out / "adapt"
    rows = read_csv(run / "predictions.csv")
    # Every input row, in order, its columns first, then ours.
    assert [(int(r["id"]), r["text"], r["label"]) for r in rows] == [(i, *row) for i, row in enumerate(predict)]
    assert list(rows[0]) == ["id", "text", "label", "prediction", "confidence",
                             *[f"probability_{c}" for c in CLASSES]]
    proba = np.array([[float(r[f"probability_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert [r["prediction"] for r in rows] == [CLASSES[i] for i in proba.argmax(1)]
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], proba.max(1), rtol=1e-12)
    # Metrics agree with the predictions.
    metrics = json.loads((run / "metrics.json").read_text())
    correct = [r["prediction"] == r["label"] for r in rows]
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(rows))
    assert metrics["classes"] == CLASSES and metrics["labelled_rows"] == len(rows)
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == len(rows) and np.trace(matrix) == sum(correct)
    assert list(matrix.sum(1)) == [3, 3, 3, 3]  # rows are the true classes
    assert (run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The adapted model: a PEFT directory + head that docs/adapt.md's lines load without MELoRA.
    adapted = run / "adapted"
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors",
                 "labels.json", "tokenizer.json", "base_model/config.json"):
        assert (adapted / name).is_file(), name
    assert json.loads((adapted / "labels.json").read_text())["labels"] == CLASSES
    texts = [r["text"] for r in rows]
    printed, logits = readme_lines(adapted, texts)
    assert printed == [r["prediction"] for r in rows]
    np.testing.assert_allclose(torch.softmax(logits.double(), -1).numpy(), proba, atol=1e-5)
    # A second run into the same folder is refused; --overwrite replaces the outputs.
    capsys.readouterr()
    assert adapt_cli(checkpoint, s, p, out) == 2
    assert_one_paragraph_error(capsys, "already holds predictions.csv, adapted", "--overwrite")
    assert adapt_cli(checkpoint, s, p, out, "--overwrite") == 0
    assert "probability_42" not in read_csv(run / "predictions.csv")[0]


def test_adaptation_is_evaluations(checkpoint):
    """N = n_way: the same phi_K (bit for bit) and query accuracy as evaluation's MELoRA."""
    support, predict = task(CLASSES[:3], shots=2, queries=2)
    texts, labels = [t for t, _ in support], [y for _, y in support]
    clf = adapt.adapt(checkpoint, texts, labels)
    cfg, _ = evaluation.evaluation_checkpoint(checkpoint, config.load_config())
    method, _ = evaluation.build_method("melora", cfg, str(checkpoint), torch.device("cpu"))
    _, tokenizer = M.load_model(cfg.models.selected_model, cfg.tasks.n_way)

    def batch(rows):
        b = dict(tokenizer([t for t, _ in rows], padding=True, truncation=True,
                           max_length=cfg.models.max_length, return_tensors="pt"))
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                "labels": torch.tensor([CLASSES.index(y) for _, y in rows])}
    utils.set_seed(cfg.training.seed)
    phis = list(method.fast_weights(batch(support), 2))
    assert set(clf.phi) == set(phis[-1])
    for name, tensor in phis[-1].items():
        assert torch.equal(clf.phi[name], tensor), name
    assert not torch.equal(phis[0]["head.weight"], phis[-1]["head.weight"])  # the steps moved phi
    episode = Episode(batch(support), batch(predict), 3, CLASSES[:3], "test")
    utils.set_seed(cfg.training.seed)
    accuracy = method.adapt(episode, 2)[-1]
    predicted = clf.predict([t for t, _ in predict])
    assert accuracy == pytest.approx(np.mean([p == y for p, (_, y) in zip(predicted, predict)]))
    # --set changes the inner steps, and says so.
    with pytest.warns(UserWarning, match="4 inner steps"):
        more = adapt.adapt(checkpoint, texts, labels,
                           overrides={"meta_learning.inner.default_num_steps": 4})
    assert more.info["inner_steps"] == 4
    assert not torch.equal(more.phi["head.weight"], clf.phi["head.weight"])


def test_api_any_number_of_classes_names_kept(checkpoint, tmp_path):
    support, predict = task(CLASSES[:2], shots=3)
    ids = {CLASSES[0]: 7, CLASSES[1]: 0}  # int labels stay ints
    clf = adapt.adapt(checkpoint, [t for t, _ in support], [ids[y] for _, y in support],
                      classes=[0, 7])
    assert clf.classes == [0, 7] and clf.phi["head.weight"].shape[0] == 2
    predicted = clf.predict([t for t, _ in predict])
    assert len(predicted) == len(predict) and set(predicted) <= {0, 7}
    assert clf.predict_proba(["coffee"]).shape == (1, 2)
    with pytest.raises(utils.UserError, match="wrap it"):
        clf.predict("coffee")
    saved = clf.save(tmp_path / "clf")
    assert json.loads((saved / "labels.json").read_text())["labels"] == [0, 7]
    clf.save(tmp_path / "clf")  # an earlier save is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(utils.UserError, match="holds other files"):
        clf.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # Four classes (more than the training n_way of 3), one shot each.
    four_support, _ = task(CLASSES, shots=1)
    four = adapt.adapt(checkpoint, [t for t, _ in four_support], [y for _, y in four_support])
    assert four.classes == CLASSES and four.phi["head.bias"].shape == (4,)


def test_other_formats_column_flags_and_unlabelled_texts(checkpoint, tmp_path, capsys):
    """jsonl support with its own column names, parquet texts without labels: no metrics."""
    import pandas as pd
    support, predict = task(CLASSES[:3])
    pd.DataFrame({"sentence": [t for t, _ in support], "intent": [y for _, y in support]}).to_json(
        tmp_path / "support.jsonl", orient="records", lines=True, force_ascii=False)
    pd.DataFrame({"sentence": [t for t, _ in predict]}).to_parquet(tmp_path / "texts.parquet")
    frame, texts, labels = adapt.read_table(tmp_path / "support.jsonl", "sentence", "intent",
                                            "--support", need_labels=True)
    assert texts == [t for t, _ in support] and labels == [y for _, y in support]
    out = tmp_path / "out"
    assert adapt_cli(checkpoint, tmp_path / "support.jsonl", tmp_path / "texts.parquet", out,
                     "--text_column", "sentence", "--label_column", "intent") == 0
    rows = read_csv(out / "adapt" / "predictions.csv")
    assert list(rows[0]) == ["sentence", "prediction", "confidence"]
    assert [r["sentence"] for r in rows] == [t for t, _ in predict]
    assert not (out / "adapt" / "metrics.json").exists()
    assert "accuracy" not in capsys.readouterr().out


def test_zero_head_starts_from_the_mean_meta_learned_row():
    theta = {"head.weight": torch.arange(6.0).reshape(3, 2), "head.bias": torch.tensor([1.0, 2.0, 6.0]),
             "x.lora_A": torch.ones(1)}
    same = adapt._theta_for(theta, 3)
    assert all(same[k] is theta[k] for k in theta)
    five = adapt._theta_for(theta, 5)
    assert torch.equal(five["head.weight"], torch.tensor([[2.0, 3.0]] * 5))
    assert torch.equal(five["head.bias"], torch.full((5,), 3.0))


# ------------------------------------------------------------------------------------
# Bad input: one error each, before any work, nothing written
# ------------------------------------------------------------------------------------

def _edited_checkpoint(checkpoint, path):
    state = torch.load(checkpoint, weights_only=True)
    config = json.loads(state["config"])
    config["models"]["selected_model"] = "tiny-gpt2"
    state["config"] = json.dumps(config)
    torch.save(state, path)
    return path


BAD = {
    "one class": (lambda s, p: ([(t, "only") for t, _ in s], p), [], ["1 class", "at least 2 classes"]),
    "support row without label": (lambda s, p: (s[:-1] + [(s[-1][0], "")], p), [], ["no label", "row 7"]),
    "predict class without example": (lambda s, p: (s, p + [("hello", "unseen")]), [],
                                      ["['unseen']", "no example in --support"]),
    "support missing label column": ("support_columns", [], ["no column 'label'", "text, intent",
                                                             "--label_column"]),
    "predict missing text column": ("predict_columns", [], ["no column 'text'", "--text_column"]),
    "empty predict (header only)": ("header_only", [], ["has no rows"]),
    "empty predict (0 bytes)": ("zero_bytes", [], ["has no rows"]),
    "another model": (None, ["--model", "tiny-gpt2"], ["belongs to model 'tiny-bert'", "drop --model"]),
    "checkpoint of another model": ("edited", [], ["do not fit this model", "another model"]),
    "no support flag": ("no_support", [], ["needs --support"]),
    "not a checkpoint": ("not_checkpoint", [], ["not a torch checkpoint"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_before_any_work(case, checkpoint, tmp_path, capsys):
    change, extra, fragments = BAD[case]
    support, predict = task(shots=2)
    if callable(change):
        support, predict = change(support, predict)
    s, p = files(tmp_path, support, predict)
    ckpt = checkpoint
    if change == "support_columns":
        write_csv(s, ["text", "intent"], support)
    elif change == "predict_columns":
        write_csv(p, ["sentence", "label"], predict)
    elif change == "header_only":
        write_csv(p, ["text", "label"], [])
    elif change == "zero_bytes":
        p.write_bytes(b"")
    elif change == "edited":
        ckpt = _edited_checkpoint(checkpoint, tmp_path / "edited.pt")
    elif change == "not_checkpoint":
        ckpt = write_csv(tmp_path / "x.pt", ["a"], [])
    out = tmp_path / "out"
    argv = ["--mode", "adapt", "--checkpoint", str(ckpt), "--predict", str(p),
            "--output_dir", str(out), *extra]
    if change != "no_support":
        argv += ["--support", str(s)]
    assert main.main(argv) == 2
    assert_one_paragraph_error(capsys, *fragments)
    assert not out.exists()  # nothing written


def test_api_class_without_example_and_unpaired_input(checkpoint):
    with pytest.raises(utils.UserError, match=r"\['c'\] have no example"):
        adapt.adapt(checkpoint, ["x", "y"], ["a", "b"], classes=["a", "b", "c"])
    with pytest.raises(utils.UserError, match="2 texts but 3 labels"):
        adapt.adapt(checkpoint, ["x", "y"], ["a", "b", "a"])
    with pytest.raises(utils.UserError, match="no text"):
        adapt.adapt(checkpoint, ["x", None], ["a", "b"])


# ------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------

def test_export_writes_the_meta_learned_initialisation(checkpoint, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel
    import trainer
    out = tmp_path / "exported"
    assert main.main(["--mode", "export", "--checkpoint", str(checkpoint), "--output_dir", str(out)]) == 0
    info = json.loads((out / "labels.json").read_text())
    assert info["labels"] is None and info["head_init"] == "proto" and info["inner_steps"] == 2
    # The adapter + head reproduce the checkpoint's model (theta, before adaptation).
    model, tokenizer, cfg, _ = trainer.restore_model(checkpoint)
    model.eval()
    batch = dict(tokenizer(["coffee please", "play a song now"], padding=True, return_tensors="pt"))
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**batch)
        peft = PeftModel.from_pretrained(AutoModel.from_pretrained(str(out / info["base_model"])), str(out)).eval()
        hidden = peft(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        head = load_file(str(out / "head.safetensors"))
        logits = ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    adapter = load_file(str(out / "adapter_model.safetensors"))  # meta-trained: B moved from 0
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    # A non-empty directory is refused, then replaced with --overwrite.
    capsys.readouterr()
    assert main.main(["--mode", "export", "--checkpoint", str(checkpoint), "--output_dir", str(out)]) == 2
    assert_one_paragraph_error(capsys, "not empty", "--overwrite")
    assert main.main(["--mode", "export", "--checkpoint", str(checkpoint), "--output_dir", str(out),
                      "--overwrite"]) == 0


# ------------------------------------------------------------------------------------
# The real MiniLM on a real CLINC150 task
# ------------------------------------------------------------------------------------

def test_example_files_are_a_clinc150_test_task():
    """data/clinc150/adapt_*.csv: 5 intents x 5 shots, and their other 25 test texts each."""
    data = json.loads((CLINC_DIR / "data_full.json").read_text())
    rows = {i: [t for t, y in data["test"] if y == i] for i in EXAMPLE_INTENTS}
    predict = [(t, i) for i in EXAMPLE_INTENTS for t in rows[i][5:]]
    random.Random(0).shuffle(predict)
    support = [(r["text"], r["label"]) for r in read_csv(CLINC_DIR / "adapt_support.csv")]
    assert support == [(t, i) for i in EXAMPLE_INTENTS for t in rows[i][:5]]
    assert [(r["text"], r["label"]) for r in read_csv(CLINC_DIR / "adapt_predict.csv")] == predict


def test_minilm_adapts_to_a_clinc150_task_and_reloads_in_plain_peft(tmp_path, capsys):
    """A short synthetic MiniLM training, then docs/adapt.md's adapt command on the example task."""
    train = ["--mode", "train", "--model", "minilm-l6", "--synthetic_only", "--num_iterations", "2",
             "--meta_batch_size", "1", "--inner_steps", "1", "--output_dir", str(tmp_path),
             "--experiment_name", "run", *sets(["tasks.n_way=2", "tasks.k_shot=1", "tasks.q_query=1",
                                                "models.max_length=16", "tracking.mlflow=false",
                                                "tracking.tensorboard=false",
                                                "memory_optimization.hessian_approximation.method=none"])]
    assert main.main(train) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint_iter_2.pt"
    assert main.main(["--mode", "adapt", "--checkpoint", str(checkpoint),
                      "--support", str(CLINC_DIR / "adapt_support.csv"),
                      "--predict", str(CLINC_DIR / "adapt_predict.csv"),
                      "--output_dir", str(tmp_path), "--experiment_name", "adapt",
                      "--set", "models.max_length=32"]) == 0
    run = tmp_path / "adapt"
    rows = read_csv(run / "predictions.csv")
    assert len(rows) == 125 and all(r["prediction"] in EXAMPLE_INTENTS for r in rows)
    accuracy = json.loads((run / "metrics.json").read_text())["accuracy"]
    print(f"MiniLM 5-way 5-shot CLINC150 accuracy: {accuracy:.4f}")
    assert accuracy > 0.8  # chance: 0.2; measured 0.944
    printed, _ = readme_lines(run / "adapted", [r["text"] for r in rows])
    assert printed == [r["prediction"] for r in rows]
