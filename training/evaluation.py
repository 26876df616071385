"""Evaluation: translate an eval set, score it per language, and measure cross-lingual alignment.

Translation quality: sacrebleu BLEU (``tokenize="zh"`` for Chinese targets, as FLEURS papers report; `evaluate`'s
sacrebleu wrapper needs the Hub, so sacrebleu is called directly), exact match (BLEU is generous on short strings),
and the off-target rate (outputs not in the target script, a known SpeechLLM failure).

Alignment (the paper's two analyses), on the Q-Former output of parallel utterances, mean-pooled over queries:

- Recall@1: for each utterance in language a, is its nearest neighbour (cosine) among language b's utterances of
  the same eval set the parallel one? Averaged over ordered language pairs.
- 1 - JSD: each pooled vector becomes a distribution (softmax over features); the Jensen-Shannon divergence (base 2,
  in [0, 1]) between parallel utterances, averaged over pairs, subtracted from 1. 1 = identical distributions.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sacrebleu
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class Prediction:
    """One translated utterance."""

    language: str
    sentence_id: str
    hypothesis: str
    reference: str | None


@dataclass
class EvaluationResult:
    """Per-language scores, group averages, alignment metrics, and the predictions they come from."""

    per_language: dict[str, dict[str, float]]
    groups: dict[str, dict[str, float]]
    alignment: dict[str, float]
    predictions: list[Prediction] = field(default_factory=list)

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        """`{prefix}{group or language}_{metric}` scalars, the shape Trainer logs expect."""
        metrics = {f"{prefix}{name}_{key}": value for name, scores in self.groups.items() for key, value in scores.items()}
        for language, scores in self.per_language.items():
            metrics.update({f"{prefix}{language}_{key}": value for key, value in scores.items()})
        metrics.update({f"{prefix}{key}": value for key, value in self.alignment.items()})
        return metrics


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def off_target(hypothesis: str, target_language: str) -> bool:
    """A Chinese-target output is off target when fewer than half of its letters are Han characters."""
    letters = [char for char in hypothesis if char.isalpha()]
    if target_language != "zh" or not letters:
        return False
    return sum(map(_is_cjk, letters)) < len(letters) / 2


def translation_scores(hypotheses: Sequence[str], references: Sequence[str], target_language: str) -> dict[str, float]:
    """Corpus BLEU, exact match and off-target rate of one set of translations."""
    tokenize = "zh" if target_language == "zh" else "13a"
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / max(len(references), 1)
    off = sum(off_target(h, target_language) for h in hypotheses) / max(len(hypotheses), 1)
    return {"bleu": bleu, "exact_match": exact, "off_target_rate": off, "count": float(len(references))}


def _parallel_groups(sentence_ids: Sequence[str], languages: Sequence[str]) -> dict[tuple[str, str], list]:
    """For each ordered language pair, the (index_a, index_b) of utterances that share a sentence id."""
    by_language: dict[str, dict[str, int]] = defaultdict(dict)
    for index, (sentence, language) in enumerate(zip(sentence_ids, languages)):
        by_language[language].setdefault(sentence, index)
    pairs = {}
    for a, b in itertools.permutations(sorted(by_language), 2):
        shared = sorted(set(by_language[a]) & set(by_language[b]))
        if len(shared) > 1:
            pairs[a, b] = [(by_language[a][s], by_language[b][s]) for s in shared]
    return pairs


def recall_at_1(pooled: torch.Tensor, sentence_ids: Sequence[str], languages: Sequence[str]) -> float | None:
    """Parallel-utterance retrieval accuracy (cosine nearest neighbour), mean over ordered language pairs."""
    normalized = F.normalize(pooled.float(), dim=-1)
    recalls = []
    for (_, _), index_pairs in _parallel_groups(sentence_ids, languages).items():
        queries = normalized[[a for a, _ in index_pairs]]  # (n, d)
        keys = normalized[[b for _, b in index_pairs]]  # (n, d): row k is the parallel of query k
        hits = (queries @ keys.T).argmax(dim=1) == torch.arange(len(index_pairs))
        recalls.append(hits.float().mean().item())
    return sum(recalls) / len(recalls) if recalls else None


def one_minus_jsd(pooled: torch.Tensor, sentence_ids: Sequence[str], languages: Sequence[str]) -> float | None:
    """1 - mean Jensen-Shannon divergence (bits) between softmax-normalised pooled states of parallel utterances."""
    distributions = pooled.float().softmax(dim=-1)
    divergences = []
    for (a_language, b_language), index_pairs in _parallel_groups(sentence_ids, languages).items():
        if a_language > b_language:
            continue  # JSD is symmetric: count each unordered language pair once
        p = distributions[[a for a, _ in index_pairs]]
        q = distributions[[b for _, b in index_pairs]]
        m = 0.5 * (p + q)
        kl = lambda x, y: (x * (x.clamp_min(1e-12).log() - y.clamp_min(1e-12).log())).sum(-1)  # noqa: E731
        divergences.append((0.5 * kl(p, m) + 0.5 * kl(q, m)) / math.log(2))
    if not divergences:
        return None
    return 1.0 - torch.cat(divergences).mean().item()


def score_predictions(
    predictions: Sequence[Prediction], target_language: str, groups: Mapping[str, Iterable[str]] | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per-language scores and, for each named group of languages (e.g. seen / zero_shot), their mean."""
    by_language: dict[str, list[Prediction]] = defaultdict(list)
    for prediction in predictions:
        if prediction.reference is not None:
            by_language[prediction.language].append(prediction)
    per_language = {
        language: translation_scores([p.hypothesis for p in items], [p.reference for p in items], target_language)
        for language, items in sorted(by_language.items())
    }
    group_scores = {}
    for name, members in (groups or {"all": list(per_language)}).items():
        present = [per_language[m] for m in members if m in per_language]
        if present:
            group_scores[name] = {
                key: sum(scores[key] for scores in present) / len(present)
                for key in ("bleu", "exact_match", "off_target_rate")
            }
    return per_language, group_scores


SPEECH_INPUTS = ("input_features", "feature_attention_mask", "language_ids", "encoder_hidden_states", "encoder_attention_mask")


def eval_batches(dataset: Any, collator: Any, batch_size: int, task: str = "translate") -> Iterator[dict[str, Any]]:
    """Collated batches of `dataset` in order, each with the `references` to score against."""
    reference_column = "transcript" if task == "transcribe" else "translation"
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        batch["references"] = [row.get(reference_column) or None for row in rows]
        yield batch


@torch.no_grad()
def evaluate_model(
    model: Any,
    processor: Any,
    batches: Iterable[dict[str, Any]],
    groups: Mapping[str, Iterable[str]] | None = None,
    task: str = "translate",
    show_progress: bool = True,
    **generate_kwargs: Any,
) -> EvaluationResult:
    """Translate every batch (from `eval_batches`), score per language, and measure alignment.

    Generation uses fresh left-padded prompts for the batch's languages; the alignment metrics use the last
    Q-Former layer's states, mean-pooled over queries.
    """
    model.eval()
    device = next(model.parameters()).device
    predictions: list[Prediction] = []
    pooled = []
    generate_kwargs = {"max_new_tokens": 64, "num_beams": 1, "do_sample": False, **generate_kwargs}
    for batch in tqdm(batches, desc="evaluating", disable=not show_progress, leave=False):
        speech = {key: batch[key].to(device) for key in SPEECH_INPUTS if key in batch}
        prompts = {key: value.to(device) for key, value in processor.tokenize(batch["languages"], task).items()}
        generated = model.generate(**speech, **prompts, **generate_kwargs)
        hypotheses = processor.batch_decode_translations(generated, task=task)
        pooled.append(model.encode(**speech).qformer_hidden_states[-1].mean(dim=1).cpu())
        predictions += [
            Prediction(language, sentence_id, hypothesis, reference)
            for language, sentence_id, hypothesis, reference in zip(
                batch["languages"], batch["sentence_ids"], hypotheses, batch["references"]
            )
        ]
    per_language, group_scores = score_predictions(predictions, model.config.target_language, groups)
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
    return EvaluationResult(per_language, group_scores, alignment, predictions)


def write_results(result: EvaluationResult, out_dir: str | Path, title: str = "Evaluation") -> Path:
    """results.json (scores + predictions) and results.md (a per-language table) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "per_language": result.per_language,
        "groups": result.groups,
        "alignment": result.alignment,
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
    if result.alignment:
        lines += ["", "| alignment | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in result.alignment.items()]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    return out_dir / "results.md"


__all__ = [
    "EvaluationResult",
    "eval_batches",
    "Prediction",
    "evaluate_model",
    "one_minus_jsd",
    "recall_at_1",
    "score_predictions",
    "translation_scores",
    "write_results",
]
