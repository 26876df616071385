"""The ablation benchmark's rows and job graph (the benchmark itself is not a test; this checks it is well formed
before anyone spends an hour of CPU on it)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest

from benchmarks import stage3_selection
from benchmarks.ablation import BEYOND_ROWS, PAPER_LAMBDA, PAPER_ROWS, POTSA, STAGE2_ONLY, bind_to_checkpoint, plan
from potsa_training.arguments import load_settings, parse_settings

REPO = Path(__file__).resolve().parents[1]
ROWS = {**PAPER_ROWS, **BEYOND_ROWS}


@pytest.mark.parametrize("name", [name for name in ROWS if name != STAGE2_ONLY])
def test_every_row_is_a_valid_stage3_configuration(name, tiny_model):
    """Each row's overrides parse as training settings, valid for a model of the tiny Q-Former depth."""
    overrides = [f"{key}={value}" for key, value in ROWS[name].items()]
    settings = parse_settings(load_settings(REPO / "training/configs/tiny_stage3_potsa.yaml", overrides))
    config = copy.deepcopy(tiny_model.config)
    config.qformer_config.num_hidden_layers = 3  # training/configs/model_tiny.yaml
    for key, value in settings.config_overrides.items():
        setattr(config, key, value)
    config._validate()
    settings.alignment.check_model(config)
    if "zero_shot_protocol" in ROWS[name]:
        assert settings.data.zero_shot_protocol == "parallel_audio"


def test_job_graph_starts_every_row_from_the_demo_stage2_and_fills_the_encoder_cache_once(tmp_path):
    args = argparse.Namespace(
        seeds=[0, 1], out=tmp_path / "ablation", demo=tmp_path / "demo", corpus=tmp_path / "corpus",
        eval_utterances=60, stage3_steps=10, workers=2, bias_utterances=5,
    )  # fmt: skip
    jobs = {job.name: job for job in plan(args, PAPER_ROWS)}
    assert len(jobs) == 1 + 2 * (len(PAPER_ROWS) - 1)  # "stage 2 only" is not trained: one seed is enough
    first = f"seed0/{POTSA}"
    assert list(jobs)[0] == first and jobs[first].after == []
    for name, job in jobs.items():
        assert job.config == "tiny_stage3_potsa" and job.settings["init_from"] == str(tmp_path / "demo/tiny_stage2_s2tt")
        assert job.settings["eval_split"] == "test" and job.settings["max_eval_samples"] == 60
        assert job.after == ([] if name == first else [first])
        assert job.settings["seed"] == int(name.split("/")[0].removeprefix("seed"))
        assert job.out_dir.parent == tmp_path / "ablation" / name.split("/")[0]
    assert jobs[f"seed0/{STAGE2_ONLY}"].settings["learning_rate"] == 0.0
    assert jobs["seed1/+ BC only"].settings["max_steps"] == 10
    assert jobs[f"seed1/{POTSA}"].settings["ot_loss_weight"] == PAPER_LAMBDA  # whatever the demo's config says
    assert jobs["seed1/POTSA, lambda 1 (paper: 10)"].settings["ot_loss_weight"] == 1.0
    assert len({job.out_dir for job in jobs.values()}) == len(jobs)
    assert not any(job.done for job in jobs.values())


def test_finished_rows_are_reused_only_for_the_checkpoint_they_were_trained_from(tmp_path):
    checkpoint = tmp_path / "stage2"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights of one build")
    bind_to_checkpoint(tmp_path / "ablation", checkpoint)
    bind_to_checkpoint(tmp_path / "ablation", checkpoint)  # a rerun on the same checkpoint resumes
    (checkpoint / "model.safetensors").write_bytes(b"weights of a rebuilt demo")
    with pytest.raises(SystemExit, match="another stage-2 checkpoint"):
        bind_to_checkpoint(tmp_path / "ablation", checkpoint)


def test_stage3_selection_rows_run_on_validation_and_include_the_demo_setting(tmp_path):
    """Every grid row is a stage 3 from the demo's stage 2 on the validation split (never test), and the demo's
    stage-3 config is one of the rows (the one the selection picked)."""
    args = argparse.Namespace(out=tmp_path / "selection", demo=tmp_path / "demo", corpus=tmp_path / "corpus")
    jobs = stage3_selection.plan(args)
    grid = [(job.settings["learning_rate"], job.settings["ot_loss_weight"]) for job in jobs]
    assert grid == list(stage3_selection.GRID)
    assert jobs[0].after == [] and all(job.after == [jobs[0].name] for job in jobs[1:])
    for job in jobs:
        assert job.config == "tiny_stage3_potsa" and job.settings["eval_split"] == "validation"
        assert job.settings["init_from"] == str(tmp_path / "demo/tiny_stage2_s2tt") and not job.done
    demo_settings = load_settings(REPO / "training/configs/tiny_stage3_potsa.yaml", [])
    assert (demo_settings["learning_rate"], demo_settings["ot_loss_weight"]) in stage3_selection.GRID
