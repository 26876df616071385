"""Is row A better than row B, or is it noise? Paired bootstrap intervals over utterances, from many seeds.

Every benchmark that compares two settings (the demo's baseline vs POTSA, each ablation row vs the baseline) reads
the same thing from each run's results.json: for every test utterance, whether its translation is exact. A row is
run with several seeds (stage-2 seeds x stage-3 seeds); an utterance's score in a row is its exact-match rate over
the row's runs, and a group's exact match is the mean over its languages of their mean utterance scores (the way
`training/evaluation.py` averages a group).

The difference between two rows is resampled *paired*: the same utterances, drawn with replacement within each
language (stratified, so every language keeps its weight), enter both rows, which cancels the shared difficulty of
an utterance and leaves the methods' difference. Seeds are averaged inside each utterance's score rather than
resampled, so the interval says how sure we are about *these runs'* difference over the population of utterances;
the spread between seeds is reported beside it (`seed_spread`). A claim that A beats B needs the interval to
exclude zero with at least 3 stage-2 x 2 stage-3 seeds per row (`MIN_RUNS`).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_RUNS = 6  # 3 stage-2 seeds x 2 stage-3 seeds
Utterance = tuple[str, str]  # (language, sentence_id)


@dataclass(frozen=True)
class Interval:
    """A difference (or a value) and its bootstrap interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    utterances: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def exact_matches(
    results: Mapping[str, Any], languages: Iterable[str], categories: Iterable[str] | None = None
) -> dict[Utterance, float]:
    """One run's utterances of `languages` (and `categories`; None: all) -> 1.0 if the translation is exact, else 0.0,
    from the "predictions" of a results.json (`training/evaluation.py` `write_results`)."""
    languages, wanted = set(languages), None if categories is None else set(categories)
    scores = {}
    for prediction in results["predictions"]:
        if prediction["reference"] is None or prediction["language"] not in languages:
            continue
        if wanted is not None and prediction.get("category") not in wanted:
            continue
        key = (prediction["language"], prediction["sentence_id"])
        if key in scores:
            raise ValueError(f"Utterance {key} occurs twice in one run's predictions; keys must be unique.")
        scores[key] = float(prediction["hypothesis"].strip() == prediction["reference"].strip())
    return scores


def row_scores(runs: Sequence[Mapping[Utterance, float]]) -> dict[Utterance, float]:
    """A row's score per utterance: the mean over its runs. Every run must hold the same utterances (the same test
    set), or the rows' difference would mix methods with test sets."""
    if not runs:
        raise ValueError("A row needs at least one run.")
    keys = set(runs[0])
    for run in runs[1:]:
        if set(run) != keys:
            raise ValueError(f"Runs of a row hold different utterances ({len(keys)} vs {len(run)}); use one test set.")
    return {key: statistics.fmean(run[key] for run in runs) for key in sorted(keys)}


def group_mean(scores: Mapping[Utterance, float]) -> float:
    """Mean over languages of the mean utterance score (the group exact match of `training/evaluation.py`)."""
    by_language = _by_language(scores)
    return statistics.fmean(statistics.fmean(values) for values in by_language.values())


def _by_language(scores: Mapping[Utterance, float]) -> dict[str, list[float]]:
    by_language: dict[str, list[float]] = defaultdict(list)
    for (language, _), value in sorted(scores.items()):
        by_language[language].append(value)
    if not by_language:
        raise ValueError("No utterances to score.")
    return by_language


def _stratified_bootstrap(by_language: Mapping[str, Sequence[float]], resamples: int, seed: int) -> np.ndarray:
    """`resamples` draws of the group mean, each language's values resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for values in by_language.values():
        array = np.asarray(values, dtype=np.float64)
        draws = rng.integers(0, len(array), size=(resamples, len(array)))  # (resamples, n_language)
        means += array[draws].mean(axis=1)
    return means / len(by_language)


def _interval(estimate: float, draws: np.ndarray, confidence: float, utterances: int) -> Interval:
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), confidence, utterances)


def paired_bootstrap(
    row: Mapping[Utterance, float],
    baseline: Mapping[Utterance, float],
    resamples: int = 4000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The difference of group means `row - baseline` and its paired, language-stratified bootstrap interval.

    Both rows must score the same utterances (from `row_scores`)."""
    if set(row) != set(baseline):
        raise ValueError(f"Paired rows must score the same utterances ({len(row)} vs {len(baseline)}).")
    differences = {key: row[key] - baseline[key] for key in row}
    draws = _stratified_bootstrap(_by_language(differences), resamples, seed)
    return _interval(group_mean(differences), draws, confidence, len(differences))


def bootstrap_mean(
    scores: Mapping[Utterance, float], resamples: int = 4000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """A row's group mean and its language-stratified bootstrap interval over utterances."""
    draws = _stratified_bootstrap(_by_language(scores), resamples, seed)
    return _interval(group_mean(scores), draws, confidence, len(scores))


def seed_spread(runs: Sequence[Mapping[Utterance, float]]) -> float:
    """Standard deviation over runs of the run's group mean (0 for one run): how much a seed moves the figure."""
    means = [group_mean(run) for run in runs]
    return statistics.stdev(means) if len(means) > 1 else 0.0


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(path).read_text()) for path in paths]


__all__ = [
    "MIN_RUNS",
    "Interval",
    "bootstrap_mean",
    "exact_matches",
    "group_mean",
    "load_results",
    "paired_bootstrap",
    "row_scores",
    "seed_spread",
]
