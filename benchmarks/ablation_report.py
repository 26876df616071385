"""The ablation's tables: each row's exact match per language group (all categories and numbers + times), the paired
bootstrap interval of its difference to its control, how much of the baseline's seen / zero-shot gap it closes, and
the final diagnostics of the aligned layers. Written as <name>.md, <name>.json and <name>.png."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

from benchmarks.corpus.roles import LanguageRoles
from benchmarks.intervals import MIN_RUNS, exact_matches, group_mean, paired_bootstrap, row_scores, seed_spread
from benchmarks.machine import cpu_name
from benchmarks.report import ALL, HEADLINE, HEADLINE_CATEGORIES

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DIAGNOSTICS = ("state_var", "ot_ratio", "ot_recall_at_1")  # per layer, from each run's final evaluation


def _scores(results: Sequence[Mapping[str, Any]], languages: Sequence[str], categories: str) -> list[dict]:
    wanted = None if categories == ALL else HEADLINE_CATEGORIES
    return [exact_matches(run, languages, wanted) for run in results]


def _diagnostics(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean over runs of every per-layer alignment diagnostic the runs report (`{stat}_layer_{l}`)."""
    keys = sorted({key for run in results for key in run["alignment"] if key.startswith(DIAGNOSTICS)})
    return {key: statistics.fmean(run["alignment"][key] for run in results if key in run["alignment"]) for key in keys}


def summarise(
    runs: Mapping[str, Sequence[Path]], controls: Mapping[str, str], roles: LanguageRoles
) -> dict[str, dict[str, Any]]:
    """Per row: runs, group EM (mean and seed spread) and BLEU, differences to the control with intervals, the
    share of the control's seen / zero-shot gap on numbers + times that the row closes, and diagnostics."""
    loaded = {name: [json.loads((path / "results.json").read_text()) for path in paths] for name, paths in runs.items()}
    summary = {}
    for name, results in loaded.items():
        control = loaded[controls[name]]
        row: dict[str, Any] = {"runs": len(results), "control": controls[name], "groups": {}}
        for group, languages in roles.groups().items():
            row["groups"][group] = {}
            for categories in (ALL, HEADLINE):
                scores, control_scores = _scores(results, languages, categories), _scores(control, languages, categories)
                entry = {
                    "exact_match": group_mean(row_scores(scores)),
                    "seed_spread": seed_spread(scores),
                    "bleu": statistics.fmean(_bleu(run, group, categories) for run in results),
                }
                if name != controls[name]:
                    entry["difference"] = paired_bootstrap(row_scores(scores), row_scores(control_scores)).to_dict()
                row["groups"][group][categories] = entry
        row["gap_closed"] = _gap_closed(row, summary.get(controls[name]), roles)
        row["diagnostics"] = _diagnostics(results)
        summary[name] = row
    return summary


def _bleu(results: Mapping[str, Any], group: str, categories: str) -> float:
    if categories == ALL:
        return results["groups"][group]["bleu"]
    return results["group_categories"][group][categories]["bleu"]


def _gap_closed(row: Mapping[str, Any], control: Mapping[str, Any] | None, roles: LanguageRoles) -> dict[str, Any]:
    """Per zero-shot group: the control's gap, seen EM - zero-shot EM on numbers + times, and the share of it the
    row's zero-shot difference closes (estimate and interval)."""
    if control is None or "difference" not in row["groups"]["seen"][HEADLINE]:
        return {}
    closed = {}
    seen = control["groups"]["seen"][HEADLINE]["exact_match"]
    for group in roles.zero_shot:
        gap = seen - control["groups"][group][HEADLINE]["exact_match"]
        difference = row["groups"][group][HEADLINE]["difference"]
        closed[group] = {"gap": gap, **{key: difference[key] / gap for key in ("estimate", "low", "high")}}
    return closed


def _cell(entry: Mapping[str, Any]) -> str:
    value = f"{entry['exact_match']:.3f}"
    difference = entry.get("difference")
    if difference is None:
        return f"{value} (control)"
    return f"{value} ({difference['estimate']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}])"


def markdown(summary: Mapping[str, Any], roles: LanguageRoles, title: str, timing: Mapping[str, Any]) -> str:
    zero_shot = list(roles.zero_shot)
    layers = sorted({key.rsplit("_", 1)[-1] for row in summary.values() for key in row["diagnostics"]})
    header = ["seen EM, all", *(f"{group} EM, {HEADLINE}" for group in zero_shot),
              *(f"{group} EM, all" for group in zero_shot), "runs", "gap closed (" + ", ".join(zero_shot) + ")",
              *(f"layer {layer}: state var / OT ratio / R@1" for layer in layers)]  # fmt: skip
    lines = [
        f"# {title}",
        "",
        f"EM = exact match over every test utterance, mean over a row's runs; in parentheses the difference to the "
        f"row's control with its 95% paired bootstrap interval over utterances. Rows with {MIN_RUNS} runs are 3 "
        "stage-2 x 2 stage-3 seeds; rows with fewer runs are indicative only. *Gap closed*: the share of the "
        f"control's seen - zero-shot EM gap on {HEADLINE} that the row's zero-shot difference closes. Layer "
        "diagnostics at the end of training: between-utterance variance of the unit Q-Former states, parallel / "
        f"non-parallel Sinkhorn divergence, OT-based Recall@1. Seen: {' '.join(roles.seen)}; "
        + "; ".join(f"{group}: {' '.join(codes)}" for group, codes in roles.zero_shot.items())
        + f". This invocation: {timing['wall_seconds'] / 60:.0f} min on {cpu_name()} ({timing['workers']} "
        f"single-threaded workers; finished jobs of earlier invocations reused), pace ratio {timing['pace_ratio']:.2f}.",
        "",
        "| row | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(header),
    ]
    for name, row in summary.items():
        groups = row["groups"]
        cells = [_cell(groups["seen"][ALL])]
        cells += [_cell(groups[group][HEADLINE]) for group in zero_shot]
        cells += [_cell(groups[group][ALL]) for group in zero_shot]
        cells.append(str(row["runs"]))
        closed = row["gap_closed"]
        cells.append(", ".join(f"{closed[g]['estimate']:+.2f} [{closed[g]['low']:+.2f}, {closed[g]['high']:+.2f}]"
                               for g in zero_shot) if closed else "—")  # fmt: skip
        for layer in layers:
            values = [row["diagnostics"].get(f"{stat}_layer_{layer}") for stat in DIAGNOSTICS]
            cells.append(" / ".join("—" if value is None else f"{value:.3f}" for value in values))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], roles: LanguageRoles, path: Path) -> None:
    """Each row's difference to its control with its interval: seen EM (all) and zero-shot EM on numbers + times."""
    names = [name for name, row in summary.items() if "difference" in row["groups"]["seen"][ALL]]
    panels = [("seen", ALL), *((group, HEADLINE) for group in roles.zero_shot)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 0.45 * len(names) + 1.5), sharey=True)
    for axis, (group, categories) in zip(axes, panels):
        differences = [summary[name]["groups"][group][categories]["difference"] for name in names]
        estimates = [d["estimate"] for d in differences]
        errors = [[d["estimate"] - d["low"] for d in differences], [d["high"] - d["estimate"] for d in differences]]
        axis.errorbar(estimates, range(len(names)), xerr=errors, fmt="o", capsize=3)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_title(f"{group}: EM difference ({categories})")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_results(
    results_dir: Path, name: str, runs: Mapping[str, Sequence[Path]], controls: Mapping[str, str],
    roles: LanguageRoles, timing: Mapping[str, Any], settings: Mapping[str, Any],
) -> dict[str, Any]:
    summary = summarise(runs, controls, roles)
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"rows": summary, "groups": roles.groups(), "timing": dict(timing),
               "settings": {key: str(value) for key, value in settings.items()}}  # fmt: skip
    (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    title = f"Ablation on the offline corpus (`python -m benchmarks.ablation --suite {settings.get('suite', 'rows')}`)"
    text = markdown(summary, roles, title, timing)
    (results_dir / f"{name}.md").write_text(text)
    plot(summary, roles, results_dir / f"{name}.png")
    print(text)
    return payload


__all__ = ["markdown", "plot", "summarise", "write_results"]
