"""Training-loop time per epoch from audio features vs from the encoder-output cache, plus the one-time cache build.

    python -m benchmarks.bench_encoder_cache [--utterances 256] [--batch-size 16] [--repeats 5] [--threads 2]

A tiny POTSA model with a larger encoder than the test model (4 layers, width 64; see ENCODER below) so that the
encoder's share of the work is not negligible, trained (forward + backward + AdamW step on the trainable parts) over
a synthetic n-way parallel dataset stored like the offline benchmark corpus (int16 PCM at 22,050 Hz, so the
feature path pays decoding + resampling + log-mel + encoder, as in real training). Epoch times are medians over
`--repeats` epochs (default 5); the data time (collation) and the model time are reported separately. Results go to
benchmarks/results/bench_encoder_cache.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.corpus import FEATURES
from modeling_potsa import PotsaForSpeechTranslation, PotsaProcessor
from potsa_training.collator import PotsaCollator
from potsa_training.encoder_cache import EncoderCache, cache_encoder_outputs
from potsa_training.sampler import ParallelBatchSampler
from potsa_training.tiny import build_tiny_potsa

REPO = Path(__file__).resolve().parents[1]

LANGUAGES = ("es", "ja", "ru", "ko")
ENCODER = {"encoder_layers": 4, "encoder_hidden_size": 64}
CORPUS_RATE = 22_050


def synthetic_corpus(num_utterances: int, seed: int = 0) -> datasets.Dataset:
    """n-way parallel rows (each sentence in every language), 1-3.5 s of harmonic noise each."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_utterances):
        seconds = rng.uniform(1.0, 3.5)
        t = np.arange(int(seconds * CORPUS_RATE)) / CORPUS_RATE
        voice = np.sin(2 * np.pi * rng.uniform(100, 200) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
        samples = (0.3 * voice + 0.01 * rng.standard_normal(t.size)) * 32767
        rows.append({
            "audio": {"array": samples.astype(np.int16), "sampling_rate": CORPUS_RATE},
            "language": LANGUAGES[index % len(LANGUAGES)], "sentence_id": f"n{index // len(LANGUAGES)}",
            "transcript": "x", "translation": "三月十四日", "speaker": "s0", "category": "date",
        })  # fmt: skip
    return datasets.Dataset.from_list(rows, features=FEATURES)


def train_epoch(
    model: PotsaForSpeechTranslation, loader: DataLoader, optimizer: torch.optim.Optimizer
) -> tuple[float, float]:
    """(data seconds, model seconds) of one epoch."""
    data_seconds = model_seconds = 0.0
    start = time.perf_counter()
    for batch in loader:
        fetched = time.perf_counter()
        batch.pop("sentence_ids"), batch.pop("languages")
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        done = time.perf_counter()
        data_seconds += fetched - start
        model_seconds += done - fetched
        start = done
    return data_seconds, model_seconds


def time_cache_build(
    model: PotsaForSpeechTranslation,
    processor: PotsaProcessor,
    dataset: datasets.Dataset,
    root: str,
    batch_size: int,
    repeats: int,
) -> tuple[EncoderCache, float, float]:
    """(cache, median full-build seconds, median seconds of a second call that finds everything cached)."""
    builds, reuses = [], []
    for repeat in range(repeats):  # a fresh directory each time
        for seconds in (builds, reuses):
            start = time.perf_counter()
            cache = cache_encoder_outputs(model, dataset, processor, os.path.join(root, str(repeat)), batch_size)
            seconds.append(time.perf_counter() - start)
    return cache, statistics.median(builds), statistics.median(reuses)


def time_epochs(
    model: PotsaForSpeechTranslation, loaders: dict[str, DataLoader], sampler: ParallelBatchSampler, repeats: int
) -> dict[str, list[float]]:
    """{path: [median data seconds, median model seconds]}; the paths run interleaved, epoch by epoch, so that
    other load on a shared machine slows them alike."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    epochs: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
    model.train()
    for epoch in range(repeats):
        sampler.set_epoch(epoch)
        for name, loader in loaders.items():
            epochs[name].append(train_epoch(model, loader, optimizer))
    return {name: [statistics.median(part) for part in zip(*runs)] for name, runs in epochs.items()}


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    model, processor = build_tiny_potsa(languages=LANGUAGES, **ENCODER)
    dataset = synthetic_corpus(args.utterances)
    sampler = ParallelBatchSampler(list(dataset["sentence_id"]), list(dataset["language"]), args.batch_size)

    with tempfile.TemporaryDirectory() as root:
        cache, build_seconds, reuse_seconds = time_cache_build(
            model, processor, dataset, root, args.batch_size, args.repeats
        )
        start = time.perf_counter()
        keyed = cache.keyed_dataset(dataset)
        keyed_seconds = time.perf_counter() - start
        cache_bytes = sum(os.path.getsize(os.path.join(cache.cache_dir, name)) for name in os.listdir(cache.cache_dir))
        paths = {
            "features": (dataset, PotsaCollator(processor)),
            "cache (rows keep their audio)": (dataset, PotsaCollator(processor, encoder_cache=cache)),
            "cache + `keyed_dataset`": (keyed, PotsaCollator(processor, encoder_cache=cache)),
        }
        loaders = {name: DataLoader(rows, batch_sampler=sampler, collate_fn=collator)
                   for name, (rows, collator) in paths.items()}  # fmt: skip
        results = time_epochs(model, loaders, sampler, args.repeats)

    parts = model.num_parameters_by_part()
    lines = [
        "# Encoder-output cache: training-loop time per epoch",
        "",
        f"Command: `python -m benchmarks.bench_encoder_cache --utterances {args.utterances} --batch-size "
        f"{args.batch_size} --repeats {args.repeats} --threads {args.threads}`",
        "",
        f"Model: `build_tiny_potsa(languages={list(LANGUAGES)}, encoder_layers=4, encoder_hidden_size=64)` (4 s "
        f"window, 100 encoder frames; parameters: encoder {parts['speech_encoder']:,}, Q-Former "
        f"{parts['qformer']:,}, LLM {parts['language_model']:,}). Data: {args.utterances} synthetic utterances of "
        f"1-3.5 s, int16 PCM at 22,050 Hz (the offline corpus' storage), {len(LANGUAGES)}-way parallel, batch "
        f"{args.batch_size}, `ParallelBatchSampler(pair_ratio=1)`. Each step: collate (features path: decode, "
        "resample, log-mel), then forward (features path: including the frozen encoder), backward, AdamW step. "
        f"Medians of {args.repeats} epochs, {args.threads} CPU threads, torch {torch.__version__}, "
        f"{platform.machine()}; load average {os.getloadavg()[0]:.1f} at the end (a shared machine: the paths run "
        "interleaved so that other load slows them alike).",
        "",
        "| path | epoch (s) | data / collation (s) | model fwd+bwd+step (s) |",
        "|---|---|---|---|",
    ]
    for name, (data_seconds, model_seconds) in results.items():
        lines.append(f"| {name} | {data_seconds + model_seconds:.2f} | {data_seconds:.2f} | {model_seconds:.2f} |")
    features, cached = sum(results["features"]), sum(results["cache + `keyed_dataset`"])
    lines += [
        "",
        f"Speed-up per epoch (features -> cache + `keyed_dataset`): {features / cached:.2f}x. One-time costs: "
        f"cache build {build_seconds:.2f} s (median of {args.repeats}; {cache_bytes / 1e6:.1f} MB on disk: float16, "
        f"valid frames only), `keyed_dataset` {keyed_seconds:.2f} s; calling `cache_encoder_outputs` again on a "
        f"complete cache (keys only, nothing encoded) {reuse_seconds:.2f} s.",
        "",
    ]
    report = "\n".join(lines)
    (REPO / "benchmarks/results/bench_encoder_cache.md").write_text(report)
    return report


if __name__ == "__main__":
    print(main())
