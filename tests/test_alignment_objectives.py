"""The alignment objectives: what a collapsed (constant) Q-Former output earns under each, finite gradients, the
anchor strategies, reductions, and the contrastive objective's negatives."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modeling_potsa.optimal_transport import sinkhorn_divergence
from potsa_training.alignment import (
    alignment_loss,
    contrast_rows,
    draw_negatives,
    find_parallel_pairs,
    nonparallel_pairs,
)
from potsa_training.arguments import AlignmentArguments, load_settings, parse_settings
from potsa_training.objectives import ALIGNMENT_LOSSES, slot_variance, standardise_states

from .tiny_runs import REPO, train

# Four sentences, each in en, es and ja: utterance 3 * s + k is sentence s in language k.
LANGUAGES = ["en", "es", "ja"] * 4
SENTENCES = [f"s{index // 3}" for index in range(12)]
QUERIES, HIDDEN = 6, 16


def _pairs(strategy: str = "random_pairwise") -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(0)
    return find_parallel_pairs(SENTENCES, LANGUAGES, strategy, generator=generator, partners_per_utterance=2)


def _kwargs(objective: str, strategy: str = "random_pairwise", **extra) -> dict:
    """alignment_loss's keyword arguments, with every negative available for the contrastive objective."""
    pairs = _pairs(strategy)
    generator = torch.Generator().manual_seed(0)
    negatives = draw_negatives(SENTENCES, LANGUAGES, contrast_rows(pairs, strategy), 8, generator)
    return {"pairs": pairs, "strategy": strategy, "objective": objective, "negatives": negatives,
            "languages": LANGUAGES, **extra}  # fmt: skip


def _aligned(noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Distinct states per sentence (float64), the same for its three languages up to ``noise``."""
    generator = torch.Generator().manual_seed(seed)
    sentences = torch.randn(4, QUERIES, HIDDEN, generator=generator, dtype=torch.float64)
    states = sentences.repeat_interleave(3, dim=0)  # (12, Q, d)
    return states + noise * torch.randn(states.shape, generator=generator, dtype=torch.float64)


def _collapsed(spread: float, seed: int = 1) -> torch.Tensor:
    """One state for every utterance plus independent (unaligned) deviations of size ``spread``."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(1, QUERIES, HIDDEN, generator=generator, dtype=torch.float64).expand(12, -1, -1)
    return common + spread * torch.randn(12, QUERIES, HIDDEN, generator=generator, dtype=torch.float64)


def _loss(states: torch.Tensor, objective: str, **extra) -> float:
    return alignment_loss(states, **_kwargs(objective, **extra)).item()


def test_the_papers_objective_is_minimised_by_a_constant_output():
    """The defect the other objectives fix: a constant output scores the global minimum, 0."""
    assert _loss(_collapsed(0.0), "sinkhorn") == pytest.approx(0.0, abs=1e-9)
    assert _loss(_collapsed(1e-3), "sinkhorn") < 1e-5 < _loss(_aligned(noise=0.3), "sinkhorn")


def test_infonce_charges_a_constant_output_log_one_plus_k():
    constant = _loss(_collapsed(0.0), "infonce_sinkhorn")
    assert constant == pytest.approx(math.log(1 + 3))  # each row: 3 other sentences in the positive's language
    assert _loss(_aligned(noise=0.05), "infonce_sinkhorn") < 0.01 * constant
    assert _loss(_collapsed(1e-3), "infonce_sinkhorn") > 0.9 * constant  # a collapse keeps paying


def test_centred_objective_gives_a_collapse_nothing():
    """Shrinking unaligned states towards a constant leaves the loss where it was; aligned states score lower."""
    small, smaller = _loss(_collapsed(1e-2), "centred_sinkhorn"), _loss(_collapsed(1e-3), "centred_sinkhorn")
    assert smaller == pytest.approx(small, rel=2e-2)
    assert _loss(_aligned(noise=0.05), "centred_sinkhorn") < 0.1 * smaller
    standardised = standardise_states(_collapsed(1e-4), torch.arange(12))
    assert standardised.square().sum(dim=-1).mean().item() == pytest.approx(1.0)  # unit mean-square norm


@pytest.mark.parametrize("objective", ALIGNMENT_LOSSES)
def test_the_variance_hinge_makes_an_exactly_constant_output_cost_under_every_objective(objective):
    hinge = {"variance_weight": 1.0, "variance_target_std": 0.5}
    constant, aligned = _loss(_collapsed(0.0), objective, **hinge), _loss(_aligned(noise=0.05), objective, **hinge)
    assert constant > aligned + 0.4  # the constant pays the hinge's 0.5 - 0.01; spread-out states pay nothing
    assert slot_variance(_aligned()).min() > 0.5**2


@pytest.mark.parametrize("objective", ALIGNMENT_LOSSES)
@pytest.mark.parametrize(
    "states", [_aligned(noise=0.3), _collapsed(0.0), _collapsed(1e-5)], ids=["spread", "constant", "collapsed"]
)
def test_gradients_are_finite(objective, states):
    states = states.float().requires_grad_()
    alignment_loss(states, **_kwargs(objective, variance_weight=1.0)).backward()
    assert torch.isfinite(states.grad).all()


@pytest.mark.parametrize("objective", ALIGNMENT_LOSSES)
@pytest.mark.parametrize("strategy", ["random_pairwise", "english_anchor", "english_anchor_frozen"])
def test_anchor_strategies_are_respected_by_every_objective(objective, strategy):
    """Frozen English anchors get no gradient (not through negatives, batch statistics or the hinge); otherwise
    every utterance that takes part does."""
    states = _aligned(noise=0.3).float().requires_grad_()
    alignment_loss(states, **_kwargs(objective, strategy, variance_weight=1.0)).backward()
    moved = states.grad.flatten(1).norm(dim=1) > 0
    english = torch.tensor([language == "en" for language in LANGUAGES])
    assert moved[~english].all()
    if strategy == "english_anchor_frozen":
        assert not moved[english].any()
    else:
        assert moved[english].all()


def test_infonce_is_cross_entropy_over_negative_divergences():
    states = _aligned(noise=0.5).float()
    pairs, negatives = [(1, 0)], [(3, 6)]  # es -> en of s0, against the English recordings of s1 and s2
    loss = alignment_loss(states, pairs, "english_anchor", objective="infonce_sinkhorn", negatives=negatives,
                          temperature=0.1)  # fmt: skip
    divergences = sinkhorn_divergence(states[[1, 1, 1]], states[[0, 3, 6]])
    expected = torch.nn.functional.cross_entropy(-divergences[None] / 0.1, torch.tensor([0]))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("objective", ALIGNMENT_LOSSES)
def test_reductions_sum_or_halve_the_per_pair_terms(objective):
    states = _aligned(noise=0.3)
    mean = _loss(states, objective)
    terms = len(_pairs()) * (2 if objective == "infonce_sinkhorn" else 1)  # contrast rows go both ways
    assert _loss(states, objective, reduction="sum") == pytest.approx(terms * mean)
    assert _loss(states, objective, reduction="half_sum") == pytest.approx(0.5 * terms * mean)


def test_negatives_are_other_sentences_in_the_positives_language():
    pairs = _pairs()
    rows = contrast_rows(pairs, "random_pairwise")
    assert len(rows) == 2 * len(pairs) and set(rows) == {(j, i) for i, j in rows}
    negatives = draw_negatives(SENTENCES, LANGUAGES, rows, 2, torch.Generator().manual_seed(0))
    for (query, positive), drawn in zip(rows, negatives):
        assert len(drawn) == 2 and len(set(drawn)) == 2
        assert all(LANGUAGES[k] == LANGUAGES[positive] != LANGUAGES[query] for k in drawn)
        assert all(SENTENCES[k] != SENTENCES[positive] for k in drawn)
    assert contrast_rows(_pairs("english_anchor"), "english_anchor") == _pairs("english_anchor")
    controls = nonparallel_pairs(SENTENCES, LANGUAGES, pairs, torch.Generator().manual_seed(0))
    assert [i for i, _ in controls] == [i for i, _ in pairs]
    assert all(SENTENCES[i] != SENTENCES[k] and LANGUAGES[k] == LANGUAGES[j]
               for (i, k), (_, j) in zip(controls, pairs))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "infonce_sinkhorn", "negatives": None}, "needs `negatives`"),
        ({"objective": "infonce_sinkhorn", "negatives": [()]}, "contrast rows"),
        ({"objective": "sinkhorn_squared"}, "Unknown alignment loss"),
        ({"reduction": "max"}, "Unknown pair reduction"),
        ({"objective": "infonce_sinkhorn", "temperature": 0.0}, "temperature"),
        ({"variance_weight": -1.0}, "variance hinge weight"),
    ],
)
def test_bad_objective_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        alignment_loss(_aligned(), **{**_kwargs("sinkhorn"), **kwargs})
    with pytest.raises(ValueError, match="count"):
        draw_negatives(SENTENCES, LANGUAGES, [(0, 1)], 0)


def test_objective_and_scheduler_settings_are_stage_settings_validated_and_recorded():
    settings = load_settings(REPO / "training/configs/tiny_stage3_potsa.yaml",
                             ["alignment_loss=infonce_sinkhorn", "ot_num_negatives=4", "ucb_reward=ratio_drop",
                              "ucb_normalize_reward=true", "ot_sinkhorn_mode=converged"])  # fmt: skip
    alignment = parse_settings(settings).alignment
    assert (alignment.alignment_loss, alignment.ot_num_negatives, alignment.ot_sinkhorn_mode) == (
        "infonce_sinkhorn", 4, "converged")  # fmt: skip
    assert alignment.layer_scheduler(seed=0).signal == "ot_ratio"
    assert AlignmentArguments(**json.loads(json.dumps(alignment.to_dict()))) == alignment
    assert alignment.objective_kwargs()["objective"] == "infonce_sinkhorn"
    defaults = AlignmentArguments()  # the paper's
    assert (defaults.alignment_loss, defaults.ot_pair_reduction, defaults.ucb_rule, defaults.ucb_reward) == (
        "sinkhorn", "mean", "potsa", "loss_drop")  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alignment_loss": "wasserstein"}, "alignment_loss.*Unknown alignment loss"),
        ({"ot_pair_reduction": "max"}, "pair reduction"),
        ({"ot_infonce_temperature": -1.0}, "temperature"),
        ({"ot_variance_weight": -0.1}, "hinge weight"),
        ({"ot_variance_target_std": 0.0}, "target std"),
        ({"ot_sinkhorn_mode": "exact"}, "ot_sinkhorn_mode"),
        ({"ot_num_negatives": 0}, "ot_num_negatives"),
        ({"ucb_rule": "paper", "ot_layer_scheduler": "uniform"}, "ucb_rule"),
        ({"ucb_reward": "ratio"}, "ucb_reward"),
    ],
)
def test_bad_objective_and_scheduler_settings_are_refused_when_parsed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignmentArguments(**kwargs)


def test_the_released_codes_configuration_trains_with_half_summed_pairs(corpus, model_yaml, tmp_path):
    """English-X pairs, 0.5 * the sum of their divergences, the released UCB rule: the first step's OT term is
    0.5 * 4 pairs (2 sentences x 2 non-English languages per batch) times the paper's mean over the same pairs."""
    common = {"max_steps": 1, "save_steps": 100, "eval_split": None, "ot_pair_strategy": "english_anchor"}
    paper = train(corpus, model_yaml, tmp_path / "paper", **common)
    released = train(corpus, model_yaml, tmp_path / "released", ot_pair_reduction="half_sum", ucb_rule="released",
                     **common)  # fmt: skip
    assert released.state.log_history[0]["ot"] == pytest.approx(0.5 * 4 * paper.state.log_history[0]["ot"], rel=1e-4)
    assert released.layer_callback.scheduler.config()["rule"] == "released"
