"""Speech translation quality per language, per language group, per category and per named set of categories.

An `evaluate` module that loads offline from its path (``evaluate.load("<dir>/speech_translation")``: a local path
never reaches the Hub). It scores, for every language, with sacrebleu called directly (`evaluate.load("sacrebleu")`
would fetch its script from the Hub):

- BLEU: corpus BLEU, ``tokenize="zh"`` for a Chinese target (as FLEURS papers report), "13a" for other targets, and
  "char" when ``target_language=None`` (ASR transcripts scored in their own language: suits every script).
- exact match: BLEU is generous on short strings, where a single wrong number is the whole answer.
- off-target rate: Chinese-target outputs mostly not in Han characters (a known SpeechLLM failure).

A language group scores the mean over its languages (each language counts once, whatever its size). Categories
(e.g. number, date, time) split each language's utterances; a named category set, e.g. ``{"number+time": ["number",
"time"]}``, pools the utterances of its categories per language before scoring, then averages over each group, as a
category does. A zero-shot language can carry numbers and times when it sounds like a seen one, while dates and
colours need words only its own lexicon has: the all-category figure hides that, the per-category one shows it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import datasets
import evaluate
import sacrebleu

MEAN_SCORES = ("bleu", "exact_match", "off_target_rate")  # what a group averages ("count" is per language)

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_INPUTS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): one hypothesis per utterance.
    references (`list[str]`): its reference (drop unlabeled utterances before scoring).
    languages (`list[str]`): its source language code.
    categories (`list[str]`): its category (give every utterance the same one when the data has none).
    target_language (`str`, *optional*, defaults to "zh"): the translations' language; None scores transcripts
        in each utterance's own language (character BLEU, no off-target rate).
    groups (`dict[str, list[str]]`, *optional*): named language groups to average; languages not evaluated are
        ignored, a group with none is left out. Defaults to {"all": every language}.
    category_sets (`dict[str, list[str]]`, *optional*): named sets of categories to pool; every category they name
        must occur in `categories`.
Returns:
    per_language: {language: {bleu, exact_match, off_target_rate, count}}
    groups: {group: {bleu, exact_match, off_target_rate}}, the mean over the group's languages
    per_category: {language: {category or set: {bleu, exact_match, off_target_rate, count}}}
    group_categories: {group: {category or set: {bleu, exact_match, off_target_rate}}}, the mean over the group's
        languages that have the category
Examples:
    >>> metric = evaluate.load("training/metrics/speech_translation")
    >>> metric.compute(predictions=["三点"], references=["三点"], languages=["es"], categories=["time"])["groups"]
    {'all': {'bleu': 0.0, 'exact_match': 1.0, 'off_target_rate': 0.0}}
"""


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def off_target(hypothesis: str, target_language: str | None) -> bool:
    """A Chinese-target output is off target when fewer than half of its letters are Han characters."""
    letters = [char for char in hypothesis if char.isalpha()]
    if target_language != "zh" or not letters:
        return False
    return sum(map(_is_cjk, letters)) < len(letters) / 2


def translation_scores(
    hypotheses: Sequence[str], references: Sequence[str], target_language: str | None
) -> dict[str, float]:
    """Corpus BLEU, exact match and off-target rate of one set of outputs, with their count."""
    tokenize = {"zh": "zh", None: "char"}.get(target_language, "13a")
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)
    off = sum(off_target(h, target_language) for h in hypotheses) / len(hypotheses)
    return {"bleu": bleu, "exact_match": exact, "off_target_rate": off, "count": float(len(references))}


def group_means(
    scores: Mapping[str, Mapping[str, float]], groups: Mapping[str, Iterable[str]]
) -> dict[str, dict[str, float]]:
    """For each group, the mean of `MEAN_SCORES` over its members that have scores; groups without any are left out."""
    means = {}
    for name, members in groups.items():
        present = [scores[member] for member in members if member in scores]
        if present:
            means[name] = {key: sum(s[key] for s in present) / len(present) for key in MEAN_SCORES}
    return means


def _check_category_sets(category_sets: Mapping[str, Sequence[str]], categories: set[str]) -> None:
    """A set must name categories that occur (a typo would silently score a smaller set) and no category's name."""
    for name, members in category_sets.items():
        if isinstance(members, str) or not members:
            raise ValueError(f"Category set {name!r} must be a non-empty list of categories, got {members!r}.")
        if name in categories:
            raise ValueError(f"Category set {name!r} has the name of a category; name it otherwise.")
        absent = sorted(set(members) - categories)
        if absent:
            raise ValueError(
                f"Category set {name!r} names {absent}, which no utterance has; the categories are "
                f"{sorted(categories)}."
            )


class SpeechTranslation(evaluate.Metric):
    """BLEU, exact match and off-target rate per language, group, category and category set (module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "languages": datasets.Value("string"),
                    "categories": datasets.Value("string"),
                }
            ),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://arxiv.org/abs/2511.09232"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str],
        languages: Sequence[str],
        categories: Sequence[str],
        target_language: str | None = "zh",
        groups: Mapping[str, Iterable[str]] | None = None,
        category_sets: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, dict]:
        if any(reference is None for reference in references):
            raise ValueError("Every utterance needs a reference string; drop unlabeled utterances before scoring.")
        by_language: dict[str, list[int]] = defaultdict(list)
        by_category: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (language, category) in enumerate(zip(languages, categories)):
            by_language[language].append(index)
            by_category[language][category].append(index)
        present_categories = {category for per_language in by_category.values() for category in per_language}
        category_sets = dict(category_sets or {})
        _check_category_sets(category_sets, present_categories)

        def score(indices: Sequence[int]) -> dict[str, float]:
            hypotheses = [predictions[i] for i in indices]
            return translation_scores(hypotheses, [references[i] for i in indices], target_language)

        per_language = {language: score(indices) for language, indices in sorted(by_language.items())}
        per_category = {}
        for language in per_language:
            pools = dict(sorted(by_category[language].items()))
            for name, members in category_sets.items():
                pooled = sorted(i for member in members for i in by_category[language].get(member, []))
                if pooled:
                    pools[name] = pooled
            per_category[language] = {name: score(indices) for name, indices in pools.items()}
        groups = {name: list(members) for name, members in (groups or {"all": list(per_language)}).items()}
        group_categories: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        for category in [*sorted(present_categories), *category_sets]:
            having = {language: pools[category] for language, pools in per_category.items() if category in pools}
            for group, means in group_means(having, groups).items():
                group_categories[group][category] = means
        return {
            "per_language": per_language,
            "groups": group_means(per_language, groups),
            "per_category": per_category,
            "group_categories": dict(group_categories),
        }
