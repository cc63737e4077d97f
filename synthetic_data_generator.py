"""Seeded synthetic few-shot text classification tasks with controllable difficulty.

Each task draws N classes; every class owns a small set of keywords, and an example is a
sequence of plain words, each a class keyword with probability `keyword_prob` and
otherwise a background word from a Zipf-distributed vocabulary. Difficulty knobs (all in
the `synthetic` section of config.yml):

- `keyword_prob`: higher = more class signal per example (easier).
- `class_overlap`: share of each class's keywords common to all classes of the task, so
  they carry no signal (harder).
- `noise`: probability that an example is generated from another class than its label
  (label noise, harder).
- `vocab_size`, `keywords_per_class`, `words_per_example`: size of the background and of
  the class signal.

Words are pronounceable syllable strings (`"kabo"`, `"tesuri"`), so any tokenizer reads
them. A task is a pure function of `(seed, index)`:

    gen = SyntheticTaskGenerator(load_config().synthetic, seed=0)
    task = gen.sample_task(n_way=5, k_shot=5, q_query=10, index=3)
    task.support_texts[0]  # "kabo tesuri ..."
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from utils import ConfigError

# Consonant-vowel syllables; words are 2 (then 3, ...) syllables, enumerated in order.
_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class TextTask:
    """One few-shot task as raw text; labels index `classes`.

    Attributes:
        support_texts: N*K support examples.
        support_labels: their labels in [0, N).
        query_texts: N*Q query examples, disjoint from the support set.
        query_labels: their labels in [0, N).
        classes: class names; `classes[label]` names the label.
    """

    support_texts: list[str]
    support_labels: list[int]
    query_texts: list[str]
    query_labels: list[int]
    classes: list[str]


class SyntheticTaskGenerator:
    """Samples seeded N-way K-shot tasks of keyword-bearing word sequences.

    Args:
        cfg: the `synthetic` config section (`vocab_size`, `keywords_per_class`,
            `words_per_example`, `keyword_prob`, `class_overlap`, `noise`).
        seed: base seed; `sample_task(..., index)` depends only on `(seed, index)`.

    Raises:
        ConfigError: a knob out of range.

    Example:
        >>> gen = SyntheticTaskGenerator(load_config().synthetic, seed=0)
        >>> task = gen.sample_task(5, 5, 10, index=0)
        >>> len(task.support_texts), len(task.query_texts)
        (25, 50)
    """

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        self.seed = int(seed)
        _validate(cfg)
        self.vocab = _make_vocab(cfg.vocab_size)
        # Zipf background: word rank r has probability proportional to 1 / r.
        weights = 1.0 / np.arange(1, cfg.vocab_size + 1)
        self._background_p = weights / weights.sum()

    def sample_task(self, n_way: int, k_shot: int, q_query: int, index: int) -> TextTask:
        """The task number `index` of this generator's stream.

        Args:
            n_way: classes in the task.
            k_shot: support examples per class.
            q_query: query examples per class.
            index: task number; the same `(seed, index)` gives the same task.

        Returns:
            The task; support and query examples are shuffled.

        Raises:
            ConfigError: the vocabulary cannot hold `n_way` disjoint keyword sets.
        """
        rng = np.random.default_rng([self.seed, int(index)])
        keywords = self._class_keywords(rng, n_way)
        support = self._examples(rng, keywords, k_shot)
        query = self._examples(rng, keywords, q_query)
        classes = [f"topic_{self.vocab[kw[-1]]}" for kw in keywords]
        return TextTask(support[0], support[1], query[0], query[1], classes)

    def _class_keywords(self, rng: np.random.Generator, n_way: int) -> list[np.ndarray]:
        """Per class, `keywords_per_class` word ids: a shared part then an own part."""
        per_class = self.cfg.keywords_per_class
        n_shared = int(round(self.cfg.class_overlap * per_class))
        n_own = per_class - n_shared
        needed = n_shared + n_way * n_own
        if needed > self.cfg.vocab_size:
            raise ConfigError(
                f"synthetic.vocab_size={self.cfg.vocab_size} cannot hold {n_way} classes of "
                f"{per_class} keywords ({needed} words needed); raise synthetic.vocab_size or "
                "lower synthetic.keywords_per_class")
        words = rng.choice(self.cfg.vocab_size, size=needed, replace=False)
        shared, own = words[:n_shared], words[n_shared:].reshape(n_way, n_own)
        return [np.concatenate([shared, own[c]]) for c in range(n_way)]

    def _examples(self, rng, keywords, per_class: int) -> tuple[list[str], list[int]]:
        """`per_class` examples of each class, shuffled; returns (texts, labels)."""
        n_way = len(keywords)
        labels = np.repeat(np.arange(n_way), per_class)
        # Label noise: the text comes from another class than the label says.
        flip = rng.random(labels.size) < self.cfg.noise
        offset = rng.integers(1, max(n_way, 2), size=labels.size)
        source = np.where(flip, (labels + offset) % n_way, labels)
        texts = [self._text(rng, keywords[c]) for c in source]
        order = rng.permutation(labels.size)
        return [texts[i] for i in order], [int(labels[i]) for i in order]

    def _text(self, rng: np.random.Generator, keywords: np.ndarray) -> str:
        """One example: each word a class keyword w.p. keyword_prob, else background."""
        length = self.cfg.words_per_example
        is_keyword = rng.random(length) < self.cfg.keyword_prob
        background = rng.choice(self.cfg.vocab_size, size=length, p=self._background_p)
        chosen = rng.choice(keywords, size=length)
        ids = np.where(is_keyword, chosen, background)
        return " ".join(self.vocab[i] for i in ids)


def _make_vocab(size: int) -> list[str]:
    """`size` distinct pronounceable words, the same for every seed."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words: list[str] = []
    for n_syllables in itertools.count(2):
        for combo in itertools.product(syllables, repeat=n_syllables):
            words.append("".join(combo))
            if len(words) == size:
                return words
    raise AssertionError("unreachable")


def _validate(cfg) -> None:
    """Range checks that `config.load_config` cannot express."""
    if cfg.keywords_per_class < 1 or cfg.words_per_example < 1 or cfg.vocab_size < 2:
        raise ConfigError(
            "synthetic.vocab_size must be >= 2 and synthetic.keywords_per_class and "
            f"synthetic.words_per_example >= 1; got {cfg.vocab_size}, "
            f"{cfg.keywords_per_class}, {cfg.words_per_example}")
    for key in ("keyword_prob", "class_overlap", "noise"):
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"synthetic.{key} must be in [0, 1], got {value!r}")
