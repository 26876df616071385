"""Turn whatever audio a user has into a validated mono float32 waveform at the model's sampling rate.

Everything a user or a dataset row may pass is decoded here, and only here: arrays (numpy, torch, lists) with an
explicit sampling rate, `datasets`-style dicts ({"array"/"raw": ..., "sampling_rate": ...}, or undecoded
{"bytes", "path"} as parquet and `Audio(decode=False)` columns hold them) and file paths. Bad input fails here with a
`ValueError` that names the problem, instead of turning into silent garbage features (NaN frames, a wrong-speed
spectrogram, a stereo file read as twice-as-long mono).
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

# Below this peak amplitude (-80 dBFS) there is nothing to translate; Whisper would hallucinate on it.
SILENCE_PEAK = 1e-4
MIN_SAMPLING_RATE = 1_000
MAX_SAMPLING_RATE = 384_000
_INTEGER_PCM_SCALE = {torch.int16: 32768.0, torch.int32: 2147483648.0}
_MAX_CHANNELS = 8


def resample(waveform: torch.Tensor, orig_sampling_rate: int, target_sampling_rate: int) -> torch.Tensor:
    """Band-limited resampling with soxr (what `transformers.audio_utils.load_audio` and librosa use).

    soxr is imported lazily: it is only needed when audio does not already come at the model's rate.
    """
    if orig_sampling_rate == target_sampling_rate:
        return waveform
    try:
        import soxr
    except ImportError as error:  # pragma: no cover - soxr ships with potsa's dependencies
        raise ValueError(
            f"Audio at {orig_sampling_rate} Hz must be resampled to {target_sampling_rate} Hz, which needs the "
            "`soxr` package (`pip install soxr`), or pass audio at the model's rate."
        ) from error
    resampled = soxr.resample(waveform.numpy(), orig_sampling_rate, target_sampling_rate, quality="HQ")
    return torch.from_numpy(resampled).float()


def _soundfile_decode(source: Any, name: str) -> tuple[torch.Tensor, int]:
    """Decode encoded audio with soundfile, imported here so that only such inputs need it. The import sits in a
    try block, which transformers' remote-code import check skips: a Hub user without soundfile can still load the
    model and translate arrays, and gets this ValueError for a file."""
    try:
        import soundfile
    except ImportError as error:
        raise ValueError(
            f"Decoding audio {name} needs the `soundfile` package (`pip install soundfile`); or pass the decoded "
            "samples as an array with `sampling_rate=`."
        ) from error
    try:
        samples, sampling_rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise ValueError(f"Cannot decode audio {name}: {error}") from error
    return torch.from_numpy(samples), int(sampling_rate)


def read_audio_file(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """(samples, channels) float32 and the file's sampling rate, decoded with soundfile (wav/flac/ogg/...)."""
    if not os.path.isfile(path):
        raise ValueError(f"Audio file not found: {os.fspath(path)!r}.")
    return _soundfile_decode(os.fspath(path), f"file {os.fspath(path)!r}")


def decode_audio_bytes(data: bytes, name: str | None = None) -> tuple[torch.Tensor, int]:
    """(samples, channels) float32 and the sampling rate of an encoded file held in memory (a parquet cell)."""
    return _soundfile_decode(io.BytesIO(data), f"bytes ({name or 'no file name'})")


def _declared_rate(found: Any, declared: int | None, where: str) -> int | None:
    """The audio's own rate, refusing a different declared one (a row's `sampling_rate`, or `sampling_rate=`)."""
    if found is not None and declared is not None and int(found) != int(declared):
        raise ValueError(f"Wrong sampling rate: the {where} is at {int(found)} Hz but {int(declared)} Hz was declared.")
    return found if found is not None else declared


def _unpack(audio: Any, sampling_rate: int | None) -> tuple[Any, int | None, bool]:
    """Split the accepted containers into (samples, sampling rate, samples-are-(time, channels))."""
    if isinstance(audio, (str, os.PathLike)):
        samples, file_rate = read_audio_file(audio)
        return samples, _declared_rate(file_rate, sampling_rate, f"file {os.fspath(audio)!r}"), True
    if not isinstance(audio, dict):
        return audio, sampling_rate, False
    keys = [key for key in ("array", "raw") if audio.get(key) is not None]
    if len(keys) > 1:
        raise ValueError(f"An audio dict needs one of 'array' or 'raw', not both (got keys {sorted(audio)}).")
    if keys:
        return audio[keys[0]], _declared_rate(audio.get("sampling_rate"), sampling_rate, "audio dict"), False
    if audio.get("bytes") is not None:
        samples, rate = decode_audio_bytes(audio["bytes"], audio.get("path"))
        return samples, _declared_rate(rate, sampling_rate, "encoded audio"), True
    if audio.get("path"):
        return _unpack(audio["path"], sampling_rate)
    raise ValueError(
        f"An audio dict needs a value for 'array' (or 'raw'), 'bytes' or 'path'; got keys {sorted(audio)}, all empty."
    )


def _check_sampling_rate(sampling_rate: Any) -> int:
    if sampling_rate is None:
        raise ValueError(
            "Missing sampling rate: pass `sampling_rate=` with raw audio arrays (e.g. 16000), or a file path, or a "
            "dict {'array': ..., 'sampling_rate': ...}."
        )
    if isinstance(sampling_rate, bool) or not float(sampling_rate).is_integer():
        raise ValueError(f"Wrong sampling rate {sampling_rate!r}: it must be a whole number of Hz.")
    sampling_rate = int(sampling_rate)
    if not MIN_SAMPLING_RATE <= sampling_rate <= MAX_SAMPLING_RATE:
        raise ValueError(
            f"Wrong sampling rate {sampling_rate} Hz: expected between {MIN_SAMPLING_RATE} and {MAX_SAMPLING_RATE}."
        )
    return sampling_rate


def canonical_samples(samples: Any) -> torch.Tensor:
    """One tensor per recording, whichever way it was read: float audio as float32, integer PCM as the narrowest of
    int16 / int32 that holds every sample (`datasets` hands an int16 column back as Python ints, which arrive as
    int64). The same samples read as a list or as an Arrow buffer thus decode, and hash, identically."""
    try:
        tensor = torch.as_tensor(samples)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"Audio must be a numeric array, got {type(samples).__name__}: {error}") from error
    if tensor.dtype == torch.float64:
        return tensor.float()
    if tensor.dtype == torch.int64 and tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        for dtype in (torch.int16, torch.int32):
            if torch.iinfo(dtype).min <= low and high <= torch.iinfo(dtype).max:
                return tensor.to(dtype)
        raise ValueError(f"Integer audio with values up to {max(-low, high)} is not 16- or 32-bit PCM.")
    return tensor


def _as_float_tensor(samples: Any) -> torch.Tensor:
    """Convert to float32; integer PCM is scaled to [-1, 1]; other dtypes are refused rather than guessed."""
    tensor = canonical_samples(samples)
    if tensor.dtype in _INTEGER_PCM_SCALE:
        return tensor.float() / _INTEGER_PCM_SCALE[tensor.dtype]
    if not tensor.is_floating_point():
        raise ValueError(f"Unsupported audio dtype {tensor.dtype}: use float32/float64 in [-1, 1] or int16/int32 PCM.")
    return tensor.float()


def _to_mono(tensor: torch.Tensor, time_major: bool, downmix: bool) -> torch.Tensor:
    if tensor.numel() == 0:
        raise ValueError(f"Empty audio: the array of shape {tuple(tensor.shape)} has no samples.")
    if tensor.ndim == 1:
        return tensor
    if tensor.ndim != 2:
        raise ValueError(f"Audio must be 1-D (mono) or 2-D (channels), got shape {tuple(tensor.shape)}.")
    # Files come (time, channels); arrays are ambiguous, so the short axis is the channel axis.
    channel_axis = 1 if time_major else int(tensor.shape[0] > tensor.shape[1])
    channels = tensor.shape[channel_axis]
    if channels == 1:
        return tensor.squeeze(channel_axis)
    if channels > _MAX_CHANNELS:
        raise ValueError(f"Audio of shape {tuple(tensor.shape)} looks like a batch, not channels: pass a list.")
    if not downmix:
        raise ValueError(
            f"Audio has {channels} channels (shape {tuple(tensor.shape)}); the model takes mono. Pass "
            f"`downmix=True` to average the channels, or average them yourself (`audio.mean(axis={channel_axis})`)."
        )
    return tensor.mean(dim=channel_axis)


def checked_waveform(
    audio: Any,
    sampling_rate: int | None = None,
    target_sampling_rate: int = 16_000,
    downmix: bool = False,
    max_seconds: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Every check of `load_waveform`, without the resampling: (1-D float32 waveform, its own sampling rate).

    Checking a whole training set (`training.data.validate_examples`) needs only this; resampling every clip just
    to look at it cost more than the checks themselves.
    """
    samples, sampling_rate, time_major = _unpack(audio, sampling_rate)
    sampling_rate = _check_sampling_rate(sampling_rate)
    waveform = _to_mono(_as_float_tensor(samples), time_major, downmix)
    if waveform.ndim != 1:
        raise ValueError(f"Audio must be a 1-D array of samples, got shape {tuple(waveform.shape)}.")
    if waveform.numel() == 0:
        raise ValueError("Empty audio: the array has no samples.")
    if not torch.isfinite(waveform).all():
        raise ValueError("Audio contains NaN or infinite samples.")
    if waveform.abs().max() < SILENCE_PEAK:
        raise ValueError(f"All-silent audio (peak amplitude below {SILENCE_PEAK}): nothing to translate.")
    seconds = waveform.numel() / sampling_rate
    if max_seconds is not None and seconds > max_seconds + 1e-6:
        raise ValueError(
            f"Audio is {seconds:.2f} s long, longer than the encoder window of {max_seconds:g} s. Split it, or use "
            "the speech-translation pipeline, which translates long audio window by window."
        )
    if seconds * target_sampling_rate < 2:
        raise ValueError(f"Audio is too short ({seconds * 1000:.2f} ms) to compute features.")
    return waveform, sampling_rate


def load_waveform(
    audio: Any,
    sampling_rate: int | None = None,
    target_sampling_rate: int = 16_000,
    downmix: bool = False,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """Validate and convert one audio input to a 1-D float32 waveform at `target_sampling_rate`.

    Args:
        audio: a file path, a dict with "array"/"raw" and "sampling_rate" or with encoded "bytes" / a "path", or an
            array (numpy, torch, list).
        sampling_rate: rate of a raw array (required for arrays); for files and dicts, which carry their own, a
            declared rate that must agree with it.
        target_sampling_rate: the feature extractor's rate (16 kHz for Whisper).
        downmix: average multi-channel audio instead of refusing it.
        max_seconds: refuse longer audio (the encoder window), if given.

    Raises:
        ValueError: naming the problem (missing/wrong rate, dtype, shape, empty, NaN/inf, silent, too long).
    """
    waveform, rate = checked_waveform(audio, sampling_rate, target_sampling_rate, downmix, max_seconds)
    return resample(waveform.contiguous(), rate, target_sampling_rate)


__all__ = ["canonical_samples", "checked_waveform", "decode_audio_bytes", "load_waveform", "read_audio_file", "resample"]
