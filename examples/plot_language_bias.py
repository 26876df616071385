"""Plot the language bias of the speech encoder: utterances' pooled encoder outputs and each language's centroid,
in 2-D (PCA), before and after bias compensation.

    python -m examples.plot_language_bias --model DIR_OR_REPO --dataset DIR [--split test] --out language_bias.png

Before compensation utterances cluster by language; after subtracting each language's bias vector the centroids
meet at the origin and what remains is content and speaker. If the checkpoint's bias table was never estimated
(all zeros), the vectors are estimated from the plotted utterances themselves, as training does from unlabeled
audio, and the title says so. Also printed: the share of the variance that the language explains.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import datasets
import matplotlib
import matplotlib.figure
import torch
from transformers import AutoModel, AutoProcessor

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

from examples.batch_translate import batches, load_split
from modeling_potsa.bias_compensation import masked_time_mean
from potsa_training.bias_estimation import LanguageBiasEstimator
from potsa_training.rows import audio_features


@torch.no_grad()
def pooled_outputs(
    model: Any, processor: Any, dataset: datasets.Dataset, per_language: int, batch_size: int = 16
) -> tuple[torch.Tensor, list[str]]:
    """(N, d) time-pooled encoder outputs (before compensation) of up to `per_language` rows of each language."""
    vectors, languages, counts = [], [], dict.fromkeys(processor.languages, 0)
    for rows in batches(dataset, batch_size):
        rows = [row for row in rows if counts.get(row["language"], per_language) < per_language]
        for row in rows:
            counts[row["language"]] += 1
        if rows:
            features = audio_features(rows, processor)
            frames, frame_mask = model.encode_speech(
                features["input_features"].to(model.speech_encoder.dtype), features["feature_attention_mask"]
            )
            vectors.append(masked_time_mean(frames, frame_mask))
            languages += [row["language"] for row in rows]
    if not vectors:
        raise ValueError(f"No rows in the model's languages {processor.languages}.")
    return torch.cat(vectors), languages


def language_bias(model: Any, processor: Any, pooled: torch.Tensor, languages: list[str]) -> tuple[torch.Tensor, bool]:
    """(n_languages, d) bias table of the model, or estimated from `pooled` when the model's is all zeros."""
    table = model.bias_compensation.bias.detach().float()
    if table.any():
        return table, False
    estimator = LanguageBiasEstimator(len(processor.languages), pooled.shape[1])
    estimator.update(pooled, torch.tensor([processor.languages.index(code) for code in languages]))
    return estimator.means()[0], True


def pca_2d(points: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N, 2) coordinates on the two principal axes."""
    centered = points - points.mean(dim=0)
    _, _, right = torch.linalg.svd(centered, full_matrices=False)  # right: (min(N, d), d)
    return centered @ right[:2].T


def language_variance_share(points: torch.Tensor, ids: torch.Tensor) -> float:
    """Between-language variance / total variance: 1 = utterances are their language's centroid, 0 = no bias."""
    _, inverse = ids.unique(return_inverse=True)
    centroids = torch.stack([points[inverse == k].mean(dim=0) for k in range(int(inverse.max()) + 1)])
    overall = points.mean(dim=0)
    between = (centroids[inverse] - overall).pow(2).sum()
    return float(between / (points - overall).pow(2).sum().clamp_min(1e-12))


def plot(
    pooled: torch.Tensor, languages: list[str], bias: torch.Tensor, all_languages: list[str], title: str
) -> matplotlib.figure.Figure:
    ids = torch.tensor([all_languages.index(code) for code in languages])
    panels = {"before bias compensation": pooled, "after bias compensation": pooled - bias[ids]}
    figure, axes = plt.subplots(1, 2, figsize=(11, 5))
    for axis, (name, points) in zip(axes, panels.items()):
        coordinates = pca_2d(points)
        for code in dict.fromkeys(languages):
            mine = coordinates[ids == all_languages.index(code)]
            (dots,) = axis.plot(mine[:, 0], mine[:, 1], ".", alpha=0.35, label=code)
            centroid = mine.mean(dim=0)
            axis.plot(centroid[0], centroid[1], "o", markersize=12, markeredgecolor="black", color=dots.get_color())
        share = language_variance_share(points, ids)
        print(f"{name}: language explains {share:.1%} of the variance")
        axis.set_title(f"{name}\n(language explains {share:.0%} of the variance)")
        axis.set_xlabel("principal axis 1")
        axis.set_ylabel("principal axis 2")
    axes[0].legend(title="language", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub repo id")
    parser.add_argument("--dataset", required=True, type=Path, help="a datasets.save_to_disk directory")
    parser.add_argument("--split", default="test", help="split of a DatasetDict")
    parser.add_argument("--per-language", type=int, default=100, help="utterances per language")
    parser.add_argument("--out", type=Path, default=Path("language_bias.png"), help="PNG file to write")
    args = parser.parse_args(argv)

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    pooled, languages = pooled_outputs(model, processor, load_split(args.dataset, args.split), args.per_language)
    bias, estimated = language_bias(model, processor, pooled, languages)
    title = "Pooled speech encoder outputs per utterance (dots) and language centroids (circles)"
    if estimated:
        title += "\nbias vectors estimated from these utterances (the checkpoint's table is all zeros)"
    figure = plot(pooled, languages, bias, list(processor.languages), title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
