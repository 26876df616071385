"""Generate the espeak corpus (or check espeak's reading of the lexicons) and print a summary.

    python -m benchmarks.corpus --seen en es ru ja --zero-shot related:it,pt distant:de,ko --out data/corpus
    python -m benchmarks.corpus --languages en es ru ja de ko --out data/corpus --seed 0
    python -m benchmarks.corpus --languages ja ko --check

Every language gets every split (a zero-shot language's train audio serves its bias vector and the parallel-audio
protocol); `--seen` / `--zero-shot` name the roles, which the summary groups by (see `roles.py`).
"""

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from . import CATEGORY_WEIGHTS, DEFAULT_SENTENCES, SPLITS, generate_corpus, reading_problems, supported_languages
from .roles import LanguageRoles, language_roles


def _seconds(dataset) -> float:
    """Total audio duration, read from the Arrow list lengths without decoding any rows."""
    total = 0.0
    for chunk in dataset.data.column("audio").chunks:
        samples = pc.list_value_length(chunk.field("array")).to_numpy(zero_copy_only=False)
        total += float(np.sum(samples / chunk.field("sampling_rate").to_numpy()))
    return total


def _size_on_disk(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__.splitlines()[0])
    languages = parser.add_mutually_exclusive_group(required=True)
    languages.add_argument("--languages", nargs="+", choices=supported_languages(), metavar="CODE",
                           help=f"languages to speak, among {' '.join(supported_languages())}")
    languages.add_argument("--seen", nargs="+", metavar="CODE", help="languages a benchmark trains on")
    parser.add_argument("--zero-shot", nargs="*", default=[], metavar="[GROUP:]CODE[,CODE]",
                        help="held-out languages, optionally in named groups (with --seen), e.g. related:it,pt distant:de,ko")
    parser.add_argument("--out", type=Path, help="directory for DatasetDict.save_to_disk (not saved without it)")
    parser.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        parser.add_argument(f"--sentences-{split}", type=int, default=DEFAULT_SENTENCES[split], metavar="N",
                            help=f"sentences in {split} (default {DEFAULT_SENTENCES[split]}), spoken in every language")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORY_WEIGHTS), choices=list(CATEGORY_WEIGHTS))
    parser.add_argument("--max-seconds", type=float, default=3.5, help="longest clip kept after trimming (default 3.5)")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes (default 2)")
    parser.add_argument("--check", action="store_true",
                        help="only check that espeak reads each language's lexicon natively; exit 1 on problems")
    args = parser.parse_args(argv)
    if args.zero_shot and not args.seen:
        parser.error("--zero-shot goes with --seen (with --languages every language has the same role)")
    try:
        args.roles = language_roles(args.seen, args.zero_shot) if args.seen else None
    except ValueError as error:
        parser.error(str(error))
    if args.roles is not None:
        args.languages = args.roles.languages
    return args


def _role(roles: LanguageRoles | None, language: str) -> str:
    if roles is None:
        return ""
    return next(name for name, codes in roles.groups().items() if language in codes)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        problems = [problem for language in args.languages for problem in reading_problems(language)]
        print("\n".join(problems) or f"espeak reads {' '.join(args.languages)} natively")
        return 1 if problems else 0
    start = time.perf_counter()
    corpus = generate_corpus(
        args.languages,
        out_dir=args.out,
        num_sentences={split: getattr(args, f"sentences_{split}") for split in SPLITS},
        seed=args.seed,
        categories=args.categories,
        max_seconds=args.max_seconds,
        workers=args.workers,
        progress=True,
    )
    wall = time.perf_counter() - start
    print(f"{'language':<10}{'role':<12}" + "".join(f"{split:>12}" for split in SPLITS))
    counts = {split: Counter(corpus[split].data.column("language").to_pylist()) for split in SPLITS}
    for language in args.languages:
        role = _role(args.roles, language)
        print(f"{language:<10}{role:<12}" + "".join(f"{counts[split].get(language, 0):>12}" for split in SPLITS))
    hours = {split: _seconds(corpus[split]) / 3600 for split in SPLITS}
    print(f"{'hours':<22}" + "".join(f"{hours[split]:>12.2f}" for split in SPLITS))
    total = sum(corpus.num_rows.values())
    saved = f", {_size_on_disk(args.out) / 2**30:.2f} GiB on disk in {args.out}" if args.out else ""
    print(f"{total} clips, {sum(hours.values()):.2f} h of audio{saved}; {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
