"""Tests for pairing parallel utterances and the OT alignment loss built on them."""

import pytest
import torch

from modeling_potsa.optimal_transport import sinkhorn_divergence
from potsa_training.alignment import ALIGNMENT_STRATEGIES, alignment_loss, find_parallel_pairs

# Sentence s1 in en, fr, de and a second en recording; s2 in en, fr; s3 only in de; s4 twice in fr; s5 in fr, de.
SENTENCES = ["s1", "s1", "s1", "s2", "s2", "s3", "s4", "s4", "s1", "s5", "s5"]
LANGUAGES = ["en", "fr", "de", "en", "fr", "de", "fr", "fr", "en", "fr", "de"]
NO_PARTNER = {5, 6, 7}  # s3 has one language only, s4 one language twice


def _pairs(strategy: str, seed: int = 0, **kwargs) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(seed)
    return find_parallel_pairs(SENTENCES, LANGUAGES, strategy, generator=generator, **kwargs)


def _states(batch_size: int = len(SENTENCES)) -> torch.Tensor:
    return torch.randn(batch_size, 4, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()


def _assert_parallel(pairs: list[tuple[int, int]]) -> None:
    for i, j in pairs:
        assert SENTENCES[i] == SENTENCES[j]
        assert LANGUAGES[i] != LANGUAGES[j]


def test_random_pairwise_gives_every_utterance_with_a_partner_a_cross_language_pair():
    pairs = _pairs("random_pairwise")
    _assert_parallel(pairs)
    assert all(i < j for i, j in pairs)
    assert len(set(pairs)) == len(pairs)
    assert {index for pair in pairs for index in pair} == set(range(len(SENTENCES))) - NO_PARTNER
    assert [pair for pair in pairs if SENTENCES[pair[0]] in ("s2", "s5")] == [(3, 4), (9, 10)]  # k = 2: one pair


def test_random_pairwise_with_enough_partners_gives_all_cross_language_pairs():
    pairs = _pairs("random_pairwise", partners_per_utterance=3)
    assert sorted(pairs) == [(0, 1), (0, 2), (1, 2), (1, 8), (2, 8), (3, 4), (9, 10)]


@pytest.mark.parametrize("strategy", ["english_anchor", "english_anchor_frozen"])
def test_anchor_strategies_pair_each_other_language_with_an_english_recording(strategy):
    pairs = _pairs(strategy)
    _assert_parallel(pairs)
    assert all(LANGUAGES[anchor] == "en" for _, anchor in pairs)
    assert sorted(other for other, _ in pairs) == [1, 2, 4]  # s3, s4, s5 have no English recording


def test_anchor_language_is_configurable():
    pairs = _pairs("english_anchor", anchor_language="fr")
    assert sorted(pairs) == [(0, 1), (2, 1), (3, 4), (8, 1), (10, 9)]


@pytest.mark.parametrize("strategy", ALIGNMENT_STRATEGIES)
def test_pairs_are_deterministic_under_a_seeded_generator(strategy):
    assert _pairs(strategy, seed=3) == _pairs(strategy, seed=3)
    # s1 has two English recordings and three languages, so some seeds draw other pairs.
    assert len({tuple(_pairs(strategy, seed=seed)) for seed in range(10)}) > 1


def test_find_parallel_pairs_rejects_bad_arguments():
    with pytest.raises(ValueError, match="random_pairwise"):
        find_parallel_pairs(SENTENCES, LANGUAGES, "all_to_all")
    with pytest.raises(ValueError, match="per utterance"):
        find_parallel_pairs(SENTENCES, LANGUAGES[:-1], "random_pairwise")
    with pytest.raises(ValueError, match="partners_per_utterance"):
        find_parallel_pairs(SENTENCES, LANGUAGES, "random_pairwise", partners_per_utterance=0)


def test_loss_is_the_mean_sinkhorn_divergence_over_pairs():
    states = _states()
    pairs = [(1, 0), (4, 3), (10, 9)]
    expected = sinkhorn_divergence(states[[1, 4, 10]], states[[0, 3, 9]]).mean()
    assert torch.allclose(alignment_loss(states, pairs, "random_pairwise", languages=LANGUAGES), expected)


@pytest.mark.parametrize("strategy", ALIGNMENT_STRATEGIES)
def test_gradients_reach_the_anchor_side_unless_frozen(strategy):
    states = _states()
    pairs = _pairs(strategy)
    alignment_loss(states, pairs, strategy, languages=LANGUAGES).backward()
    gradient_norms = states.grad.flatten(1).norm(dim=1)
    paired = {index for pair in pairs for index in pair}
    anchors = {j for _, j in pairs}
    for index in range(len(SENTENCES)):
        reaches = index in paired and not (strategy == "english_anchor_frozen" and index in anchors)
        assert (gradient_norms[index] > 0) == reaches, index


def test_a_batch_without_pairs_gives_a_zero_that_backpropagates():
    states = _states()
    loss = alignment_loss(states, [], "random_pairwise")
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(states.grad, torch.zeros_like(states))


@pytest.mark.parametrize(
    ("strategy", "pair", "message"),
    [
        ("random_pairwise", (6, 7), r"Pair \(6, 7\) joins two 'fr' utterances"),
        ("english_anchor", (0, 1), r"'fr' second.*\(other, anchor\)"),
        ("random_pairwise", (0, 11), "outside the batch"),
        ("random_pairwise", (2, 2), "with itself"),
        ("anchor_everything", (0, 1), "random_pairwise"),
    ],
)
def test_invalid_pairs_and_strategies_raise(strategy, pair, message):
    with pytest.raises(ValueError, match=message):
        alignment_loss(_states(), [pair], strategy, languages=LANGUAGES)


def test_states_must_be_batch_queries_hidden():
    with pytest.raises(ValueError, match="num_queries"):
        alignment_loss(torch.zeros(2, 8), [(0, 1)], "random_pairwise")
