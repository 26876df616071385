"""Inference benchmarks of the speech-translation pipeline: speed on CPU, and language-identification accuracy.

    python -m benchmarks.bench_inference speed [--repeats 5] [--out benchmarks/results/bench_inference.md]
    python -m benchmarks.bench_inference language-id --model CKPT --dataset DIR [--split test] [--per-language 200]

Speed: utterances per second and real-time factor (compute seconds per second of audio) against batch size, with
the time split between the frozen encoder (`encode_speech`), the Q-Former + projector (`speech_to_soft_prompt`) and
the LLM (`language_model.generate`); the rest is audio loading and feature extraction. Every run generates exactly
`--new-tokens` tokens (`min_new_tokens = max_new_tokens`), since a random model stops at arbitrary points. Two
configurations of random weights: the tiny test model, and a "small" one with the real model's proportions (an
LLM ~15x the encoder's parameters, a thin Q-Former) at toy width.

Language id: accuracy of `pipe.detect_language` (nearest bias centroid) per language on a dataset, for a trained
checkpoint whose bias table has been estimated.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import pipeline

from examples.batch_translate import batches, load_split
from examples.tiny_end_to_end import tone
from modeling_potsa import PotsaSpeechTranslationPipeline
from potsa_training.tiny import build_tiny_potsa

REPO = Path(__file__).resolve().parents[1]

CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {},  # build_tiny_potsa defaults: encoder 32 x 2 layers, Q-Former 32 x 3, 8 queries, LLM 32 x 2
    # Real: Whisper-large-v3 encoder 1280 x 32 (0.6 B), Q-Former 768 x 8 with 80 queries, Qwen2.5-7B 3584 x 28.
    "small": {
        "encoder_hidden_size": 256, "encoder_layers": 4, "qformer_hidden_size": 192, "qformer_layers": 2,
        "num_query_tokens": 16, "llm_hidden_size": 768, "llm_layers": 6,
    },
}  # fmt: skip
PARTS = {"encoder": "encode_speech", "Q-Former": "speech_to_soft_prompt", "LLM generate": "generate"}
PART_PARAMETERS = {"encoder": "speech_encoder", "Q-Former": "qformer", "LLM": "language_model", "total": "total"}
NOTES = [
    "- Batching pays because generation is a loop of small steps: one batched step costs little more than one "
    "row's, so the LLM's share falls and audio loading / features (`rest`, done per clip on the CPU) rise with the "
    "batch.",
    "- The LLM dominates as soon as it has the real model's proportions (small: over 80 % of the time); at real size "
    "(30 s windows of 1,500 frames, 80 queries, a 7B LLM) the encoder runs once per window while the LLM runs once "
    "per token, so the split stays LLM-heavy. Beam 4 runs 4 hypotheses per utterance through the LLM: its cost "
    "against greedy is the `beam 4 / greedy time` column.",
    "- The 2 cores are shared with other jobs. Under their load a 2-thread run at batch 1 slows down several-fold "
    "(each small operation waits for both threads); the repeats are interleaved so that load hits every case alike, "
    "but compare numbers only within one run.",
    "- No GPU on this machine: GPU throughput was not measured.",
]
CLIP_SECONDS = 3.0
SAMPLING_RATE = 16_000


class PartTimer:
    """Adds up the wall time of the model's three stages by wrapping them on the instances (no code change)."""

    def __init__(self, model: Any) -> None:
        self.seconds: Counter[str] = Counter()
        owners = {"encoder": model, "Q-Former": model, "LLM generate": model.language_model}
        for part, method in PARTS.items():
            setattr(owners[part], method, self._timed(part, getattr(owners[part], method)))

    def _timed(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed


def run_once(pipe: PotsaSpeechTranslationPipeline, timer: PartTimer, clips: list[np.ndarray], case: dict) -> dict:
    """Wall seconds of one pipeline call on all `clips`, in total and inside each stage."""
    torch.set_num_threads(case["threads"])
    timer.seconds.clear()
    start = time.perf_counter()
    pipe(clips, **case["call"])
    return {"total": time.perf_counter() - start, **timer.seconds}


def summarize(runs: list[dict[str, float]], num_clips: int) -> dict[str, float]:
    """Throughput and RTF of the median run, with that run's stage shares."""
    median = statistics.median(run["total"] for run in runs)
    run = min(runs, key=lambda r: abs(r["total"] - median))
    return {
        "utterances_per_second": num_clips / median,
        "rtf": median / (num_clips * CLIP_SECONDS),
        **{part: run.get(part, 0.0) / run["total"] for part in PARTS},
    }


def speed(
    repeats: int, num_clips: int, new_tokens: int, threads: list[int], configs: list[str]
) -> list[dict[str, Any]]:
    """Every (config, threads, batch size, beams) case, `repeats` times. The repeats are interleaved across cases,
    so that load from other processes on the machine slows every case alike instead of one."""
    clips = [tone(CLIP_SECONDS, pitch=150 + 10 * k, sampling_rate=SAMPLING_RATE) for k in range(num_clips)]
    rows = []
    for name in configs:
        model, processor = build_tiny_potsa(**CONFIGS[name])
        pipe = pipeline("speech-translation", model=model, processor=processor, device="cpu")
        timer = PartTimer(model)
        counts = model.num_parameters_by_part()
        cases = [
            {"config": name, "parameters": {part: counts[key] for part, key in PART_PARAMETERS.items()},
             "threads": thread_count, "batch_size": batch_size, "beams": beams,
             "call": {"sampling_rate": SAMPLING_RATE, "language": "es", "batch_size": batch_size, "num_beams": beams,
                      "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}}
            for thread_count in threads
            for batch_size, beams in ((1, 1), (4, 1), (16, 1), (1, 4), (16, 4))
        ]  # fmt: skip
        for case in cases:  # warm-up: first-call allocations and lazy initialisation
            run_once(pipe, timer, clips[:2], case)
        runs = [[run_once(pipe, timer, clips, case) for case in cases] for _ in range(repeats)]
        for index, case in enumerate(cases):
            rows.append({**case, **summarize([repeat[index] for repeat in runs], num_clips)})
            print({key: value for key, value in rows[-1].items() if key != "call"}, flush=True)
    return rows


def speed_table(rows: list[dict[str, Any]], repeats: int, num_clips: int, new_tokens: int) -> str:
    def key(row: dict[str, Any], **changes: Any) -> tuple:
        row = {**row, **changes}
        return row["config"], row["threads"], row["batch_size"], row["beams"]

    speed_of = {key(row): row["utterances_per_second"] for row in rows}
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        "# Inference speed (CPU)",
        "",
        f"`python -m benchmarks.bench_inference speed --repeats {repeats} --threads "
        f"{' '.join(str(t) for t in dict.fromkeys(row['threads'] for row in rows))}`: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs: load average "
        f"{load} when the run ended), torch {torch.__version__}, no GPU. {num_clips} clips of {CLIP_SECONDS:g} s (one "
        f"encoder window each) through `pipeline(\"speech-translation\")`, exactly {new_tokens} new tokens per clip, "
        f"median of {repeats} interleaved runs. RTF = compute seconds per second of audio. Shares: wall time inside "
        "each stage (rest: audio loading, features, prompts, decoding).",
        "",
        "Parameters (random weights):",
        "",
        *(
            f"- {name}: " + ", ".join(f"{part} {count / 1e6:.2f} M" for part, count in parameters.items())
            for name, parameters in {r["config"]: r["parameters"] for r in rows}.items()
        ),
        "",
        "| config | threads | batch | decoding | utt/s | RTF | x batch 1 | beam 4 / greedy time | encoder | Q-Former "
        "| LLM generate | rest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        shares = [row[part] for part in PARTS]
        speed = row["utterances_per_second"]
        beam_cost = f"{speed_of[key(row, beams=1)] / speed:.2f}" if row["beams"] > 1 else ""
        lines.append(
            f"| {row['config']} | {row['threads']} | {row['batch_size']} | "
            f"{'greedy' if row['beams'] == 1 else 'beam ' + str(row['beams'])} | {speed:.2f} | {row['rtf']:.4f} | "
            f"{speed / speed_of[key(row, batch_size=1)]:.1f} | {beam_cost} | "
            + " | ".join(f"{share:.0%}" for share in shares)
            + f" | {1 - sum(shares):.0%} |"
        )
    gains = [
        f"{config}, {threads} thread(s): {speed_of[(config, threads, 16, 1)] / speed_of[(config, threads, 1, 1)]:.1f}x"
        for config, threads, batch, beams in speed_of
        if batch == 16 and beams == 1
    ]
    lines += ["", f"Batch 16 against batch 1, greedy (target: at least 5x): {'; '.join(gains)}.", "", *NOTES]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def language_id_accuracy(
    pipe: PotsaSpeechTranslationPipeline, dataset: Any, per_language: int | None = None, batch_size: int = 32
) -> dict[str, float]:
    """Share of rows whose `detect_language` equals their `language` column, per language and "overall" (rows in
    languages the model does not know are skipped; at most `per_language` rows of each language)."""
    known = set(pipe.processor.languages)
    seen: Counter[str] = Counter()
    correct: dict[str, int] = defaultdict(int)
    for rows in batches(dataset, batch_size):
        rows = [
            row
            for row in rows
            if row["language"] in known and (per_language is None or seen[row["language"]] < per_language)
        ]
        if not rows:
            continue
        detected = pipe.detect_language([row["audio"] for row in rows])
        for row, code in zip(rows, detected):
            seen[row["language"]] += 1
            correct[row["language"]] += code == row["language"]
    if not seen:
        raise ValueError(f"No rows in the model's languages {sorted(known)}.")
    accuracy = {code: correct[code] / seen[code] for code in sorted(seen)}
    accuracy["overall"] = sum(correct.values()) / sum(seen.values())
    return accuracy


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    speed_parser = commands.add_parser("speed", help="throughput and stage shares on random tiny models")
    speed_parser.add_argument("--repeats", type=int, default=5)
    speed_parser.add_argument("--clips", type=int, default=16)
    speed_parser.add_argument("--new-tokens", type=int, default=16)
    speed_parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch thread counts to compare")
    speed_parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    speed_parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bench_inference.md")
    language_parser = commands.add_parser("language-id", help="detect_language accuracy of a trained checkpoint")
    language_parser.add_argument("--model", required=True, help="checkpoint directory or Hub repo id")
    language_parser.add_argument("--dataset", required=True, type=Path, help="a datasets.save_to_disk directory")
    language_parser.add_argument("--split", default="test")
    language_parser.add_argument("--per-language", type=int, help="at most this many rows per language")
    language_parser.add_argument("--out", type=Path, help="markdown file for the results (not written without it)")
    args = parser.parse_args(argv)

    if args.command == "speed":
        rows = speed(args.repeats, args.clips, args.new_tokens, args.threads, args.configs)
        args.out.write_text(speed_table(rows, args.repeats, args.clips, args.new_tokens))
        print(args.out.read_text())
        return rows
    pipe = pipeline("translation", model=args.model, trust_remote_code=True)
    accuracy = language_id_accuracy(pipe, load_split(args.dataset, args.split), args.per_language)
    print("\n".join(f"{code}\t{value:.3f}" for code, value in accuracy.items()))
    if args.out:
        args.out.write_text(language_id_table(accuracy, args, len(pipe.processor.languages)))
    return accuracy


def language_id_table(accuracy: dict[str, float], args: argparse.Namespace, num_languages: int) -> str:
    command = f"python -m benchmarks.bench_inference language-id --model {args.model} --dataset {args.dataset}"
    lines = [
        "# Language detection (`language=None`): nearest bias centroid of the pooled encoder output",
        "",
        f"`{command} --split {args.split} --out {args.out}`: every {args.split} utterance of the model's languages"
        f"{f' (at most {args.per_language} per language)' if args.per_language else ''}; chance {1 / num_languages:.3f}.",
        "",
        "| language | accuracy |",
        "|---|---|",
        *(f"| {code} | {value:.3f} |" for code, value in accuracy.items()),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
