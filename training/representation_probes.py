"""What the model's representations say about alignment, measured on an eval set: retrieval of parallel
utterances and distributional similarity of the pooled Q-Former output, and how linearly identifiable the language
still is at each stage of the model.

Alignment (the paper's two analyses), on the Q-Former output of parallel utterances, mean-pooled over queries:

- Recall@1: for each utterance in language a, is its nearest neighbour (cosine) among language b's utterances of
  the same eval set the parallel one? Averaged over ordered language pairs.
- 1 - JSD: each pooled vector becomes a distribution (softmax over features); the Jensen-Shannon divergence (base 2,
  in [0, 1]) between parallel utterances, averaged over pairs, subtracted from 1. 1 = identical distributions.

Is the language bias really additive? A language-ID probe: a linear classifier (multinomial logistic regression)
trained on half of the eval sentences and tested on the other half, on (a) the time-pooled encoder outputs, (b) the
same after bias compensation, (c) the pooled Q-Former output. Subtracting each language's own mean makes the class
means coincide (on the audio the means were estimated from), and a linear probe then has little to go on but
higher-order differences, so (b) near chance says the bias is an offset; (b) well above chance says it is not only
one (or that the means do not carry over to new audio); (c) says whether the Q-Former brings language back.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def _parallel_groups(sentence_ids: Sequence[str], languages: Sequence[str]) -> dict[tuple[str, str], list]:
    """For each ordered language pair, the (index_a, index_b) of utterances that share a sentence id."""
    by_language: dict[str, dict[str, int]] = defaultdict(dict)
    for index, (sentence, language) in enumerate(zip(sentence_ids, languages)):
        by_language[language].setdefault(sentence, index)
    pairs = {}
    for a, b in itertools.permutations(sorted(by_language), 2):
        shared = sorted(set(by_language[a]) & set(by_language[b]))
        if len(shared) > 1:
            pairs[a, b] = [(by_language[a][s], by_language[b][s]) for s in shared]
    return pairs


def recall_at_1(pooled: torch.Tensor, sentence_ids: Sequence[str], languages: Sequence[str]) -> float | None:
    """Parallel-utterance retrieval accuracy (cosine nearest neighbour), mean over ordered language pairs."""
    normalized = F.normalize(pooled.float(), dim=-1)
    recalls = []
    for (_, _), index_pairs in _parallel_groups(sentence_ids, languages).items():
        queries = normalized[[a for a, _ in index_pairs]]  # (n, d)
        keys = normalized[[b for _, b in index_pairs]]  # (n, d): row k is the parallel of query k
        hits = (queries @ keys.T).argmax(dim=1) == torch.arange(len(index_pairs))
        recalls.append(hits.float().mean().item())
    return sum(recalls) / len(recalls) if recalls else None


def one_minus_jsd(pooled: torch.Tensor, sentence_ids: Sequence[str], languages: Sequence[str]) -> float | None:
    """1 - mean Jensen-Shannon divergence (bits) between softmax-normalised pooled states of parallel utterances."""
    distributions = pooled.float().softmax(dim=-1)
    divergences = []
    for (a_language, b_language), index_pairs in _parallel_groups(sentence_ids, languages).items():
        if a_language > b_language:
            continue  # JSD is symmetric: count each unordered language pair once
        p = distributions[[a for a, _ in index_pairs]]
        q = distributions[[b for _, b in index_pairs]]
        m = 0.5 * (p + q)
        kl = lambda x, y: (x * (x.clamp_min(1e-12).log() - y.clamp_min(1e-12).log())).sum(-1)
        divergences.append((0.5 * kl(p, m) + 0.5 * kl(q, m)) / math.log(2))
    if not divergences:
        return None
    return 1.0 - torch.cat(divergences).mean().item()


def _probe_split(sentence_ids: Sequence[str], held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train / held-out utterance positions, split by sentence: every utterance of a sentence (all its languages)
    lands on one side, so the probe is tested on content it has not seen."""
    sentences = sorted(set(sentence_ids))
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = {sentences[k] for k in order[: round(held_out_fraction * len(sentences))]}
    train = [i for i, sentence in enumerate(sentence_ids) if sentence not in held_out]
    test = [i for i, sentence in enumerate(sentence_ids) if sentence in held_out]
    return train, test


def _fit_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, l2: float):
    """Multinomial logistic regression by full-batch LBFGS from zero weights (deterministic); float64 features."""
    weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def language_id_probe(
    features: torch.Tensor,
    languages: Sequence[str],
    sentence_ids: Sequence[str],
    *,
    held_out_fraction: float = 0.5,
    steps: int = 200,
    l2: float = 1e-3,
    seed: int = 0,
) -> float | None:
    """Held-out accuracy of a linear language-ID classifier on ``features``: how linearly identifiable the
    language still is.

    Features are standardised with the training part's statistics (an affine map: linear separability is unchanged,
    LBFGS converges); the L2 penalty keeps the fit finite when the training part is separable.

    Args:
        features (`torch.Tensor` of shape `(num_utterances, dim)`): one vector per utterance, e.g. pooled states.
        languages (`Sequence[str]`): per utterance, its language (the class).
        sentence_ids (`Sequence[str]`): per utterance, its sentence; the split keeps a sentence on one side.
        held_out_fraction (`float`, *optional*, defaults to 0.5): share of sentences held out for testing.
        steps (`int`, *optional*, defaults to 200): LBFGS iterations.
        l2 (`float`, *optional*, defaults to 1e-3): weight of the squared-weight penalty.
        seed (`int`, *optional*, defaults to 0): seeds the split (the fit itself has no randomness).

    Returns:
        `float` in [0, 1], or `None` without two languages or without utterances on both sides of the split.
    """
    classes = sorted(set(languages))
    train, test = _probe_split(sentence_ids, held_out_fraction, seed)
    if len(classes) < 2 or not train or not test:
        return None
    labels = torch.tensor([classes.index(language) for language in languages])
    x = features.double()
    mean, std = x[train].mean(dim=0), x[train].std(dim=0, unbiased=False).clamp_min(1e-12)
    x = (x - mean) / std  # (num_utterances, dim)
    weight, bias = _fit_linear_classifier(x[train], labels[train], len(classes), steps, l2)
    predictions = (x[test] @ weight + bias).argmax(dim=1)
    return (predictions == labels[test]).double().mean().item()


def language_probe_metrics(
    settings: Mapping[str, torch.Tensor], languages: Sequence[str], sentence_ids: Sequence[str], seed: int = 0
) -> dict[str, float]:
    """`language_id_probe` accuracy per named feature set, as ``lid_probe_{name}``, and ``lid_probe_chance``: the
    held-out share of the most frequent language (what a probe that learned nothing scores)."""
    metrics = {}
    for name, features in settings.items():
        accuracy = language_id_probe(features, languages, sentence_ids, seed=seed)
        if accuracy is not None:
            metrics[f"lid_probe_{name}"] = accuracy
    if metrics:
        _, test = _probe_split(sentence_ids, 0.5, seed)
        metrics["lid_probe_chance"] = max(Counter(languages[i] for i in test).values()) / len(test)
    return metrics


__all__ = ["language_id_probe", "language_probe_metrics", "one_minus_jsd", "recall_at_1"]
