"""PotsaConfig: the paper's defaults, self-validation, serialisation, and the real-size config built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    config = PotsaConfig()
    assert config.model_type == "potsa"
    assert (config.num_query_tokens, config.num_qformer_layers) == (80, 8)
    assert config.encoder_config.model_type == "whisper" and config.encoder_config.d_model == 1280
    assert config.text_config.model_type == "qwen2" and config.text_config.hidden_size == 3584
    assert config.qformer_config.encoder_hidden_size == 1280  # derived from the encoder width
    assert (config.ot_loss_weight, config.ot_blur, config.ot_candidate_layers) == (10.0, 0.05, [1, 2, 3])
    assert (config.ucb_beta, config.ucb_ema) == (1.0, 0.9)
    assert (config.ucb_temperature_floor, config.ucb_temperature_decay) == (0.05, 0.999)
    assert config.ot_pair_strategy == "random_pairwise" and not config.use_lora


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"languages": ["en", "EN!"]}, "Invalid language code"),
        ({"languages": ["en", "en"]}, "duplicates"),
        ({"languages": []}, "at least one language"),
        ({"ot_pair_strategy": "english_anchor", "anchor_language": "fr"}, "anchor_language"),
        ({"ot_loss_weight": -1.0}, "lambda"),
        ({"ot_blur": 0.0}, "ot_blur"),
        ({"ot_candidate_layers": [9]}, "outside the Q-Former's layers 1..8"),
        ({"ot_candidate_layers": [0]}, "outside"),
        ({"ot_candidate_layers": []}, "at least one"),
        ({"ot_layer_scheduler": "greedy"}, "ot_layer_scheduler"),
        ({"ot_pair_strategy": "all"}, "ot_pair_strategy"),
        ({"ucb_ema": 1.0}, "ucb_ema"),
        ({"ucb_temperature_floor": 0.0}, "ucb_temperature_floor"),
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
    config = PotsaConfig(languages=["en", "ko"], ot_candidate_layers=[1, 2], speech_token_id=151665)
    config.save_pretrained(tmp_path)
    loaded = PotsaConfig.from_pretrained(tmp_path)
    assert loaded.languages == ["en", "ko"] and loaded.ot_candidate_layers == [1, 2]
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
