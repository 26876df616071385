"""Tables of the offline benchmark's results: rows (settings) x language groups x categories, exact match (EM) and
BLEU, with paired bootstrap intervals of each row's difference to its control (`intervals.py`).

The zero-shot headline is EM on numbers + times (`HEADLINE`): content a held-out language can carry when it sounds
like a seen one. Dates and colours use words only each language's lexicon has, so a zero-shot language is near 0 on
them by construction; the all-category figure stands beside the headline, never instead of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.corpus.roles import LanguageRoles
from benchmarks.intervals import exact_matches, paired_bootstrap, row_scores

HEADLINE = "number+time"
HEADLINE_CATEGORIES = ("number", "time")
ALL = "all"


def group_score(results: Mapping[str, Any], group: str, categories: str = ALL) -> dict[str, float]:
    """{exact_match, bleu} of a language group over all categories, or over a category (set) of
    results.json's `group_categories`."""
    if categories == ALL:
        return {key: results["groups"][group][key] for key in ("exact_match", "bleu")}
    return {key: results["group_categories"][group][categories][key] for key in ("exact_match", "bleu")}


def difference(
    runs: Sequence[Mapping[str, Any]], control_runs: Sequence[Mapping[str, Any]], languages: Sequence[str],
    categories: Sequence[str] | None = None,
) -> dict[str, float]:
    """Paired bootstrap interval of (runs - control_runs) group EM over `languages` (and `categories`)."""
    row = row_scores([exact_matches(results, languages, categories) for results in runs])
    control = row_scores([exact_matches(results, languages, categories) for results in control_runs])
    return paired_bootstrap(row, control).to_dict()


def _cell(value: float, bleu: float | None = None) -> str:
    return f"{value:.3f}" if bleu is None else f"{value:.3f} ({bleu:.1f})"


def _interval_cell(interval: Mapping[str, float]) -> str:
    return f"{interval['estimate']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def demo_tables(
    rows: Mapping[str, Mapping[str, Any]],
    roles: LanguageRoles,
    seconds: Mapping[str, float],
    wall: float,
    pace: float,
    standins: Mapping[str, Any],
    pipeline_example: str,
) -> tuple[dict[str, Any], str]:
    """The demo's demo.json summary and demo.md: baseline vs POTSA, per group, language and category."""
    groups = roles.groups()
    baseline, potsa = rows["baseline"], rows["POTSA"]
    summary: dict[str, Any] = {
        "command": "python -m benchmarks.demo --seen " + " ".join(roles.seen) + " --zero-shot "
        + " ".join(f"{name}:{','.join(codes)}" for name, codes in roles.zero_shot.items()),
        "groups": groups,
        "rows": {},
        "potsa_minus_baseline": {},
    }
    for name, results in rows.items():
        summary["rows"][name] = {
            "groups": {
                group: {"all": group_score(results, group), HEADLINE: group_score(results, group, HEADLINE)}
                for group in groups
            },
            "per_language": results["per_language"],
            "per_category": results["per_category"],
        }
    for group, languages in groups.items():
        summary["potsa_minus_baseline"][group] = {
            "all": difference([potsa], [baseline], languages),
            HEADLINE: difference([potsa], [baseline], languages, HEADLINE_CATEGORIES),
        }
    summary["wall_seconds"] = {**seconds, "total": wall}
    summary["pace_ratio"] = pace
    summary["pace_normalised_minutes"] = wall / pace / 60
    summary["standins"] = {
        "encoder_validation": standins["encoder"]["validation"],
        "llm_text_translation_exact": standins["llm"]["text_translation_exact"],
    }
    summary["pipeline_example"] = pipeline_example
    return summary, _markdown(summary, roles)


def _markdown(summary: Mapping[str, Any], roles: LanguageRoles) -> str:
    groups = summary["groups"]
    zero_shot = [group for group in groups if group != "seen"]
    lines = [
        "# README demo (`python -m benchmarks.demo`)",
        "",
        f"`{summary['command']}`. Seen: {' '.join(roles.seen)}; "
        + "; ".join(f"{group}: {' '.join(groups[group])}" for group in zero_shot)
        + ". Every test utterance of every language; one seed per row. EM = exact match, BLEU in parentheses; "
        f"zero-shot headline: {HEADLINE.replace('+', ' + ')}.",
        "",
        "| row | seen EM, all | " + " | ".join(f"{g} EM, {HEADLINE} | {g} EM, all" for g in zero_shot) + " |",
        "|---|---:|" + "---:|---:|" * len(zero_shot),
    ]
    for name, row in summary["rows"].items():
        cells = [_cell(row["groups"]["seen"]["all"]["exact_match"], row["groups"]["seen"]["all"]["bleu"])]
        for group in zero_shot:
            for categories in (HEADLINE, "all"):
                score = row["groups"][group][categories]
                cells.append(_cell(score["exact_match"], score["bleu"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    delta = summary["potsa_minus_baseline"]
    cells = [_interval_cell(delta["seen"]["all"])]
    for group in zero_shot:
        cells += [_interval_cell(delta[group][HEADLINE]), _interval_cell(delta[group]["all"])]
    lines.append("| POTSA - baseline, 95% paired bootstrap over utterances (one seed each) | " + " | ".join(cells) + " |")
    lines += ["", "EM per language and category (baseline / POTSA):", ""]
    categories = sorted({c for per in summary["rows"]["baseline"]["per_category"].values() for c in per})
    lines += ["| language | group | " + " | ".join(categories) + " | all |", "|---|---|" + "---:|" * (len(categories) + 1)]
    for group, languages in groups.items():
        for language in languages:
            cells = []
            for category in [*categories, "all"]:
                pair = []
                for row in summary["rows"].values():
                    scores = row["per_language"][language] if category == "all" else row["per_category"][language].get(category)
                    pair.append("—" if scores is None else f"{scores['exact_match']:.2f}")
                cells.append(" / ".join(pair))
            lines.append(f"| {language} | {group} | " + " | ".join(cells) + " |")
    seconds = summary["wall_seconds"]
    lines += ["", f"Wall time on this machine, pace ratio {summary['pace_ratio']:.2f} "
              "(`python -m benchmarks.bench_machine_pace`: its step time over the prototype's):", "",
              "| phase | seconds |", "|---|---:|"]  # fmt: skip
    lines += [f"| {name} | {value:.0f} |" for name, value in seconds.items() if name != "total"]
    lines += [f"| **total** | **{seconds['total']:.0f}** ({seconds['total'] / 60:.1f} min; "
              f"pace-normalised {summary['pace_normalised_minutes']:.1f} min) |"]  # fmt: skip
    encoder = summary["standins"]["encoder_validation"]
    lines += [
        "",
        "Stand-ins (shipped, benchmarks/standins/checkpoints/quality.json): encoder validation CER "
        + ", ".join(f"{language} {figures['cer']:.3f}" for language, figures in encoder.items())
        + f"; LLM text-translation exact match {summary['standins']['llm_text_translation_exact']:.3f}.",
        "",
        summary["pipeline_example"],
    ]
    return "\n".join(lines) + "\n"


__all__ = ["ALL", "HEADLINE", "HEADLINE_CATEGORIES", "demo_tables", "difference", "group_score"]
