r"""Is the OT term aligning the Q-Former's layers, or collapsing them? Per-layer statistics, in training and on an
eval set.

Per Q-Former layer, of the states the paper's loss sees (L2-normalised tokens):

- ``state_var``: the between-utterance variance, per query slot the variance over the utterances summed over
  dimensions (``1 - |mean unit vector|^2``, `objectives.slot_variance`), averaged over slots. How much the layer
  depends on its input: 0 for a constant output.
- ``ot_par``: the mean Sinkhorn divergence of parallel cross-language pairs (same sentence, two languages).
- ``ot_nonpar``: the same for non-parallel cross-language pairs (different sentence, different language).
- ``ot_ratio = ot_par / ot_nonpar``: below 1 when parallel utterances are closer than unrelated ones. A collapse
  shrinks both divergences together, so it drives ``ot_par`` to zero but leaves the ratio without a gain; the
  ratio (with ``state_var`` beside it) is what says the layer aligns.
- ``ot_recall_at_1`` (eval only): for each utterance in language a, is its parallel utterance in language b the one
  at the smallest divergence among b's utterances? Mean over ordered language pairs.

Training logs them, keyed by layer (``state_var_layer_1``, ...), for every candidate layer, from the last
micro-batch before each log (`batch_statistics` + `statistics_logs`, see `trainer.py`); `layer_alignment_metrics`
computes them over an eval set.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import torch

from modeling_potsa.optimal_transport import sinkhorn_divergence

from .objectives import slot_variance

_STATISTICS = ("state_var", "ot_par", "ot_nonpar")


def empty_statistics(num_layers: int) -> torch.Tensor:
    """`batch_statistics` totals of no batch: what a process that measured nothing adds to the sum over processes."""
    return torch.zeros(num_layers, len(_STATISTICS), 2, dtype=torch.float64)


@torch.no_grad()
def batch_statistics(
    hidden_states: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    layers: Iterable[int],
    pairs: Sequence[tuple[int, int]],
    nonparallel: Sequence[tuple[int, int]],
    *,
    blur: float = 0.05,
    mode: str = "geomloss",
) -> torch.Tensor:
    """Sums and counts of the statistics of one batch, per layer, ready to be summed over batches and processes.

    All layers' parallel and non-parallel divergences come from one `sinkhorn_divergence` call.

    Args:
        hidden_states (`Sequence[torch.Tensor]` or `Mapping[int, torch.Tensor]`): Q-Former states by layer (index
            ``l`` = layer ``l``), each `(batch_size, num_queries, hidden_size)`; only ``layers`` are read.
        layers (`Iterable[int]`): the layers to measure.
        pairs (`Sequence[tuple[int, int]]`): the batch's parallel pairs.
        nonparallel (`Sequence[tuple[int, int]]`): its non-parallel controls (`alignment.nonparallel_pairs`).
        blur (`float`, *optional*, defaults to 0.05), mode (`str`, *optional*, defaults to "geomloss"): as the loss.

    Returns:
        `torch.Tensor` of shape `(num_layers, 3, 2)`, float64: for state_var, ot_par, ot_nonpar, (sum, count).
    """
    layers = list(layers)
    totals = empty_statistics(len(layers))
    compared = list(pairs) + list(nonparallel)
    for row, layer in enumerate(layers):
        totals[row, 0] = torch.tensor([slot_variance(hidden_states[layer]).mean().item(), 1.0])
    if not compared:
        return totals
    index = torch.tensor(compared, device=hidden_states[layers[0]].device)  # (P + N, 2)
    first = torch.cat([hidden_states[layer][index[:, 0]] for layer in layers])  # (L * (P + N), Q, d)
    second = torch.cat([hidden_states[layer][index[:, 1]] for layer in layers])
    divergences = sinkhorn_divergence(first, second, blur=blur, mode=mode).double().cpu().view(len(layers), -1)
    for column, part in ((1, divergences[:, : len(pairs)]), (2, divergences[:, len(pairs) :])):
        totals[:, column, 0] = part.sum(dim=1)
        totals[:, column, 1] = part.shape[1]
    return totals


def statistics_logs(totals: torch.Tensor, layers: Iterable[int]) -> dict[str, float]:
    """``{statistic}_layer_{l}`` means (and ``ot_ratio_layer_{l}``) from `batch_statistics` totals; a statistic
    without a count is left out."""
    logs = {}
    for row, layer in enumerate(layers):
        means = {
            name: (totals[row, column, 0] / totals[row, column, 1]).item()
            for column, name in enumerate(_STATISTICS)
            if totals[row, column, 1] > 0
        }
        if means.get("ot_nonpar", 0.0) > 0 and "ot_par" in means:
            means["ot_ratio"] = means["ot_par"] / means["ot_nonpar"]
        logs.update({f"{name}_layer_{layer}": value for name, value in means.items()})
    return logs


def arm_ratio(totals: torch.Tensor, weights: Sequence[float]) -> float | None:
    """The weighted mean of the layers' ``ot_par / ot_nonpar`` from `batch_statistics` totals (the layers of one
    scheduler arm, ``weights`` in the same order); ``None`` when a layer lacks either divergence."""
    sums, counts = totals[:, 1:, 0], totals[:, 1:, 1]  # (L, 2): ot_par, ot_nonpar
    if (counts == 0).any() or (sums[:, 1] <= 0).any():
        return None
    means = sums / counts
    return sum(weight * (par / nonpar).item() for weight, (par, nonpar) in zip(weights, means))


def _capped_sentences(sentence_ids: Sequence[str], languages: Sequence[str], cap: int, seed: int) -> set[str]:
    """Up to ``cap`` sentences recorded in at least two languages, drawn by ``seed``."""
    languages_of: dict[str, set[str]] = {}
    for sentence, language in zip(sentence_ids, languages):
        languages_of.setdefault(sentence, set()).add(language)
    eligible = sorted(sentence for sentence, spoken in languages_of.items() if len(spoken) > 1)
    order = torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed))[:cap].tolist()
    return {eligible[k] for k in order}


def _language_blocks(
    sentence_ids: Sequence[str], languages: Sequence[str], sentences: set[str]
) -> list[tuple[list[int], list[int]]]:
    """For each unordered language pair sharing at least two of ``sentences``: the utterance indices in a and in b,
    sentence k of both lists the same (the first recording of each sentence in each language)."""
    first: dict[str, dict[str, int]] = {}
    for index, (sentence, language) in enumerate(zip(sentence_ids, languages)):
        if sentence in sentences:
            first.setdefault(language, {}).setdefault(sentence, index)
    blocks = []
    for a, b in itertools.combinations(sorted(first), 2):
        shared = sorted(set(first[a]) & set(first[b]))
        if len(shared) > 1:
            blocks.append(([first[a][s] for s in shared], [first[b][s] for s in shared]))
    return blocks


def _block_metrics(divergences: torch.Tensor, blocks: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """ot_par, ot_nonpar, ot_ratio (when ot_nonpar > 0) and ot_recall_at_1 from the flattened (n, n) divergence
    matrix of each language pair, row and column k both sentence k."""
    parallel, others, hits = [], [], []
    offset = 0
    for a, b in blocks:
        matrix = divergences[offset : offset + len(a) * len(b)].view(len(a), len(b))  # (n, n)
        offset += len(a) * len(b)
        diagonal = torch.eye(len(a), dtype=torch.bool)
        parallel.append(matrix[diagonal])
        others.append(matrix[~diagonal])
        target = torch.arange(len(a))
        hits += [(matrix.argmin(dim=1) == target).double().mean(), (matrix.argmin(dim=0) == target).double().mean()]
    ot_par, ot_nonpar = torch.cat(parallel).double().mean().item(), torch.cat(others).double().mean().item()
    metrics = {"ot_par": ot_par, "ot_nonpar": ot_nonpar, "ot_recall_at_1": torch.stack(hits).mean().item()}
    if ot_nonpar > 0:  # identical states everywhere leave the ratio undefined
        metrics["ot_ratio"] = ot_par / ot_nonpar
    return metrics


@torch.no_grad()
def layer_alignment_metrics(
    hidden_states: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    sentence_ids: Sequence[str],
    languages: Sequence[str],
    *,
    layers: Iterable[int] | None = None,
    max_sentences: int = 16,
    blur: float = 0.05,
    mode: str = "geomloss",
    seed: int = 0,
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Per Q-Former layer, the training diagnostics (module docstring) over an eval set, and OT Recall@1.

    ``state_var`` is taken over every utterance. The divergences are taken within a random set of at most
    ``max_sentences`` sentences recorded in two or more languages: for each unordered language pair, every
    a-utterance against every b-utterance of their shared sentences (one recording per sentence and language), so
    one matrix gives ``ot_par`` (its diagonal), ``ot_nonpar`` (the rest) and Recall@1 both ways (the divergence is
    symmetric). The cap bounds the cost at ``C(languages, 2) * max_sentences^2`` divergences per layer (8
    languages, 16 sentences: 7,168), computed in batched calls of ``chunk_size`` pairs. Chance Recall@1 is
    ``1 / shared sentences``.

    Args:
        hidden_states (`Sequence[torch.Tensor]` or `Mapping[int, torch.Tensor]`): the model's
            ``qformer_hidden_states`` over the eval set (index ``l`` = layer ``l``, index 0 the query embeddings), or
            only some layers by number (to keep fewer in memory), each `(num_utterances, num_queries, hidden_size)`.
        sentence_ids (`Sequence[str]`), languages (`Sequence[str]`): per utterance.
        layers (`Iterable[int]`, *optional*): layers to measure; default every layer given (from 1).
        max_sentences (`int`, *optional*, defaults to 16): the sentence cap.
        blur (`float`, *optional*, defaults to 0.05), mode (`str`, *optional*, defaults to "geomloss"): as the loss.
        seed (`int`, *optional*, defaults to 0): seeds the choice of sentences.
        chunk_size (`int`, *optional*, defaults to 4096): pairs per `sinkhorn_divergence` call (bounds memory).

    Returns:
        `dict[str, float]`: ``state_var_layer_{l}``, and, when two languages share two capped sentences,
        ``ot_par_layer_{l}``, ``ot_nonpar_layer_{l}``, ``ot_recall_at_1_layer_{l}`` and (when ``ot_nonpar > 0``)
        ``ot_ratio_layer_{l}``.
    """
    by_layer = hidden_states if isinstance(hidden_states, Mapping) else dict(enumerate(hidden_states))
    given = sorted(layer for layer in by_layer if layer >= 1)  # layer 0 holds the query embeddings
    layers = given if layers is None else list(layers)
    count = len(sentence_ids)
    if len(languages) != count or any(states.shape[0] != count for states in by_layer.values()):
        raise ValueError(
            f"Got {count} sentence ids, {len(languages)} languages and states for "
            f"{[states.shape[0] for states in by_layer.values()]} utterances; give one of each per utterance."
        )
    if not set(layers) <= set(given):
        raise ValueError(f"Layers {layers} must be among the Q-Former layers given, {given}.")
    if max_sentences < 2:
        raise ValueError(f"max_sentences must be >= 2 (Recall@1 needs a wrong candidate); got {max_sentences}.")
    blocks = _language_blocks(sentence_ids, languages, _capped_sentences(sentence_ids, languages, max_sentences, seed))
    first = torch.tensor([i for a, b in blocks for i in a for _ in b], dtype=torch.long)
    second = torch.tensor([j for a, b in blocks for _ in a for j in b], dtype=torch.long)
    metrics = {}
    for layer in layers:
        states = by_layer[layer]
        metrics[f"state_var_layer_{layer}"] = slot_variance(states).mean().item()
        if not blocks:
            continue
        index = first.to(states.device), second.to(states.device)
        divergences = torch.cat([
            sinkhorn_divergence(states[index[0][k : k + chunk_size]], states[index[1][k : k + chunk_size]],
                                blur=blur, mode=mode).cpu()
            for k in range(0, len(first), chunk_size)
        ])  # fmt: skip
        metrics.update({f"{name}_layer_{layer}": value for name, value in _block_metrics(divergences, blocks).items()})
    return metrics


__all__ = ["arm_ratio", "batch_statistics", "empty_statistics", "layer_alignment_metrics", "statistics_logs"]
