r"""Pair the parallel utterances of a batch and turn their Q-Former states into the alignment loss.

A POTSA batch holds utterances of the same sentences in several languages, described per utterance by a sentence
id and a language. A *pair* ``(i, j)`` of batch indices joins two utterances of one sentence in two different
languages; two utterances of a sentence in the same language are never a pair. The paper's loss over the pairs
``P`` at the scheduled Q-Former layer is

.. math::

    \mathcal{L}_{\text{OT}} = \frac{1}{|P|} \sum_{(i, j) \in P} S_\varepsilon(H_i, H_j)

with ``H_i`` of shape ``(num_queries, hidden_size)`` the query states of utterance ``i`` and ``S_eps`` the
Sinkhorn divergence of `modeling_potsa.optimal_transport.sinkhorn_divergence`. Query states have no padding, so
no masks are passed. `alignment_loss` also computes the collapse-free objectives of `objectives.py` (which says
why they exist): a contrastive one needs *rows* ``(query, positive)`` (`contrast_rows`) and in-batch *negatives*
(`draw_negatives`: utterances of other sentences in the positive's language, so a row is never told apart by
language alone).

Strategies (the paper's ablation; ``random_pairwise`` is POTSA's choice):

- ``random_pairwise``: every utterance is aligned with a random parallel utterance in another language, so all
  languages pull towards each other, no language is privileged, and both sides get gradients. Pairs are
  unordered, written ``(smaller index, larger index)``; the contrastive objective uses them both ways.
- ``english_anchor``: every non-anchor utterance is paired with an anchor-language utterance of its sentence;
  both sides get gradients. Sentences without an anchor-language utterance give no pair. This is the released
  code's English-X pairing (see `ucb_scheduler.py`).
- ``english_anchor_frozen``: the same pairs, with the anchor side detached: the anchor is a fixed target that
  only the other languages move towards. Every utterance on the anchor side (anchors, and the contrastive
  objective's negatives, which are in the anchor language) is detached, also where it enters batch statistics.

For both anchor strategies the anchor is always the *second* element of a pair.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from modeling_potsa.optimal_transport import sinkhorn_divergence

from .objectives import check_objective, infonce_terms, reduce_terms, standardise_states, variance_hinge
from .rows import group_by_sentence

ALIGNMENT_STRATEGIES = ("random_pairwise", "english_anchor", "english_anchor_frozen")
ANCHOR_STRATEGIES = ("english_anchor", "english_anchor_frozen")


def _check_strategy(strategy: str) -> None:
    if strategy not in ALIGNMENT_STRATEGIES:
        raise ValueError(f"Unknown alignment strategy {strategy!r}; choose one of {list(ALIGNMENT_STRATEGIES)}.")


def _random_pairs(
    members: list[int], languages: Sequence[str], partners: int, generator: torch.Generator | None
) -> list[tuple[int, int]]:
    pairs: dict[tuple[int, int], None] = {}  # an ordered set: (i, j) and (j, i) are one pair
    for i in members:
        others = [j for j in members if languages[j] != languages[i]]
        if not others:
            continue
        for k in torch.randperm(len(others), generator=generator)[:partners].tolist():
            pairs[min(i, others[k]), max(i, others[k])] = None
    return list(pairs)


def _anchor_pairs(
    members: list[int], languages: Sequence[str], anchor_language: str, generator: torch.Generator | None
) -> list[tuple[int, int]]:
    anchors = [j for j in members if languages[j] == anchor_language]
    if not anchors:
        return []
    pairs = []
    for i in members:
        if languages[i] != anchor_language:
            # Several recordings of the anchor sentence: draw one per pair so each gets used.
            k = int(torch.randint(len(anchors), (), generator=generator)) if len(anchors) > 1 else 0
            pairs.append((i, anchors[k]))
    return pairs


def find_parallel_pairs(
    sentence_ids: Sequence[str],
    languages: Sequence[str],
    strategy: str,
    anchor_language: str = "en",
    generator: torch.Generator | None = None,
    partners_per_utterance: int = 1,
) -> list[tuple[int, int]]:
    """Pairs of batch indices that share a sentence id and differ in language, chosen by ``strategy``.

    Under ``random_pairwise`` every utterance draws ``partners_per_utterance`` distinct partners uniformly among
    its sentence's utterances in other languages; a pair drawn from both ends is kept once. A sentence recorded
    once in each of ``k`` languages thus gives, with one partner, between ``ceil(k / 2)`` and ``k`` pairs (exactly
    one for ``k = 2``): every utterance takes part at every step, the OT cost grows linearly in ``k`` like the
    anchor strategies' ``k - 1`` pairs, and over steps every language pair is drawn. ``partners_per_utterance >=
    k - 1`` gives all ``k (k - 1) / 2`` pairs.

    Args:
        sentence_ids (`Sequence[str]`):
            Per utterance, the id of its sentence (utterances of one sentence are parallel).
        languages (`Sequence[str]`):
            Per utterance, its language code.
        strategy (`str`):
            One of `ALIGNMENT_STRATEGIES` (see the module docstring).
        anchor_language (`str`, *optional*, defaults to "en"):
            The anchor language of the anchor strategies; ignored by ``random_pairwise``.
        generator (`torch.Generator`, *optional*):
            Source of the random draws (CPU); ``None`` uses torch's global generator.
        partners_per_utterance (`int`, *optional*, defaults to 1):
            Partners each utterance draws under ``random_pairwise``.

    Returns:
        `list[tuple[int, int]]`: the pairs, grouped by sentence in order of first appearance; for the anchor
        strategies the anchor-language utterance is second.
    """
    _check_strategy(strategy)
    if len(sentence_ids) != len(languages):
        raise ValueError(
            f"Got {len(sentence_ids)} sentence ids but {len(languages)} languages; give both per utterance."
        )
    if partners_per_utterance < 1:
        raise ValueError(f"partners_per_utterance must be >= 1; got {partners_per_utterance}.")
    pairs = []
    for members in group_by_sentence(sentence_ids):
        if strategy == "random_pairwise":
            pairs += _random_pairs(members, languages, partners_per_utterance, generator)
        else:
            pairs += _anchor_pairs(members, languages, anchor_language, generator)
    return pairs


def _check_pairs(
    pairs: Sequence[tuple[int, int]],
    batch_size: int,
    strategy: str,
    languages: Sequence[str] | None,
    anchor_language: str,
) -> None:
    if languages is not None and len(languages) != batch_size:
        raise ValueError(f"Got {len(languages)} languages for a batch of {batch_size} utterances; give one each.")
    for i, j in pairs:
        if not (0 <= i < batch_size and 0 <= j < batch_size):
            raise ValueError(f"Pair ({i}, {j}) points outside the batch of {batch_size} utterances.")
        if i == j:
            raise ValueError(f"Pair ({i}, {j}) pairs an utterance with itself; pairs join two different utterances.")
        if languages is None:
            continue
        if languages[i] == languages[j]:
            raise ValueError(
                f"Pair ({i}, {j}) joins two {languages[i]!r} utterances; pairs must differ in language "
                "(build them with find_parallel_pairs)."
            )
        if strategy in ANCHOR_STRATEGIES and languages[j] != anchor_language:
            raise ValueError(
                f"Pair ({i}, {j}) has {languages[j]!r} second, but {strategy!r} needs the anchor language "
                f"{anchor_language!r} second; write the pair as (other, anchor)."
            )


def contrast_rows(pairs: Sequence[tuple[int, int]], strategy: str) -> list[tuple[int, int]]:
    """The ``(query, positive)`` rows of the contrastive objective: each pair both ways under ``random_pairwise``
    (no side is privileged, as in CLIP's symmetric loss), ``(other, anchor)`` under the anchor strategies."""
    _check_strategy(strategy)
    if strategy in ANCHOR_STRATEGIES:
        return list(pairs)
    return [row for i, j in pairs for row in ((i, j), (j, i))]


def draw_negatives(
    sentence_ids: Sequence[str],
    languages: Sequence[str],
    rows: Sequence[tuple[int, int]],
    count: int,
    generator: torch.Generator | None = None,
) -> list[tuple[int, ...]]:
    """For each ``(query, positive)`` row, up to ``count`` utterances of other sentences in the positive's language.

    Negatives share the positive's language, so a row cannot be solved by telling languages apart, and differ from
    the query's (pairs join two languages). Fewer than ``count`` candidates: all of them, in random order.

    Args:
        sentence_ids (`Sequence[str]`), languages (`Sequence[str]`): per utterance of the batch.
        rows (`Sequence[tuple[int, int]]`): ``(query, positive)`` batch indices, e.g. `contrast_rows` or pairs.
        count (`int`): negatives per row, >= 1.
        generator (`torch.Generator`, *optional*): source of the draws (CPU); ``None`` uses torch's global one.

    Returns:
        `list[tuple[int, ...]]`: one tuple of batch indices per row (empty when the batch has no candidate).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1 negatives per row; got {count}.")
    by_language: dict[str, list[int]] = defaultdict(list)
    for index, language in enumerate(languages):
        by_language[language].append(index)
    negatives = []
    for _, positive in rows:
        candidates = [k for k in by_language[languages[positive]] if sentence_ids[k] != sentence_ids[positive]]
        order = torch.randperm(len(candidates), generator=generator)[:count].tolist()
        negatives.append(tuple(candidates[k] for k in order))
    return negatives


def nonparallel_pairs(
    sentence_ids: Sequence[str],
    languages: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    generator: torch.Generator | None = None,
) -> list[tuple[int, int]]:
    """A control for each pair ``(i, j)``: ``(i, k)`` with ``k`` another sentence in ``j``'s language (different
    sentence, different language from ``i``, the same language pair as the parallel one); pairs without a
    candidate get none. Diagnostics compare the divergences of the two sets (`alignment_diagnostics.py`)."""
    drawn = draw_negatives(sentence_ids, languages, pairs, 1, generator)
    return [(i, negatives[0]) for (i, _), negatives in zip(pairs, drawn) if negatives]


def _check_negatives(
    negatives: Sequence[Sequence[int]] | None, rows: Sequence[tuple[int, int]], batch_size: int
) -> None:
    if negatives is None:
        raise ValueError("alignment_loss='infonce_sinkhorn' needs `negatives`, one tuple per contrast row "
                         "(build them with draw_negatives(..., contrast_rows(pairs, strategy), ...)).")  # fmt: skip
    if len(negatives) != len(rows):
        raise ValueError(f"Got negatives for {len(negatives)} rows, but the pairs give {len(rows)} contrast rows; "
                         "draw them for contrast_rows(pairs, strategy).")  # fmt: skip
    for (query, positive), row_negatives in zip(rows, negatives):
        for k in row_negatives:
            if not 0 <= k < batch_size or k in (query, positive):
                raise ValueError(f"Negative {k} of row ({query}, {positive}) is outside the batch of {batch_size} "
                                 "utterances or is the row's own query or positive.")  # fmt: skip


def _infonce_divergences(
    states: torch.Tensor, rows: Sequence[tuple[int, int]], negatives: Sequence[Sequence[int]], **ot_kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows x (positive + negatives) divergences in one `sinkhorn_divergence` call: (R, 1 + K) and a validity
    mask; rows with fewer than K negatives are padded with their positive, masked out."""
    width = 1 + max(map(len, negatives))
    candidates = [[positive, *row_negatives] + [positive] * (width - 1 - len(row_negatives))
                  for (_, positive), row_negatives in zip(rows, negatives)]  # fmt: skip
    valid = torch.tensor([[k <= len(row) for k in range(width)] for row in negatives], device=states.device)
    queries = torch.tensor([query for query, _ in rows], device=states.device).repeat_interleave(width)  # (R * W,)
    keys = torch.tensor(candidates, device=states.device).flatten()  # (R * W,)
    divergences = sinkhorn_divergence(states[queries], states[keys], **ot_kwargs)  # (R * W,)
    return divergences.view(len(rows), width), valid


def alignment_loss(
    states: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    strategy: str,
    *,
    objective: str = "sinkhorn",
    negatives: Sequence[Sequence[int]] | None = None,
    languages: Sequence[str] | None = None,
    anchor_language: str = "en",
    blur: float = 0.05,
    mode: str = "geomloss",
    reduction: str = "mean",
    temperature: float = 0.05,
    variance_weight: float = 0.0,
    variance_target_std: float = 0.5,
    **ot_kwargs: Any,
) -> torch.Tensor:
    """The alignment objective over ``pairs`` of the Q-Former states at one layer (`objectives.py` defines them).

    Args:
        states (`torch.Tensor` of shape `(batch_size, num_queries, hidden_size)`):
            Query states of every utterance of the batch at the scheduled layer.
        pairs (`Sequence[tuple[int, int]]`):
            Batch index pairs, usually from `find_parallel_pairs` with the same ``strategy``.
        strategy (`str`):
            One of `ALIGNMENT_STRATEGIES`; ``english_anchor_frozen`` detaches the anchor side.
        objective (`str`, *optional*, defaults to "sinkhorn"):
            One of `objectives.ALIGNMENT_LOSSES`: "sinkhorn" (the paper), "infonce_sinkhorn" or "centred_sinkhorn".
        negatives (`Sequence[Sequence[int]]`, *optional*):
            "infonce_sinkhorn" only: per row of `contrast_rows(pairs, strategy)`, its negatives (`draw_negatives`).
        languages (`Sequence[str]`, *optional*):
            Per utterance, its language; when given, every pair is checked to join two languages and, for the
            anchor strategies, to have ``anchor_language`` second.
        anchor_language (`str`, *optional*, defaults to "en"):
            Used only for that check.
        blur (`float`, *optional*, defaults to 0.05), mode (`str`, *optional*, defaults to "geomloss"), ot_kwargs:
            Passed to `sinkhorn_divergence`.
        reduction (`str`, *optional*, defaults to "mean"):
            How the per-pair (per-row) terms become one: "mean", "sum" or "half_sum" (the released code).
        temperature (`float`, *optional*, defaults to 0.05):
            "infonce_sinkhorn" only: tau.
        variance_weight (`float`, *optional*, defaults to 0.0), variance_target_std (`float`, *optional*, defaults
        to 0.5):
            Adds ``variance_weight * variance_hinge`` over the utterances that take part (0: off).

    Returns:
        `torch.Tensor`: a scalar. With no pair it is a zero that stays in the graph of ``states`` (backward gives
        zero gradients), so a batch without parallel utterances needs no special case.
    """
    _check_strategy(strategy)
    check_objective(objective, reduction, temperature, variance_weight, variance_target_std)
    if states.dim() != 3:
        raise ValueError(f"states must be (batch_size, num_queries, hidden_size); got shape {tuple(states.shape)}.")
    _check_pairs(pairs, states.shape[0], strategy, languages, anchor_language)
    if not pairs:
        return states.sum() * 0.0
    ot_kwargs = {"blur": blur, "mode": mode, **ot_kwargs}
    contrastive = objective == "infonce_sinkhorn"
    rows = contrast_rows(pairs, strategy) if contrastive else list(pairs)
    if contrastive:
        _check_negatives(negatives, rows, states.shape[0])
    else:
        negatives = [()] * len(rows)
    anchor_side = {index for (_, j), ks in zip(rows, negatives) for index in (j, *ks)}
    if strategy == "english_anchor_frozen":
        frozen = torch.zeros(states.shape[0], dtype=torch.bool, device=states.device)
        frozen[sorted(anchor_side)] = True
        states = torch.where(frozen[:, None, None], states.detach(), states)
    participants = torch.tensor(sorted(anchor_side | {i for i, _ in rows}), device=states.device)
    if contrastive:
        divergences, valid = _infonce_divergences(states, rows, negatives, **ot_kwargs)
        terms = infonce_terms(divergences, valid, temperature)
    else:
        compared = standardise_states(states, participants) if objective == "centred_sinkhorn" else states
        index = torch.tensor(rows, device=states.device)  # (num_pairs, 2)
        normalize = objective == "sinkhorn"  # standardised states are compared as they are
        terms = sinkhorn_divergence(compared[index[:, 0]], compared[index[:, 1]], normalize=normalize, **ot_kwargs)
    loss = reduce_terms(terms, reduction)
    if variance_weight > 0:
        loss = loss + variance_weight * variance_hinge(states[participants], variance_target_std)
    return loss


def weighted_alignment_loss(
    hidden_states: Sequence[torch.Tensor],
    layer_weights: Sequence[tuple[int, float]],
    pairs: Sequence[tuple[int, int]],
    strategy: str,
    **kwargs: Any,
) -> torch.Tensor:
    r"""The OT loss of a scheduler arm, :math:`\sum_l w_l \mathcal{L}_{\text{OT}}(l)` over its (layer, weight) pairs.

    Args:
        hidden_states (`Sequence[torch.Tensor]`):
            Every Q-Former layer's states, index ``l`` = output of block ``l`` (index 0: the query embeddings), each
            of shape `(batch_size, num_queries, hidden_size)`.
        layer_weights (`Sequence[tuple[int, float]]`):
            The ``(layer, weight)`` pairs, e.g. a scheduler's ``current_layers`` (weights already normalised).
        pairs, strategy, kwargs:
            As for `alignment_loss`, applied at every layer.

    Returns:
        `torch.Tensor`: a scalar; a single layer of weight 1 gives exactly `alignment_loss` at that layer.
    """
    if not layer_weights:
        raise ValueError("layer_weights is empty; give at least one (layer, weight) pair.")
    for layer, _ in layer_weights:
        if not 1 <= layer < len(hidden_states):
            raise ValueError(f"Layer {layer} is outside the Q-Former's layers 1..{len(hidden_states) - 1}.")
    return sum(
        weight * alignment_loss(hidden_states[layer], pairs, strategy, **kwargs) for layer, weight in layer_weights
    )


__all__ = [
    "ALIGNMENT_STRATEGIES",
    "ANCHOR_STRATEGIES",
    "alignment_loss",
    "contrast_rows",
    "draw_negatives",
    "find_parallel_pairs",
    "nonparallel_pairs",
    "weighted_alignment_loss",
]
