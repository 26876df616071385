"""Evaluation: translate an eval set, score it per language and category, and measure cross-lingual alignment.

Translation quality comes from the `evaluate` metric shipped beside this file (metrics/speech_translation, loaded by
path, offline): sacrebleu BLEU (``tokenize="zh"`` for Chinese targets, as FLEURS papers report), exact match (BLEU
is generous on short strings) and the off-target rate (outputs not in the target script, a known SpeechLLM
failure), per language, per language group (seen / zero-shot / `report_groups`), per category of the data (the
offline corpus: number, date, time, ...) and per named set of categories, by default number+time: what a zero-shot
language can carry when it sounds like a seen one, where the all-category figure hides it.

Alignment: the paper's two analyses (Recall@1 and 1 - JSD of the pooled Q-Former output) and the language-ID
probes (`representation_probes.py`), and per Q-Former layer the OT diagnostics of training (state variance, parallel /
non-parallel Sinkhorn divergence, their ratio, OT Recall@1; `alignment_diagnostics.py`).
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import evaluate
import torch
from tqdm.auto import tqdm

from .alignment_diagnostics import layer_alignment_metrics
from .representation_probes import language_probe_metrics, one_minus_jsd, recall_at_1

UNCATEGORIZED = "uncategorized"  # the category of utterances whose data has none (FLEURS: one category)
DEFAULT_CATEGORY_SETS = {"number+time": ["number", "time"]}  # reported when the data has both categories
METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "speech_translation"


@dataclass
class Prediction:
    """One translated utterance, with what identifies it (language, sentence, category) for paired resampling."""

    language: str
    sentence_id: str
    hypothesis: str
    reference: str | None
    category: str = UNCATEGORIZED


@dataclass
class EvaluationResult:
    """Scores per language and group (and per category and category set of each), alignment metrics, and the
    predictions they come from. `per_category` / `group_categories` hold the named `category_sets` beside the
    categories themselves."""

    per_language: dict[str, dict[str, float]]
    groups: dict[str, dict[str, float]]
    alignment: dict[str, float]
    predictions: list[Prediction] = field(default_factory=list)
    per_category: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    group_categories: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    category_sets: dict[str, list[str]] = field(default_factory=dict)

    def category_columns(self) -> list[str]:
        """The categories, then the category sets, worth a column of their own: none when there is only one (it
        would repeat the per-language scores)."""
        categories = {name for scores in self.per_category.values() for name in scores} - set(self.category_sets)
        columns = [*sorted(categories), *self.category_sets]
        return columns if len(columns) > 1 else []

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        """`{prefix}{group or language}_{metric}` and `{prefix}{group}_{category}_{metric}` scalars, the shape
        Trainer logs expect."""
        metrics = {f"{prefix}{name}_{key}": value for name, scores in self.groups.items() for key, value in scores.items()}
        for language, scores in self.per_language.items():
            metrics.update({f"{prefix}{language}_{key}": value for key, value in scores.items()})
        columns = self.category_columns()
        for group, scores in self.group_categories.items():
            metrics.update({f"{prefix}{group}_{c}_{key}": v for c in columns for key, v in scores.get(c, {}).items()})
        metrics.update({f"{prefix}{key}": value for key, value in self.alignment.items()})
        return metrics


@functools.cache
def speech_translation_metric() -> evaluate.EvaluationModule:
    """The translation-quality metric (metrics/speech_translation), loaded once by path: `evaluate` reads a local
    module without the Hub. In memory: the utterances are not written to an Arrow cache file."""
    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def score_predictions(
    predictions: Sequence[Prediction],
    target_language: str | None,
    groups: Mapping[str, Iterable[str]] | None = None,
    category_sets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict]:
    """The labeled predictions scored by `speech_translation_metric`: "per_language", "groups" (each named group of
    languages, e.g. seen / zero_shot, averaged; default one group "all"), "per_category" and "group_categories"
    (categories and category sets), and the "category_sets" used: `category_sets`, or by default those of
    `DEFAULT_CATEGORY_SETS` whose categories all occur."""
    labeled = [p for p in predictions if p.reference is not None]
    if category_sets is None:
        present = {p.category for p in labeled}
        category_sets = {name: members for name, members in DEFAULT_CATEGORY_SETS.items() if present >= set(members)}
    category_sets = {name: list(members) for name, members in category_sets.items()}
    scores = speech_translation_metric().compute(
        predictions=[p.hypothesis for p in labeled],
        references=[p.reference for p in labeled],
        languages=[p.language for p in labeled],
        categories=[p.category for p in labeled],
        target_language=target_language,
        groups=groups,
        category_sets=category_sets,
    )
    return {**scores, "category_sets": category_sets}


SPEECH_INPUTS = ("input_features", "feature_attention_mask", "language_ids", "encoder_hidden_states", "encoder_attention_mask")


def eval_batches(dataset: Any, collator: Any, batch_size: int, task: str = "translate") -> Iterator[dict[str, Any]]:
    """Collated batches of `dataset` in order, each with the `references` to score against and the rows'
    `categories` (`UNCATEGORIZED` where the data has none)."""
    reference_column = "transcript" if task == "transcribe" else "translation"
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        batch["references"] = [row.get(reference_column) or None for row in rows]
        batch["categories"] = [row.get("category") or UNCATEGORIZED for row in rows]
        yield batch


@torch.no_grad()
def evaluate_model(
    model: Any,
    processor: Any,
    batches: Iterable[dict[str, Any]],
    groups: Mapping[str, Iterable[str]] | None = None,
    task: str = "translate",
    show_progress: bool = True,
    language_probe: bool = True,
    category_sets: Mapping[str, Sequence[str]] | None = None,
    **generate_kwargs: Any,
) -> EvaluationResult:
    """Translate every batch (from `eval_batches`), score per language, group, category and category set (see
    `score_predictions`), and measure alignment.

    Generation uses fresh left-padded prompts for the batch's languages; Recall@1 and 1 - JSD use the last Q-Former
    layer's states, mean-pooled over queries; `layer_alignment_metrics` adds every layer's OT diagnostics
    (``state_var_layer_{l}``, ``ot_par_layer_{l}``, ``ot_nonpar_layer_{l}``, ``ot_ratio_layer_{l}``,
    ``ot_recall_at_1_layer_{l}``). With ``language_probe``, the alignment metrics also hold
    the language-ID probe accuracies (module docstring) on the pooled encoder output (``lid_probe_encoder``), the
    same after compensation (``lid_probe_compensated``, with bias compensation on; the compensation is per
    utterance and affine, so compensating the pooled vector equals pooling the compensated frames) and the pooled
    last Q-Former layer (``lid_probe_qformer``), with ``lid_probe_chance`` for reference.
    """
    model.eval()
    device = next(model.parameters()).device
    predictions: list[Prediction] = []
    pooled = []
    layer_states: dict[int, list[torch.Tensor]] = defaultdict(list)
    probe_features: dict[str, list[torch.Tensor]] = defaultdict(list)
    generate_kwargs = {"max_new_tokens": 64, "num_beams": 1, "do_sample": False, **generate_kwargs}
    for batch in tqdm(batches, desc="evaluating", disable=not show_progress, leave=False):
        speech = {key: batch[key].to(device) for key in SPEECH_INPUTS if key in batch}
        prompts = {key: value.to(device) for key, value in processor.tokenize(batch["languages"], task).items()}
        generated = model.generate(**speech, **prompts, **generate_kwargs)
        hypotheses = processor.batch_decode_translations(generated, task=task)
        encoded = model.encode(**speech)
        pooled.append(encoded.qformer_hidden_states[-1].mean(dim=1).cpu())
        for layer, states in enumerate(encoded.qformer_hidden_states[1:], start=1):
            layer_states[layer].append(states.float().cpu())
        if language_probe:
            probe_features["encoder"].append(encoded.pooled_speech.cpu())
            if model.config.use_bias_compensation:
                compensated = model.bias_compensation(encoded.pooled_speech.unsqueeze(1), speech["language_ids"])
                probe_features["compensated"].append(compensated.squeeze(1).cpu())  # (B, d_enc)
            probe_features["qformer"].append(pooled[-1])
        predictions += [
            Prediction(language, sentence_id, hypothesis, reference, category)
            for language, sentence_id, hypothesis, reference, category in zip(
                batch["languages"], batch["sentence_ids"], hypotheses, batch["references"], batch["categories"]
            )
        ]
    target_language = None if task == "transcribe" else model.config.target_language
    scores = score_predictions(predictions, target_language, groups, category_sets)
    sentence_ids = [p.sentence_id for p in predictions]
    languages = [p.language for p in predictions]
    all_pooled = torch.cat(pooled) if pooled else torch.zeros(0, 1)
    alignment = {
        key: value
        for key, value in (
            ("recall_at_1", recall_at_1(all_pooled, sentence_ids, languages)),
            ("one_minus_jsd", one_minus_jsd(all_pooled, sentence_ids, languages)),
        )
        if value is not None
    }
    if probe_features:
        features = {name: torch.cat(parts) for name, parts in probe_features.items()}
        alignment.update(language_probe_metrics(features, languages, sentence_ids))
    if layer_states:
        states = {layer: torch.cat(parts) for layer, parts in layer_states.items()}
        alignment.update(layer_alignment_metrics(states, sentence_ids, languages))
    return EvaluationResult(alignment=alignment, predictions=predictions, **scores)


def _category_table(result: EvaluationResult) -> list[str]:
    """Markdown rows: exact match / BLEU per language and group (rows) and category or category set (columns)."""
    columns = result.category_columns()
    if not columns:
        return []

    def row(name: str, scores: Mapping[str, Mapping[str, float]]) -> str:
        cells = [f"{scores[c]['exact_match']:.3f} / {scores[c]['bleu']:.1f}" if c in scores else "-" for c in columns]
        return f"| {name} | {' | '.join(cells)} |"

    lines = ["", "Exact match / BLEU per category:", "", f"| language | {' | '.join(columns)} |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    lines += [row(language, scores) for language, scores in result.per_category.items()]
    lines += [row(f"**{group}** (mean)", scores) for group, scores in result.group_categories.items()]
    return lines


def write_results(
    result: EvaluationResult, out_dir: str | Path, title: str = "Evaluation", settings: Mapping[str, Any] | None = None
) -> Path:
    """results.json (scores + predictions, each with its language, sentence id and category, and the run's
    `settings`: how it was trained, for the model card) and results.md (per-language and per-category tables) in
    `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "per_language": result.per_language,
        "groups": result.groups,
        "per_category": result.per_category,
        "group_categories": result.group_categories,
        "category_sets": result.category_sets,
        "alignment": result.alignment,
        **({"settings": dict(settings)} if settings else {}),
        "predictions": [vars(p) for p in result.predictions],
    }
    (out_dir / "results.json").write_text(json.dumps(payload, ensure_ascii=False, indent=2))
    lines = [f"# {title}", "", "| language | BLEU | exact match | off-target | utterances |", "|---|---|---|---|---|"]
    for language, scores in result.per_language.items():
        lines.append(
            f"| {language} | {scores['bleu']:.2f} | {scores['exact_match']:.3f} | "
            f"{scores['off_target_rate']:.3f} | {int(scores['count'])} |"
        )
    for name, scores in result.groups.items():
        lines.append(
            f"| **{name}** (mean) | {scores['bleu']:.2f} | {scores['exact_match']:.3f} | "
            f"{scores['off_target_rate']:.3f} | |"
        )
    lines += _category_table(result)
    if result.alignment:
        lines += ["", "| alignment | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in result.alignment.items()]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    return out_dir / "results.md"


__all__ = [
    "DEFAULT_CATEGORY_SETS",
    "EvaluationResult",
    "METRIC_PATH",
    "eval_batches",
    "Prediction",
    "evaluate_model",
    "score_predictions",
    "speech_translation_metric",
    "UNCATEGORIZED",
    "write_results",
]
