"""PotsaConfig: the paper's defaults, self-validation, serialisation, the real-size config built offline, and the
training-only keys kept out of it (older checkpoints that still hold them load with a notice)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation
from modeling_potsa.configuration_potsa import TRAINING_ONLY_KEYS

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    config = PotsaConfig()
    assert config.model_type == "potsa"
    assert (config.num_query_tokens, config.num_qformer_layers) == (80, 8)
    assert config.encoder_config.model_type == "whisper" and config.encoder_config.d_model == 1280
    assert config.text_config.model_type == "qwen2" and config.text_config.hidden_size == 3584
    assert config.qformer_config.encoder_hidden_size == 1280  # derived from the encoder width
    assert config.use_bias_compensation and not config.use_lora


def test_config_holds_no_training_settings():
    """How a model is trained (OT, scheduler, pairing) is not part of what it is: config.json stays free of it."""
    saved = PotsaConfig().to_dict()
    assert not set(TRAINING_ONLY_KEYS) & set(saved)
    assert not any(key.startswith(("ot_", "ucb_")) for key in saved)


def test_old_config_with_training_keys_loads_and_ignores_them(tmp_path, caplog):
    PotsaConfig(languages=["en", "ko"]).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    old = {**json.loads(path.read_text()), "ot_loss_weight": 10.0, "ot_layer_groups": None, "ucb_beta": 1.0,
           "train_bias": True}  # fmt: skip
    path.write_text(json.dumps(old))
    logging.getLogger("transformers").propagate = True
    with caplog.at_level(logging.WARNING):
        loaded = PotsaConfig.from_pretrained(tmp_path)
    assert loaded.languages == ["en", "ko"] and not hasattr(loaded, "ot_loss_weight")
    notices = [record.getMessage() for record in caplog.records if "training-only settings" in record.getMessage()]
    assert len(notices) == 1 and "ot_layer_groups" in notices[0] and "\n" not in notices[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"languages": ["en", "EN!"]}, "Invalid language code"),
        ({"languages": ["en", "en"]}, "duplicates"),
        ({"languages": []}, "at least one language"),
        ({"num_query_tokens": 0}, "num_query_tokens"),
        ({"prompt_template": "no speech here {instruction}"}, "exactly once"),
        ({"prompt_template": "<|speech|> {language}"}, "instruction"),
        ({"speech_token_id": 10**7}, "outside the LLM vocabulary"),
        ({"use_lora": True, "lora_target_modules": []}, "LoRA"),
    ],
)
def test_bad_values_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PotsaConfig(**kwargs)


def test_unknown_language_lookup_lists_supported():
    config = PotsaConfig(languages=["en", "es"])
    assert config.language_id("es") == 1
    with pytest.raises(ValueError, match=r"Unknown language 'xx'.*\['en', 'es'\]"):
        config.language_id("xx")


def test_json_round_trip_keeps_sub_configs(tmp_path):
    config = PotsaConfig(languages=["en", "ko"], num_query_tokens=16, speech_token_id=151665)
    config.save_pretrained(tmp_path)
    loaded = PotsaConfig.from_pretrained(tmp_path)
    assert loaded.languages == ["en", "ko"] and loaded.num_query_tokens == 16
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert loaded.encoder_config.d_model == 1280 and loaded.qformer_config.num_hidden_layers == 8
    assert loaded.speech_token_id == 151665


def test_real_size_config_file_builds_offline_and_counts_on_meta(monkeypatch):
    """The paper's config builds without any download; parameter counts come from a meta-device init."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = yaml.safe_load((REPO / "training/configs/model_paper.yaml").read_text())
    config = PotsaConfig(**settings)
    assert config.encoder_model_id == "openai/whisper-large-v3"
    assert config.text_model_id == "Qwen/Qwen2.5-7B-Instruct"
    with torch.device("meta"):
        model = PotsaForSpeechTranslation(config)
    counts = model.num_parameters_by_part()
    assert 7.0e9 < counts["language_model"] < 7.7e9  # Qwen2.5-7B: 7.62 B
    assert 0.6e9 < counts["speech_encoder"] < 0.65e9  # Whisper-large-v3 encoder: 0.637 B
    assert counts["trainable"] == (
        counts["qformer"] + counts["projector"] + counts["query_tokens"] + counts["bias_compensation"]
    )
