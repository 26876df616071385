"""Training data for POTSA: canonical rows from any source, checked once, batched so that parallel utterances meet.

Every source (FLEURS as parquet, a folder with a manifest, any `datasets` dataset such as the offline benchmark
corpus) becomes a `datasets.Dataset` with the canonical columns

    audio        a file path, {"array", "sampling_rate"} (float, or int16/int32 PCM) or {"bytes", "path"} (parquet)
    language     a code such as "es": the utterance's row in the model's bias table
    sentence_id  str, the n-way parallel key: the same id in two languages is the same sentence (an OT pair)
    transcript   str or None: source-language text, the stage-1 (ASR) target
    translation  str or None: the Chinese target; None (or "") for a zero-shot language that only joins the OT loss

and optionally `sampling_rate`, a declared rate the audio must match. Audio is decoded with soundfile, never
through `datasets.Audio` (which needs torchcodec, broken with the CPU torch builds), and always ends in
`load_waveform`: the validation and resampling that inference uses, so training cannot drift from it.

The pipeline: `load_source` -> `validate_examples` (every row decoded once up front; bad rows raise or are dropped
and counted, never discovered in the middle of an epoch) -> `ParallelBatchSampler` (a sentence's utterances share
a batch, so the OT loss has pairs) -> `PotsaCollator` (features or cached encoder outputs + the stage's targets).
`estimate_language_bias` + `apply_language_bias` set the bias table from audio alone, which is also how a zero-shot
language is added; `cache_encoder_outputs` runs the frozen encoder once for every later epoch and run.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import soundfile
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from modeling_potsa.audio import checked_waveform, load_waveform, read_audio_file
from modeling_potsa.bias_compensation import LanguageBiasEstimator, masked_time_mean
from modeling_potsa.modeling_potsa import PotsaForSpeechTranslation
from modeling_potsa.processing_potsa import TASKS, PotsaProcessor

logger = logging.getLogger(__name__)

Row = Mapping[str, Any]
REQUIRED_COLUMNS = ("audio", "language", "sentence_id")
TEXT_COLUMNS = ("transcript", "translation")
DATA_SOURCES = ("fleurs", "manifest", "disk", "hub-dataset")

FLEURS_REPO = "google/fleurs"
# The Hub's automatic parquet conversion lives on this branch as {config}/{split}/NNNN.parquet; an hf:// path
# needs the branch name quoted.
PARQUET_REVISION = "refs%2Fconvert%2Fparquet"
FLEURS_CONFIGS = {
    "ar": "ar_eg", "de": "de_de", "en": "en_us", "es": "es_419", "fr": "fr_fr", "hi": "hi_in", "id": "id_id",
    "it": "it_it", "ja": "ja_jp", "ko": "ko_kr", "nl": "nl_nl", "pl": "pl_pl", "pt": "pt_br", "ru": "ru_ru",
    "sv": "sv_se", "th": "th_th", "tr": "tr_tr", "uk": "uk_ua", "vi": "vi_vn", "zh": "cmn_hans_cn",
}  # fmt: skip


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _progress(iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """A progress bar on the main process only (every rank printing one is noise)."""
    return tqdm(iterable, desc=desc, total=total, disable=_rank_and_world_size()[0] != 0)


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


def _rows(dataset: datasets.Dataset, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Rows `indices` of `dataset` as dicts, read in one batched access."""
    return _table_rows(dataset.with_format("arrow")[list(indices)])


def iter_rows(dataset: datasets.Dataset, batch_size: int = 512) -> Iterator[dict[str, Any]]:
    """Every row of `dataset` as a dict, read in contiguous Arrow batches (several times faster than row access)."""
    formatted = dataset.with_format("arrow")
    for start in range(0, len(dataset), batch_size):
        yield from _table_rows(formatted[start : start + batch_size])


# ---------------------------------------------------------------------------------------------------------- audio
def _mono(samples: np.ndarray) -> np.ndarray:
    """soundfile's (time, channels) -> (time,) for mono; multi-channel audio is left for `load_waveform` to refuse."""
    return samples[:, 0] if samples.shape[1] == 1 else samples


def _decode_bytes(data: bytes, name: str | None) -> dict[str, Any]:
    try:
        samples, sampling_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except RuntimeError as error:  # soundfile.LibsndfileError is a RuntimeError
        raise ValueError(f"Cannot decode audio bytes ({name or 'no file name'}): {error}") from error
    return {"array": _mono(samples), "sampling_rate": int(sampling_rate)}


def _samples(array: Any) -> np.ndarray:
    """One canonical array per recording, whichever way it was read: `datasets` hands an Arrow int16/int32 PCM
    column back as Python ints (the dtype is lost on the way), so integers become int16 when every value fits and
    int32 otherwise; floats become float32. The same samples read as a list or as an Arrow buffer thus decode (and
    hash, see `utterance_key`) identically; `load_waveform` scales integer PCM to [-1, 1]. (Only int32 audio
    quieter than -96 dBFS could be misread, and that is refused as silent either way.)"""
    samples = np.asarray(array)
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    if samples.dtype.kind not in "iu" or samples.size == 0:
        return samples
    fits_int16 = samples.min() >= -(2**15) and samples.max() < 2**15
    return samples.astype(np.int16 if fits_int16 else np.int32, copy=False)


def audio_input(audio: Any) -> dict[str, Any]:
    """A canonical `audio` value -> {"array", "sampling_rate"} for `load_waveform`.

    Files and parquet bytes are decoded here (soundfile, as `read_audio_file` does) rather than handed to
    `load_waveform` as paths, so that the file's own rate is known and can be checked against a declared one.
    """
    if isinstance(audio, (str, os.PathLike)):
        samples, sampling_rate = read_audio_file(audio)
        return {"array": _mono(samples.numpy()), "sampling_rate": sampling_rate}
    if not isinstance(audio, Mapping):
        raise ValueError(f"Unsupported audio value of type {type(audio).__name__}: use a file path or a dict.")
    if audio.get("array") is not None:
        return {"array": _samples(audio["array"]), "sampling_rate": audio.get("sampling_rate")}
    if audio.get("bytes") is not None:
        return _decode_bytes(audio["bytes"], audio.get("path"))
    if audio.get("path"):
        return audio_input(audio["path"])
    raise ValueError(f"An audio dict needs a value for 'array', 'bytes' or 'path'; got {sorted(audio)} all empty.")


def _row_audio(row: Row, processor: PotsaProcessor) -> dict[str, Any]:
    """The keyword arguments of `load_waveform` / `checked_waveform` for a row's audio (its declared rate checked)."""
    audio = audio_input(row["audio"])
    declared, actual = row.get("sampling_rate"), audio["sampling_rate"]
    if declared is not None and actual is not None and int(declared) != int(actual):
        raise ValueError(f"Wrong sampling rate: the audio is at {actual} Hz but the row declares {declared} Hz.")
    return {
        "audio": audio["array"],
        "sampling_rate": actual if actual is not None else declared,
        "target_sampling_rate": processor.sampling_rate,
        "max_seconds": processor.max_seconds,
    }


def row_waveform(row: Row, processor: PotsaProcessor) -> torch.Tensor:
    """A row's audio as the model hears it: mono float32 at the processor's rate, checked by `load_waveform`."""
    return load_waveform(**_row_audio(row, processor))


def audio_features(rows: Sequence[Row], processor: PotsaProcessor) -> dict[str, torch.Tensor]:
    """`input_features` padded to the encoder window + `feature_attention_mask`: log-mels (B, n_mels, frames) for
    Whisper, waveforms (B, samples) for wav2vec2-style encoders (see `PotsaProcessor.extract_features`)."""
    return processor.extract_features([row_waveform(row, processor) for row in rows])


# -------------------------------------------------------------------------------------------------------- sources
def _without_audio_decoding(dataset: datasets.Dataset) -> datasets.Dataset:
    """Audio-typed columns are read as raw {bytes, path} (decoding them through `datasets` needs torchcodec)."""
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Audio) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Audio(decode=False))
    return dataset


def from_dataset(dataset: datasets.Dataset | datasets.DatasetDict, split: str | None = None) -> datasets.Dataset:
    """Check a `datasets` dataset (or one split of a `DatasetDict`) for the canonical columns and normalise it.

    Missing `transcript` / `translation` columns become all-None (unlabeled audio still serves the bias estimate and
    the OT loss), with a warning in case the column is only misnamed. Extra columns (speaker, category) are kept.
    """
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"Split {split!r} not found; the dataset has the splits {list(dataset)}.")
        dataset = dataset[split]
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset lacks the column(s) {missing} (it has {dataset.column_names}); potsa rows need "
            f"{list(REQUIRED_COLUMNS + TEXT_COLUMNS)}. Rename yours with `dataset.rename_column(old, new)`."
        )
    for column in TEXT_COLUMNS:
        if column not in dataset.column_names:
            logger.warning("The dataset has no %r column: every row is unlabeled for it.", column)
            dataset = dataset.add_column(column, [None] * len(dataset), feature=datasets.Value("string"))
    if dataset.features["sentence_id"] != datasets.Value("string"):
        dataset = dataset.cast_column("sentence_id", datasets.Value("string"))
    return _without_audio_decoding(dataset)


def load_dataset_source(
    path: str, split: str = "train", config_name: str | None = None, cache_dir: str | None = None
) -> datasets.Dataset:
    """A `save_to_disk` directory (e.g. the offline benchmark corpus) or a Hub dataset id with canonical columns."""
    if os.path.isdir(path):
        return from_dataset(datasets.load_from_disk(path), split)
    return from_dataset(datasets.load_dataset(path, config_name, split=split, cache_dir=cache_dir))


def _text(value: Any) -> str | None:
    """None and "" both mean "no label" (an empty CSV cell, an Arrow null)."""
    return str(value) if value not in (None, "") else None


def _manifest_records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        if path.endswith((".jsonl", ".json")):
            return [json.loads(line) for line in file if line.strip()]
        if path.endswith((".csv", ".tsv")):
            return list(csv.DictReader(file, delimiter="\t" if path.endswith(".tsv") else ","))
    raise ValueError(f"Unknown manifest format {path!r}: use .csv, .tsv or .jsonl.")


MANIFEST_FEATURES = datasets.Features(
    {
        "audio": datasets.Value("string"),
        "language": datasets.Value("string"),
        "sentence_id": datasets.Value("string"),
        "transcript": datasets.Value("string"),
        "translation": datasets.Value("string"),
        "sampling_rate": datasets.Value("int32"),
    }
)


def load_manifest(path: str) -> datasets.Dataset:
    """A manifest (CSV/TSV with a header, or JSONL) of one split: one row per utterance.

    Columns: `audio` (a path relative to the manifest's folder, or absolute), `language`, `sentence_id`, and
    optionally `transcript`, `translation` and `sampling_rate` (the rate the file is declared to have; a file at
    another rate is bad data). Other columns are ignored. Files are not opened here: `validate_examples` does.
    """
    records = _manifest_records(path)
    if not records:
        raise ValueError(f"The manifest {path!r} has no rows.")
    missing = [column for column in REQUIRED_COLUMNS if column not in records[0]]
    if missing:
        raise ValueError(f"The manifest {path!r} lacks the column(s) {missing}; it has {sorted(records[0])}.")
    root = os.path.dirname(os.path.abspath(path))
    rows = [
        {
            "audio": os.path.join(root, str(record["audio"])),  # an absolute path stays as it is
            "language": str(record["language"]),
            "sentence_id": _text(record["sentence_id"]),
            "transcript": _text(record.get("transcript")),
            "translation": _text(record.get("translation")),
            "sampling_rate": int(record["sampling_rate"]) if _text(record.get("sampling_rate")) else None,
        }
        for record in records
    ]
    return datasets.Dataset.from_list(rows, features=MANIFEST_FEATURES)


def _fleurs_split(source: str, config: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    """One FLEURS config/split from a local copy of the parquet layout, or from the Hub's parquet branch."""
    if os.path.isdir(source):
        pattern = os.path.join(source, config, split, "*.parquet")
        if not glob.glob(pattern):
            raise ValueError(
                f"No FLEURS parquet files match {pattern!r}. A local copy must use the Hub's layout "
                "{config}/{split}/*.parquet (as on the refs/convert/parquet branch of google/fleurs)."
            )
    else:
        pattern = f"hf://datasets/{source}@{PARQUET_REVISION}/{config}/{split}/*.parquet"
    dataset = datasets.load_dataset("parquet", data_files=pattern, split="train", cache_dir=cache_dir)
    return _without_audio_decoding(dataset)


def load_fleurs(
    languages: Sequence[str],
    split: str = "train",
    data_files_or_repo: str = FLEURS_REPO,
    target_language: str = "zh",
    configs: Mapping[str, str] | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """FLEURS as canonical rows, with the X -> `target_language` translation joined by sentence id.

    FLEURS is n-way parallel: rows with the same `id` are the same sentence in every language, so the translation
    of an utterance is the `raw_transcription` of the target language's row with its id (None where the target
    language lacks the id in this split: the row stays, unlabeled, for the OT loss). The loading script of
    `google/fleurs` no longer runs (datasets >= 4), so the parquet conversion is read instead.

    Args:
        languages: language codes to load (keys of `FLEURS_CONFIGS`, or of `configs`).
        split: "train", "validation" or "test".
        data_files_or_repo: a Hub dataset id, or a local directory laid out as {config}/{split}/*.parquet.
        target_language: the code whose transcriptions are the translations.
        configs: extra or overriding code -> FLEURS config names, e.g. {"sw": "sw_ke"}.
        cache_dir: `datasets` cache directory for the converted Arrow files.
    """
    table = {**FLEURS_CONFIGS, **(configs or {})}
    unknown = [code for code in (*languages, target_language) if code not in table]
    if unknown:
        raise ValueError(f"No FLEURS config known for {unknown}; pass `configs={{code: 'xx_yy'}}` (e.g. 'sw_ke').")
    target = _fleurs_split(data_files_or_repo, table[target_language], split, cache_dir)
    translations: dict[int, str] = {}
    for sentence_id, text in zip(target["id"], target["raw_transcription"]):
        translations.setdefault(sentence_id, text)  # several speakers read each sentence: same text
    parts = []
    for code in languages:
        part = target if code == target_language else _fleurs_split(data_files_or_repo, table[code], split, cache_dir)
        ids = list(part["id"])
        part = part.select_columns(["audio", "raw_transcription"]).rename_column("raw_transcription", "transcript")
        string = datasets.Value("string")
        part = part.add_column("language", [code] * len(ids), feature=string)
        part = part.add_column("sentence_id", [str(i) for i in ids], feature=string)
        part = part.add_column("translation", [translations.get(i) for i in ids], feature=string)
        unlabeled = sum(i not in translations for i in ids)
        if unlabeled:
            logger.warning("%d %s rows of %s have no %s translation: kept unlabeled.", unlabeled, code, split,
                           target_language)  # fmt: skip
        parts.append(part)
    return from_dataset(datasets.concatenate_datasets(parts))


def select_languages(dataset: datasets.Dataset, languages: Sequence[str]) -> datasets.Dataset:
    """The rows in `languages` (no cache files are written: only an index mapping)."""
    codes = list(dataset["language"])
    absent = sorted(set(languages) - set(codes))
    if absent:
        logger.warning("No rows for the language(s) %s.", absent)
    wanted = set(languages)
    return dataset.select([index for index, code in enumerate(codes) if code in wanted])


def load_source(
    kind: str,
    path: str | None = None,
    split: str = "train",
    languages: Sequence[str] | None = None,
    target_language: str = "zh",
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """One entry point for the training configuration's `data_source`.

    Args:
        kind: "fleurs" (`path`: a Hub id, default google/fleurs, or a local parquet copy), "manifest" (`path`: the
            manifest of this split; a manifest is one split, so `split` is not used), "disk" (`path`: a
            `save_to_disk` directory) or "hub-dataset" (`path`: a Hub dataset id with canonical columns).
        split: the split to read.
        languages: keep only these languages (required for FLEURS, which has one config per language).
        target_language: FLEURS only: the language whose transcriptions are the translations.
        config_name: hub-dataset only: the dataset's config.
        cache_dir: the `datasets` cache directory.
    """
    if kind == "fleurs":
        if not languages:
            raise ValueError("The FLEURS source needs `languages` (one FLEURS config is read per language).")
        return load_fleurs(languages, split, path or FLEURS_REPO, target_language, cache_dir=cache_dir)
    if kind not in DATA_SOURCES:
        raise ValueError(f"Unknown data source {kind!r}; choose one of {DATA_SOURCES}.")
    if path is None:
        raise ValueError(f"The {kind!r} data source needs a path.")
    if kind == "manifest":
        dataset = load_manifest(path)
    elif kind == "disk" and not os.path.isdir(path):
        raise ValueError(f"No dataset directory at {path!r} (expected a `save_to_disk` folder).")
    else:
        dataset = load_dataset_source(path, split, config_name, cache_dir)
    return select_languages(dataset, languages) if languages else dataset


# ----------------------------------------------------------------------------------------------------- validation
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
        checked_waveform(**_row_audio(row, processor))  # the checks of `row_waveform`, without its resampling
    except ValueError as error:
        message = str(error)
        reason = next((reason for reason, text in _AUDIO_PROBLEMS if text in message.lower()), "invalid audio")
        return reason, message
    return None


def group_by_sentence(sentence_ids: Sequence[str]) -> list[list[int]]:
    """Row indices grouped by sentence id (the n-way parallel key), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, sentence_id in enumerate(sentence_ids):
        groups.setdefault(sentence_id, []).append(index)
    return list(groups.values())


def spread_sentences(dataset: datasets.Dataset, max_utterances: int) -> datasets.Dataset:
    """At most `max_utterances` rows, whole sentences at a time (every language of a sentence), the sentences
    evenly spaced over the split: a truncated set keeps its parallel utterances, so it still has OT pairs and
    Recall@1 groups, and it samples a split sorted by language, category or length (FLEURS' and the offline
    corpus' are) across its whole range instead of taking its head."""
    if len(dataset) <= max_utterances:
        return dataset
    groups = group_by_sentence([str(sentence_id) for sentence_id in dataset["sentence_id"]])
    wanted = max(int(max_utterances * len(groups) / len(dataset)), 1)  # sentences that fit, at the average size
    kept: list[int] = []
    for group in (groups[int(i * len(groups) / wanted)] for i in range(wanted)):
        if len(kept) + len(group) <= max_utterances:
            kept.extend(group)
    return dataset.select(sorted(kept))


def first_per_language(dataset: datasets.Dataset, max_per_language: int) -> datasets.Dataset:
    """The first `max_per_language` rows of each language, in dataset order."""
    return dataset.select(_under_cap(dataset["language"], sorted(set(dataset["language"])), max_per_language, Counter()))


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
    for index, row in enumerate(_progress(iter_rows(dataset), "Checking audio", total=len(dataset))):
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


# -------------------------------------------------------------------------------------------------------- sampler
def _interleave(group: list[int], languages: Sequence[str], rng: np.random.Generator) -> list[int]:
    """A sentence's utterances in a random round-robin over their languages: any two consecutive ones differ in
    language while possible, so a prefix of two or more (a chunk cut off at a batch boundary) holds a pair."""
    by_language: dict[str, list[int]] = {}
    for index in rng.permutation(group).tolist():
        by_language.setdefault(languages[index], []).append(index)
    queues = list(by_language.values())
    return [queue[turn] for turn in range(max(map(len, queues))) for queue in queues if turn < len(queue)]


def _pack(units: list[list[int]], batch_size: int, lookahead: int) -> list[list[int]]:
    """Fill batches in order with whole units; when the next unit does not fit the free space, take the first of the
    next `lookahead` units that does; when none does, split the next unit at the free space. Every batch but the
    last is full, which makes the number of batches exact."""
    queue, batches, batch = deque(units), [], []
    while queue:
        space = batch_size - len(batch)
        fitting = next((k for k, unit in enumerate(islice(queue, lookahead)) if len(unit) <= space), None)
        if fitting is None:
            unit = queue.popleft()
            batch += unit[:space]
            queue.appendleft(unit[space:])
        else:
            batch += queue[fitting]
            del queue[fitting]
        if len(batch) == batch_size:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches


class ParallelBatchSampler(Sampler[list[int]]):
    """Batches of row indices in which the utterances of a sentence (in different languages) travel together.

    Each epoch covers every row exactly once. With probability `pair_ratio` a sentence's utterances form one unit
    that is placed in a single batch (a unit larger than the space left is cut into chunks whose first two
    utterances differ in language, so every chunk of two or more holds an OT pair); otherwise they are scattered as
    single utterances. Rows without a translation are ordinary members: their labels are all -100, but they
    join the OT pairs (zero-shot languages). Same (seed, epoch) -> same batches; `set_epoch` is called by the
    Trainer / accelerate at each epoch.

    Under DDP, accelerate wraps this sampler in `BatchSamplerShard`, which hands each process whole batches (batch
    i goes to process i % world_size), so pairs never straddle processes; every process builds the same batches
    because the order depends only on (seed, epoch). `DataLoaderShard.set_epoch` does not reach a sampler inside a
    `BatchSamplerShard`; transformers' Trainer calls ours explicitly, a custom loop must do the same.

    Args:
        sentence_ids: per row, its sentence id.
        languages: per row, its language.
        batch_size: utterances per batch.
        pair_ratio: probability that a sentence's utterances are kept together in an epoch.
        seed: base seed; the epoch is mixed in.
        drop_last: drop the last, smaller batch.
        lookahead: how many later units to search for one that fills the free space of a batch.
    """

    def __init__(
        self,
        sentence_ids: Sequence[str],
        languages: Sequence[str],
        batch_size: int,
        pair_ratio: float = 1.0,
        seed: int = 0,
        drop_last: bool = False,
        lookahead: int = 64,
    ) -> None:
        if len(sentence_ids) != len(languages):
            raise ValueError(f"Got {len(sentence_ids)} sentence ids but {len(languages)} languages; give one each.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0.0 <= pair_ratio <= 1.0:
            raise ValueError(f"pair_ratio is a probability in [0, 1], got {pair_ratio}.")
        self.languages = list(languages)
        self.groups = group_by_sentence(list(sentence_ids))
        self.batch_size = batch_size
        self.pair_ratio = pair_ratio
        self.seed = seed
        self.drop_last = drop_last
        self.lookahead = lookahead
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        num_rows = len(self.languages)
        return num_rows // self.batch_size if self.drop_last else math.ceil(num_rows / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        units: list[list[int]] = []
        for group in self.groups:
            multilingual = len({self.languages[index] for index in group}) > 1
            if multilingual and rng.random() < self.pair_ratio:
                units.append(_interleave(group, self.languages, rng))
            else:
                units.extend([index] for index in group)
        units = [units[k] for k in rng.permutation(len(units))]
        batches = _pack(units, self.batch_size, self.lookahead)
        yield from batches[: len(self)]


# ------------------------------------------------------------------------------------------------------- collator
def stage_targets(rows: Sequence[Row], task: str) -> tuple[list[str | None], list[str | None]]:
    """Per row, the (text, transcript) that `PotsaProcessor.tokenize` needs for `task`; None = unlabeled row.

    "translate" (stages 2-3) learns the translation; "transcribe" (stage 1, ASR) the transcript; "chain" (the
    paper's transcript-then-translation target) needs both, so a row missing either is unlabeled.
    """
    translations = [_text(row["translation"]) for row in rows]
    transcripts = [_text(row["transcript"]) for row in rows]
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


# -------------------------------------------------------------------------------------------------- encoder runs
@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run a frozen module deterministically (no dropout / layer drop), then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _encoder_frames(
    model: PotsaForSpeechTranslation, inputs: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, d) frames and their (B, T) bool mask: cached outputs as they are, else the frozen encoder's."""
    if "encoder_hidden_states" in inputs:
        return inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]
    encoder = model.speech_encoder
    features = inputs["input_features"].to(encoder.device, encoder.dtype)
    with _eval_mode(encoder):
        return model.encode_speech(features, inputs["feature_attention_mask"].to(encoder.device))


def _under_cap(codes: Sequence[str], wanted: Sequence[str], cap: int | None, counts: Counter[str]) -> list[int]:
    """Positions of `codes` in `wanted` languages while each has fewer than `cap` utterances (updates `counts`)."""
    keep = []
    for position, code in enumerate(codes):
        if code in wanted and (cap is None or counts[code] < cap):
            counts[code] += 1
            keep.append(position)
    return keep


def _dataset_batches(
    dataset: datasets.Dataset,
    processor: PotsaProcessor,
    indices: Sequence[int],
    batch_size: int,
    encoder_cache: EncoderCache | None,
) -> Iterator[dict[str, Any]]:
    """Encoder inputs (features, or cached frames) of `indices`, batch by batch, with each row's language."""
    for start in range(0, len(indices), batch_size):
        rows = _rows(dataset, indices[start : start + batch_size])
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
        selected = _under_cap(list(dataset_or_loader["language"]), languages, cap, Counter())
        rank, world_size = _rank_and_world_size()
        selected = selected[rank::world_size]
        batches: Iterable = _dataset_batches(dataset_or_loader, processor, selected, batch_size, encoder_cache)
        total, cap = math.ceil(len(selected) / batch_size), None  # the rows are already selected
    else:
        total = None
        batches = dataset_or_loader
    counts: Counter[str] = Counter()
    for batch in _progress(batches, "Estimating language bias", total):
        keep = _under_cap(batch["languages"], languages, cap, counts)
        if not keep:
            continue
        frames, frame_mask = _encoder_frames(model, batch)
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


# ---------------------------------------------------------------------------------------------------------- cache
CACHE_FORMAT = 1
CACHE_METADATA = "metadata.json"
KEY_COLUMN = "utterance_key"
# Config entries that name or describe a checkpoint without changing what the encoder computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")
# Those of them the feature extractor has: Whisper's log-mel settings, or wav2vec2's waveform normalisation.
_FEATURE_SETTINGS = ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "do_normalize")


def encoder_fingerprint(model: PotsaForSpeechTranslation, processor: PotsaProcessor) -> dict[str, Any]:
    """What determines the cached frames: the encoder config, a SHA-256 of its first, middle and last weight
    tensors (enough to tell checkpoints apart without hashing a 600M-parameter encoder) and the feature settings."""
    encoder = model.speech_encoder
    config = json.loads(encoder.config.to_json_string(use_diff=False))
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    parameters = list(encoder.named_parameters())
    digest = hashlib.sha256()
    for name, parameter in (parameters[0], parameters[len(parameters) // 2], parameters[-1]):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    extractor = processor.feature_extractor
    features = {name: getattr(extractor, name) for name in _FEATURE_SETTINGS if hasattr(extractor, name)}
    return {"encoder_config": config, "weights_sha256": digest.hexdigest(), "features": features}


def utterance_key(row: Row) -> str:
    """A stable key of one utterance: SHA-1 of its language, sentence id and audio content (the bytes, the
    samples, or a file's path, size and modification time). Unlike a row index it survives filtering, shuffling,
    dropped rows and reloading, and a re-recorded file gets a new key. A row of `EncoderCache.keyed_dataset`
    carries its key in the `utterance_key` column instead of its audio."""
    if row.get(KEY_COLUMN):
        return row[KEY_COLUMN]
    audio = row["audio"]
    digest = hashlib.sha1(f"{row['language']}\0{row['sentence_id']}\0".encode())
    path = audio if isinstance(audio, (str, os.PathLike)) else None
    if isinstance(audio, Mapping) and audio.get("array") is not None:
        digest.update(np.ascontiguousarray(_samples(audio["array"])).tobytes())
        digest.update(str(audio.get("sampling_rate")).encode())
    elif isinstance(audio, Mapping) and audio.get("bytes") is not None:
        digest.update(audio["bytes"])
    elif isinstance(audio, Mapping):
        path = audio.get("path")
    if path is not None:
        stat = os.stat(path) if os.path.exists(path) else None
        digest.update(f"{os.fspath(path)}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _check_finite(frames: torch.Tensor, what: str) -> None:
    if not torch.isfinite(frames).all():
        raise ValueError(
            f"{what} contains NaN or infinite values (an encoder run in float16 can overflow: run it in float32 or "
            "bfloat16) and cannot be trained on; rebuild the cache after fixing it."
        )


def _row_label(row: Row) -> str:
    return f"sentence_id {row['sentence_id']!r}, language {row['language']!r}"


class EncoderCache:
    """Frozen-encoder outputs stored once, read by `PotsaCollator` and `estimate_language_bias` instead of
    running the encoder.

    Layout of `cache_dir`:
        metadata.json             {"format": 1, "fingerprint": encoder_fingerprint(...), "hidden_size": d,
                                   "shards": ["shard-00000.safetensors", ...]}
        shard-NNNNN.safetensors   one float16 tensor (n_valid_frames, d) per utterance, named by `utterance_key`

    Only an utterance's valid frames are stored (the padding of the encoder window is dropped; it is masked out of
    the Q-Former anyway), so the cache is about (clip length / window) of the full outputs and a batch is padded
    to its own longest utterance. Shards are memory-mapped and read lazily. Opening with a `fingerprint` refuses a
    cache built for another encoder or other features.
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: Mapping[str, Any] | None = None) -> None:
        self.cache_dir = os.fspath(cache_dir)
        metadata_path = os.path.join(self.cache_dir, CACHE_METADATA)
        if not os.path.isfile(metadata_path):
            raise ValueError(f"No encoder cache in {self.cache_dir!r} (no {CACHE_METADATA}); build it with "
                             "`cache_encoder_outputs`.")  # fmt: skip
        with open(metadata_path, encoding="utf-8") as file:
            metadata = json.load(file)
        if metadata.get("format") != CACHE_FORMAT:
            raise ValueError(f"The encoder cache in {self.cache_dir!r} has format {metadata.get('format')}, this "
                             f"code reads format {CACHE_FORMAT}: delete it and build it again.")  # fmt: skip
        fingerprint = None if fingerprint is None else json.loads(json.dumps(fingerprint))  # tuples -> lists
        if fingerprint is not None and metadata["fingerprint"] != fingerprint:
            differing = sorted(key for key in fingerprint if metadata["fingerprint"].get(key) != fingerprint[key])
            raise ValueError(
                f"The encoder cache in {self.cache_dir!r} was built for another encoder or other features (differs "
                f"in {differing}); delete it or choose another cache_dir."
            )
        self.fingerprint = metadata["fingerprint"]
        self.hidden_size = int(metadata["hidden_size"])
        self.shards = list(metadata["shards"])
        self._shard_of: dict[str, str] = {}
        for shard in self.shards:
            with safe_open(os.path.join(self.cache_dir, shard), framework="pt") as handle:
                self._shard_of.update(dict.fromkeys(handle.keys(), shard))
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        """DataLoader workers get a copy without open file handles; they reopen lazily."""
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def keyed_dataset(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """`dataset` with an `utterance_key` column instead of `audio`, for training from the cache: a batch then
        costs a frame lookup only (no audio is read from the rows to find their keys), and DataLoader workers
        receive small rows. Every utterance must already be cached."""
        keys = [utterance_key(row) for row in iter_rows(dataset)]
        missing = sum(key not in self for key in keys)
        if missing:
            raise ValueError(f"{missing} of {len(keys)} utterances are not in the encoder cache {self.cache_dir!r}; "
                             "run `cache_encoder_outputs` on this dataset first.")  # fmt: skip
        return dataset.remove_columns("audio").add_column(KEY_COLUMN, keys, feature=datasets.Value("string"))

    def frames(self, row: Row) -> torch.Tensor:
        """(n_valid_frames, d) float16 encoder output of one canonical row."""
        key = utterance_key(row)
        shard = self._shard_of.get(key)
        if shard is None:
            raise ValueError(f"The utterance ({_row_label(row)}) is not in the encoder cache {self.cache_dir!r}; run "
                             "`cache_encoder_outputs` on this dataset (it only adds what is missing).")  # fmt: skip
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.cache_dir, shard), framework="pt")
        frames = self._handles[shard].get_tensor(key)
        _check_finite(frames, f"The cached encoder output of {_row_label(row)}")
        return frames

    def batch(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """`encoder_hidden_states` (B, T, d) float32, zero-padded to the longest row, + `encoder_attention_mask`."""
        frames = [self.frames(row) for row in rows]
        lengths = torch.tensor([len(row_frames) for row_frames in frames])
        hidden_states = pad_sequence(frames, batch_first=True).float()  # (B, T, d)
        mask = torch.arange(hidden_states.shape[1]) < lengths.unsqueeze(1)  # (B, T)
        return {"encoder_hidden_states": hidden_states, "encoder_attention_mask": mask}


def _write_metadata(cache_dir: str, fingerprint: Mapping[str, Any], hidden_size: int, shards: list[str]) -> None:
    """Atomically: a crash while writing never leaves a half-written index of the shards."""
    metadata = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "hidden_size": hidden_size, "shards": shards}
    temporary = os.path.join(cache_dir, CACHE_METADATA + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(metadata, file, indent=1)
    os.replace(temporary, os.path.join(cache_dir, CACHE_METADATA))


@torch.no_grad()
def cache_encoder_outputs(
    model: PotsaForSpeechTranslation,
    dataset: datasets.Dataset,
    processor: PotsaProcessor,
    cache_dir: str | os.PathLike,
    batch_size: int = 16,
    shard_size: int = 1024,
) -> EncoderCache:
    """Run the frozen encoder once over `dataset` and store each utterance's valid frames (see `EncoderCache`).

    An existing cache in `cache_dir` is reused: only utterances it lacks are encoded, in new shards, so the same
    directory serves several splits and later runs. A cache for another encoder (fingerprint mismatch) is refused.
    The metadata is rewritten after every shard, so an interrupted build keeps what it finished. Under DDP, build
    on one process (`accelerator.main_process_first()`), then open it everywhere.

    Raises:
        ValueError: an encoder output with NaN/inf (named by row), or a stale cache.
    """
    cache_dir = os.fspath(cache_dir)
    fingerprint = encoder_fingerprint(model, processor)
    hidden_size = model.config.encoder_hidden_size
    os.makedirs(cache_dir, exist_ok=True)
    if not os.path.isfile(os.path.join(cache_dir, CACHE_METADATA)):
        _write_metadata(cache_dir, fingerprint, hidden_size, [])
    existing = EncoderCache(cache_dir, fingerprint)
    shards = existing.shards
    todo = {key: index for index, key in enumerate(map(utterance_key, iter_rows(dataset))) if key not in existing}
    keys, indices = list(todo), list(todo.values())
    pending: dict[str, torch.Tensor] = {}
    starts = range(0, len(indices), batch_size)
    for start in _progress(starts, "Caching encoder outputs"):
        rows = _rows(dataset, indices[start : start + batch_size])
        frames, frame_mask = _encoder_frames(model, audio_features(rows, processor))
        for key, row, row_frames, row_mask in zip(keys[start:], rows, frames, frame_mask):
            valid = row_frames[row_mask].to("cpu", torch.float16).contiguous()  # (n_valid, d)
            _check_finite(valid, f"The encoder output of {_row_label(row)}")
            pending[key] = valid
        if len(pending) >= shard_size or start + batch_size >= len(indices):
            shards.append(f"shard-{len(shards):05d}.safetensors")
            save_file(pending, os.path.join(cache_dir, shards[-1]))
            _write_metadata(cache_dir, fingerprint, hidden_size, shards)
            pending = {}
    return EncoderCache(cache_dir, fingerprint)


__all__ = [
    "DATA_SOURCES",
    "FLEURS_CONFIGS",
    "apply_language_bias",
    "audio_features",
    "audio_input",
    "cache_encoder_outputs",
    "DataReport",
    "encoder_fingerprint",
    "EncoderCache",
    "estimate_language_bias",
    "first_per_language",
    "spread_sentences",
    "from_dataset",
    "group_by_sentence",
    "LanguageBiasEstimate",
    "load_dataset_source",
    "load_fleurs",
    "load_manifest",
    "load_source",
    "ParallelBatchSampler",
    "PotsaCollator",
    "row_problem",
    "row_waveform",
    "select_languages",
    "stage_targets",
    "utterance_key",
    "validate_examples",
]
