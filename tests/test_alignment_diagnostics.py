"""Alignment diagnostics: the statistics on constructed states, their cost on an eval set, and their training logs."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

import potsa_training.alignment_diagnostics as diagnostics
from potsa_training.alignment_diagnostics import (
    arm_ratio,
    batch_statistics,
    layer_alignment_metrics,
    statistics_logs,
)
from potsa_training.objectives import slot_variance

from .tiny_runs import train


def _eval_set(num_sentences: int, languages: list[str], queries: int = 4, hidden: int = 8, seed: int = 0):
    """Utterances of ``num_sentences`` sentences in every language, sentence-major; per layer: (1) parallel
    utterances identical and sentences distinct, (2) one constant state, (3) independent random states."""
    generator = torch.Generator().manual_seed(seed)
    sentence_ids = [f"s{s}" for s in range(num_sentences) for _ in languages]
    spoken = list(languages) * num_sentences
    aligned = torch.randn(num_sentences, queries, hidden, generator=generator).repeat_interleave(len(languages), 0)
    constant = torch.randn(1, queries, hidden, generator=generator).expand(len(spoken), -1, -1)
    unrelated = torch.randn(len(spoken), queries, hidden, generator=generator)
    return [constant, aligned, constant, unrelated], sentence_ids, spoken  # index 0: the query embeddings


def test_state_variance_is_zero_for_a_constant_output_and_one_when_directions_cancel():
    assert slot_variance(torch.ones(5, 3, 4)).abs().max() < 1e-6
    opposite = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])  # one slot, two utterances pointing apart
    assert slot_variance(3.0 * opposite).item() == pytest.approx(1.0)
    quarter = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # mean (0.5, 0.5): 1 - 0.5 = 0.5
    assert slot_variance(quarter).item() == pytest.approx(0.5)


def test_batch_statistics_of_identical_parallel_states_give_ratio_zero():
    states, _, _ = _eval_set(3, ["en", "es"])
    pairs = [(0, 1), (2, 3), (4, 5)]  # utterance 2 s + k: sentence s in language k
    controls = [(0, 3), (2, 5), (4, 1)]
    totals = batch_statistics(states, [1, 2, 3], pairs, controls)
    assert totals.shape == (3, 3, 2) and totals[:, 1:, 1].tolist() == [[3, 3]] * 3
    logs = statistics_logs(totals, [1, 2, 3])
    assert logs["ot_par_layer_1"] < 1e-6 < logs["ot_nonpar_layer_1"]
    assert logs["ot_ratio_layer_1"] < 1e-4
    assert logs["state_var_layer_2"] < 1e-6 and "ot_ratio_layer_2" not in logs  # constant: 0 / 0 is left out
    assert logs["state_var_layer_3"] > 0.5 and logs["ot_ratio_layer_3"] > 0.5
    halves = arm_ratio(totals[[0, 2]], [0.5, 0.5])
    assert halves == pytest.approx(0.5 * logs["ot_ratio_layer_1"] + 0.5 * logs["ot_ratio_layer_3"])
    assert arm_ratio(totals[[1]], [1.0]) is None
    assert arm_ratio(batch_statistics(states, [1], pairs, []), [1.0]) is None
    assert statistics_logs(batch_statistics(states, [1], [], []), [1]) == {"state_var_layer_1": pytest.approx(
        slot_variance(states[1]).mean().item())}  # fmt: skip


def test_eval_metrics_recall_parallel_utterances_of_an_aligned_layer():
    states, sentence_ids, languages = _eval_set(6, ["en", "es", "ja"])
    metrics = layer_alignment_metrics(states, sentence_ids, languages, layers=[1, 3])
    assert metrics["ot_recall_at_1_layer_1"] == 1.0
    assert metrics["ot_par_layer_1"] < 1e-6 and metrics["ot_ratio_layer_1"] < 1e-4
    assert metrics["ot_recall_at_1_layer_3"] < 0.6  # chance is 1/6
    assert metrics["state_var_layer_1"] == pytest.approx(slot_variance(states[1]).mean().item())
    assert set(layer_alignment_metrics(states, sentence_ids, languages)) >= {"state_var_layer_2", "ot_par_layer_3"}
    some = layer_alignment_metrics({1: states[1], 3: states[3]}, sentence_ids, languages)  # fewer layers in memory
    assert some == metrics


def test_eval_metrics_compare_a_capped_set_of_sentences_in_batched_calls(monkeypatch):
    calls = []

    def counting(x, y, **kwargs):
        calls.append(len(x))
        return torch.zeros(len(x))

    monkeypatch.setattr(diagnostics, "sinkhorn_divergence", counting)
    languages = ["en", "es", "ja", "de", "fr", "ru", "ko", "zh"]
    states, sentence_ids, spoken = _eval_set(40, languages)
    layer_alignment_metrics(states, sentence_ids, spoken, layers=[1, 3], max_sentences=5, chunk_size=128)
    assert sum(calls) == 2 * len(list(itertools.combinations(languages, 2))) * 5**2  # 2 layers x 28 x 25
    assert max(calls) == 128


def test_eval_metrics_on_3000_utterances_of_8_languages_take_seconds():
    """The tiny recipe's shape (24 queries, d 128); the default cap; one layer."""
    states, sentence_ids, languages = _eval_set(375, ["en", "es", "ja", "de", "fr", "ru", "ko", "zh"], 24, 128)
    start = time.perf_counter()
    metrics = layer_alignment_metrics(states, sentence_ids, languages, layers=[1])
    assert time.perf_counter() - start < 60
    assert metrics["ot_recall_at_1_layer_1"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"languages": ["en"]}, "one of each per utterance"),
        ({"layers": [4]}, r"among the Q-Former layers given, \[1, 2, 3\]"),
        ({"max_sentences": 1}, "max_sentences"),
    ],
)
def test_eval_metrics_reject_bad_input(kwargs, message):
    states, sentence_ids, languages = _eval_set(3, ["en", "es"])
    with pytest.raises(ValueError, match=message):
        layer_alignment_metrics(states, **{"sentence_ids": sentence_ids, "languages": languages, **kwargs})


def test_a_tiny_stage_3_run_with_infonce_logs_the_diagnostics_and_feeds_ratios_to_the_scheduler(
    corpus, model_yaml, tmp_path
):
    trainer = train(corpus, model_yaml, tmp_path / "infonce", alignment_loss="infonce_sinkhorn", max_steps=4,
                    save_steps=100, eval_split=None, ucb_reward="ratio_drop", ucb_normalize_reward=True)  # fmt: skip
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4
    for entry in logged:
        for name in ("state_var", "ot_par", "ot_nonpar", "ot_ratio"):
            assert all(f"{name}_layer_{layer}" in entry for layer in (1, 2, 3)), (name, entry)
        assert entry["ot_ratio_layer_1"] == pytest.approx(entry["ot_par_layer_1"] / entry["ot_nonpar_layer_1"])
        assert entry["ot_layer"] in (1, 2, 3) and entry["ot"] > 0
    assert sum(logged[-1][f"ot_picks_layer_{layer}"] for layer in (1, 2, 3)) == 4
    state = trainer.layer_callback.scheduler.state_dict()
    assert sum(state["visits"]) == 4 and state["rewards_seen"] > 0  # a ratio every step, and some were rewards
    assert trainer.alignment_args.to_dict()["alignment_loss"] == "infonce_sinkhorn"
