"""Parameter counts (trainable vs total) of the tiny demo model and the paper's real-size model.

    python -m benchmarks.param_counts

The real-size model is instantiated on the meta device from training/configs/model_paper.yaml: exact counts, no
download, no memory. Results go to benchmarks/results/param_counts.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation
from potsa_training.tiny import build_tiny_potsa

REPO = Path(__file__).resolve().parents[1]

PARTS = ("speech_encoder", "bias_compensation", "query_tokens", "qformer", "projector", "language_model")


def count(config: PotsaConfig) -> dict[str, int]:
    with torch.device("meta"):
        return PotsaForSpeechTranslation(config).num_parameters_by_part()


def main() -> str:
    tiny_model, _ = build_tiny_potsa()
    paper = PotsaConfig(**yaml.safe_load((REPO / "training/configs/model_paper.yaml").read_text()))
    rows = {"tiny (tests)": count(tiny_model.config), "paper (Whisper-large-v3 + Qwen2.5-7B)": count(paper)}
    lines = [
        "# Parameter counts (meta-device init; `python -m benchmarks.param_counts`)",
        "",
        "| model | " + " | ".join(PARTS) + " | trainable | total | trainable % |",
        "|---" * (len(PARTS) + 4) + "|",
    ]
    for name, counts in rows.items():
        cells = [f"{counts[part]:,}" for part in (*PARTS, "trainable", "total")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * counts['trainable'] / counts['total']:.2f} |")
    report = "\n".join(lines) + "\n"
    (REPO / "benchmarks/results/param_counts.md").write_text(report)
    return report


if __name__ == "__main__":
    print(main())
