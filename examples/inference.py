"""Translate an audio file or a saved array with a POTSA checkpoint, through the speech-translation pipeline.

    python -m examples.inference --model DIR_OR_REPO --audio speech.flac --language es
    python -m examples.inference --model DIR_OR_REPO --array clip.npy --sampling-rate 22050   # language detected

Only transformers is needed: the checkpoint brings its own code (`trust_remote_code=True`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from transformers import pipeline


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub repo id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", type=Path, help="audio file (wav, flac, ogg, ...)")
    source.add_argument("--array", type=Path, help="a .npy array of samples (mono, or channels x samples)")
    parser.add_argument("--sampling-rate", type=int, help="rate of --array (files carry their own)")
    parser.add_argument("--language", help="source language code; omitted: detected from the audio")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3)
    args = parser.parse_args(argv)

    translate = pipeline("translation", model=args.model, trust_remote_code=True)
    audio = str(args.audio) if args.audio else np.load(args.array)
    result = translate(
        audio,
        sampling_rate=args.sampling_rate,
        language=args.language,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    print(json.dumps(result, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
