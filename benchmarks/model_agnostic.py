"""POTSA is model-agnostic: the demo's recipe with a Llama LLM stand-in in place of the Qwen2 one.

    python -m benchmarks.model_agnostic [--architecture llama]

Everything else is the demo's (`python -m benchmarks.demo`, run first if missing): the corpus, the Whisper
stand-in, its encoder cache, the three stage configs and their budgets. The LLM stand-in is trained with the same
recipe (`LanguageModelRecipe`, only `architecture` differs) and loaded through `AutoModelForCausalLM` like any other
causal LM, so the comparison with the demo's Qwen2 row isolates the LLM family. One seed each.
Results: benchmarks/results/model_agnostic.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import datasets

from benchmarks import demo
from benchmarks.demo import REPO, STAGES, PhaseTimer, run_stages, write_model_config
from benchmarks.standins import LanguageModelRecipe, language_model_text, train_language_model


def _row(name: str, results_file: Path) -> str:
    groups = json.loads(results_file.read_text())["groups"]
    seen, zero_shot = groups["seen"], groups["zero_shot"]
    return (
        f"| {name} | {seen['bleu']:.1f} | {seen['exact_match']:.3f} | {zero_shot['bleu']:.1f} | "
        f"{zero_shot['exact_match']:.3f} |"
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="llama", help="model_type of the LLM stand-in")
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo's output (made if missing)")
    parser.add_argument("--standins", type=Path, default=Path("runs/standins"), help="the demo's stand-ins")
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus"))
    parser.add_argument("--out", type=Path, default=Path("runs/model_agnostic"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.demo / STAGES[-1] / "results.json").exists():
        demo.main(["--out", str(args.demo), "--corpus", str(args.corpus), "--standins", str(args.standins)])
    out = args.out / args.architecture
    out.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer()
    llm = out / "llm"
    if not (llm / "config.json").exists():
        pairs, validation = language_model_text(datasets.load_from_disk(str(args.corpus)))
        recipe = LanguageModelRecipe(architecture=args.architecture)
        quality = timer(f"{args.architecture} LLM stand-in",
                        lambda: train_language_model(pairs, validation, llm, recipe, args.seed))  # fmt: skip
        (llm / "quality.json").write_text(json.dumps(quality, indent=2))
    write_model_config(out, args.standins, llm)
    start = time.perf_counter()
    final = run_stages(out, args.corpus, args.seed, timer, cache=args.demo / "encoder_cache")
    quality = json.loads((llm / "quality.json").read_text())
    lines = [
        f"# POTSA with another LLM family (`python -m benchmarks.model_agnostic --architecture {args.architecture}`)",
        "",
        "The demo's corpus, Whisper stand-in, stage configs and budgets; only the LLM stand-in's architecture "
        f"differs (same recipe, loaded through `AutoModelForCausalLM`). One seed each; stages took "
        f"{(time.perf_counter() - start) / 60:.1f} min here. Test: every test sentence, seen en es ru ja, "
        "zero-shot de ko (strict protocol).",
        "",
        "| LLM stand-in | seen BLEU | seen EM | zero-shot BLEU | zero-shot EM |",
        "|---|---|---|---|---|",
        _row("qwen2 (the demo)", args.demo / STAGES[-1] / "results.json"),
        _row(args.architecture, final / "results.json"),
        "",
        "Text-translation exact match of the LLM stand-ins after their pretraining (their own check): qwen2 "
        f"{json.loads((args.standins / 'quality.json').read_text())['lm_text_translation_exact']:.3f}, "
        f"{args.architecture} {quality['lm_text_translation_exact']:.3f}.",
    ]
    results = REPO / "benchmarks/results/model_agnostic.md"
    results.write_text("\n".join(lines) + "\n")
    print(results.read_text())
    return results


if __name__ == "__main__":
    main()
