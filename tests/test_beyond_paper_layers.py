"""Which layers to align: a fixed weighted set ("all"), UCB over groups of layers, their config checks, the weighted
OT loss, and the trainer's logs of both (the paper's single-layer default is covered by test_layer_scheduler.py)."""

from __future__ import annotations

import json

import pytest
import torch

from modeling_potsa import PotsaConfig
from potsa_training.alignment import alignment_loss, find_parallel_pairs, weighted_alignment_loss
from potsa_training.arguments import AlignmentArguments
from potsa_training.layer_scheduler import arm_label
from potsa_training.layer_scheduler_callback import build_layer_scheduler

from .tiny_runs import train

GROUPS = [[1], [1, 2], [1, 2, 3]]


def _run(scheduler, steps, loss):
    """``steps`` optimizer steps; ``loss(arm, visits)`` is the arm's OT loss after ``visits`` picks."""
    picks = []
    for _ in range(steps):
        arm = scheduler.select()
        picks.append(arm)
        scheduler.update(loss(arm, scheduler.pick_counts[arm]))
    return picks


def _group_loss(arm, visits):
    """Group [1, 2]'s loss falls ten times faster than the others'."""
    return 10.0 - (1.0 if arm == (1, 2) else 0.1) * visits


def test_all_scheduler_aligns_every_layer_with_normalised_weights():
    scheduler = build_layer_scheduler("all", [1, 2, 3], layer_weights=[2.0, 1.0, 1.0])
    assert _run(scheduler, 3, lambda arm, visits: 1.0) == [(1, 2, 3)] * 3
    assert scheduler.current_layers == ((1, 0.5), (2, 0.25), (3, 0.25))
    equal = build_layer_scheduler("all", [1, 3])
    equal.select()
    assert equal.current_layers == ((1, 0.5), (3, 0.5))
    skipping = build_layer_scheduler("all", [1, 2, 3], layer_weights=[1.0, 0.0, 3.0])
    skipping.select()
    assert skipping.current_layers == ((1, 0.25), (3, 0.75))  # a zero-weight layer is not even computed


def test_ucb_over_groups_prefers_the_group_whose_loss_falls_fastest():
    scheduler = build_layer_scheduler("ucb", [1, 2, 3], groups=GROUPS)
    assert scheduler.arms == ((1,), (1, 2), (1, 2, 3))
    picks = _run(scheduler, 300, _group_loss)
    assert picks.count((1, 2)) > 0.5 * 300
    assert sum(scheduler.pick_counts.values()) == 300
    arm = scheduler.select()
    assert scheduler.current_layers == tuple((layer, 1 / len(arm)) for layer in arm)
    with pytest.raises(RuntimeError, match="current_layers"):
        scheduler.current_layer


def test_single_layer_arms_keep_the_papers_interface():
    scheduler = build_layer_scheduler("round_robin", [2, 3])
    assert scheduler.current_layer is None
    assert scheduler.select() == 2 and scheduler.current_layer == 2 and scheduler.current_layers == ((2, 1.0),)
    assert arm_label(2) == "layer_2" and arm_label((1, 2)) == "layers_1_2"


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("ucb", {"groups": GROUPS}),
        ("uniform", {"groups": GROUPS, "layer_weights": [1.0, 2.0, 3.0]}),
        ("round_robin", {"groups": GROUPS}),
        ("fixed", {"groups": [[2, 3]]}),
        ("all", {"layer_weights": [1.0, 0.5, 0.0]}),
    ],
)
def test_group_schedulers_resume_exactly_from_a_json_state(name, kwargs):
    uninterrupted = build_layer_scheduler(name, [1, 2, 3], seed=5, **kwargs)
    expected = _run(uninterrupted, 40, _group_loss)
    interrupted = build_layer_scheduler(name, [1, 2, 3], seed=5, **kwargs)
    head = _run(interrupted, 20, _group_loss)
    saved = json.loads(json.dumps(interrupted.state_dict()))  # what trainer_state.json holds
    resumed = build_layer_scheduler(**saved["config"])
    resumed.load_state_dict(saved)
    assert resumed.current_arm == interrupted.current_arm  # a group comes back as a tuple, not a JSON list
    assert head + _run(resumed, 20, _group_loss) == expected
    assert resumed.state_dict() == uninterrupted.state_dict()


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("ucb", {"layer_weights": [1.0, 2.0]}, "one weight per candidate layer"),
        ("all", {"layer_weights": [1.0, -1.0, 1.0]}, ">= 0"),
        ("all", {"layer_weights": [1.0, float("nan"), 1.0]}, ">= 0"),
        ("ucb", {"layer_weights": [1.0, 2.0, 3.0]}, "no effect"),
        ("ucb", {"groups": [[1], []]}, "non-empty"),
        ("ucb", {"groups": []}, "non-empty"),
        ("ucb", {"groups": [[1, 4]]}, "not candidate layers"),
        ("ucb", {"groups": [[1, 1]]}, "more than once"),
        ("ucb", {"groups": [[1, 2], [2, 1]]}, "same group twice"),
        ("all", {"groups": [[1, 2]]}, "every candidate layer"),
        ("fixed", {"groups": [[1], [2]]}, "exactly one"),
        ("uniform", {"groups": [[1, 2], [3]], "layer_weights": [1.0, 1.0, 0.0]}, "weight 0"),
    ],
)
def test_invalid_weights_and_groups_raise(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_layer_scheduler(name, [1, 2, 3], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ot_layer_weights": [1.0, 1.0]}, "2 values for the candidate layers"),
        ({"ot_layer_scheduler": "all", "ot_layer_weights": [1.0, -0.5, 1.0]}, ">= 0"),
        ({"ot_layer_scheduler": "all", "ot_layer_weights": [0, 0, 0]}, "weight 0"),
        ({"ot_layer_weights": [1.0, 2.0, 3.0]}, "no\\s+effect"),
        ({"ot_layer_groups": [[1], []]}, "non-empty"),
        ({"ot_layer_groups": [[1, 9]]}, "not candidate layers"),
        ({"ot_layer_groups": [[2, 2]]}, "more than once"),
        ({"ot_layer_groups": [[1, 2], [2, 1]]}, "same group twice"),
        ({"ot_layer_scheduler": "all", "ot_layer_groups": [[1, 2]]}, "every candidate layer"),
    ],
)
def test_stage_settings_reject_bad_layer_selection(kwargs, message):
    """The stage settings are checked when they are parsed, by the scheduler they name: before any model loads."""
    with pytest.raises(ValueError, match=message):
        AlignmentArguments(**kwargs)


def test_groups_deeper_than_the_q_former_are_refused_for_the_model():
    arguments = AlignmentArguments(ot_candidate_layers=[1, 9], ot_layer_groups=[[1, 9]])
    with pytest.raises(ValueError, match="outside the Q-Former's layers 1..8"):
        arguments.check_model(PotsaConfig())


def test_layer_settings_are_recorded_as_json():
    arguments = AlignmentArguments(ot_candidate_layers=[1, 2, 3, 4], ot_layer_groups=[[1, 2], [1, 2, 3, 4]],
                                   ot_layer_weights=[1.0, 1.0, 0.5, 0.5], ot_gradient_surgery="pcgrad",
                                   ot_gradient_cosine_every=50)  # fmt: skip
    recorded = json.loads(json.dumps(arguments.to_dict()))
    assert AlignmentArguments(**recorded) == arguments
    defaults = AlignmentArguments()
    assert (defaults.ot_layer_weights, defaults.ot_layer_groups, defaults.ot_gradient_surgery) == (None, None, "none")
    assert defaults.ot_gradient_cosine_every == 0


def test_weighted_alignment_loss_is_the_weighted_sum_of_layer_losses():
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(4, 3, 8, generator=generator) for _ in range(4)]  # query embeddings + 3 layers
    pairs = find_parallel_pairs(["a", "a", "b", "b"], ["en", "es", "en", "es"], "random_pairwise")
    single = {layer: alignment_loss(states[layer], pairs, "random_pairwise") for layer in (1, 2, 3)}
    assert torch.equal(weighted_alignment_loss(states, ((2, 1.0),), pairs, "random_pairwise"), single[2])
    weighted = weighted_alignment_loss(states, ((1, 0.25), (3, 0.75)), pairs, "random_pairwise")
    torch.testing.assert_close(weighted, 0.25 * single[1] + 0.75 * single[3])
    with pytest.raises(ValueError, match="outside"):
        weighted_alignment_loss(states, ((4, 1.0),), pairs, "random_pairwise")


def test_trainer_logs_groups_and_fixed_sets(corpus, model_yaml, tmp_path):
    common = {"max_steps": 4, "save_steps": 100, "test_split": None}
    grouped = train(corpus, model_yaml, tmp_path / "groups", ot_layer_groups=[[1], [2, 3]], **common)
    logged = [entry for entry in grouped.state.log_history if "ot" in entry]
    assert logged and all(entry["ot_group"] in (1, 2) and "ot_layer" not in entry for entry in logged)
    assert logged[-1]["ot_picks_layers_1"] + logged[-1]["ot_picks_layers_2_3"] == 4
    fixed_set = train(corpus, model_yaml, tmp_path / "all", ot_layer_scheduler="all",
                      ot_layer_weights=[1.0, 1.0, 2.0], **common)  # fmt: skip
    last = [entry for entry in fixed_set.state.log_history if "ot" in entry][-1]
    assert last["ot_group"] == 1 and last["ot_picks_layers_1_2_3"] == 4 and last["ot"] > 0
