"""training/run.py end to end on tiny models and eSpeak speech: learning, logs, resume, accumulation, DDP, freezing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modeling_potsa import PotsaForSpeechTranslation, PotsaProcessor
from potsa_training.arguments import load_settings
from potsa_training.run import run
from potsa_training.trainer import check_frozen

from .tiny_runs import REPO, losses, settings, train


def test_stage_learns_logs_ot_and_saves_trainable_parts(corpus, model_yaml, tmp_path):
    """A random frozen LLM hears the soft prompt only through random attention, so on an overfit set (2 sentences
    x 3 languages) the loss falls steadily but slowly; LoRA is on, which also checks adapters train and are saved.
    (With pretrained stand-ins the same code reaches exact-match translation: see the README demo.)"""
    trainer = train(corpus, model_yaml, tmp_path / "run", max_steps=40, save_steps=100, estimate_bias=True,
                    learning_rate=1e-2, max_train_samples=6,
                    use_lora=True, lora_target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    curve = list(losses(trainer).values())
    assert curve[-1] < 0.95 * curve[0] and sum(curve[-4:]) < sum(curve[16:20]) < sum(curve[:4]), curve
    logged = [entry for entry in trainer.state.log_history if "ot" in entry]
    assert logged and all(entry["ot_layer"] in (1, 2, 3) for entry in logged)
    assert sum(logged[-1][f"ot_picks_layer_{layer}"] for layer in (1, 2, 3)) == 40
    assert all(key in logged[0] for key in ("ce", "weighted_ot"))
    saved = load_file(tmp_path / "run/model.safetensors")
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and any("lora_" in name for name in saved)  # base weights: from their paths
    assert {"modeling_potsa.py", "processor_config.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    assert trainer.model.bias_compensation.bias.abs().sum() > 0  # estimated before training
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert set(results["per_language"]) == {"en", "es", "ja", "de"} and "zero_shot" in results["groups"]
    for processor in (trainer.processing_class, PotsaProcessor.from_pretrained(tmp_path / "run")):
        tokenizer = processor.tokenizer  # read as written: AutoTokenizer would rebuild Qwen2's byte-level recipe
        assert tokenizer.decode(tokenizer.encode("八千四百", add_special_tokens=False)) == "八千四百"
    reloaded = PotsaForSpeechTranslation.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(reloaded.query_tokens, trainer.model.query_tokens)


def test_resume_gives_the_uninterrupted_loss_curve(corpus, model_yaml, tmp_path):
    full = train(corpus, model_yaml, tmp_path / "full")
    assert (tmp_path / "full/checkpoint-3").is_dir()
    resumed = train(corpus, model_yaml, tmp_path / "full", resume_from_checkpoint=str(tmp_path / "full/checkpoint-3"))
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come back from the checkpoint's log history
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)
    full_state = full.layer_callback.scheduler.state_dict()
    assert resumed.layer_callback.scheduler.state_dict() == full_state


def test_gradient_accumulation_equals_one_large_batch(corpus, model_yaml, tmp_path):
    """Two sentences x en/es: both the CE and the OT term (two pairs) must scale as one batch of 4 does."""
    common = {"max_steps": 1, "save_steps": 100, "max_train_samples": 4, "train_languages": ["en", "es"],
              "zero_shot_languages": [], "test_split": None, "learning_rate": 1e-2, "optim": "sgd",
              "lr_scheduler_type": "constant"}  # fmt: skip
    large = train(corpus, model_yaml, tmp_path / "large", per_device_train_batch_size=4, **common)
    small = train(corpus, model_yaml, tmp_path / "small", per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, **common)  # fmt: skip
    for (name, a), (_, b) in zip(large.model.named_parameters(), small.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert losses(large)[1] == pytest.approx(losses(small)[1], rel=1e-5)
    assert [entry["ot"] > 0 for entry in large.state.log_history if "ot" in entry] == [True]


def test_frozen_parts_are_enforced(tiny_model):
    model = PotsaForSpeechTranslation(tiny_model.config)
    model.speech_encoder.conv1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="keeps them frozen"):
        check_frozen(model)


DDP_SCRIPT = """
import json, os, sys
from potsa_training.run import run
trainer = run(sys.argv[1:])
rank = int(os.environ["RANK"])
state = trainer.layer_callback.scheduler.state_dict()
logged = [entry for entry in trainer.state.log_history if "loss" in entry]
with open(os.path.join(trainer.args.output_dir, f"scheduler-rank{rank}.json"), "w") as f:
    json.dump({"state": state, "logged": logged}, f)
"""


def _assert_terms_add_up(logged: list[dict]) -> None:
    """Every logged term is on the logged loss's scale: loss = ce + weighted_ot (the Trainer rounds loss to 4
    digits)."""
    assert logged
    for entry in logged:
        assert entry["loss"] == pytest.approx(entry["ce"] + entry["weighted_ot"], abs=1e-4), entry


def test_two_process_cpu_ddp(corpus, model_yaml, tmp_path):
    """gloo DDP over 2 CPU processes (torchrun; accelerate's multi-CPU launcher needs mpirun): completes, both
    ranks pick the same layers, one set of checkpoints, and the logged terms add up to the logged loss, as on one
    process (where each process's CE is a share of the global token count, an unscaled one would be half)."""
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    lambda_10 = {"ot_loss_weight": 10.0, "test_split": None}  # a visible OT term
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "--config", str(REPO / "training/configs/tiny_stage3_potsa.yaml"),
        *settings(corpus, model_yaml, out, per_device_train_batch_size=3, **lambda_10),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment, cwd=REPO, timeout=300)
    ranks = [json.loads((out / f"scheduler-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["state"] == ranks[1]["state"] and sum(ranks[0]["state"]["pick_counts"]) == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not list(out.glob("checkpoint-*/scheduler-rank*"))
    _assert_terms_add_up(ranks[0]["logged"])
    assert ranks[0]["logged"] == ranks[1]["logged"]  # every process logs the same (reduced) terms
    single = train(corpus, model_yaml, tmp_path / "single", per_device_train_batch_size=6, save_steps=100, **lambda_10)
    _assert_terms_add_up([entry for entry in single.state.log_history if "loss" in entry])


def test_a_missing_previous_stage_is_named_with_the_stage_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/tiny_stage2_s2tt does not exist here
    with pytest.raises(ValueError, match=r"no such local checkpoint.*training/configs/tiny_stage2_s2tt.yaml"):
        run(["--config", str(REPO / "training/configs/tiny_stage3_potsa.yaml"), "data_path=missing"])


def test_settings_accept_yaml_floats_without_a_dot(tmp_path):
    """`learning_rate: 1e-5` is a string to YAML 1.1; it must still reach TrainingArguments as a float."""
    config = tmp_path / "stage.yaml"
    config.write_text("learning_rate: 1e-5\nmodel_config: tiny\n")
    settings = load_settings(config, ["warmup_ratio=5e-2", "output_dir=runs/1e3"])
    assert settings["learning_rate"] == 1e-5 and settings["warmup_ratio"] == 0.05
    assert settings["output_dir"] == "runs/1e3"
