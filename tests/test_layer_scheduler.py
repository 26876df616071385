"""Tests for the UCB layer scheduler, its ablations, DDP agreement and its Trainer checkpoint round trip."""

import json
import math
import random
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Trainer, TrainingArguments

from potsa_training.layer_scheduler import LayerScheduler
from potsa_training.layer_scheduler_callback import LayerSchedulerCallback, build_layer_scheduler
from potsa_training.ucb_scheduler import UCBLayerScheduler

SCHEDULER_NAMES = ["ucb", "uniform", "round_robin", "fixed"]


def _build(name: str, seed: int = 0) -> LayerScheduler:
    return build_layer_scheduler(name, [2] if name == "fixed" else [1, 2, 3], seed=seed)


def _falling_loss(layer: int, visits: int) -> float:
    """Synthetic OT loss: each visit lowers layer 2's loss by 1.0 and the others' by 0.1, so layer 2 is best."""
    return 10.0 - (1.0 if layer == 2 else 0.1) * visits


def _run(
    scheduler: LayerScheduler, steps: int, loss: Callable[[int, int], float | None] = _falling_loss
) -> list[int]:
    """Drive ``steps`` optimizer steps; the loss depends on the layer and how often it has been picked."""
    picks = []
    for _ in range(steps):
        layer = scheduler.select()
        picks.append(layer)
        scheduler.update(loss(layer, scheduler.pick_counts[layer]))
    return picks


def test_ucb_picks_the_fastest_improving_layer_far_more_often_than_uniform():
    steps = 500
    ucb = _run(_build("ucb"), steps).count(2)
    uniform = _run(_build("uniform"), steps).count(2)
    assert ucb > 0.5 * steps
    assert ucb > 1.5 * uniform


def test_ucb_tries_every_layer_once_before_the_rewards_decide():
    scheduler = _build("ucb")
    assert scheduler.probabilities() == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    assert sorted(_run(scheduler, 3)) == [1, 2, 3]


def test_ucb_reward_is_the_loss_drop_since_the_last_visit_smoothed_by_ema():
    scheduler = UCBLayerScheduler([2])
    for loss in (5.0, 3.0, 4.0):  # rewards: 0 (first visit, no baseline), 5 - 3 = 2, 3 - 4 = -1
        scheduler.select()
        scheduler.update(loss)
    state = scheduler.state_dict()
    assert state["value"] == pytest.approx([0.9 * (0.1 * 2.0) + 0.1 * -1.0])
    assert state["visits"] == [3]
    assert state["last_loss"] == [4.0]


@pytest.mark.parametrize("missing", [None, math.nan, math.inf])
def test_ucb_skips_steps_without_a_finite_loss(missing):
    scheduler = UCBLayerScheduler([2])
    scheduler.select()
    scheduler.update(missing)
    assert scheduler.state_dict()["visits"] == [0]


def _ratio_loop(scheduler: LayerScheduler, steps: int, seed: int = 0) -> list[int]:
    """Layer 1's ot_ratio falls by 0.002 each time it is trained, layer 2's stays put; both are measured with noise
    of std 0.002 (on the tiny benchmark the paper's loss drops were ~1e-3 against a bonus of ~0.25)."""
    noise = random.Random(seed)
    picks = []
    for _ in range(steps):
        arm = scheduler.select()
        picks.append(arm)
        trend = 0.002 * scheduler.pick_counts[arm] if arm == 1 else 0.0
        scheduler.update(0.7 - trend + noise.gauss(0.0, 0.002))
    return picks


def test_a_normalised_ratio_reward_makes_the_better_layer_win():
    steps, normalised = 400, {"reward": "ratio_drop", "normalize_reward": True}
    decided = _ratio_loop(build_layer_scheduler("ucb", [1, 2], temperature_decay=0.99, **normalised), steps)
    assert decided.count(1) > 0.8 * steps and decided[-100:].count(1) > 0.9 * 100
    papers_temperature = _ratio_loop(build_layer_scheduler("ucb", [1, 2], **normalised), steps)
    assert papers_temperature.count(1) > 0.6 * steps  # a majority, but T >= 0.67 keeps the preference soft
    inert = _ratio_loop(build_layer_scheduler("ucb", [1, 2], reward="ratio_drop"), steps)  # raw rewards: ~1e-3
    assert 0.4 * steps < inert.count(1) < 0.6 * steps
    released = _ratio_loop(build_layer_scheduler("ucb", [1, 2], rule="released", **normalised), steps)
    assert released.count(1) < 0.4 * steps  # the released rule prefers the arm that improves least
    flat, noise = build_layer_scheduler("ucb", [1, 2], temperature_decay=0.99, **normalised), random.Random(1)
    for _ in range(steps):  # neither improves: no false decision
        flat.select()
        flat.update(0.7 + noise.gauss(0.0, 0.002))
    assert 0.35 * steps < flat.pick_counts[1] < 0.65 * steps


def test_normalised_rewards_are_divided_by_their_running_rms():
    scheduler = UCBLayerScheduler([2], normalize_reward=True)
    for loss in (5.0, 3.0, 4.0):  # raw rewards: none (first visit), 2, -1
        scheduler.select()
        scheduler.update(loss)
    second_moment = 0.9 * (0.1 * 2.0**2) + 0.1 * 1.0
    rms = math.sqrt(second_moment / (1 - 0.9**2))
    state = scheduler.state_dict()
    assert state["value"] == pytest.approx([0.9 * (0.1 * 1.0) + 0.1 * (-1.0 / rms)])  # the first reward scales to 1
    assert (state["reward_moment"], state["rewards_seen"]) == (pytest.approx(second_moment), 2)


def test_the_released_rule_samples_softmax_of_minus_q_plus_the_bonus():
    """Sslnon/semst's LayerSampler: score = Q - beta * sqrt(log t / (n + 1e-6)), p = softmax(-score / T),
    T = max(0.05, 0.999^t), Q the EMA of the loss drop; here computed from the scheduler's own Q and n."""
    scheduler = build_layer_scheduler("ucb", [1, 2, 3], seed=4, rule="released", beta=0.5)
    _run(scheduler, 25)
    state = scheduler.state_dict()
    step = scheduler.step + 1
    score = torch.tensor(state["value"]) - 0.5 * torch.sqrt(math.log(step) / (torch.tensor(state["visits"]) + 1e-6))
    expected = torch.softmax(-score / max(0.05, 0.999**step), dim=0)
    assert list(scheduler.probabilities().values()) == pytest.approx(expected.tolist())
    assert scheduler.signal == "ot" and build_layer_scheduler("ucb", [1], reward="ratio_drop").signal == "ot_ratio"


def test_update_before_select_raises():
    with pytest.raises(RuntimeError, match="select"):
        _build("ucb").update(1.0)


def test_temperature_decays_from_one_to_the_floor():
    scheduler = UCBLayerScheduler([1, 2, 3])
    assert scheduler.temperature(1) == pytest.approx(0.999)
    assert scheduler.temperature(1000) == pytest.approx(0.999**1000)  # about 0.37
    assert scheduler.temperature(2994) > 0.05  # 0.999 ** t crosses 0.05 between t = 2994 and 2995
    assert scheduler.temperature(2995) == 0.05
    assert scheduler.temperature(100_000) == 0.05


@pytest.mark.parametrize("name", ["ucb", "uniform"])
def test_random_schedulers_are_seeded_and_leave_the_global_rngs_alone(name):
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = _run(_build(name, seed=1), 50)
    assert _run(_build(name, seed=1), 50) == first
    assert _run(_build(name, seed=2), 50) != first
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_resumed_scheduler_continues_exactly_like_an_uninterrupted_one(name):
    uninterrupted = _build(name, seed=7)
    expected = _run(uninterrupted, 60)

    interrupted = _build(name, seed=7)
    head = _run(interrupted, 30)
    saved = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint file holds
    resumed = build_layer_scheduler(**saved["config"])
    resumed.load_state_dict(saved)

    assert head + _run(resumed, 30) == expected
    assert resumed.state_dict() == uninterrupted.state_dict()


@pytest.mark.parametrize("settings", [{"normalize_reward": True, "reward": "ratio_drop"}, {"rule": "released"}])
def test_resumed_ucb_with_new_settings_continues_exactly(settings):
    uninterrupted = build_layer_scheduler("ucb", [1, 2, 3], seed=7, **settings)
    expected = _run(uninterrupted, 60)
    interrupted = build_layer_scheduler("ucb", [1, 2, 3], seed=7, **settings)
    head = _run(interrupted, 30)
    saved = json.loads(json.dumps(interrupted.state_dict()))
    assert {key: saved["config"][key] for key in settings} == settings
    resumed = build_layer_scheduler(**saved["config"])
    resumed.load_state_dict(saved)
    assert head + _run(resumed, 30) == expected
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_loading_a_state_saved_with_other_settings_raises():
    saved = UCBLayerScheduler([1, 2, 3], beta=0.5).state_dict()
    with pytest.raises(ValueError, match="saved settings"):
        UCBLayerScheduler([1, 2, 3]).load_state_dict(saved)
    with pytest.raises(ValueError, match="saved settings"):
        UCBLayerScheduler([1, 2, 3], rule="released").load_state_dict(UCBLayerScheduler([1, 2, 3]).state_dict())
    default = UCBLayerScheduler([1, 2, 3]).config()  # what checkpoints saved before the rule and reward existed hold
    assert not {"rule", "reward", "normalize_reward"} & set(default)


def test_ablation_schedulers():
    assert set(_run(_build("fixed"), 10)) == {2}
    assert _run(build_layer_scheduler("round_robin", [3, 1, 2]), 7) == [3, 1, 2, 3, 1, 2, 3]
    uniform_counts = _build("uniform")
    _run(uniform_counts, 600)
    assert all(150 < count < 250 for count in uniform_counts.pick_counts.values())


@pytest.mark.parametrize(
    ("name", "layers", "message"),
    [
        ("greedy", [1, 2], "choose one of"),
        ("ucb", [], "empty"),
        ("ucb", [1, 2, 2], "more than once"),
        ("ucb", [0, 1], "positive integers"),
        ("uniform", [1.5], "positive integers"),
        ("fixed", [1, 2], "exactly one"),
    ],
)
def test_invalid_scheduler_arguments_raise(name, layers, message):
    with pytest.raises(ValueError, match=message):
        build_layer_scheduler(name, layers)
    with pytest.raises(ValueError, match="UCB rule"):
        build_layer_scheduler("ucb", [1, 2], rule="paper")
    with pytest.raises(ValueError, match="UCB reward"):
        build_layer_scheduler("ucb", [1, 2], reward="ratio")


DDP_SETTINGS = [{}, {"rule": "released", "reward": "ratio_drop", "normalize_reward": True}]


def _ddp_worker(rank: int, init_file: str, out_dir: str, settings: dict) -> None:
    """One of two gloo ranks: same seed, but a different local OT loss, and rank 1 sometimes has none."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        scheduler = build_layer_scheduler("ucb", [1, 2, 3], seed=3, **settings)

        def local_loss(layer: int, visits: int) -> float | None:
            if rank == 1 and scheduler.step % 5 == 0:
                return None
            return _falling_loss(layer, visits) + 2.0 * rank

        picks = _run(scheduler, 40, local_loss)
        # Even a rank whose own draws would differ (another seed) follows rank 0's choice.
        misconfigured = _build("uniform", seed=rank)
        followed = [misconfigured.select() for _ in range(20)]
        with open(f"{out_dir}/rank{rank}.json", "w") as file:
            json.dump({"picks": picks, "state": scheduler.state_dict(), "followed": followed}, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("settings", DDP_SETTINGS)
def test_ranks_pick_identical_layers_and_keep_identical_state_under_ddp(tmp_path, settings):
    # fork: the ranks inherit the imported modules; spawn would re-import transformers (5-15 s per rank).
    ranks = mp.start_processes(
        _ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), settings), nprocs=2, join=False,
        start_method="fork",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("The two gloo ranks did not finish within 60 s.")
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0 == rank1
    rank0_uniform = _build("uniform", seed=0)
    assert rank0["followed"] == [rank0_uniform.select() for _ in range(20)]

    # One process fed the mean over the ranks that had a loss makes the same choices: the reward is all-reduced.
    def mean_loss(layer: int, visits: int) -> float:
        return _falling_loss(layer, visits) + (0.0 if reference.step % 5 == 0 else 1.0)

    reference = build_layer_scheduler("ucb", [1, 2, 3], seed=3, **settings)
    assert _run(reference, 40, mean_loss) == rank0["picks"]
    assert reference.state_dict() == rank0["state"]


def test_callback_selects_at_step_begin_and_updates_with_the_mean_of_recorded_losses():
    callback = LayerSchedulerCallback(UCBLayerScheduler([2]))
    callback.on_step_begin(None, None, None)
    callback.record(2.0)
    callback.record(4.0)
    callback.on_step_end(None, None, None)
    callback.on_step_begin(None, None, None)  # nothing recorded: no update
    callback.on_step_end(None, None, None)
    state = callback.scheduler.state_dict()
    assert state["pick_counts"] == [2]
    assert state["visits"] == [1]
    assert state["last_loss"] == [3.0]


def test_callback_state_rebuilds_the_scheduler_through_exportable_state():
    callback = LayerSchedulerCallback(_build("ucb", seed=5))
    _run(callback.scheduler, 20)
    restored = LayerSchedulerCallback.from_state(json.loads(json.dumps(callback.state())))
    assert restored.scheduler.state_dict() == callback.scheduler.state_dict()
    assert _run(restored.scheduler, 20) == _run(callback.scheduler, 20)


class _TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.weight * x).pow(2).mean()}


class _OTRecordingTrainer(Trainer):
    """Records a synthetic OT loss per micro-batch the way POTSA's trainer does, and logs the layer it saw."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layers_seen: list[tuple[int, int]] = []  # (global_step, layer) for every micro-batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Looked up every time: with restore_callback_states_from_checkpoint the Trainer swaps the instance.
        callback = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, LayerSchedulerCallback))
        layer = callback.scheduler.current_layer
        self.layers_seen.append((self.state.global_step, layer))
        callback.record(layer * 10.0 / (1 + self.state.global_step) + inputs["x"].sum().item())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _train(output_dir, restore_flag: bool, resume_from_checkpoint=None) -> _OTRecordingTrainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=6,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=3,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        restore_callback_states_from_checkpoint=restore_flag,
    )
    dataset = [{"x": torch.tensor([float(i)])} for i in range(24)]
    callback = LayerSchedulerCallback(_build("ucb", seed=11))
    trainer = _OTRecordingTrainer(model=_TinyModel(), args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


@pytest.mark.parametrize("restore_flag", [False, True])
def test_trainer_checkpoint_restores_the_scheduler_on_resume(tmp_path, restore_flag):
    full = _train(tmp_path / "full", restore_flag)
    # One select per optimizer step, shared by both micro-batches of the step.
    assert [step for step, _ in full.layers_seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert all(full.layers_seen[i][1] == full.layers_seen[i + 1][1] for i in range(0, 12, 2))
    assert {layer for _, layer in full.layers_seen} <= {1, 2, 3}

    resumed = _train(tmp_path / "resumed", restore_flag, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.layers_seen == full.layers_seen[6:]
    final = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, LayerSchedulerCallback))
    expected = next(cb for cb in full.callback_handler.callbacks if isinstance(cb, LayerSchedulerCallback))
    assert final.scheduler.state_dict() == expected.scheduler.state_dict()
    assert final.scheduler.step == 6  # a fresh, unrestored scheduler would stand at 3
