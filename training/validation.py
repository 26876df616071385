"""Check a training set once, up front: every row decoded and judged, bad rows refused or dropped and counted, so
that no epoch discovers a missing file or a NaN clip halfway through."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import datasets

from modeling_potsa.audio import checked_waveform
from modeling_potsa.processing_potsa import PotsaProcessor

from .distributed import main_process_progress
from .rows import Row, group_by_sentence, iter_rows, row_audio

logger = logging.getLogger(__name__)

# (reason, lower-case text of the ValueError that `audio_input`, `row_waveform` or `load_waveform` raise for it)
_AUDIO_PROBLEMS = (
    ("missing file", "not found"),
    ("unreadable audio", "cannot decode"),
    ("wrong sampling rate", "sampling rate"),
    ("empty audio", "empty audio"),
    ("empty audio", "too short"),
    ("non-finite samples", "nan or infinite"),
    ("silent audio", "all-silent"),
    ("too long", "longer than the encoder window"),
)


@dataclass
class DataReport:
    """What `validate_examples` found.

    Attributes:
        num_rows: rows checked.
        dropped: rows dropped per reason (only with on_bad_data="skip").
        single_language_sentences: sentence ids left with utterances in one language only: they are kept (they
            still train the CE loss) but can never form an OT pair.
    """

    num_rows: int
    dropped: dict[str, int] = field(default_factory=dict)
    single_language_sentences: int = 0

    @property
    def num_kept(self) -> int:
        return self.num_rows - sum(self.dropped.values())


def row_problem(row: Row, languages: Iterable[str], processor: PotsaProcessor) -> tuple[str, str] | None:
    """(reason, message) of what makes a row unusable, or None for a good row. Decodes its audio once."""
    if row["language"] not in languages:
        return "unknown language", f"{row['language']!r} is not one of the model's languages {sorted(languages)}"
    if row["sentence_id"] in (None, ""):
        return "missing sentence id", "no sentence_id (the key that pairs parallel utterances)"
    try:
        checked_waveform(**row_audio(row, processor))  # the checks of `row_waveform`, without its resampling
    except ValueError as error:
        message = str(error)
        reason = next((reason for reason, text in _AUDIO_PROBLEMS if text in message.lower()), "invalid audio")
        return reason, message
    return None


def validate_examples(
    dataset: datasets.Dataset,
    languages: Sequence[str] | None,
    processor: PotsaProcessor,
    on_bad_data: str = "raise",
) -> tuple[datasets.Dataset, DataReport]:
    """Decode every row once and refuse (or drop) the rows that would otherwise fail or poison a batch mid-epoch.

    Checks: missing file, unreadable or empty audio, a wrong sampling rate (implausible, or not the declared one),
    NaN/inf samples, all-silent audio, audio longer than the encoder window, a language outside `languages`
    (default: the processor's), and a missing sentence id. Clips are short, so one sequential pass is cheap
    next to training. The result is deterministic, so under DDP every process keeps the same rows.

    Args:
        on_bad_data: "raise": a ValueError naming the row index, sentence id, language and problem. "skip": drop
            the row, count it per reason in the report and log the counts.

    Returns:
        The dataset (without the dropped rows) and a `DataReport`.
    """
    if on_bad_data not in ("raise", "skip"):
        raise ValueError(f"on_bad_data must be 'raise' or 'skip', got {on_bad_data!r}.")
    allowed = set(processor.languages if languages is None else languages)
    dropped: Counter[str] = Counter()
    keep = []
    for index, row in enumerate(main_process_progress(iter_rows(dataset), "Checking audio", total=len(dataset))):
        problem = row_problem(row, allowed, processor)
        if problem is None:
            keep.append(index)
            continue
        reason, message = problem
        if on_bad_data == "raise":
            raise ValueError(
                f"Bad row {index} (sentence_id {row['sentence_id']!r}, language {row['language']!r}): {reason}: "
                f"{message}. Fix or remove it, or pass on_bad_data='skip' to drop such rows."
            )
        dropped[reason] += 1
    report = DataReport(len(dataset), dict(dropped))
    if dropped:
        logger.warning("Dropped %d of %d rows: %s.", sum(dropped.values()), len(dataset), dict(dropped))
        dataset = dataset.select(keep)
    row_languages = list(dataset["language"])
    groups = group_by_sentence(list(dataset["sentence_id"]))
    report.single_language_sentences = sum(len({row_languages[i] for i in group}) < 2 for group in groups)
    if report.single_language_sentences:
        logger.warning("%d of %d sentence ids occur in one language only: they cannot form OT pairs.",
                       report.single_language_sentences, len(groups))  # fmt: skip
    return dataset, report


__all__ = ["DataReport", "row_problem", "validate_examples"]
