"""generate_corpus: the sentence inventory spoken by espeak, stored as a datasets.DatasetDict."""

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa

from .lexicon import load_lexicon
from .sentences import CATEGORY_WEIGHTS, DEFAULT_SENTENCES, SPLITS, Sentence, sentence_inventory
from .synthesis import Clip, ClipRequest, SpeakerRanges, synthesize

logger = logging.getLogger(__name__)

# Plain int16 lists rather than datasets' Audio feature: Audio decodes through torchcodec, which fails here, and
# the PotsaProcessor resamples the 22,050 Hz arrays to 16 kHz at feature time anyway.
FEATURES = datasets.Features(
    {
        "audio": {"array": datasets.List(datasets.Value("int16")), "sampling_rate": datasets.Value("int32")},
        "language": datasets.Value("string"),
        "sentence_id": datasets.Value("string"),
        "transcript": datasets.Value("string"),
        "translation": datasets.Value("string"),
        "speaker": datasets.Value("string"),
        "category": datasets.Value("string"),
    }
)
_ROWS_PER_BATCH = 10_000  # keeps each Arrow list's int32 offsets far below 2**31 samples


@dataclass(frozen=True)
class _Row:
    """One clip to make: a sentence of a split in one language."""

    split: str
    sentence: Sentence
    request: ClipRequest


def _record_batch(rows: Sequence[tuple[_Row, Clip]]) -> pa.RecordBatch:
    arrays = [clip.audio for _, clip in rows]
    offsets = np.cumsum([0, *map(len, arrays)], dtype=np.int32)
    samples = np.concatenate(arrays) if arrays else np.zeros(0, np.int16)
    columns = {
        "audio": pa.StructArray.from_arrays(
            [
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(samples)),
                pa.array([clip.sampling_rate for _, clip in rows], pa.int32()),
            ],
            names=["array", "sampling_rate"],
        ),
        "language": [row.request.language for row, _ in rows],
        "sentence_id": [row.sentence.sentence_id for row, _ in rows],
        "transcript": [row.request.text for row, _ in rows],
        "translation": [row.sentence.translation for row, _ in rows],
        "speaker": [clip.speaker for _, clip in rows],
        "category": [row.sentence.category for row, _ in rows],
    }
    schema = FEATURES.arrow_schema
    return pa.RecordBatch.from_arrays([pa.array(columns[field.name], field.type) for field in schema], schema=schema)


def _dataset(rows: Sequence[tuple[_Row, Clip]], split: str, description: str) -> datasets.Dataset:
    batches = [_record_batch(rows[start : start + _ROWS_PER_BATCH]) for start in range(0, len(rows), _ROWS_PER_BATCH)]
    table = pa.Table.from_batches(batches, schema=FEATURES.arrow_schema)
    info = datasets.DatasetInfo(description=description, features=FEATURES)
    # An explicit fingerprint: left to datasets, it hashes the whole table (copies of every array, ~3x the memory).
    fingerprint = hashlib.sha256(f"{description} split={split}".encode()).hexdigest()[:16]
    return datasets.Dataset(
        datasets.table.InMemoryTable(table), info=info, split=datasets.NamedSplit(split), fingerprint=fingerprint
    )


def _spoken(sentences: Sequence[Sentence], count: int | None) -> list[Sentence]:
    """All `sentences`, or `count` of them evenly spaced (the split is ordered by category: this keeps its mix)."""
    if count is None or count >= len(sentences):
        return list(sentences)
    return [sentences[index * len(sentences) // count] for index in range(count)]


def generate_corpus(
    languages: Sequence[str],
    out_dir: str | os.PathLike | None = None,
    num_sentences: Mapping[str, int] | int = DEFAULT_SENTENCES,
    seed: int = 0,
    categories: Sequence[str] | Mapping[str, float] = tuple(CATEGORY_WEIGHTS),
    max_seconds: float | None = 3.5,
    max_redraws: int = 3,
    speakers: SpeakerRanges = SpeakerRanges(),
    workers: int = 2,
    progress: bool = False,
    subsets: Mapping[str, Mapping[str, int]] | None = None,
) -> datasets.DatasetDict:
    """Synthesizes every sentence of the inventory in every language; saved to `out_dir` when given.

    Every language gets all three splits (hold a language out of training by filtering the train split on
    `language`). `num_sentences` counts sentences per split (an int is a total split 80/10/10), so a split
    has about num_sentences[split] * len(languages) clips. `subsets` speaks fewer sentences of some splits in some
    languages, `{language: {split: count}}`, spread evenly over the split (so over its categories): e.g. a zero-shot
    language whose train audio only estimates its bias vector. Sentences and splits are the same as without it, so
    such a corpus stays parallel to a full one. A clip longer than `max_seconds` after trimming is synthesized again
    with a newly drawn speaker, up to `max_redraws` times, and then dropped; both are logged. Same arguments give
    byte-identical arrays, whatever `workers` is.
    """
    if not languages or len(set(languages)) != len(languages):
        raise ValueError(f"languages must be a non-empty list without repeats, got {list(languages)}")
    subsets = dict(subsets or {})
    unknown = {code: sorted(set(splits) - set(SPLITS)) for code, splits in subsets.items()}
    if set(subsets) - set(languages) or any(unknown.values()):
        raise ValueError(f"subsets name languages or splits the corpus does not have: {subsets}")
    lexicons = [load_lexicon(code) for code in languages]
    inventory = sentence_inventory(num_sentences, seed, categories, languages)
    rows = [
        _Row(split, sentence, ClipRequest(lexicon.code, lexicon.voice, sentence.sentence_id, text))
        for lexicon in lexicons
        for split in SPLITS
        for sentence in _spoken(inventory[split], subsets.get(lexicon.code, {}).get(split))
        if (text := sentence.transcripts.get(lexicon.code)) is not None
    ]
    clips = synthesize([row.request for row in rows], seed, speakers, max_seconds, max_redraws, workers, progress)
    dropped = Counter(row.request.language for row, clip in zip(rows, clips) if clip.audio is None)
    redrawn = Counter(row.request.language for row, clip in zip(rows, clips) if clip.redraws)
    if dropped or redrawn:
        logger.info("clips over %s s: redrawn %s; dropped %s", max_seconds, dict(redrawn), dict(dropped))
    description = (
        f"eSpeak NG n-way parallel speech, X -> zh: languages={list(languages)} num_sentences={num_sentences} "
        f"seed={seed} categories={list(categories)} max_seconds={max_seconds} speakers={speakers}"
        + (f" subsets={subsets}" if subsets else "")
    )
    kept = [(row, clip) for row, clip in zip(rows, clips) if clip.audio is not None]
    # A split nobody speaks (subsets) is left out: `datasets` cannot load an empty split back from disk.
    spoken = [split for split in SPLITS if any(row.split == split for row, _ in kept)]
    corpus = datasets.DatasetDict(
        {split: _dataset([item for item in kept if item[0].split == split], split, description) for split in spoken}
    )
    if out_dir is not None:
        corpus.save_to_disk(os.fspath(out_dir))
    return corpus
