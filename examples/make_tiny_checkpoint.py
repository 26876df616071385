"""Write a tiny, random, fully offline POTSA checkpoint (model + processor + code files) to a directory.

    python examples/make_tiny_checkpoint.py --out DIR

The directory then loads anywhere, without this package installed:

    AutoModel.from_pretrained(DIR, trust_remote_code=True)
    AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from potsa_training.tiny import build_tiny_potsa


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--languages", nargs="+", default=["en", "es", "ja", "ko", "ru", "zh"], help="language codes of the bias table"
    )
    args = parser.parse_args(argv)
    model, processor = build_tiny_potsa(languages=args.languages, seed=args.seed)
    model.save_pretrained(args.out)  # the tiny model has no base ids, so its encoder and LLM are bundled
    processor.save_pretrained(args.out)
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
