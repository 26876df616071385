"""Where rows come from: FLEURS (parquet), a manifest folder, a `save_to_disk` folder or a Hub dataset, each turned
into canonical rows (`rows.py`), and the subsets of a split a run asks for (languages, a truncated set, the first
utterances of each language).

FLEURS' loading script no longer runs (datasets >= 4), so its parquet conversion is read; audio columns are kept
encoded ({bytes, path}) because decoding them through `datasets` needs torchcodec.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from .rows import REQUIRED_COLUMNS, TEXT_COLUMNS, group_by_sentence, label_text, positions_under_cap

logger = logging.getLogger(__name__)

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
            "sentence_id": label_text(record["sentence_id"]),
            "transcript": label_text(record.get("transcript")),
            "translation": label_text(record.get("translation")),
            "sampling_rate": int(record["sampling_rate"]) if label_text(record.get("sampling_rate")) else None,
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
    return dataset.select(positions_under_cap(dataset["language"], sorted(set(dataset["language"])), max_per_language))


__all__ = [
    "DATA_SOURCES",
    "FLEURS_CONFIGS",
    "first_per_language",
    "from_dataset",
    "load_dataset_source",
    "load_fleurs",
    "load_manifest",
    "load_source",
    "select_languages",
    "spread_sentences",
]
