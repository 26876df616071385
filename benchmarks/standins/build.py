"""Make both stand-ins for a corpus, record what they were made from and how good they are, and decide whether a
set of stand-ins can serve a given demo corpus (they must hear its languages, and their LLM must never have read a
test target of it)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from benchmarks.corpus import supported_languages

from .encoder import EncoderRecipe, train_speech_encoder
from .language_model import LanguageModelRecipe, language_model_text, train_language_model

QUALITY_FILE = "quality.json"
# Every language the corpus can speak, as Whisper and Qwen know every language a user may pick as seen or zero-shot.
STANDIN_LANGUAGES = tuple(supported_languages())


@dataclass(frozen=True)
class CorpusSpec:
    """What decides a corpus' sentences and splits (not its languages): the LLM stand-in reads the train-split text
    of one spec, so it may serve only demos whose corpus has the same spec, or it would have read test targets."""

    seed: int = 0
    num_sentences: dict[str, int] = field(default_factory=lambda: {"train": 3000, "validation": 200, "test": 400})
    categories: tuple[str, ...] = ("number", "date", "time", "colours")
    max_seconds: float = 3.0  # the stand-in encoder's window (EncoderRecipe.window_seconds)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as quality.json stores them


def _train_language_model_single_threaded(*args: Any) -> dict[str, float]:
    """`train_language_model` on one CPU thread, timed (run in a child process)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    report = train_language_model(*args)
    return {**report, "seconds": time.perf_counter() - start}


def build_standins(
    corpus: datasets.DatasetDict,
    out_dir: str | Path,
    spec: CorpusSpec,
    encoder_recipe: EncoderRecipe = EncoderRecipe(),
    language_model_recipe: LanguageModelRecipe = LanguageModelRecipe(),
) -> dict[str, Any]:
    """Both stand-ins under `out_dir/encoder` and `out_dir/llm`, trained on `corpus` (made with `spec`), and their
    quality report, also written to `out_dir/quality.json`.

    They are independent, so they train at the same time: the LM in a child process on one core, the encoder here
    on the other core until the LM is done, then on all of them. Small models use a second thread poorly (measured
    on 2 cores: 1.3x for the encoder's step), so two single-threaded jobs get more done than one after the other."""
    out_dir = Path(out_dir)
    pairs, validation = language_model_text(corpus)
    all_threads = torch.get_num_threads()
    start = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        language_model = pool.submit(
            _train_language_model_single_threaded, pairs, validation, out_dir / "llm", language_model_recipe, spec.seed
        )

        def threads() -> int:
            return all_threads if language_model.done() else max(all_threads - 1, 1)

        asr = train_speech_encoder(
            corpus["train"], corpus["validation"], out_dir / "encoder", encoder_recipe, spec.seed, threads
        )
        encoder_seconds = time.perf_counter() - start
        llm = language_model.result()
    torch.set_num_threads(all_threads)
    report = {
        "corpus": {"languages": sorted(set(corpus["train"]["language"])), **spec.to_dict()},
        "encoder": {"validation": asr, "seconds": encoder_seconds, "recipe": dataclasses.asdict(encoder_recipe)},
        "llm": {**llm, "recipe": dataclasses.asdict(language_model_recipe)},
    }
    (out_dir / QUALITY_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def check_standins(directory: str | Path, spec: CorpusSpec, languages: Sequence[str]) -> list[str]:
    """Why the stand-ins in `directory` cannot serve a demo corpus of `spec` in `languages` (empty: they can)."""
    directory = Path(directory)
    quality_file = directory / QUALITY_FILE
    if not all((directory / part / "model.safetensors").is_file() for part in ("encoder", "llm")):
        return [f"no stand-in checkpoints in {directory}"]
    if not quality_file.is_file():
        return [f"no {QUALITY_FILE} in {directory} (what they were made from is unknown)"]
    made_from = json.loads(quality_file.read_text())["corpus"]
    problems = []
    unheard = sorted(set(languages) - set(made_from["languages"]))
    if unheard:
        problems.append(f"they never heard {unheard}")
    recorded = {key: made_from[key] for key in spec.to_dict()}
    if recorded != spec.to_dict():
        problems.append(f"their LLM read the train split of another corpus ({recorded}), which may hold this "
                        f"corpus' test targets ({spec.to_dict()})")  # fmt: skip
    return problems


def standins_for(spec: CorpusSpec, languages: Sequence[str], shipped: Path, own_dir: Path) -> Path | None:
    """The stand-ins a demo corpus can use: the shipped ones, or ones built for it earlier in `own_dir`; None when
    neither fits (the caller builds them into `own_dir`)."""
    for directory in (shipped, own_dir):
        if not check_standins(directory, spec, languages):
            return directory
    return None


__all__ = ["QUALITY_FILE", "STANDIN_LANGUAGES", "CorpusSpec", "build_standins", "check_standins", "standins_for"]
