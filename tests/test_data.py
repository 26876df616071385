"""training/data.py: every source kind, bad data in both modes, the parallel batch sampler, the collator per task,
the language-bias estimate and the encoder-output cache (including cached-vs-features loss equality)."""

from __future__ import annotations

import copy
import io
import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from benchmarks.corpus import FEATURES as CORPUS_FEATURES
from modeling_potsa.bias_compensation import masked_time_mean
from modeling_potsa.processing_potsa import IGNORE_INDEX
from potsa_training.bias_estimation import apply_language_bias, estimate_language_bias
from potsa_training.collator import PotsaCollator
from potsa_training.encoder_cache import EncoderCache, cache_encoder_outputs, utterance_key
from potsa_training.rows import row_waveform
from potsa_training.sampler import ParallelBatchSampler
from potsa_training.sources import (
    first_per_language,
    from_dataset,
    load_fleurs,
    load_manifest,
    load_source,
    spread_sentences,
)
from potsa_training.tiny import build_tiny_potsa
from potsa_training.validation import validate_examples

from .conftest import SAMPLING_RATE, synthetic_audio


def _array_row(sentence_id="s0", language="es", seconds=1.0, seed=0, transcript="uno", translation="一", **extra):
    """A canonical row whose audio is a float array dict (what an in-memory dataset usually holds)."""
    audio = {"array": synthetic_audio(seconds, seed), "sampling_rate": SAMPLING_RATE}
    row = {"audio": audio, "language": language, "sentence_id": sentence_id, "transcript": transcript}
    return {**row, "translation": translation, **extra}


def _parallel_rows(num_sentences=3, languages=("es", "ja")):
    return [
        _array_row(f"s{s}", code, seconds=0.6 + 0.5 * s + 0.2 * k, seed=10 * s + k, translation=f"{s}月")
        for s in range(num_sentences)
        for k, code in enumerate(languages)
    ]


def _wav_bytes(samples: np.ndarray, rate: int = SAMPLING_RATE) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


def _without_lists(batch: dict) -> dict:
    """What the trainer passes to the model: the pair bookkeeping lists popped."""
    return {key: value for key, value in batch.items() if key not in ("sentence_ids", "languages")}


# ------------------------------------------------------------------------------------------------------- sources
FLEURS_FEATURES = datasets.Features(
    {
        "id": datasets.Value("int32"),
        "num_samples": datasets.Value("int32"),
        "path": datasets.Value("string"),
        "audio": datasets.Audio(sampling_rate=16_000),
        "transcription": datasets.Value("string"),
        "raw_transcription": datasets.Value("string"),
        "gender": datasets.ClassLabel(names=["male", "female", "other"]),
        "lang_id": datasets.ClassLabel(num_classes=102),
        "language": datasets.Value("string"),
        "lang_group_id": datasets.ClassLabel(num_classes=7),
    }
)


def _write_fleurs_config(root, config: str, language: str, rows: list[tuple[int, str]], seed: int) -> None:
    """{root}/{config}/train/0000.parquet with FLEURS' schema and Hub metadata (an Audio-typed column)."""
    records = []
    for k, (sentence_id, text) in enumerate(rows):
        samples = synthetic_audio(0.5 + 0.1 * k, seed=seed + k)
        name = f"{seed + k}.wav"
        records.append({
            "id": sentence_id, "num_samples": len(samples), "path": name,
            "audio": {"bytes": _wav_bytes(samples), "path": name}, "transcription": text.lower(),
            "raw_transcription": text, "gender": k % 2, "lang_id": 0, "language": language, "lang_group_id": 0,
        })  # fmt: skip
    os.makedirs(root / config / "train")
    table = pa.Table.from_pylist(records, schema=FLEURS_FEATURES.arrow_schema)
    pq.write_table(table, root / config / "train" / "0000.parquet")


@pytest.fixture(scope="module")
def fleurs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleurs")
    _write_fleurs_config(root, "es_419", "Spanish", [(1, "Uno."), (2, "Dos."), (1, "Uno."), (3, "Tres.")], seed=0)
    _write_fleurs_config(root, "ja_jp", "Japanese", [(2, "ni"), (1, "ichi")], seed=10)
    _write_fleurs_config(root, "cmn_hans_cn", "Mandarin Chinese", [(1, "一。"), (2, "二。"), (2, "二。")], seed=20)
    return root


def test_fleurs_parquet_joins_the_chinese_translation_by_id(fleurs_dir, tiny_processor, tmp_path):
    dataset = load_fleurs(["es", "ja"], "train", str(fleurs_dir), cache_dir=str(tmp_path))
    assert dataset.column_names[:5] == ["audio", "transcript", "language", "sentence_id", "translation"]
    assert list(dataset["language"]) == ["es"] * 4 + ["ja"] * 2
    assert list(dataset["sentence_id"]) == ["1", "2", "1", "3", "2", "1"]
    assert list(dataset["translation"]) == ["一。", "二。", "一。", None, "二。", "一。"]
    assert dataset[0]["transcript"] == "Uno."
    assert row_waveform(dataset[1], tiny_processor).shape == (int(0.6 * SAMPLING_RATE),)
    same = load_source("fleurs", str(fleurs_dir), languages=["ja", "zh"], cache_dir=str(tmp_path))
    assert list(same["language"]) == ["ja", "ja", "zh", "zh", "zh"]
    assert same[2]["translation"] == same[2]["transcript"] == "一。"


def test_fleurs_errors_name_the_missing_piece(fleurs_dir, tmp_path):
    with pytest.raises(ValueError, match="No FLEURS config known for \\['xx'\\]"):
        load_fleurs(["xx"], "train", str(fleurs_dir))
    with pytest.raises(ValueError, match="cmn_hans_cn/test/\\*.parquet"):
        load_fleurs(["es"], "test", str(fleurs_dir), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs `languages`"):
        load_source("fleurs", str(fleurs_dir))


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_manifest_with_wav_and_flac_files(tmp_path, suffix, tiny_processor):
    os.makedirs(tmp_path / "clips")
    soundfile.write(tmp_path / "clips" / "a.wav", synthetic_audio(0.5, 1), SAMPLING_RATE)
    soundfile.write(tmp_path / "clips" / "b.flac", synthetic_audio(0.7, 2, 22_050), 22_050)
    records = [
        {"audio": "clips/a.wav", "language": "es", "sentence_id": "007", "transcript": "siete", "translation": "七"},
        {"audio": "clips/b.flac", "language": "ja", "sentence_id": "007", "transcript": "", "translation": "",
         "sampling_rate": 22050},
    ]  # fmt: skip
    path = tmp_path / f"manifest.{suffix}"
    if suffix == "csv":
        header = ["audio", "language", "sentence_id", "transcript", "translation", "sampling_rate"]
        lines = [",".join(header)] + [",".join(str(r.get(c, "")) for c in header) for r in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    dataset = load_source("manifest", str(path))
    assert dataset[0]["audio"] == str(tmp_path / "clips" / "a.wav")
    assert list(dataset["sentence_id"]) == ["007", "007"]
    assert dataset[1]["translation"] is None and dataset[1]["transcript"] is None
    assert list(dataset["sampling_rate"]) == [None, 22050]
    assert abs(len(row_waveform(dataset[1], tiny_processor)) - 0.7 * SAMPLING_RATE) <= 1  # resampled
    checked, report = validate_examples(dataset, None, tiny_processor)
    assert len(checked) == 2 and report.single_language_sentences == 0


def test_manifest_missing_column(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("audio,language\nclip.wav,es\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks the column\\(s\\) \\['sentence_id'\\]"):
        load_manifest(str(path))


def test_in_memory_dataset_is_checked_and_normalised():
    rows = [{"audio": f"{code}.wav", "language": code, "sentence_id": 7} for code in ("es", "ja")]
    dataset = from_dataset(datasets.Dataset.from_list(rows))
    assert list(dataset["sentence_id"]) == ["7", "7"]
    assert list(dataset["translation"]) == [None, None] and list(dataset["transcript"]) == [None, None]
    with pytest.raises(ValueError, match="lacks the column\\(s\\) \\['sentence_id'\\]"):
        from_dataset(datasets.Dataset.from_list([{"audio": "a.wav", "language": "es"}]))
    with pytest.raises(ValueError, match="Split 'dev' not found"):
        from_dataset(datasets.DatasetDict({"train": dataset}), "dev")


def test_corpus_saved_to_disk_loads_like_any_source(tmp_path, tiny_processor, monkeypatch):
    """The offline benchmark corpus' schema: int16 PCM lists at 22,050 Hz in a DatasetDict on disk."""

    def split_rows(seed):
        def pcm(k):
            return (synthetic_audio(0.5, seed + k, 22_050) * 32767).astype(np.int16)

        return [
            {"audio": {"array": pcm(k), "sampling_rate": 22_050}, "language": code, "sentence_id": f"n{seed}",
             "transcript": "x", "translation": "三", "speaker": "m1", "category": "number"}
            for k, code in enumerate(["es", "ja", "ru"])
        ]  # fmt: skip

    corpus = datasets.DatasetDict(
        {split: datasets.Dataset.from_list(split_rows(seed), features=CORPUS_FEATURES)
         for seed, split in enumerate(["train", "validation", "test"])}
    )  # fmt: skip
    corpus.save_to_disk(str(tmp_path / "corpus"))
    dataset = load_source("disk", str(tmp_path / "corpus"), split="validation", languages=["es", "ja"])
    assert list(dataset["language"]) == ["es", "ja"] and "category" in dataset.column_names
    waveform = row_waveform(dataset[0], tiny_processor)
    expected = torch.from_numpy(synthetic_audio(0.5, 1, 22_050))
    assert waveform.shape == (8000,) and abs(waveform.abs().max() - expected.abs().max()) < 0.05
    monkeypatch.setattr("modeling_potsa.audio.resample", None)  # checking 22.05 kHz rows must not resample them
    checked, report = validate_examples(dataset, None, tiny_processor)
    assert report.num_kept == 2 and report.dropped == {}
    with pytest.raises(ValueError, match="No dataset directory"):
        load_source("disk", str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------------ bad data
def _file_audio(path) -> dict:
    return {"array": None, "sampling_rate": None, "bytes": None, "path": str(path)}


def _bad_row_cases(tmp_path) -> dict[str, dict]:
    (tmp_path / "garbage.wav").write_bytes(b"not a wav file at all")
    nan = synthetic_audio(0.5)
    nan[100] = np.nan
    return {
        "missing file": {"audio": _file_audio(tmp_path / "missing.wav")},
        "unreadable audio": {"audio": _file_audio(tmp_path / "garbage.wav")},
        "empty audio": {"audio": {"array": np.zeros(0, np.float32), "sampling_rate": SAMPLING_RATE}},
        "wrong sampling rate": {"audio": {"array": synthetic_audio(0.5), "sampling_rate": 100}},
        "declared rate": {"sampling_rate": 8000},
        "non-finite samples": {"audio": {"array": nan, "sampling_rate": SAMPLING_RATE}},
        "silent audio": {"audio": {"array": np.zeros(8000, np.float32), "sampling_rate": SAMPLING_RATE}},
        "too long": {"audio": {"array": synthetic_audio(4.5), "sampling_rate": SAMPLING_RATE}},
        "unknown language": {"language": "xx"},
        "missing sentence id": {"sentence_id": None},
    }


BAD_CASES = ["missing file", "unreadable audio", "empty audio", "wrong sampling rate", "declared rate",
             "non-finite samples", "silent audio", "too long", "unknown language", "missing sentence id"]  # fmt: skip


def _with_bad_row(tmp_path, case: str) -> datasets.Dataset:
    good = {**_array_row("good"), "sampling_rate": None}
    good["audio"] = {**good["audio"], "bytes": None, "path": None}
    bad = {**good, "sentence_id": "bad", **_bad_row_cases(tmp_path)[case]}
    bad["audio"] = {"array": None, "sampling_rate": None, "bytes": None, "path": None, **bad["audio"]}
    return datasets.Dataset.from_list([good, bad])


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_raises_naming_row_and_problem(tmp_path, tiny_processor, case):
    reason = "wrong sampling rate" if case == "declared rate" else case
    with pytest.raises(ValueError, match=f"Bad row 1 \\(sentence_id .*, language .*\\): {reason}: ") as error:
        validate_examples(_with_bad_row(tmp_path, case), None, tiny_processor)
    assert "on_bad_data='skip'" in str(error.value)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_is_skipped_and_counted(tmp_path, tiny_processor, case, caplog):
    reason = "wrong sampling rate" if case == "declared rate" else case
    dataset, report = validate_examples(_with_bad_row(tmp_path, case), None, tiny_processor, on_bad_data="skip")
    assert list(dataset["sentence_id"]) == ["good"]
    assert report.dropped == {reason: 1} and report.num_rows == 2 and report.num_kept == 1
    assert f"Dropped 1 of 2 rows: {{'{reason}': 1}}" in caplog.text


def test_single_language_sentences_are_counted_not_dropped(tiny_processor):
    rows = [_array_row("a", "es"), _array_row("a", "ja", seed=1), _array_row("b", "es", seed=2),
            _array_row("b", "es", seed=3)]  # fmt: skip
    dataset, report = validate_examples(datasets.Dataset.from_list(rows), ["es", "ja"], tiny_processor)
    assert len(dataset) == 4 and report.single_language_sentences == 1
    with pytest.raises(ValueError, match="on_bad_data must be"):
        validate_examples(dataset, None, tiny_processor, on_bad_data="ignore")


# ------------------------------------------------------------------------------------------------------- sampler
def _corpus_keys(num_sentences: int, languages: list[str], missing_every: int = 0):
    """(sentence_ids, languages) of an n-way corpus; with missing_every, some utterances are absent."""
    keys = [(f"s{s}", code) for s in range(num_sentences) for k, code in enumerate(languages)
            if not (missing_every and (s + k) % missing_every == 0)]  # fmt: skip
    return [s for s, _ in keys], [code for _, code in keys]


@pytest.mark.parametrize("pair_ratio, drop_last", [(1.0, False), (0.5, False), (0.0, True)])
def test_sampler_covers_every_row_once_with_exact_length(pair_ratio, drop_last):
    sentence_ids, languages = _corpus_keys(30, ["es", "ja", "ru", "ko"], missing_every=3)
    sampler = ParallelBatchSampler(sentence_ids, languages, 7, pair_ratio=pair_ratio, drop_last=drop_last)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len(batch) == 7 for batch in batches[:-1])
        seen = sorted(index for batch in batches for index in batch)
        if drop_last:
            assert len(seen) == len(sampler) * 7 and len(set(seen)) == len(seen)
        else:
            assert seen == list(range(len(languages)))


def _sentences_together(batches, sentence_ids) -> float:
    """Fraction of sentences whose utterances all sit in one batch."""
    batch_of = {index: b for b, batch in enumerate(batches) for index in batch}
    groups: dict[str, set[int]] = {}
    for index, sentence_id in enumerate(sentence_ids):
        groups.setdefault(sentence_id, set()).add(batch_of[index])
    return sum(len(found) == 1 for found in groups.values()) / len(groups)


def test_sampler_keeps_pairs_together_or_scatters_them():
    sentence_ids, languages = _corpus_keys(40, ["es", "ja", "ru", "ko"])
    together = list(ParallelBatchSampler(sentence_ids, languages, 8, pair_ratio=1.0))
    assert _sentences_together(together, sentence_ids) == 1.0
    scattered = list(ParallelBatchSampler(sentence_ids, languages, 8, pair_ratio=0.0))
    assert _sentences_together(scattered, sentence_ids) < 0.1


def test_sampler_splits_large_groups_into_multilingual_chunks():
    sentence_ids, languages = _corpus_keys(10, ["es", "ja", "ru", "ko", "de", "fr"])
    for batch in ParallelBatchSampler(sentence_ids, languages, 4, pair_ratio=1.0, seed=3):
        members: dict[str, list[str]] = {}
        for index in batch:
            members.setdefault(sentence_ids[index], []).append(languages[index])
        assert all(len(codes) >= 2 and len(set(codes)) == len(codes) for codes in members.values())


def test_sampler_is_deterministic_per_seed_and_epoch():
    sentence_ids, languages = _corpus_keys(20, ["es", "ja", "ru"])
    first = ParallelBatchSampler(sentence_ids, languages, 5, pair_ratio=0.5, seed=1)
    second = ParallelBatchSampler(sentence_ids, languages, 5, pair_ratio=0.5, seed=1)
    assert list(first) == list(second)
    second.set_epoch(1)
    assert list(first) != list(second)
    first.set_epoch(1)
    assert list(first) == list(second)
    assert list(ParallelBatchSampler(sentence_ids, languages, 5, pair_ratio=0.5, seed=2)) != list(second)
    with pytest.raises(ValueError, match="one each"):
        ParallelBatchSampler(sentence_ids, languages[:-1], 5)


def test_sampler_under_accelerate_sharding_gives_whole_batches():
    sentence_ids, languages = _corpus_keys(12, ["es", "ja", "ru"])
    sampler = ParallelBatchSampler(sentence_ids, languages, 6, pair_ratio=1.0)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in range(2)]
    assert [batch for pair in zip(*shards) for batch in pair] == list(sampler)


# ------------------------------------------------------------------------------------------------------ collator
def _label_text(processor, labels: torch.Tensor) -> str:
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_collator_translate_features_and_unlabeled_rows(tiny_processor):
    rows = [_array_row("s1", "es", 1.0, translation="三月"), _array_row("s1", "ja", 2.0, 1, translation=None),
            _array_row("s2", "ru", 0.5, 2, translation="")]  # fmt: skip
    batch = PotsaCollator(tiny_processor)(rows)
    assert batch["input_features"].shape == (3, 40, 200)
    assert batch["feature_attention_mask"].shape == (3, 200)
    assert batch["feature_attention_mask"].sum(dim=1).tolist() == [50, 100, 25]
    assert batch["language_ids"].tolist() == [tiny_processor.language_id(c) for c in ("es", "ja", "ru")]
    assert batch["sentence_ids"] == ["s1", "s1", "s2"] and batch["languages"] == ["es", "ja", "ru"]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert _label_text(tiny_processor, batch["labels"][0]) == "三月<|endoftext|>"
    assert (batch["labels"][1:] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "task, expected",
    [("transcribe", ["uno<|endoftext|>", "dos<|endoftext|>", None]),
     ("chain", ["uno\n一<|endoftext|>", None, None])],
)  # fmt: skip
def test_collator_stage_targets(tiny_processor, task, expected):
    rows = [_array_row("s1", "es", transcript="uno", translation="一"),
            _array_row("s2", "ja", seed=1, transcript="dos", translation=None),
            _array_row("s3", "ru", seed=2, transcript=None, translation="三")]  # fmt: skip
    batch = PotsaCollator(tiny_processor, task=task)(rows)
    for labels, text in zip(batch["labels"], expected):
        assert (labels == IGNORE_INDEX).all() if text is None else _label_text(tiny_processor, labels) == text


def test_collator_rejects_unknown_task(tiny_processor):
    with pytest.raises(ValueError, match="Unknown task 'asr'"):
        PotsaCollator(tiny_processor, task="asr")


# -------------------------------------------------------------------------------------------------- language bias
def _direct_means(model, processor, rows) -> dict[str, torch.Tensor]:
    pooled: dict[str, list[torch.Tensor]] = {}
    for row in rows:
        inputs = processor.extract_features([row_waveform(row, processor)])
        frames, mask = model.encode_speech(inputs["input_features"], inputs["feature_attention_mask"])
        pooled.setdefault(row["language"], []).append(masked_time_mean(frames, mask)[0])
    return {code: torch.stack(vectors).mean(dim=0) for code, vectors in pooled.items()}


@torch.no_grad()
def test_bias_estimate_equals_direct_per_language_means(tiny_model, tiny_processor):
    rows = _parallel_rows(3, ("es", "ja", "de"))
    dataset = datasets.Dataset.from_list(rows)
    expected = _direct_means(tiny_model, tiny_processor, rows)
    estimated = estimate_language_bias(tiny_model, dataset, tiny_processor, ["es", "ja", "de", "ko"], batch_size=2)
    assert sorted(estimated) == ["de", "es", "ja"]  # no ko audio: not estimated
    for code in estimated:
        torch.testing.assert_close(estimated[code], expected[code], rtol=1e-5, atol=1e-5)
    capped = estimate_language_bias(tiny_model, dataset, tiny_processor, ["es"], max_per_language=1)
    torch.testing.assert_close(capped["es"], _direct_means(tiny_model, tiny_processor, rows[:1])["es"])
    labeled = datasets.Dataset.from_list([row for row in rows if row["language"] != "de"])
    loader = DataLoader(labeled, batch_size=2, collate_fn=PotsaCollator(tiny_processor), shuffle=False)
    from_loader = estimate_language_bias(tiny_model, loader, tiny_processor, max_per_language=2)
    torch.testing.assert_close(from_loader["ja"], _direct_means(tiny_model, tiny_processor, rows[1:5:3])["ja"])


def test_apply_language_bias_updates_known_and_adds_new_languages(tiny_model, tiny_processor):
    model, processor = copy.deepcopy(tiny_model), copy.deepcopy(tiny_processor)
    vectors = {"es": torch.full((32,), 0.5), "sw": torch.full((32,), -1.0)}
    apply_language_bias(model, vectors, processor)
    assert model.config.languages[-1] == "sw" and processor.languages[-1] == "sw"
    for code, vector in vectors.items():
        torch.testing.assert_close(model.bias_compensation.bias[model.config.language_id(code)].detach(), vector)
    batch = PotsaCollator(processor)([_array_row("s", "sw")])
    assert torch.isfinite(model(**_without_lists(batch)).loss)


# ---------------------------------------------------------------------------------------------------------- cache
@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    model, processor = tiny
    dataset = datasets.Dataset.from_list(_parallel_rows(3, ("es", "ja")))
    cache_dir = tmp_path_factory.mktemp("encoder_cache")
    return dataset, cache_encoder_outputs(model, dataset, processor, cache_dir, batch_size=4, shard_size=4)


@torch.no_grad()
def test_cache_round_trip_stores_valid_frames_in_float16(tiny_model, tiny_processor, cached):
    dataset, cache = cached
    assert len(cache) == len(dataset) and len(cache.shards) == 2
    for row in dataset:
        inputs = tiny_processor.extract_features([row_waveform(row, tiny_processor)])
        frames, mask = tiny_model.encode_speech(inputs["input_features"], inputs["feature_attention_mask"])
        stored = cache.frames(row)
        assert stored.dtype == torch.float16 and stored.shape == (int(mask.sum()), 32)
        torch.testing.assert_close(stored.float(), frames[mask], rtol=1e-3, atol=1e-3)
    batch = cache.batch([dataset[0], dataset[5]])
    assert batch["encoder_hidden_states"].shape == (2, cache.frames(dataset[5]).shape[0], 32)
    assert batch["encoder_attention_mask"].sum(dim=1).tolist() == [15, 45]  # 0.6 s and 1.8 s at 25 frames/s


def test_cache_is_reused_and_extended(tiny_model, tiny_processor, cached, tmp_path):
    dataset, cache = cached
    again = cache_encoder_outputs(tiny_model, dataset, tiny_processor, cache.cache_dir)
    assert again.shards == cache.shards
    extra = datasets.Dataset.from_list([_array_row("new", "ru", seed=99)])
    with pytest.raises(ValueError, match="not in the encoder cache"):
        again.frames(extra[0])
    copy_dir = tmp_path / "copy"
    cache_encoder_outputs(tiny_model, dataset.select([0]), tiny_processor, copy_dir)
    extended = cache_encoder_outputs(tiny_model, extra, tiny_processor, copy_dir)
    assert len(extended) == 2 and len(extended.shards) == 2 and utterance_key(extra[0]) in extended


def test_stale_cache_for_another_encoder_is_refused(tiny_processor, cached):
    dataset, cache = cached
    other_model, _ = build_tiny_potsa(seed=1)
    with pytest.raises(ValueError, match="built for another encoder .*\\['weights_sha256'\\]"):
        cache_encoder_outputs(other_model, dataset, tiny_processor, cache.cache_dir)
    with pytest.raises(ValueError, match="No encoder cache"):
        EncoderCache(os.path.join(cache.cache_dir, "missing"))


def test_nan_encoder_outputs_are_refused(tiny_model, tiny_processor, cached, tmp_path):
    dataset, cache = cached
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.speech_encoder.layer_norm.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="encoder output of sentence_id 's0', language 'es' contains NaN"):
        cache_encoder_outputs(broken, dataset, tiny_processor, tmp_path / "nan")
    corrupt_dir = tmp_path / "corrupt"
    cache_encoder_outputs(tiny_model, dataset.select([0]), tiny_processor, corrupt_dir)
    save_file({utterance_key(dataset[0]): torch.full((3, 32), float("nan"), dtype=torch.float16)},
              str(corrupt_dir / "shard-00000.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="cached encoder output .* contains NaN"):
        EncoderCache(corrupt_dir).frames(dataset[0])


@torch.no_grad()
def test_cached_batches_give_the_feature_path_loss(tiny_model, tiny_processor, cached):
    dataset, cache = cached
    rows = list(dataset)
    rows[1] = {**rows[1], "translation": None}  # an unlabeled row takes part too
    from_features = PotsaCollator(tiny_processor)(rows)
    from_cache = PotsaCollator(tiny_processor, encoder_cache=cache)(rows)
    assert from_cache["encoder_hidden_states"].dtype == torch.float32
    assert from_cache["encoder_attention_mask"].dtype == torch.bool
    for key in ("input_ids", "labels", "language_ids"):
        assert torch.equal(from_features[key], from_cache[key])
    loss_features = tiny_model(**_without_lists(from_features)).loss
    loss_cache = tiny_model(**_without_lists(from_cache)).loss
    torch.testing.assert_close(loss_cache, loss_features, rtol=1e-3, atol=1e-4)
    keyed = cache.keyed_dataset(dataset)
    assert "audio" not in keyed.column_names
    keyed_rows = list(keyed)
    keyed_rows[1] = {**keyed_rows[1], "translation": None}
    from_keys = PotsaCollator(tiny_processor, encoder_cache=cache)(keyed_rows)
    for key in ("encoder_hidden_states", "encoder_attention_mask", "labels"):
        assert torch.equal(from_keys[key], from_cache[key])
    with pytest.raises(ValueError, match="1 of 1 utterances are not in the encoder cache"):
        cache.keyed_dataset(datasets.Dataset.from_list([_array_row("new", "ru", seed=99)]))
    biases = estimate_language_bias(tiny_model, keyed, tiny_processor, ["es", "ja"], encoder_cache=cache)
    direct = _direct_means(tiny_model, tiny_processor, rows)
    for code in biases:
        torch.testing.assert_close(biases[code], direct[code], rtol=1e-3, atol=1e-3)


def test_truncation_keeps_whole_sentences_spread_over_the_split_or_the_first_rows_of_each_language():
    rows = {"language": ["en", "es", "en", "es", "ja", "en"], "sentence_id": ["1", "1", "2", "2", "2", "3"]}
    dataset = datasets.Dataset.from_dict(rows)
    assert spread_sentences(dataset, 5)["sentence_id"] == ["1", "1", "2", "2", "2"]
    assert spread_sentences(dataset, 4)["sentence_id"] == ["1", "1"]  # never half a sentence
    assert spread_sentences(dataset, 6)["sentence_id"] == rows["sentence_id"]
    # a split sorted by category: the truncated set samples every category, not the first one
    ids = [f"{category}-{i}" for category in ("number", "date", "time") for i in range(10)]
    spread = spread_sentences(datasets.Dataset.from_dict({"sentence_id": ids, "language": ["en"] * 30}), 6)
    assert [sentence.split("-")[0] for sentence in spread["sentence_id"]] == ["number"] * 2 + ["date"] * 2 + ["time"] * 2
    capped = first_per_language(dataset, 1)
    assert capped["language"] == ["en", "es", "ja"] and capped["sentence_id"] == ["1", "1", "2"]
    assert len(first_per_language(dataset, 10)) == len(dataset)
