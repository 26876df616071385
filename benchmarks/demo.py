"""The README's main job: POTSA against its control, end to end on the offline corpus, on a CPU, in minutes.

    python -m benchmarks.demo [--seen en es ru ja] [--zero-shot related:it,pt distant:de,ko]   (or: make demo)

1. corpus      eSpeak NG speech of the same sentences in the seen and zero-shot languages (numbers, dates, times,
               colour lists; Chinese targets), made once and kept (`benchmarks/corpus`); only what the demo uses:
               no validation split, and of the zero-shot languages' train audio the part their bias estimate reads
2. stand-ins   the pretrained Whisper and Qwen2 stand-ins shipped in benchmarks/standins/checkpoints (they hear
               every corpus language, as Whisper and Qwen do); rebuilt into --out only if they cannot serve this
               corpus (another spec: their LLM might have read its test targets)
3. stages      training/run.py, as in the paper: 1 ASR pretraining, 2 S2TT, on the seen languages only; then stage 3
               twice from the same stage 2, side by side on one core each: the *baseline* (CE only, no bias
               compensation) and *POTSA* (bias compensation estimated from audio of every language, zero-shot ones
               included, then CE + lambda * OT with UCB over Q-Former layers 1-2); the zero-shot languages take
               no part in any stage but their bias estimate (the paper's strict protocol)
4. report      exact match (EM) and BLEU per language, category and group for both rows, on every test utterance;
               the zero-shot headline is EM on numbers + times (what a held-out language can carry: dates and
               colours use words only its own lexicon has), the all-category figure beside it; the paired bootstrap
               interval of POTSA - baseline (one seed each: an interval over utterances, not a claim; the ablation
               has the seeds); wall time per phase with this machine's pace ratio
               (`benchmarks.bench_machine_pace`). POTSA's checkpoint is bundled and loaded back through
               `pipeline("translation", ...)`.

Results: runs/demo/ and benchmarks/results/demo.md + demo.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import yaml
from transformers import pipeline

from benchmarks.bench_machine_pace import pace_ratio
from benchmarks.corpus import generate_corpus
from benchmarks.corpus.roles import LanguageRoles, language_roles
from benchmarks.jobs import REPO, Job, execute
from benchmarks.report import demo_tables
from benchmarks.standins import SHIPPED, CorpusSpec, build_standins, check_standins, standins_for
from modeling_potsa import PotsaForSpeechTranslation, PotsaProcessor
from potsa_training.arguments import DataArguments
from potsa_training.encoder_cache import cache_encoder_outputs
from potsa_training.run import bias_audio, load_checkpoint, run
from potsa_training.sources import load_source, select_languages
from potsa_training.validation import validate_examples

SEEN = ["en", "es", "ru", "ja"]
ZERO_SHOT = ["related:it,pt", "distant:de,ko"]
STAGES = ("tiny_stage1_asr", "tiny_stage2_s2tt")
ROWS = {  # stage-3 rows: tiny_stage3_potsa.yaml with these overrides
    "baseline": {"ot_loss_weight": 0.0, "use_bias_compensation": False, "estimate_bias": False},
    "POTSA": {},
}
BIAS_UTTERANCES = 500  # per language, for its bias vector (training/configs/tiny_stage3_potsa.yaml)


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


def language_settings(roles: LanguageRoles) -> dict[str, Any]:
    """The stage settings that put these languages in their roles (the configs' own lists are the default's)."""
    return {
        "train_languages": list(roles.seen),
        "zero_shot_languages": roles.zero_shot_languages,
        "report_groups": {name: list(codes) for name, codes in roles.zero_shot.items()},
    }


def demo_subsets(roles: LanguageRoles) -> dict[str, dict[str, int]]:
    """What the demo leaves unspoken: the validation split (nothing here is chosen on it: benchmarks/ablation.py and
    stage3_selection.py speak it), and the zero-shot languages' train audio beyond their bias estimate."""
    return {code: {"validation": 0, **({"train": BIAS_UTTERANCES} if code in roles.zero_shot_languages else {})}
            for code in roles.languages}  # fmt: skip


def prepare_corpus(
    path: Path, roles: LanguageRoles, spec: CorpusSpec, subsets: dict[str, dict[str, int]] | None = None
) -> datasets.DatasetDict:
    """The corpus of `spec` in the roles' languages (with `subsets`, see `generate_corpus`): made if missing,
    refused if the folder holds another corpus."""
    wanted = {**spec.to_dict(), "languages": roles.languages, "subsets": subsets or {}}
    recorded = path / "corpus_spec.json"
    if not (path / "dataset_dict.json").exists():
        generate_corpus(
            roles.languages, out_dir=str(path), num_sentences=spec.num_sentences, seed=spec.seed,
            categories=spec.categories, max_seconds=spec.max_seconds, progress=True, subsets=subsets,
        )  # fmt: skip
        recorded.write_text(json.dumps(wanted))
    if not recorded.exists() or json.loads(recorded.read_text()) != wanted:
        raise SystemExit(f"{path} holds another corpus than this run needs ({wanted}): pass --corpus with a new "
                         "folder, or delete it.")  # fmt: skip
    return datasets.load_from_disk(str(path))


def prepare_standins(corpus: datasets.DatasetDict, roles: LanguageRoles, spec: CorpusSpec, out: Path) -> Path:
    """The shipped stand-ins when they can serve this corpus, else ones built for it (said why, and kept)."""
    found = standins_for(spec, roles.languages, SHIPPED, out / "standins")
    if found is not None:
        return found
    print(f"[demo] the shipped stand-ins cannot serve this corpus: {'; '.join(check_standins(SHIPPED, spec, roles.languages))}."
          f" Building stand-ins for it in {out / 'standins'} (about 20 minutes on 2 cores).", flush=True)  # fmt: skip
    build_standins(corpus, out / "standins", spec)
    return out / "standins"


def write_model_config(out: Path, standins: Path, roles: LanguageRoles, llm: Path | None = None) -> Path:
    """training/configs/model_tiny.yaml with these stand-ins (the LLM: `llm`, default standins/llm) and languages, as
    out/model_tiny.yaml."""
    settings = yaml.safe_load((REPO / "training/configs/model_tiny.yaml").read_text())
    settings.update(encoder_model_id=str(standins / "encoder"), text_model_id=str(llm or standins / "llm"),
                    languages=roles.languages)  # fmt: skip
    path = out / "model_tiny.yaml"
    path.write_text(yaml.safe_dump(settings, allow_unicode=True, sort_keys=False))
    return path


def stage_settings(out: Path, corpus: Path, roles: LanguageRoles, seed: int) -> dict[str, Any]:
    """What every stage of this run shares: data, languages, encoder cache, seed."""
    return {
        "data_path": str(corpus), "encoder_cache_dir": str(out / "encoder_cache"), "seed": seed,
        **language_settings(roles),
    }  # fmt: skip


def stages_1_2_settings(out: Path, common: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Stage config -> settings of stages 1 (ASR) and 2 (S2TT), each from the previous one's checkpoint; only the
    final models are evaluated (the ablation evaluates stage 2)."""
    previous: dict[str, Any] = {"model_config": str(out / "model_tiny.yaml")}
    stages = {}
    for stage in STAGES:
        stages[stage] = {**common, **previous, "output_dir": str(out / stage), "disable_tqdm": False, "test_split": None}
        previous = {"init_from": str(out / stage)}
    return stages


def run_stages_1_2(out: Path, common: dict[str, Any], timer: PhaseTimer) -> Path:
    """Stages 1 and 2 in this process, on all CPU threads; returns the stage-2 checkpoint."""
    for stage, settings in stages_1_2_settings(out, common).items():
        config = REPO / "training/configs" / f"{stage}.yaml"
        timer(stage, lambda: run(["--config", str(config), *(f"{k}={json.dumps(v)}" for k, v in settings.items())]))
    return out / STAGES[-1]


def cache_stage3_inputs(stage2: Path, common: dict[str, Any], roles: LanguageRoles, zero_shot_train: bool = False):
    """Encode what stage-3 runs read beyond stage 1's cache (the test split, every language's bias audio, and with
    `zero_shot_train` the zero-shot languages' train audio, for the parallel-audio protocol) before they start side
    by side: concurrent runs then only ever read the cache."""
    model, processor = load_checkpoint(str(stage2), None)
    model.config.languages = roles.languages
    data = DataArguments(data_source="disk", data_path=common["data_path"], bias_max_per_language=BIAS_UTTERANCES)
    load = functools.partial(load_source, "disk", common["data_path"])
    wanted = [(load(split="test"), roles.languages)]
    if zero_shot_train:
        wanted.append((load(split="train"), roles.zero_shot_languages))
    for dataset, languages in wanted:
        checked = validate_examples(select_languages(dataset, languages), roles.languages, processor)[0]
        cache_encoder_outputs(model, checked, processor, common["encoder_cache_dir"])
    cache_encoder_outputs(model, bias_audio(data, model, processor), processor, common["encoder_cache_dir"])


def stage3_jobs(out: Path, stage2: Path, common: dict[str, Any]) -> list[Job]:
    settings = {**common, "init_from": str(stage2), "bias_max_per_language": BIAS_UTTERANCES, "test_split": "test"}
    return [Job(name, out / f"stage3_{name.lower()}", "tiny_stage3_potsa", {**settings, **overrides})
            for name, overrides in ROWS.items()]  # fmt: skip


def check_pipeline(bundle: Path, corpus: datasets.DatasetDict, language: str) -> str:
    """Load the bundle back as a Hub user would and translate one test clip; returns the line that says so."""
    translate = pipeline("translation", model=str(bundle), trust_remote_code=True)
    example = corpus["test"].filter(lambda row: row["language"] == language).select(range(1))[0]
    output = translate(example["audio"], language=language)
    return (f"pipeline(\"translation\") on {example['transcript']!r} ({language}): "
            f"{output[0]['translation_text']!r}, reference {example['translation']!r}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seen", nargs="+", default=SEEN, metavar="CODE", help="languages trained on")
    parser.add_argument("--zero-shot", nargs="+", default=ZERO_SHOT, metavar="[GROUP:]CODE[,CODE]",
                        help="held-out languages in named groups (default: related:it,pt distant:de,ko)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="stages, cache and report")
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus"), help="corpus folder (made if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results", help="where demo.md/json go")
    args = parser.parse_args(argv)
    try:
        roles = language_roles(args.seen, args.zero_shot)
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    timer, spec = PhaseTimer(), CorpusSpec()
    start = time.perf_counter()
    pace = timer("machine pace", pace_ratio)
    corpus = timer("corpus", lambda: prepare_corpus(args.corpus, roles, spec, demo_subsets(roles)))
    standins = timer("stand-ins", lambda: prepare_standins(corpus, roles, spec, args.out))
    write_model_config(args.out, standins, roles)
    common = stage_settings(args.out, args.corpus, roles, args.seed)
    stage2 = run_stages_1_2(args.out, common, timer)
    timer("encoder cache (test, bias audio)", lambda: cache_stage3_inputs(stage2, common, roles))
    jobs = stage3_jobs(args.out, stage2, common)
    timer("stage 3: baseline and POTSA", lambda: execute(jobs, workers=2, log_dir=args.out / "logs",
                                                         description="stage 3 runs"))  # fmt: skip
    bundle = args.out / "potsa-tiny"
    potsa = jobs[-1].out_dir
    PotsaForSpeechTranslation.from_pretrained(potsa).save_pretrained(bundle, include_base_weights=True)
    PotsaProcessor.from_pretrained(potsa).save_pretrained(bundle)
    example = timer("pipeline check", lambda: check_pipeline(bundle, corpus, roles.seen[0]))
    wall = time.perf_counter() - start
    rows = {job.name: json.loads((job.out_dir / "results.json").read_text()) for job in jobs}
    quality = json.loads((standins / "quality.json").read_text())
    summary, markdown = demo_tables(rows, roles, timer.seconds, wall, pace, quality, example)
    print(markdown)
    (args.out / "demo.md").write_text(markdown)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "demo.md").write_text(markdown)
    (args.results / "demo.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


if __name__ == "__main__":
    main()
