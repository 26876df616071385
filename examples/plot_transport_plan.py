"""Plot the optimal-transport plan between the Q-Former tokens of two parallel utterances (a heatmap).

    python -m examples.plot_transport_plan --model DIR_OR_REPO --dataset DIR --languages es ja --layer 1 \
        --out transport_plan.png

The OT loss of POTSA compares two utterances of the same sentence token by token: each query token of one is
transported to the tokens of the other at the cost |x - y|^2 / 2 of their L2-normalised states, with entropic
regularisation eps = blur^2. The plan (computed here with POT, the reference solver, run to convergence) shows which
tokens the loss pulls together: a sharp, near-permutation plan means each token has a clear counterpart in the
other language; a diffuse one means the layer's tokens are not (yet) matched. Printed: the plan's entropy relative
to the uniform plan's, and the transport cost.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import ot
import torch
from transformers import AutoModel, AutoProcessor

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

from examples.batch_translate import load_split
from potsa_training.rows import audio_features


def parallel_rows(dataset: Any, languages: tuple[str, str], sentence_id: str | None) -> list[dict[str, Any]]:
    """The two utterances of one sentence (the first one spoken in both languages, or `sentence_id`)."""
    wanted = dataset.filter(lambda row: row["language"] in languages, input_columns=None)
    by_sentence: dict[str, dict[str, dict[str, Any]]] = {}
    for row in wanted:
        by_sentence.setdefault(row["sentence_id"], {})[row["language"]] = row
    if sentence_id is not None:
        candidates = [sentence_id] if sentence_id in by_sentence else []
    else:
        candidates = [key for key, rows in by_sentence.items() if len(rows) == 2]
    if not candidates or len(by_sentence[candidates[0]]) < 2:
        raise ValueError(f"No sentence {sentence_id or ''} is spoken in both {languages[0]} and {languages[1]}.")
    return [by_sentence[candidates[0]][code] for code in languages]


@torch.no_grad()
def token_states(model: Any, processor: Any, rows: list[dict[str, Any]], layer: int) -> torch.Tensor:
    """(2, Q, d) L2-normalised Q-Former states at `layer` (0 = the queries' input, as in `qformer_hidden_states`)."""
    if not 0 <= layer <= model.config.qformer_config.num_hidden_layers:
        raise ValueError(f"`layer` must be in 0..{model.config.qformer_config.num_hidden_layers}, got {layer}.")
    features = audio_features(rows, processor)
    language_ids = torch.tensor([model.config.language_id(row["language"]) for row in rows])
    speech = model.encode(features["input_features"], features["feature_attention_mask"], language_ids)
    return torch.nn.functional.normalize(speech.qformer_hidden_states[layer].float(), dim=-1)


def transport_plan(x: torch.Tensor, y: torch.Tensor, blur: float) -> tuple[np.ndarray, float]:
    """The entropic OT plan (n, m) between uniform point clouds and its transport cost <P, C>."""
    cost = 0.5 * torch.cdist(x.double(), y.double()).pow(2).numpy()
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    plan = ot.bregman.sinkhorn_log(a, b, cost, reg=blur**2, numItermax=20_000, stopThr=1e-9)
    return plan, float((plan * cost).sum())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub repo id")
    parser.add_argument("--dataset", required=True, type=Path, help="a datasets.save_to_disk directory")
    parser.add_argument("--split", default="test", help="split of a DatasetDict")
    parser.add_argument("--languages", nargs=2, default=["es", "ja"], metavar="CODE", help="the two languages")
    parser.add_argument("--sentence-id", help="sentence to plot (default: the first spoken in both languages)")
    parser.add_argument("--layer", type=int, default=1, help="Q-Former layer (the OT loss' candidates are 1..)")
    parser.add_argument("--out", type=Path, default=Path("transport_plan.png"), help="PNG file to write")
    args = parser.parse_args(argv)

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    rows = parallel_rows(load_split(args.dataset, args.split), tuple(args.languages), args.sentence_id)
    states = token_states(model, processor, rows, args.layer)
    plan, cost = transport_plan(states[0], states[1], model.config.ot_blur)
    entropy = float(-(plan[plan > 0] * np.log(plan[plan > 0])).sum())
    uniform_entropy = math.log(plan.size)
    print(f"sentence {rows[0]['sentence_id']}: plan entropy {entropy / uniform_entropy:.1%} of the uniform plan's "
          f"(a permutation: 50%), transport cost {cost:.4f}")

    figure, axis = plt.subplots(figsize=(6, 5.4))
    image = axis.imshow(plan * len(plan), cmap="viridis", vmin=0)
    figure.colorbar(image, ax=axis, label="transported mass x n (1 = all of a token's mass)")
    axis.set_xlabel(f"{args.languages[1]} query token")
    axis.set_ylabel(f"{args.languages[0]} query token")
    axis.set_title(
        f"OT plan, Q-Former layer {args.layer}, eps = {model.config.ot_blur ** 2:g}\n"
        f"{rows[0]['transcript']!r} / {rows[1]['transcript']!r}",
        fontsize="small",
    )
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
