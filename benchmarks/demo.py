"""The README's main job: POTSA end to end on the offline corpus, on a CPU, in minutes.

    python -m benchmarks.demo            (or: make demo)

1. corpus      eSpeak NG speech of the same sentences in en, es, ru, ja (seen) and de, ko (zero-shot), Chinese targets:
               numbers, dates, times and colour lists (`--categories`; the corpus also has quantities and digit
               strings, which the tiny Q-Former learns more slowly)
2. stand-ins   a Whisper encoder pretrained on multilingual ASR of the corpus and a Qwen2 LM pretrained on the
               train-split target texts, then frozen (saved under runs/standins: a rerun skips this)
3. stages      training/run.py, as in the paper: 1 ASR pretraining, 2 S2TT, 3 POTSA (bias compensation estimated
               from audio of every language, then CE + lambda * OT with UCB over Q-Former layers 1-2; lambda 1 and
               lr 1e-3 chosen on validation by benchmarks/stage3_selection.py), each from the
               previous stage's checkpoint; the zero-shot languages take no part in any stage (strict protocol)
4. report      per-language BLEU and exact match (seen and zero-shot), examples, wall time per phase; the final
               checkpoint (a self-contained bundle) is loaded back through `pipeline("translation", ...)`.

Results go to runs/demo/ and benchmarks/results/demo.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import pipeline

from benchmarks.corpus import generate_corpus
from benchmarks.standins import build_standins
from modeling_potsa import PotsaForSpeechTranslation, PotsaProcessor
from potsa_training.run import run

REPO = Path(__file__).resolve().parents[1]
SEEN = ["en", "es", "ru", "ja"]
ZERO_SHOT = ["de", "ko"]
CATEGORIES = ("number", "date", "time", "colours")
NUM_SENTENCES = {"train": 3000, "validation": 200, "test": 400}
MAX_SECONDS = 3.0  # the stand-in encoder's window (EncoderRecipe.window_seconds)
STAGES = ("tiny_stage1_asr", "tiny_stage2_s2tt", "tiny_stage3_potsa")


class PhaseTimer:
    """Wall time of each phase, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - start
        print(f"[demo] {name}: {self.seconds[name]:.0f} s", flush=True)
        return result


def stage_settings(out: Path, corpus: Path, stage: str, seed: int, cache: Path | None = None) -> list[str]:
    """`key=value` overrides that point a stage config at this run's corpus, model config (out/model_tiny.yaml),
    encoder cache (default out/encoder_cache) and output folders."""
    settings = {
        "data_path": str(corpus),
        "output_dir": str(out / stage),
        "encoder_cache_dir": str(cache or out / "encoder_cache"),
        "seed": seed,
        "disable_tqdm": False,
    }
    if stage == STAGES[0]:
        settings["model_config"] = str(out / "model_tiny.yaml")
    else:
        settings["init_from"] = str(out / STAGES[STAGES.index(stage) - 1])
    if stage != STAGES[-1]:
        settings.update(eval_split=None, test_split=None)  # only the final model is evaluated (ablation: stage 2 too)
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def run_stages(out: Path, corpus: Path, seed: int, timer: PhaseTimer, cache: Path | None = None) -> Path:
    """The three POTSA stages with training/run.py, each from the previous one's checkpoint; returns the last."""
    for stage in STAGES:
        config = REPO / "training/configs" / f"{stage}.yaml"
        timer(stage, lambda: run(["--config", str(config), *stage_settings(out, corpus, stage, seed, cache)]))
    return out / STAGES[-1]


def write_model_config(out: Path, standins: Path, llm: Path | None = None) -> None:
    """training/configs/model_tiny.yaml with these stand-in paths (the LLM: `llm`, default standins/llm), as
    out/model_tiny.yaml."""
    text = (REPO / "training/configs/model_tiny.yaml").read_text()
    text = text.replace("runs/standins/encoder", str(standins / "encoder"))
    text = text.replace("runs/standins/llm", str(llm or standins / "llm"))
    (out / "model_tiny.yaml").write_text(text)


def prepare_corpus_and_standins(
    corpus_dir: Path, standins: Path, categories: list[str], seed: int, timer: PhaseTimer
) -> tuple[datasets.DatasetDict, dict[str, float]]:
    """The corpus and the two frozen stand-ins, each made only if missing; returns the corpus and the stand-ins'
    quality report (empty when they already existed)."""
    if not (corpus_dir / "dataset_dict.json").exists():
        timer("corpus", lambda: generate_corpus(
            SEEN + ZERO_SHOT, out_dir=str(corpus_dir), num_sentences=NUM_SENTENCES, seed=seed,
            categories=categories, max_seconds=MAX_SECONDS, progress=True,
        ))  # fmt: skip
    corpus = datasets.load_from_disk(str(corpus_dir))
    quality: dict[str, float] = {}
    if not (standins / "llm" / "config.json").exists():
        quality = timer("stand-ins", lambda: build_standins(corpus, standins, seed=seed))
        (standins / "quality.json").write_text(json.dumps(quality, indent=2))
    return corpus, quality


def report(args: argparse.Namespace, timer: PhaseTimer, standin_quality: dict[str, float]) -> str:
    """The markdown report: the evaluation table of the final stage, examples, and the time per phase."""
    final = args.out / STAGES[-1]
    results = json.loads((final / "results.json").read_text())
    lines = ["| language | group | BLEU | exact match |", "|---|---|---|---|"]
    for language, scores in results["per_language"].items():
        group = "zero-shot" if language in ZERO_SHOT else "seen"
        lines.append(f"| {language} | {group} | {scores['bleu']:.1f} | {scores['exact_match']:.3f} |")
    for group, scores in results["groups"].items():
        lines.append(f"| **{group}** | mean | {scores['bleu']:.1f} | {scores['exact_match']:.3f} |")
    lines += ["", "| alignment | value |", "|---|---|"]
    lines += [f"| {key} | {value:.3f} |" for key, value in results["alignment"].items()]
    examples = [p for p in results["predictions"] if p["reference"]][:: max(len(results["predictions"]) // 8, 1)][:8]
    lines += ["", "| language | reference | translation |", "|---|---|---|"]
    lines += [f"| {p['language']} | {p['reference']} | {p['hypothesis']} |" for p in examples]
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timer.seconds.items()]
    lines.append(f"| **total** | {sum(timer.seconds.values()):.0f} |")
    if standin_quality:
        lines += ["", "Stand-ins: " + ", ".join(f"{key} {value:.3f}" for key, value in standin_quality.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where stages, cache and report go")
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus"), help="corpus folder (made if missing)")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), help="corpus categories to speak")
    parser.add_argument("--standins", type=Path, default=Path("runs/standins"), help="stand-in models (made if missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    timer = PhaseTimer()

    corpus, quality = prepare_corpus_and_standins(args.corpus, args.standins, args.categories, args.seed, timer)
    write_model_config(args.out, args.standins)
    final = run_stages(args.out, args.corpus, args.seed, timer)

    bundle = args.out / "potsa-tiny"
    model = PotsaForSpeechTranslation.from_pretrained(final)
    model.save_pretrained(bundle, include_base_weights=True)  # self-contained: loads without runs/standins
    PotsaProcessor.from_pretrained(final).save_pretrained(bundle)
    translate = pipeline("translation", model=str(bundle), trust_remote_code=True)
    example = corpus["test"].filter(lambda row: row["language"] == "es").select(range(1))[0]
    output = translate({"array": example["audio"]["array"], "sampling_rate": example["audio"]["sampling_rate"]},
                       language="es")  # fmt: skip
    print(f"[demo] pipeline on {example['transcript']!r} (es): {output[0]['translation_text']!r}, "
          f"reference {example['translation']!r}")  # fmt: skip

    text = report(args, timer, quality)
    (args.out / "demo.md").write_text(text)
    (REPO / "benchmarks/results/demo.md").write_text(
        "# README demo (`python -m benchmarks.demo`, 2 CPU cores)\n\n" + text
    )
    print(text)
    return bundle


if __name__ == "__main__":
    main()
