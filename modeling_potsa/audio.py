"""Turn whatever audio a user has into a validated mono float32 waveform at the model's sampling rate.

Everything a user may pass ends here: arrays (numpy, torch, lists) with an explicit sampling rate, `datasets`-style
dicts ({"array"/"raw": ..., "sampling_rate": ...}) and file paths. Bad input fails here with a `ValueError` that
names the problem, instead of turning into silent garbage features (NaN frames, a wrong-speed spectrogram, a
stereo file read as twice-as-long mono).
"""

from __future__ import annotations

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


def read_audio_file(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """(samples, channels) float32 and the file's sampling rate, decoded with soundfile (wav/flac/ogg/...)."""
    if not os.path.isfile(path):
        raise ValueError(f"Audio file not found: {os.fspath(path)!r}.")
    import soundfile  # lazily: only file inputs need it

    try:
        samples, sampling_rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise ValueError(f"Cannot decode audio file {os.fspath(path)!r}: {error}") from error
    return torch.from_numpy(samples), int(sampling_rate)


def _unpack(audio: Any, sampling_rate: int | None) -> tuple[Any, int | None, bool]:
    """Split the accepted containers into (samples, sampling rate, samples-are-(time, channels))."""
    if isinstance(audio, (str, os.PathLike)):
        samples, file_rate = read_audio_file(audio)
        return samples, file_rate, True
    if isinstance(audio, dict):
        keys = [key for key in ("array", "raw") if key in audio]
        if len(keys) != 1:
            raise ValueError(f"An audio dict needs exactly one of 'array' or 'raw' (got keys {sorted(audio)}).")
        dict_rate = audio.get("sampling_rate")
        if sampling_rate is not None and dict_rate is not None and int(dict_rate) != int(sampling_rate):
            raise ValueError(f"Conflicting sampling rates: {dict_rate} in the audio dict, {sampling_rate} passed.")
        return audio[keys[0]], dict_rate if dict_rate is not None else sampling_rate, False
    return audio, sampling_rate, False


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


def _as_float_tensor(samples: Any) -> torch.Tensor:
    """Convert to float32; integer PCM is scaled to [-1, 1]; other dtypes are refused rather than guessed."""
    try:
        tensor = torch.as_tensor(samples)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"Audio must be a numeric array, got {type(samples).__name__}: {error}") from error
    if tensor.dtype == torch.int64 and tensor.numel():
        # Python int lists (how `datasets` rows return int16 PCM) arrive as int64: read them as the narrowest PCM
        # width that holds every sample, and refuse what no PCM width explains.
        low, high = int(tensor.min()), int(tensor.max())
        for dtype in (torch.int16, torch.int32):
            if torch.iinfo(dtype).min <= low and high <= torch.iinfo(dtype).max:
                tensor = tensor.to(dtype)
                break
        else:
            raise ValueError(f"Integer audio with values up to {max(-low, high)} is not 16- or 32-bit PCM.")
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
        audio: a file path, a dict with "array"/"raw" and "sampling_rate", or an array (numpy, torch, list).
        sampling_rate: rate of a raw array (required for arrays; files and dicts carry their own).
        target_sampling_rate: the feature extractor's rate (16 kHz for Whisper).
        downmix: average multi-channel audio instead of refusing it.
        max_seconds: refuse longer audio (the encoder window), if given.

    Raises:
        ValueError: naming the problem (missing/wrong rate, dtype, shape, empty, NaN/inf, silent, too long).
    """
    waveform, rate = checked_waveform(audio, sampling_rate, target_sampling_rate, downmix, max_seconds)
    return resample(waveform.contiguous(), rate, target_sampling_rate)


__all__ = ["checked_waveform", "load_waveform", "read_audio_file", "resample"]
