"""Estimate the language bias table from unlabeled audio and write it into a model.

A language's bias vector is the mean, over its utterances, of the time-pooled frozen-encoder output. Only audio is
needed, so a zero-shot language (no translations at all) gets its vector the same way, and adding a language to a
trained model is `apply_language_bias(model, estimate_language_bias(model, its_audio, processor))`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import torch

from modeling_potsa.bias_compensation import masked_time_mean
from modeling_potsa.modeling_potsa import PotsaForSpeechTranslation
from modeling_potsa.processing_potsa import PotsaProcessor

from .distributed import all_reduce_sum, main_process_progress, rank_and_world_size
from .encoder_cache import EncoderCache, encoder_frames
from .rows import audio_features, positions_under_cap, read_rows

logger = logging.getLogger(__name__)


class LanguageBiasEstimator:
    """Streaming per-language mean and spread of time-pooled encoder outputs (float64 sums of values and squares:
    exact over millions of clips).

    Feed it batches with `update`; `means()` gives the table rows and which languages were seen, `stds()` the
    per-dimension spreads affine compensation needs. Under data parallelism, `all_reduce()` sums the statistics of
    every process before reading them.
    """

    def __init__(self, num_languages: int, hidden_size: int) -> None:
        self.sums = torch.zeros(num_languages, hidden_size, dtype=torch.float64)
        self.square_sums = torch.zeros(num_languages, hidden_size, dtype=torch.float64)
        self.counts = torch.zeros(num_languages, dtype=torch.float64)

    def update(self, pooled: torch.Tensor, language_ids: torch.Tensor) -> None:
        """pooled (B, d) from `masked_time_mean`, language_ids (B,)."""
        pooled = pooled.detach().to("cpu", torch.float64)
        language_ids = language_ids.detach().to("cpu")
        self.sums.index_add_(0, language_ids, pooled)
        self.square_sums.index_add_(0, language_ids, pooled.square())
        self.counts.index_add_(0, language_ids, torch.ones_like(language_ids, dtype=torch.float64))

    def all_reduce(self) -> None:
        """Sum the statistics of every process (no-op on one)."""
        stats = all_reduce_sum(torch.cat([self.sums, self.square_sums, self.counts.unsqueeze(1)], dim=1))
        self.sums, self.square_sums = stats[:, :-1].chunk(2, dim=1)  # (num_languages, d) each
        self.counts = stats[:, -1]

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_languages, d) float32 means and a (num_languages,) bool mask of languages that had any audio."""
        seen = self.counts > 0
        means = self.sums / self.counts.clamp_min(1.0).unsqueeze(1)
        return means.float(), seen

    def stds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_languages, d) float32 population standard deviations and a (num_languages,) bool mask of the
        languages with at least two utterances (a spread needs two)."""
        counts = self.counts.clamp_min(1.0).unsqueeze(1)
        variance = self.square_sums / counts - (self.sums / counts).square()
        return variance.clamp_min(0.0).sqrt().float(), self.counts >= 2


def _dataset_batches(
    dataset: datasets.Dataset,
    processor: PotsaProcessor,
    indices: Sequence[int],
    batch_size: int,
    encoder_cache: EncoderCache | None,
) -> Iterator[dict[str, Any]]:
    """Encoder inputs (features, or cached frames) of `indices`, batch by batch, with each row's language."""
    for start in range(0, len(indices), batch_size):
        rows = read_rows(dataset, indices[start : start + batch_size])
        inputs = audio_features(rows, processor) if encoder_cache is None else encoder_cache.batch(rows)
        yield {**inputs, "languages": [row["language"] for row in rows]}


class LanguageBiasEstimate(dict):
    """{language: (d_enc,) mean vector}, the bias rows, plus ``std``: {language: (d_enc,) per-dimension spread} for
    the languages with at least two utterances, which affine compensation needs (see `apply_language_bias`).

    A dict of the means, so code that only wants the means (mean compensation, the paper) reads it as before.
    """

    def __init__(self, means: Mapping[str, torch.Tensor], std: Mapping[str, torch.Tensor]) -> None:
        super().__init__(means)
        self.std = dict(std)


@torch.no_grad()
def estimate_language_bias(
    model: PotsaForSpeechTranslation,
    dataset_or_loader: datasets.Dataset | Iterable[Mapping[str, Any]],
    processor: PotsaProcessor,
    languages: Sequence[str] | None = None,
    batch_size: int = 16,
    max_per_language: int | None = None,
    encoder_cache: EncoderCache | None = None,
) -> dict[str, torch.Tensor]:
    """Each language's bias vector: the mean over utterances of the time-pooled encoder output (valid frames only).

    Only audio is needed, so a language without any translation (zero-shot) gets its vector the same way. With a
    Dataset, rows are read, decoded and encoded in batches of `batch_size` (or their frames read from
    `encoder_cache`: no encoder pass) and, under DDP, split across processes; with a loader of `PotsaCollator`
    batches (already sharded by accelerate), those batches are used. Statistics are summed over processes.

    Args:
        languages: languages to estimate (default: the processor's); pass a new code to estimate a zero-shot one.
        max_per_language: use at most this many utterances of each language (per process, for a loader).

    Returns:
        `LanguageBiasEstimate`: {language: (d_enc,) float32 mean} for every language that had audio, with their
        spreads in ``.std``; feed it to `apply_language_bias`.
    """
    languages = list(processor.languages if languages is None else languages)
    estimator = LanguageBiasEstimator(len(languages), model.config.encoder_hidden_size)
    cap = max_per_language
    if isinstance(dataset_or_loader, datasets.Dataset):
        selected = positions_under_cap(list(dataset_or_loader["language"]), languages, cap, Counter())
        rank, world_size = rank_and_world_size()
        selected = selected[rank::world_size]
        batches: Iterable = _dataset_batches(dataset_or_loader, processor, selected, batch_size, encoder_cache)
        total, cap = math.ceil(len(selected) / batch_size), None  # the rows are already selected
    else:
        total = None
        batches = dataset_or_loader
    counts: Counter[str] = Counter()
    for batch in main_process_progress(batches, "Estimating language bias", total):
        keep = positions_under_cap(batch["languages"], languages, cap, counts)
        if not keep:
            continue
        frames, frame_mask = encoder_frames(model, batch)
        pooled = masked_time_mean(frames, frame_mask.to(frames.device))  # (B, d)
        language_ids = torch.tensor([languages.index(batch["languages"][k]) for k in keep])
        estimator.update(pooled[keep], language_ids)
    estimator.all_reduce()
    means, seen = estimator.means()
    stds, spread = estimator.stds()
    unseen = [code for code, was_seen in zip(languages, seen.tolist()) if not was_seen]
    if unseen:
        logger.warning("No audio for %s: their bias vectors were not estimated.", unseen)
    return LanguageBiasEstimate(
        {code: means[row] for row, code in enumerate(languages) if seen[row]},
        {code: stds[row] for row, code in enumerate(languages) if spread[row]},
    )


def apply_language_bias(
    model: PotsaForSpeechTranslation, biases: Mapping[str, torch.Tensor], processor: PotsaProcessor | None = None
) -> None:
    """Write estimated vectors into the model: known languages are updated, new ones added (a zero-shot language
    needs only audio). Pass the processor to let it accept the new languages too.

    With ``config.bias_compensation_mode == "affine"`` the model's compensation is switched to affine if it is not
    yet (a "mean" checkpoint continued as affine), and each language's scale is set from ``biases.std`` (a
    `LanguageBiasEstimate`): the first estimate also fixes the reference spread, which later languages reuse.
    """
    for code, vector in biases.items():
        if code in model.config.languages:
            model.set_language_bias(code, vector)
        else:
            model.add_language(code, vector)
        if processor is not None and code not in processor.languages:
            processor.languages.append(code)
    if model.config.bias_compensation_mode == "affine":
        _apply_language_spreads(model, biases)


def _apply_language_spreads(model: PotsaForSpeechTranslation, biases: Mapping[str, torch.Tensor]) -> None:
    stds = getattr(biases, "std", None)
    if stds is None:
        raise ValueError(
            "Affine bias compensation needs each language's spread as well as its mean: pass the result of "
            "`estimate_language_bias` (a LanguageBiasEstimate), not a plain dict of vectors."
        )
    without_spread = sorted(set(biases) - set(stds))
    if without_spread:
        logger.warning("Under two utterances of %s: their scales stay as they are (identity if new).", without_spread)
    compensation = model.bias_compensation
    compensation.enable_affine()
    if stds and not compensation.has_reference:
        compensation.set_reference_std(stds.values())
    for code in biases:  # the order `add_language` appended new rows in, so each is the next row to append
        row = model.config.language_id(code)
        if code in stds or row == compensation.scale.shape[0]:
            compensation.set_language_std(row, stds.get(code))


__all__ = ["LanguageBiasEstimate", "LanguageBiasEstimator", "apply_language_bias", "estimate_language_bias"]
