"""The frozen encoder's outputs, computed once and stored, so that every later epoch, stage and run reads frames
instead of running the encoder (4.8x faster epochs on the tiny recipe, `benchmarks/bench_encoder_cache.py`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.utils.rnn import pad_sequence

from modeling_potsa.audio import canonical_samples
from modeling_potsa.modeling_potsa import PotsaForSpeechTranslation
from modeling_potsa.processing_potsa import PotsaProcessor

from .distributed import main_process_progress
from .rows import Row, audio_features, iter_rows, read_rows


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run a frozen module deterministically (no dropout / layer drop), then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def encoder_frames(
    model: PotsaForSpeechTranslation, inputs: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, d) frames and their (B, T) bool mask: cached outputs as they are, else the frozen encoder's."""
    if "encoder_hidden_states" in inputs:
        return inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]
    encoder = model.speech_encoder
    features = inputs["input_features"].to(encoder.device, encoder.dtype)
    with _eval_mode(encoder):
        return model.encode_speech(features, inputs["feature_attention_mask"].to(encoder.device))


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
        digest.update(canonical_samples(audio["array"]).contiguous().numpy().tobytes())
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
    for start in main_process_progress(starts, "Caching encoder outputs"):
        rows = read_rows(dataset, indices[start : start + batch_size])
        frames, frame_mask = encoder_frames(model, audio_features(rows, processor))
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


__all__ = ["EncoderCache", "cache_encoder_outputs", "encoder_fingerprint", "encoder_frames", "utterance_key"]
