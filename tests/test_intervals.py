"""benchmarks/intervals.py: the paired bootstrap every benchmark uses to tell a method from noise."""

from __future__ import annotations

import random

import pytest

from benchmarks.intervals import (
    bootstrap_mean,
    exact_matches,
    group_mean,
    paired_bootstrap,
    row_scores,
    seed_spread,
)


def _run(correct: dict[tuple[str, str], bool], category: str = "number") -> dict:
    return {"predictions": [
        {"language": language, "sentence_id": sentence, "category": category, "reference": "一",
         "hypothesis": "一" if ok else "二"}
        for (language, sentence), ok in correct.items()
    ]}  # fmt: skip


def test_exact_matches_reads_one_run_by_language_and_category():
    results = _run({("de", "s1"): True, ("de", "s2"): False, ("en", "s1"): True})
    results["predictions"].append({"language": "de", "sentence_id": "s3", "category": "date", "reference": "x",
                                   "hypothesis": "x"})  # fmt: skip
    assert exact_matches(results, ["de"], ["number"]) == {("de", "s1"): 1.0, ("de", "s2"): 0.0}
    assert len(exact_matches(results, ["de", "en"])) == 4


def test_group_mean_weighs_languages_equally():
    scores = {("de", "a"): 1.0, ("de", "b"): 1.0, ("de", "c"): 1.0, ("ko", "a"): 0.0}
    assert group_mean(scores) == 0.5  # not 0.75: ko counts as much as de


def test_identical_rows_differ_by_zero_and_a_shift_is_recovered_exactly():
    rng = random.Random(0)
    base = {(language, f"s{i}"): float(rng.random() < 0.4) for language in ("de", "ko") for i in range(200)}
    same = paired_bootstrap(base, dict(base))
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    # A row that gets 50 more utterances of each language right: the paired difference has no spread from the
    # shared utterances at all, only from which utterances changed.
    better = dict(base)
    for language in ("de", "ko"):
        wrong = [key for key in sorted(better) if key[0] == language and better[key] == 0.0][:50]
        better.update(dict.fromkeys(wrong, 1.0))
    interval = paired_bootstrap(better, base)
    assert interval.estimate == pytest.approx(0.25) and interval.excludes_zero and interval.low > 0.18


def test_noise_is_not_called_a_difference():
    rng = random.Random(1)
    keys = [(language, f"s{i}") for language in ("it", "pt") for i in range(300)]
    row_a = {key: float(rng.random() < 0.5) for key in keys}
    row_b = {key: float(rng.random() < 0.5) for key in keys}  # the same method, drawn again
    interval = paired_bootstrap(row_a, row_b)
    assert interval.low < 0 < interval.high and interval.high - interval.low > 0.05


def test_rows_average_their_runs_and_refuse_different_test_sets():
    runs = [{("de", "s"): 1.0, ("de", "t"): 0.0}, {("de", "s"): 0.0, ("de", "t"): 0.0}]
    assert row_scores(runs) == {("de", "s"): 0.5, ("de", "t"): 0.0}
    assert seed_spread(runs) == pytest.approx(0.3535, abs=1e-4)
    with pytest.raises(ValueError, match="different utterances"):
        row_scores([runs[0], {("de", "s"): 1.0}])
    with pytest.raises(ValueError, match="same utterances"):
        paired_bootstrap({("de", "s"): 1.0}, {("ko", "s"): 1.0})


def test_bootstrap_mean_brackets_the_estimate():
    scores = {("es", f"s{i}"): float(i % 4 == 0) for i in range(400)}
    interval = bootstrap_mean(scores)
    assert interval.low < interval.estimate == 0.25 < interval.high
