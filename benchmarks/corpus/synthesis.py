"""Speech for the sentence inventory: per-clip speakers, silence trimming, noise, and parallel synthesis.

Determinism: every random draw of a clip comes from a generator seeded by (seed, language, sentence id), and
espeak's hidden state is made reproducible by synthesizing each block of clips in a fresh process (espeak keeps
pitch-flutter phase and gain across utterances, see espeak.py). Blocks are cut from the request list, not per
worker, so the arrays are the same for any number of workers.
"""

import functools
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .espeak import Espeak, espeak
from .sentences import stable_hash

BLOCK_SIZE = 1000  # clips per fresh process: small enough for a smooth progress bar, large enough to amortize start-up
SILENCE_LEVEL = 100  # |sample| at or below this (-50 dBFS) counts as silence when trimming
TRIM_MARGIN_SECONDS = 0.02  # silence kept before the first and after the last sound


@dataclass(frozen=True)
class SpeakerRanges:
    """The ranges each clip's speaker is drawn from (uniformly; bounds inclusive)."""

    variants: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
    rate: tuple[int, int] = (140, 190)  # words per minute
    pitch: tuple[int, int] = (30, 70)  # espeak pitch, 0-100 (50 = the voice's own)
    volume: tuple[int, int] = (70, 130)  # espeak volume, 100 = normal
    snr_db: tuple[float, float] = (25.0, 45.0)  # additive white noise, signal-to-noise ratio


@dataclass(frozen=True)
class Speaker:
    """One clip's voice settings; `describe()` is the dataset's `speaker` column."""

    voice: str  # espeak voice with variant, e.g. "es+f3"
    rate: int
    pitch: int
    volume: int
    snr_db: float

    def describe(self) -> str:
        return f"{self.voice} rate={self.rate} pitch={self.pitch} volume={self.volume} snr={self.snr_db:.0f}dB"


@dataclass(frozen=True)
class ClipRequest:
    """A text to speak; (language, sentence_id) also seeds the clip's random draws."""

    language: str
    voice: str  # the language's espeak voice, without variant
    sentence_id: str
    text: str


@dataclass(frozen=True)
class Clip:
    """A synthesized clip; `audio` is None where every draw was longer than the duration limit (dropped)."""

    audio: np.ndarray | None
    sampling_rate: int
    speaker: str
    redraws: int  # speakers drawn again because the clip was too long


def draw_speaker(rng: np.random.Generator, voice: str, ranges: SpeakerRanges) -> Speaker:
    return Speaker(
        voice=f"{voice}+{ranges.variants[rng.integers(len(ranges.variants))]}",
        rate=int(rng.integers(ranges.rate[0], ranges.rate[1] + 1)),
        pitch=int(rng.integers(ranges.pitch[0], ranges.pitch[1] + 1)),
        volume=int(rng.integers(ranges.volume[0], ranges.volume[1] + 1)),
        snr_db=float(rng.uniform(*ranges.snr_db)),
    )


def trim_silence(audio: np.ndarray, sampling_rate: int) -> np.ndarray:
    """Cuts leading/trailing silence down to a 20 ms margin (espeak pads clause ends with silence)."""
    loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > SILENCE_LEVEL)
    if loud.size == 0:
        return audio[:0]
    margin = int(TRIM_MARGIN_SECONDS * sampling_rate)
    return audio[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at `snr_db` below the clip's RMS, back to int16 with clipping."""
    signal = audio.astype(np.float32)
    noise_rms = np.sqrt(np.mean(signal**2)) / 10 ** (snr_db / 20)
    noisy = signal + noise_rms * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), -32768, 32767).astype(np.int16)


def _clip(
    engine: Espeak,
    request: ClipRequest,
    speaker: Speaker,
    rng: np.random.Generator,
    ranges: SpeakerRanges,
    max_samples: int | None,
    max_redraws: int,
) -> Clip:
    """One clip; one that is empty or over `max_samples` is tried again with a new speaker, then dropped."""
    for redraws in range(max_redraws + 1):
        if redraws:
            speaker = draw_speaker(rng, request.voice, ranges)
        audio = engine.synthesize(request.text, speaker.voice, speaker.rate, speaker.pitch, speaker.volume)
        audio = trim_silence(audio, engine.sampling_rate)
        if len(audio) and (max_samples is None or len(audio) <= max_samples):
            return Clip(add_noise(audio, speaker.snr_db, rng), engine.sampling_rate, speaker.describe(), redraws)
    return Clip(None, engine.sampling_rate, speaker.describe(), max_redraws)


def synthesize_block(
    requests: Sequence[ClipRequest], seed: int, ranges: SpeakerRanges, max_seconds: float | None, max_redraws: int
) -> list[Clip]:
    """Synthesizes `requests` with this process's espeak (run it in a fresh process for determinism)."""
    engine = espeak()
    max_samples = None if max_seconds is None else int(max_seconds * engine.sampling_rate)
    rngs = [np.random.default_rng([seed, stable_hash(r.language), stable_hash(r.sentence_id)]) for r in requests]
    speakers = [draw_speaker(rng, request.voice, ranges) for rng, request in zip(rngs, requests)]
    # One voice variant after another: each voice change reloads the language's dictionary (8 MB, 5 ms for ru).
    order = sorted(range(len(requests)), key=lambda index: speakers[index].voice)
    clips = {
        index: _clip(engine, requests[index], speakers[index], rngs[index], ranges, max_samples, max_redraws)
        for index in order
    }
    return [clips[index] for index in range(len(requests))]


def _blocks(requests: Sequence[ClipRequest]) -> Iterator[Sequence[ClipRequest]]:
    """Consecutive runs of at most BLOCK_SIZE requests of one language (one voice load per block)."""
    start = 0
    while start < len(requests):
        end = start + 1
        while end < len(requests) and end - start < BLOCK_SIZE and requests[end].language == requests[start].language:
            end += 1
        yield requests[start:end]
        start = end


def synthesize(
    requests: Sequence[ClipRequest],
    seed: int,
    ranges: SpeakerRanges,
    max_seconds: float | None,
    max_redraws: int,
    workers: int,
    progress: bool = False,
) -> list[Clip]:
    """All clips, in request order; blocks run in `workers` processes, each block in a process of its own."""
    # forkserver: children fork from a clean server process that never loaded espeak, cheaply and safely
    # (the parent may hold threads, e.g. pyarrow's, which make a plain fork unsafe). The server imports the
    # caller's main module (which therefore needs the usual `if __name__ == "__main__":` guard) and this
    # module once, so blocks do not import them again.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    work = functools.partial(
        synthesize_block, seed=seed, ranges=ranges, max_seconds=max_seconds, max_redraws=max_redraws
    )
    clips = []
    with (
        context.Pool(workers, maxtasksperchild=1) as pool,
        tqdm(total=len(requests), unit="clip", disable=not progress, desc="synthesis") as bar,
    ):
        for block in pool.imap(work, _blocks(requests)):
            clips.extend(block)
            bar.update(len(block))
    return clips
