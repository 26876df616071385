"""The canonical row every data source is turned into, and how rows are read, heard and grouped.

A row is a mapping with the columns

    audio        a file path, {"array", "sampling_rate"} (float, or int16/int32 PCM) or {"bytes", "path"} (parquet)
    language     a code such as "es": the utterance's row in the model's bias table
    sentence_id  str, the n-way parallel key: the same id in two languages is the same sentence (an OT pair)
    transcript   str or None: source-language text, the stage-1 (ASR) target
    translation  str or None: the target-language text; None (or "") for a row that only joins the OT loss

and optionally `sampling_rate`, a declared rate the audio must match. Audio is decoded by
`modeling_potsa.audio.load_waveform`, the function inference uses, so training cannot drift from it (and never
through `datasets.Audio`, which needs torchcodec).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from modeling_potsa.audio import load_waveform
from modeling_potsa.processing_potsa import PotsaProcessor

if TYPE_CHECKING:  # rows are read through the datasets' own methods: the OT loss (alignment.py) needs no `datasets`
    import datasets

Row = Mapping[str, Any]
REQUIRED_COLUMNS = ("audio", "language", "sentence_id")
TEXT_COLUMNS = ("transcript", "translation")


def _table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Arrow rows as dicts. PCM arrays ({"array": list<...>, "sampling_rate"} audio) become numpy views of the Arrow
    buffers with their stored dtype: converting 40k-sample Python lists costs more than the rest of the audio path.
    Everything else comes as `to_pylist` gives it (the same values as `dataset[i]`)."""
    columns: dict[str, list[Any]] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        is_pcm = pa.types.is_struct(column.type) and column.type.get_field_index("array") >= 0
        if is_pcm and column.null_count == 0 and column.field("array").null_count == 0:
            arrays = column.field("array")
            offsets = arrays.offsets.to_numpy()
            values = arrays.values.to_numpy(zero_copy_only=False).copy()  # writable: torch refuses read-only views
            rates = column.field("sampling_rate").to_pylist()
            columns[name] = [
                {"array": values[offsets[i] : offsets[i + 1]], "sampling_rate": rates[i]} for i in range(len(column))
            ]
        else:
            columns[name] = column.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def read_rows(dataset: datasets.Dataset, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Rows `indices` of `dataset` as dicts, read in one batched access."""
    return _table_rows(dataset.with_format("arrow")[list(indices)])


def iter_rows(dataset: datasets.Dataset, batch_size: int = 512) -> Iterator[dict[str, Any]]:
    """Every row of `dataset` as a dict, read in contiguous Arrow batches (several times faster than row access)."""
    formatted = dataset.with_format("arrow")
    for start in range(0, len(dataset), batch_size):
        yield from _table_rows(formatted[start : start + batch_size])


def row_audio(row: Row, processor: PotsaProcessor) -> dict[str, Any]:
    """The keyword arguments of `load_waveform` / `checked_waveform` for a row's audio; a rate the row declares must
    be the audio's own."""
    return {
        "audio": row["audio"],
        "sampling_rate": row.get("sampling_rate"),
        "target_sampling_rate": processor.sampling_rate,
        "max_seconds": processor.max_seconds,
    }


def row_waveform(row: Row, processor: PotsaProcessor) -> torch.Tensor:
    """A row's audio as the model hears it: mono float32 at the processor's rate, checked by `load_waveform`."""
    return load_waveform(**row_audio(row, processor))


def audio_features(rows: Sequence[Row], processor: PotsaProcessor) -> dict[str, torch.Tensor]:
    """`input_features` padded to the encoder window + `feature_attention_mask`: log-mels (B, n_mels, frames) for
    Whisper, waveforms (B, samples) for wav2vec2-style encoders (see `PotsaProcessor.extract_features`)."""
    return processor.extract_features([row_waveform(row, processor) for row in rows])


def label_text(value: Any) -> str | None:
    """None and "" both mean "no label" (an empty CSV cell, an Arrow null)."""
    return str(value) if value not in (None, "") else None


def group_by_sentence(sentence_ids: Sequence[str]) -> list[list[int]]:
    """Row indices grouped by sentence id (the n-way parallel key), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, sentence_id in enumerate(sentence_ids):
        groups.setdefault(sentence_id, []).append(index)
    return list(groups.values())


def positions_under_cap(
    codes: Sequence[str], wanted: Sequence[str], cap: int | None, counts: Counter[str] | None = None
) -> list[int]:
    """Positions of `codes` in `wanted` languages while each has fewer than `cap` utterances; `counts` (updated)
    carries the tallies across calls, e.g. over the batches of a stream."""
    counts = Counter() if counts is None else counts
    keep = []
    for position, code in enumerate(codes):
        if code in wanted and (cap is None or counts[code] < cap):
            counts[code] += 1
            keep.append(position)
    return keep


__all__ = [
    "REQUIRED_COLUMNS",
    "Row",
    "TEXT_COLUMNS",
    "audio_features",
    "group_by_sentence",
    "iter_rows",
    "label_text",
    "positions_under_cap",
    "read_rows",
    "row_audio",
    "row_waveform",
]
