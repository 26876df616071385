"""Translate a `datasets` dataset saved to disk (an `audio` and a `language` column) into a JSONL file.

    python -m examples.batch_translate --model DIR_OR_REPO --dataset DIR [--split test] --out predictions.jsonl

One JSON object per row, in dataset order: the row's index and text columns (e.g. sentence_id, the reference
`translation`), the model's `translation_text` and, with `--detect-language`, the `detected_language` (the
`language` column is then not given to the model).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm
from transformers import pipeline


def load_split(path: str | Path, split: str) -> datasets.Dataset:
    """One split of a `save_to_disk` directory (a `Dataset` is its own only split)."""
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"Split {split!r} not found; the dataset has {list(dataset)}.")
        dataset = dataset[split]
    return dataset


def text_columns(dataset: datasets.Dataset) -> list[str]:
    return [name for name, feature in dataset.features.items() if feature == datasets.Value("string")]


def batches(dataset: datasets.Dataset, size: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of `size` rows, in order, without the whole dataset in memory."""
    for columns in dataset.iter(batch_size=size):
        yield [dict(zip(columns, values)) for values in zip(*columns.values())]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub repo id")
    parser.add_argument("--dataset", required=True, type=Path, help="a datasets.save_to_disk directory")
    parser.add_argument("--split", default="test", help="split of a DatasetDict")
    parser.add_argument("--out", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per generate call")
    parser.add_argument("--detect-language", action="store_true", help="ignore the language column: detect it")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3)
    args = parser.parse_args(argv)

    dataset = load_split(args.dataset, args.split)
    keep = text_columns(dataset)
    translate = pipeline(
        "translation",
        model=args.model,
        trust_remote_code=True,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    index = 0
    with args.out.open("w", encoding="utf-8") as out, tqdm(total=len(dataset), unit="utt", desc="Translating") as bar:
        for rows in batches(dataset, args.batch_size):
            inputs = [
                {"audio": row["audio"], "language": None if args.detect_language else row["language"]}
                for row in rows
            ]
            for row, result in zip(rows, translate(inputs, batch_size=args.batch_size)):
                record = {"index": index, **{name: row[name] for name in keep}}
                record["translation_text"] = result["translation_text"]
                if args.detect_language:
                    record["detected_language"] = result["language"]
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                index += 1
            bar.update(len(rows))
    return args.out


if __name__ == "__main__":
    main()
