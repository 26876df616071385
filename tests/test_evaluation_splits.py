"""Which split each run evaluates on: validation (or nothing) during training, test only in the final report, and
validation wherever something is chosen from the scores (the stage-3 selection)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from benchmarks import ablation, demo, stage3_selection
from potsa_training.arguments import DataArguments, load_settings
from potsa_training.run import CONFIGS

from .tiny_runs import train

STAGE_CONFIGS = sorted(CONFIGS.glob("*stage*.yaml"))


def data_arguments(config: Path, overrides: list[str] = ()) -> tuple[DataArguments, str]:
    """The `DataArguments` of a stage config with `key=value` overrides, and its `eval_strategy`."""
    settings = load_settings(config, list(overrides))
    fields = {field.name for field in dataclasses.fields(DataArguments)}
    data = DataArguments(**{key: value for key, value in settings.items() if key in fields})
    return data, settings.get("eval_strategy", "no")


def job_overrides(settings: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def test_every_stage_config_is_checked():
    stages = ("stage1_asr", "stage2_s2tt", "stage3_potsa")
    assert [path.stem for path in STAGE_CONFIGS] == [*stages, *(f"tiny_{stage}" for stage in stages)]


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda path: path.stem)
def test_no_stage_config_evaluates_on_test_during_training(config):
    data, eval_strategy = data_arguments(config)
    assert data.report_split == data.test_split == "test"  # the final report, after training
    if eval_strategy == "no":
        assert data.eval_split is None  # no per-epoch evaluation: no eval set loaded for nothing
    else:
        assert data.eval_split == "validation"


def test_benchmarks_report_on_the_split_they_mean(tmp_path):
    """The stage-3 selection picks its setting on validation; the ablation reports on test; the demo evaluates
    only its final stage (on test)."""
    args = argparse.Namespace(
        seeds=[0], out=tmp_path / "out", demo=tmp_path / "demo", corpus=tmp_path / "corpus",
        eval_utterances=60, stage3_steps=10, bias_utterances=5,
    )  # fmt: skip
    for job in stage3_selection.plan(args):
        data, eval_strategy = data_arguments(CONFIGS / f"{job.config}.yaml", job_overrides(job.settings))
        assert data.report_split == "validation" and eval_strategy == "no"
    for job in ablation.plan(args, ablation.PAPER_ROWS):
        data, eval_strategy = data_arguments(CONFIGS / f"{job.config}.yaml", job_overrides(job.settings))
        assert data.report_split == "test" and eval_strategy == "no"
    for stage in demo.STAGES:
        data, _ = data_arguments(CONFIGS / f"{stage}.yaml", demo.stage_settings(tmp_path, tmp_path, stage, seed=0))
        assert data.report_split == ("test" if stage == demo.STAGES[-1] else None)


def test_a_run_evaluates_validation_during_training_and_reports_test_per_category(corpus, model_yaml, tmp_path):
    """Per-step evaluation on validation (eval-step-N/), the final report on test, each with its categories (the
    corpus's sentence ids start with their category) and the named category set."""
    category_sets = {"number+date": ["number", "date"]}
    train(corpus, model_yaml, tmp_path / "run", max_steps=2, eval_split="validation", eval_strategy="steps",
          eval_steps=2, report_category_sets=category_sets)  # fmt: skip
    splits = datasets.load_from_disk(str(corpus))
    during = json.loads((tmp_path / "run/eval-step-2/results.json").read_text())
    final = json.loads((tmp_path / "run/results.json").read_text())
    assert {p["sentence_id"] for p in during["predictions"]} <= set(splits["validation"]["sentence_id"])
    assert {p["sentence_id"] for p in final["predictions"]} <= set(splits["test"]["sentence_id"])
    assert final["settings"]["split"] == "test"
    for results in (during, final):
        assert all(p["category"] == p["sentence_id"].split("-")[0] for p in results["predictions"])
        assert results["category_sets"] == category_sets
        assert set(results["group_categories"]["zero_shot"]) == {"date", "number", "quantity", "number+date"}
        assert set(results["per_category"]["de"]["number+date"]) == {"bleu", "exact_match", "off_target_rate", "count"}
