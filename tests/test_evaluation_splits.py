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
from benchmarks.corpus.roles import language_roles
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
    """The stage-3 selection picks its setting on validation; the ablation and the demo's stage 3 report on test;
    the demo's stages 1-2 are not evaluated."""
    args = argparse.Namespace(
        suite="rows", stage2_seeds=[0, 1, 2], stage3_seeds=[0, 1], seen=demo.SEEN, zero_shot=demo.ZERO_SHOT,
        out=tmp_path / "out", corpus=tmp_path / "corpus", selection=tmp_path / "selection",
    )  # fmt: skip
    roles = language_roles(demo.SEEN, demo.ZERO_SHOT)
    common = demo.stage_settings(tmp_path, tmp_path, roles, seed=0)
    for job in stage3_selection.plan(args, common):
        data, eval_strategy = data_arguments(CONFIGS / f"{job.config}.yaml", job_overrides(job.settings))
        assert data.report_split == "validation" and eval_strategy == "no"
    for job in [*ablation.stage2_jobs(args, common), *ablation.plan(args, ablation.ROWS, common)]:
        data, eval_strategy = data_arguments(CONFIGS / f"{job.config}.yaml", job_overrides(job.settings))
        assert data.report_split == ("test" if job.config == "tiny_stage3_potsa" else None) and eval_strategy == "no"
    for job in demo.stage3_jobs(tmp_path, tmp_path / "stage2", common):
        data, _ = data_arguments(CONFIGS / f"{job.config}.yaml", job_overrides(job.settings))
        assert data.report_split == "test"
    for stage, settings in demo.stages_1_2_settings(tmp_path, common).items():
        data, _ = data_arguments(CONFIGS / f"{stage}.yaml", job_overrides(settings))
        assert data.report_split is None


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
