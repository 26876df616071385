"""Rebuild the stand-ins shipped in benchmarks/standins/checkpoints.

    python -m benchmarks.standins [--out benchmarks/standins/checkpoints] [--corpus data/standin_corpus]

Speaks the corpus of the demo's spec (`CorpusSpec()`) in every language the corpus supports (made once, kept in
--corpus), pretrains both stand-ins on it, and writes their checkpoints and quality.json, with the wall time and this
machine's pace ratio (`benchmarks.bench_machine_pace`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import datasets

from benchmarks.bench_machine_pace import pace_ratio
from benchmarks.corpus import generate_corpus
from benchmarks.standins import SHIPPED
from benchmarks.standins.build import QUALITY_FILE, STANDIN_LANGUAGES, CorpusSpec, build_standins


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.standins", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED, help="where the checkpoints and quality.json go")
    parser.add_argument("--corpus", type=Path, default=Path("data/standin_corpus"), help="corpus folder (made if missing)")
    args = parser.parse_args(argv)
    spec = CorpusSpec()
    start = time.perf_counter()
    if not (args.corpus / "dataset_dict.json").exists():
        generate_corpus(
            STANDIN_LANGUAGES, out_dir=str(args.corpus), num_sentences=spec.num_sentences, seed=spec.seed,
            categories=spec.categories, max_seconds=spec.max_seconds, progress=True,
        )  # fmt: skip
    corpus = datasets.load_from_disk(str(args.corpus))
    report = build_standins(corpus, args.out, spec)
    report["wall_seconds"] = time.perf_counter() - start
    report["pace_ratio"] = pace_ratio()
    report["command"] = "python -m benchmarks.standins"
    (args.out / QUALITY_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({key: report[key] for key in ("encoder", "llm", "wall_seconds", "pace_ratio")}, indent=1))
    return report


if __name__ == "__main__":
    main()
