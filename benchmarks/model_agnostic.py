"""POTSA is model-agnostic: the demo's recipe with a Llama LLM stand-in in place of the Qwen2 one.

    python -m benchmarks.model_agnostic [--architecture llama]

Everything else is the demo's (`python -m benchmarks.demo`, run first if missing): its corpus, the shipped Whisper
stand-in, the stage configs and budgets. The LLM stand-in is trained with the shipped one's recipe and text
(`LanguageModelRecipe`, only `architecture` differs; the text of the stand-ins' corpus, spoken if missing) and loaded
through `AutoModelForCausalLM` like any other causal LM, so the comparison with the demo's POTSA row isolates the
LLM family. One seed each. Results: benchmarks/results/model_agnostic.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import datasets

from benchmarks import demo
from benchmarks.bench_machine_pace import pace_ratio
from benchmarks.corpus import generate_corpus
from benchmarks.corpus.roles import language_roles
from benchmarks.jobs import REPO, execute
from benchmarks.report import HEADLINE, group_score
from benchmarks.standins import (
    SHIPPED,
    STANDIN_LANGUAGES,
    CorpusSpec,
    LanguageModelRecipe,
    language_model_text,
    train_language_model,
)


def _row(name: str, results: dict, groups: list[str]) -> str:
    cells = [f"{group_score(results, 'seen')['exact_match']:.3f}"]
    cells += [f"{group_score(results, group, HEADLINE)['exact_match']:.3f}" for group in groups]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_agnostic", description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="llama", help="model_type of the LLM stand-in")
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo's output (made if missing)")
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus"), help="the demo's corpus")
    parser.add_argument("--standin-corpus", type=Path, default=Path("data/standin_corpus"),
                        help="the stand-ins' corpus, for the LLM's text (spoken if missing)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/model_agnostic"))
    args = parser.parse_args(argv)
    roles = language_roles(demo.SEEN, demo.ZERO_SHOT)
    potsa = args.demo / "stage3_potsa"
    if not (potsa / "results.json").exists():
        demo.main(["--out", str(args.demo), "--corpus", str(args.corpus)])
    out = args.out / args.architecture
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    llm = out / "llm"
    if not (llm / "config.json").exists():
        spec = CorpusSpec()
        if not (args.standin_corpus / "dataset_dict.json").exists():
            generate_corpus(STANDIN_LANGUAGES, out_dir=str(args.standin_corpus), num_sentences=spec.num_sentences,
                            seed=spec.seed, categories=spec.categories, max_seconds=spec.max_seconds, progress=True)
        pairs, validation = language_model_text(datasets.load_from_disk(str(args.standin_corpus)))
        quality = train_language_model(pairs, validation, llm, LanguageModelRecipe(architecture=args.architecture))
        (llm / "quality.json").write_text(json.dumps(quality, indent=2))
    demo.write_model_config(out, SHIPPED, roles, llm=llm)
    common = demo.stage_settings(out, args.corpus, roles, seed=0)
    stage2 = demo.run_stages_1_2(out, common, demo.PhaseTimer())
    demo.cache_stage3_inputs(stage2, common, roles)
    jobs = [job for job in demo.stage3_jobs(out, stage2, common) if job.name == "POTSA"]
    execute(jobs, workers=1, log_dir=out / "logs", description="stage 3")
    zero_shot = list(roles.zero_shot)
    qwen_quality = json.loads((SHIPPED / "quality.json").read_text())["llm"]["text_translation_exact"]
    own_quality = json.loads((llm / "quality.json").read_text())["text_translation_exact"]
    lines = [
        f"# POTSA with another LLM family (`python -m benchmarks.model_agnostic --architecture {args.architecture}`)",
        "",
        "The demo's corpus, Whisper stand-in, stage configs and budgets; only the LLM stand-in's architecture differs "
        f"(same recipe and text, loaded through `AutoModelForCausalLM`). POTSA rows, one seed each; this run took "
        f"{(time.perf_counter() - start) / 60:.1f} min here (pace ratio {pace_ratio():.2f}). Every test utterance.",
        "",
        "| LLM stand-in | seen EM | " + " | ".join(f"{group} EM, {HEADLINE}" for group in zero_shot) + " |",
        "|---|---:|" + "---:|" * len(zero_shot),
        _row("qwen2 (the demo)", json.loads((potsa / "results.json").read_text()), zero_shot),
        _row(args.architecture, json.loads((jobs[0].out_dir / "results.json").read_text()), zero_shot),
        "",
        f"Text-translation exact match of the LLM stand-ins after pretraining (their own check): qwen2 "
        f"{qwen_quality:.3f}, {args.architecture} {own_quality:.3f}.",
    ]
    results = REPO / "benchmarks/results/model_agnostic.md"
    results.write_text("\n".join(lines) + "\n")
    print(results.read_text())
    return results


if __name__ == "__main__":
    main()
