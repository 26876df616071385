"""Stage settings: the training-side AlignmentArguments (validated once, at construction, and against the model), and
the routing of a flat YAML + key=value overrides into the argument dataclasses and model-config overrides."""

from __future__ import annotations

import pytest

from modeling_potsa import PotsaConfig
from potsa_training.arguments import AlignmentArguments, load_settings, parse_settings
from potsa_training.ucb_scheduler import UCBLayerScheduler


def test_defaults_are_the_papers():
    arguments = AlignmentArguments()
    assert (arguments.ot_loss_weight, arguments.ot_blur, arguments.ot_candidate_layers) == (10.0, 0.05, [1, 2, 3])
    assert (arguments.ucb_beta, arguments.ucb_ema) == (1.0, 0.9)
    assert (arguments.ucb_temperature_floor, arguments.ucb_temperature_decay) == (0.05, 0.999)
    assert arguments.ot_pair_strategy == "random_pairwise" and arguments.ot_layer_scheduler == "ucb"
    scheduler = arguments.layer_scheduler(seed=0)
    assert isinstance(scheduler, UCBLayerScheduler) and scheduler.arms == (1, 2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ot_loss_weight": -1.0}, "lambda"),
        ({"ot_blur": 0.0}, "ot_blur"),
        ({"ot_candidate_layers": [0]}, "positive integers"),
        ({"ot_candidate_layers": []}, "empty"),
        ({"ot_layer_scheduler": "greedy"}, "Unknown layer scheduler"),
        ({"ot_pair_strategy": "all"}, "ot_pair_strategy"),
        ({"ot_gradient_surgery": "mgda"}, "ot_gradient_surgery"),
        ({"ot_gradient_cosine_every": -1}, "ot_gradient_cosine_every"),
        ({"ucb_ema": 1.0}, "ema"),
        ({"ucb_temperature_floor": 0.0}, "temperature_floor"),
        ({"ot_layer_weights": [1.0, 2.0, 3.0]}, "one layer per arm"),
        ({"ot_layer_groups": [[1], [4]]}, "not candidate layers"),
    ],
)
def test_bad_values_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignmentArguments(**kwargs)


def test_groups_and_weights_build_their_scheduler():
    arguments = AlignmentArguments(
        ot_candidate_layers=[1, 2, 3, 4], ot_layer_groups=[[1], [1, 2, 3, 4]], ot_layer_weights=[4.0, 1.0, 1.0, 2.0]
    )
    grouped = arguments.layer_scheduler(seed=0)
    assert grouped.arms == ((1,), (1, 2, 3, 4)) and grouped.arm_weights((1, 2, 3, 4))[0] == (1, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ot_candidate_layers": [9]}, r"outside the Q-Former's layers 1..8"),
        ({"ot_pair_strategy": "english_anchor", "anchor_language": "fr"}, "anchor_language"),
    ],
)
def test_settings_the_model_cannot_train_with_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignmentArguments(**kwargs).check_model(PotsaConfig(languages=["en", "es"]))


def test_settings_route_to_their_dataclasses(tmp_path):
    config = tmp_path / "stage.yaml"
    config.write_text("data_source: disk\ndata_path: x\noutput_dir: out\not_loss_weight: 1e-1\n")
    overrides = ["ot_candidate_layers=[1, 2]", "learning_rate=1e-5", "num_query_tokens=16", "train_bias=false",
                 "report_groups={related: [it, pt]}"]  # fmt: skip
    settings = parse_settings(load_settings(config, overrides))
    assert settings.alignment.ot_loss_weight == 0.1 and settings.alignment.ot_candidate_layers == [1, 2]
    assert settings.training.learning_rate == 1e-5 and settings.model.train_bias is False
    assert settings.data.report_groups == {"related": ["it", "pt"]}
    assert settings.config_overrides == {"num_query_tokens": 16}
    with pytest.raises(ValueError, match=r"Unknown settings \['ot_weight'\]"):
        parse_settings(load_settings(config, ["ot_weight=1"]))
