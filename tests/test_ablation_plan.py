"""The ablation and selection benchmarks' rows and job graphs (the benchmarks themselves are not tests; this checks
they are well formed before anyone spends hours of CPU on them)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest

from benchmarks import ablation, demo, stage3_selection
from benchmarks.corpus.roles import language_roles
from benchmarks.intervals import MIN_RUNS
from benchmarks.jobs import bind_to_checkpoint
from potsa_training.arguments import load_settings, parse_settings

REPO = Path(__file__).resolve().parents[1]
ALL_ROWS = {**ablation.ROWS, **ablation.REGIME, **ablation.BEYOND}


def _args(tmp_path: Path, suite: str = "rows", stage2_seeds=(0, 1, 2)) -> argparse.Namespace:
    return argparse.Namespace(
        suite=suite, stage2_seeds=list(stage2_seeds), stage3_seeds=[0, 1], seen=demo.SEEN, zero_shot=demo.ZERO_SHOT,
        out=tmp_path / "ablation", corpus=tmp_path / "corpus", selection=tmp_path / "selection",
    )  # fmt: skip


def _common(args: argparse.Namespace) -> dict:
    return demo.stage_settings(args.out, args.corpus, language_roles(args.seen, args.zero_shot), seed=0)


@pytest.mark.parametrize("name", list(ALL_ROWS))
def test_every_row_is_a_valid_stage3_configuration(name, tiny_model):
    """Each row's overrides parse as training settings, valid for a model of the tiny Q-Former depth, and its control
    is a row of the same suite."""
    overrides = [f"{key}={value}" for key, value in ALL_ROWS[name].overrides.items()]
    settings = parse_settings(load_settings(REPO / "training/configs/tiny_stage3_potsa.yaml", overrides))
    config = copy.deepcopy(tiny_model.config)
    config.qformer_config.num_hidden_layers = 3  # training/configs/model_tiny.yaml
    for key, value in settings.config_overrides.items():
        setattr(config, key, value)
    config._validate()
    settings.alignment.check_model(config)
    suite = next(rows for rows in ablation.SUITES.values() if name in rows)
    assert ALL_ROWS[name].control in suite


def test_stage2_chains_fill_the_cache_once_and_run_side_by_side(tmp_path):
    args = _args(tmp_path)
    jobs = {job.name: job for job in ablation.stage2_jobs(args, _common(args))}
    assert list(jobs) == [f"seed{seed}/{stage}" for seed in (0, 1, 2) for stage in demo.STAGES]
    assert jobs["seed0/tiny_stage1_asr"].after == []
    assert jobs["seed1/tiny_stage1_asr"].after == jobs["seed2/tiny_stage1_asr"].after == ["seed0/tiny_stage1_asr"]
    assert jobs["seed1/tiny_stage2_s2tt"].after == ["seed1/tiny_stage1_asr"]
    assert jobs["seed2/tiny_stage2_s2tt"].settings["init_from"] == str(args.out / "stage2_seed2/tiny_stage1_asr")
    assert all(job.settings["test_split"] is None and job.settings["seed"] == int(job.name[4]) for job in jobs.values())


def test_rows_run_from_three_stage2_seeds_and_claims_get_six_runs(tmp_path):
    args = _args(tmp_path)
    jobs = {job.name: job for job in ablation.plan(args, ablation.ROWS, _common(args))}
    for name, row in ablation.ROWS.items():
        runs = [job for job in jobs.values() if job.name.startswith(f"{name} / ")]
        assert len(runs) == (MIN_RUNS if row.all_seeds else 3), name
        for job in runs:
            stage2_seed = int(job.name.rsplit(" / ", 1)[1].split(".")[0])
            assert job.settings["init_from"] == str(args.out / f"stage2_seed{stage2_seed}/tiny_stage2_s2tt")
            assert job.out_dir.is_relative_to(args.out / "rows" / f"stage2_seed{stage2_seed}")
            assert job.settings["test_split"] == "test" and not job.done
    for row in ("baseline (CE only)", "InfoNCE over Sinkhorn", "POTSA, parallel audio"):
        assert ablation.ROWS[row].all_seeds
    assert len({job.out_dir for job in jobs.values()}) == len(jobs)


def test_the_regime_suite_runs_the_papers_long_low_lr_stage3(tmp_path):
    args = _args(tmp_path, "regime", stage2_seeds=(0,))
    jobs = ablation.plan(args, ablation.REGIME, _common(args))
    assert len(jobs) == len(ablation.REGIME)
    for job in jobs:
        assert job.settings["num_train_epochs"] == ablation.REGIME_EPOCHS and job.settings["max_steps"] == -1
        assert job.settings["learning_rate"] in (1e-4, 3e-5)


def test_finished_jobs_are_reused_only_for_the_checkpoint_they_were_trained_from(tmp_path):
    checkpoint = tmp_path / "stage2"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights of one build")
    bind_to_checkpoint(tmp_path / "ablation", checkpoint)
    bind_to_checkpoint(tmp_path / "ablation", checkpoint)  # a rerun on the same checkpoint resumes
    (checkpoint / "model.safetensors").write_bytes(b"weights of a rebuilt demo")
    with pytest.raises(SystemExit, match="another stage2 checkpoint"):
        bind_to_checkpoint(tmp_path / "ablation", checkpoint)


def test_stage3_selection_rows_report_on_validation_and_include_the_demo_setting(tmp_path):
    args = _args(tmp_path)
    jobs = stage3_selection.plan(args, _common(args))
    grid = [(job.settings["learning_rate"], job.settings["ot_loss_weight"], job.settings["alignment_loss"])
            for job in jobs[1:]]  # fmt: skip
    assert grid == list(stage3_selection.GRID) and jobs[0].settings["ot_loss_weight"] == 0.0
    for job in jobs:
        assert job.settings["test_split"] == "validation" and job.config == "tiny_stage3_potsa"
        assert job.settings["init_from"] == str(args.out / "stage2_seed0/tiny_stage2_s2tt")
    demo_settings = load_settings(REPO / "training/configs/tiny_stage3_potsa.yaml", [])
    assert (demo_settings["learning_rate"], demo_settings["ot_loss_weight"], "sinkhorn") in stage3_selection.GRID
