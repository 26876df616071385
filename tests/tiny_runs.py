"""Tiny `training/run.py` runs shared by the training tests: an eSpeak corpus, base checkpoints saved by path (as the
real config names hub ids), and the settings / launcher / loss-curve helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import WhisperConfig, WhisperModel

from benchmarks.corpus import generate_corpus
from potsa_training.run import run
from potsa_training.tiny import build_tiny_potsa

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = ["en", "es", "ja", "de"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """24 parallel utterances (8 sentences x en/es/ja) for training, a few for evaluation, de held out."""
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    generate_corpus(LANGUAGES, out_dir=str(out), num_sentences={"train": 8, "validation": 3, "test": 3}, workers=1)
    return out


@pytest.fixture(scope="session")
def model_yaml(tmp_path_factory) -> Path:
    """A model config naming base checkpoints by path, exactly as the real one names hub ids."""
    root = tmp_path_factory.mktemp("bases")
    model, processor = build_tiny_potsa(languages=LANGUAGES, seed=1)
    whisper = WhisperModel(WhisperConfig(**model.config.encoder_config.to_dict()))
    whisper.encoder.load_state_dict(model.speech_encoder.state_dict())
    whisper.save_pretrained(root / "encoder")
    processor.feature_extractor.save_pretrained(root / "encoder")
    model.language_model.save_pretrained(root / "llm")
    processor.tokenizer.save_pretrained(root / "llm")
    settings = {
        "encoder_model_id": str(root / "encoder"),
        "text_model_id": str(root / "llm"),
        "languages": LANGUAGES,
        "num_query_tokens": 8,
        "prompt_template": model.config.prompt_template,
        "qformer_config": {
            **{k: model.config.qformer_config.to_dict()[k] for k in ("hidden_size", "num_hidden_layers")},
            "num_attention_heads": 2, "intermediate_size": 64, "cross_attention_frequency": 1,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        },  # fmt: skip
    }
    path = root / "model.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def settings(corpus: Path, model_yaml: Path, out: Path, **overrides) -> list[str]:
    base = {
        "model_config": str(model_yaml), "init_from": None, "data_source": "disk", "data_path": str(corpus), "output_dir": str(out),
        "train_languages": ["en", "es", "ja"], "zero_shot_languages": ["de"], "task": "translate",
        "per_device_train_batch_size": 6, "per_device_eval_batch_size": 8, "learning_rate": 3e-3,
        "max_steps": 6, "warmup_steps": 0, "logging_steps": 1, "save_strategy": "steps", "save_steps": 3, "eval_strategy": "no", "report_to": [],
        "use_cpu": True, "seed": 3, "dataloader_num_workers": 0, "generation_max_new_tokens": 8,
        "ot_loss_weight": 1.0, "ot_candidate_layers": [1, 2, 3], "disable_tqdm": True,
    }  # fmt: skip
    base.update(overrides)
    return [f"{key}={json.dumps(value)}" for key, value in base.items()]


def train(corpus, model_yaml, out, **overrides):
    config = REPO / "training/configs/tiny_stage3_potsa.yaml"
    return run(["--config", str(config), *settings(corpus, model_yaml, out, **overrides)])


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
