"""Rows -> one training batch: encoder inputs (features, or cached encoder frames), language ids, the stage's
prompt and target tokens, and the sentence ids and languages the OT pairs are found from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modeling_potsa.processing_potsa import TASKS, PotsaProcessor

from .encoder_cache import EncoderCache
from .rows import Row, audio_features, label_text


def stage_targets(rows: Sequence[Row], task: str) -> tuple[list[str | None], list[str | None]]:
    """Per row, the (text, transcript) that `PotsaProcessor.tokenize` needs for `task`; None = unlabeled row.

    "translate" (stages 2-3) learns the translation; "transcribe" (stage 1, ASR) the transcript; "chain" (the
    paper's transcript-then-translation target) needs both, so a row missing either is unlabeled.
    """
    translations = [label_text(row["translation"]) for row in rows]
    transcripts = [label_text(row["transcript"]) for row in rows]
    nothing = [None] * len(rows)
    if task == "translate":
        return translations, nothing
    if task == "transcribe":
        return nothing, transcripts
    labeled = [text is not None and transcript is not None for text, transcript in zip(translations, transcripts)]
    texts = [text if ok else None for text, ok in zip(translations, labeled)]
    return texts, [transcript if ok else None for transcript, ok in zip(transcripts, labeled)]


@dataclass
class PotsaCollator:
    """Canonical rows -> one training batch for `PotsaForSpeechTranslation.forward`.

    Returns `input_features` + `feature_attention_mask` (audio decoded and resampled by `load_waveform`), or, with
    an `encoder_cache`, `encoder_hidden_states` (B, T, d) float32 + `encoder_attention_mask` (B, T) bool padded to
    the batch's longest utterance; `language_ids` (B,); right-padded `input_ids`, `attention_mask`, `labels` (-100
    outside targets, and everywhere on rows without a target for the task); and `sentence_ids` and `languages` as
    plain lists, which the trainer pops to find the OT pairs before calling the model. The Trainer needs
    `remove_unused_columns=False`, or it drops the columns this collator reads.
    """

    processor: PotsaProcessor
    task: str = "translate"
    encoder_cache: EncoderCache | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; choose one of {TASKS}.")

    def __call__(self, rows: Sequence[Row]) -> dict[str, Any]:
        languages = [row["language"] for row in rows]
        if self.encoder_cache is None:
            batch: dict[str, Any] = audio_features(rows, self.processor)
        else:
            batch = self.encoder_cache.batch(rows)
        batch["language_ids"] = torch.tensor([self.processor.language_id(code) for code in languages])
        texts, transcripts = stage_targets(rows, self.task)
        batch.update(self.processor.tokenize(languages, self.task, texts, transcripts))
        batch["sentence_ids"] = [str(row["sentence_id"]) for row in rows]
        batch["languages"] = languages
        return batch


__all__ = ["PotsaCollator", "stage_targets"]
