"""The CE/OT gradient conflict: PCGrad on the OT gradient and per-layer CE/OT gradient cosines, from the projection
itself to the trainer's applied gradient, its logs, gradient accumulation and two-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from potsa_training.alignment import alignment_loss
from potsa_training.gradient_surgery import (
    SplitGradientStep,
    StepGradients,
    gradient_cosine,
    project_conflicting_gradient,
)
from potsa_training.trainer import METADATA_KEYS, PotsaTrainer

from .tiny_runs import REPO, losses, settings, train

# en/es sentences (each batch of 4 = two whole sentences, so a batch of 4 and two accumulated batches of 2 hold the
# same utterances and OT pairs), plain SGD: the parameters move by exactly -lr * the applied gradient.
SGD_STEP = {"train_languages": ["en", "es"], "zero_shot_languages": [], "test_split": None, "save_steps": 100,
            "learning_rate": 1e-2, "optim": "sgd", "lr_scheduler_type": "constant"}  # fmt: skip


def _flat(gradients) -> torch.Tensor:
    return torch.cat([g.flatten() for g in gradients])


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_pcgrad_removes_exactly_the_conflicting_component():
    ce = [torch.tensor([1.0, 0.0]), torch.tensor([[2.0]]), None, torch.tensor([1.0])]
    ot = [torch.tensor([-1.0, 1.0]), torch.tensor([[-1.0]]), torch.tensor([5.0]), None]
    projected, was_projected = project_conflicting_gradient(ot, ce)
    # Shared entries 0-1: <ot, ce> = -3, |ce|^2 = 5, so ot + 0.6 ce there; the OT-only entry keeps its value.
    assert was_projected
    torch.testing.assert_close(projected[0], torch.tensor([-0.4, 1.0]))
    torch.testing.assert_close(projected[1], torch.tensor([[0.2]]))
    assert torch.equal(projected[2], ot[2]) and projected[3] is None
    assert gradient_cosine(projected, ce) == pytest.approx(0.0, abs=1e-6)  # float32 rounding of 0.6

    agreeing = [torch.tensor([1.0, 1.0]), torch.tensor([[0.5]]), torch.tensor([5.0]), None]
    unchanged, was_projected = project_conflicting_gradient(agreeing, ce)
    assert not was_projected and all(a is b for a, b in zip(unchanged, agreeing))


def test_pcgrad_on_random_gradients_keeps_everything_but_the_component_along_ce():
    generator = torch.Generator().manual_seed(0)
    ce = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    ot = [-c + 0.3 * torch.randn(c.shape, generator=generator) for c in ce]  # strongly conflicting
    projected, was_projected = project_conflicting_gradient(ot, ce)
    removed = _flat(ot) - _flat(projected)
    assert was_projected and torch.dot(_flat(projected), _flat(ce)).abs() < 1e-5
    assert F.cosine_similarity(removed, _flat(ce), dim=0) == pytest.approx(-1.0)  # only the part against CE
    assert _flat(projected).norm() < _flat(ot).norm()


def test_gradient_cosine_is_taken_on_the_parameters_both_reach():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([3.0]), None]
    b = [torch.tensor([2.0, -1.0]), None, torch.tensor([4.0])]
    assert gradient_cosine(a, b) == pytest.approx(0.0)
    c = [torch.tensor([1.0, 0.0]), torch.tensor([1.0]), torch.tensor([1.0])]
    expected = F.cosine_similarity(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0]), dim=0)
    assert gradient_cosine(a, c) == pytest.approx(expected.item())
    assert gradient_cosine(a, [torch.zeros(2), torch.zeros(1), None]) is None  # a zero gradient has no direction


def test_step_gradients_sum_micro_batches_and_keep_unreached_parameters_none():
    sums = StepGradients()
    sums.add("ot", [torch.tensor([1.0]), None, None])
    sums.add("ot", [torch.tensor([2.0]), torch.tensor([3.0]), None])
    assert torch.equal(sums.sums["ot"][0], torch.tensor([3.0])) and torch.equal(sums.sums["ot"][1], torch.tensor([3.0]))
    assert sums.sums["ot"][2] is None
    sums.all_reduce_mean()  # no process group: nothing to average
    assert torch.equal(sums.sums["ot"][0], torch.tensor([3.0]))


def test_pcgrad_judges_the_conflict_on_the_step_sums_not_on_each_micro_batch():
    """Micro-batch 1 conflicts on its own, the step's sums do not: nothing is projected, as in one large batch."""
    sums = StepGradients()
    for ce, ot in (([1.0, 0.0], [-1.0, 0.5]), ([1.0, 0.0], [3.0, 0.0])):
        sums.add("ce", [torch.tensor(ce)])
        sums.add("ot", [torch.tensor(ot)])
    gradient, projected = sums.step_gradient(pcgrad=True)
    assert not projected and torch.equal(gradient[0], torch.tensor([4.0, 0.5]))
    sums.add("ot", [torch.tensor([-5.0, 0.0])])  # now the step's OT sum, (-3, 0.5), opposes its CE sum, (2, 0)
    gradient, projected = sums.step_gradient(pcgrad=True)
    assert projected and torch.equal(gradient[0], torch.tensor([2.0, 0.5]))
    assert torch.equal(sums.step_gradient(pcgrad=False)[0][0], torch.tensor([-1.0, 0.5]))


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"is_deepspeed_enabled": True}, "DeepSpeed"), ({"is_fsdp_enabled": True}, "FSDP"),
     ({"n_gpu": 2}, "DataParallel"), ({"fp16": True}, "fp16")],
)  # fmt: skip
def test_unsupported_setups_are_refused(setting, message):
    values = {"is_deepspeed_enabled": False, "is_fsdp_enabled": False, "n_gpu": 1, "fp16": False, **setting}
    with pytest.raises(ValueError, match=message):
        SplitGradientStep.check_supported(
            values["is_deepspeed_enabled"], values["is_fsdp_enabled"], values["n_gpu"], values["fp16"]
        )


def test_split_gradients_without_surgery_give_the_normal_update(corpus, model_yaml, tmp_path):
    """Taking CE and OT gradients apart and handing them back through the surrogate changes nothing, with gradient
    accumulation too."""
    accumulate = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2}
    plain = train(corpus, model_yaml, tmp_path / "plain", **SGD_STEP, **accumulate)
    measured = train(corpus, model_yaml, tmp_path / "measured", ot_gradient_cosine_every=1, **SGD_STEP, **accumulate)
    assert "grad_cosine_layer_1" in measured.state.log_history[0]
    for (name, a), b in zip(_trainable(plain.model).items(), _trainable(measured.model).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert losses(plain) == pytest.approx(losses(measured), rel=1e-6)


def test_pcgrad_acts_on_the_step_gradient_so_accumulation_equals_one_large_batch(corpus, model_yaml, tmp_path):
    # Seed 2: this step's CE and OT gradients conflict. The tiny model's OT loss is ~1e-6 and its gradient almost
    # orthogonal to CE's (cosine ~ -1e-3), so lambda is raised to make the projection visible in the weights.
    one_step = {"max_steps": 1, "seed": 2, "ot_loss_weight": 1e5, **SGD_STEP}
    pcgrad = {"ot_gradient_surgery": "pcgrad", **one_step}
    large = train(corpus, model_yaml, tmp_path / "large", per_device_train_batch_size=4, **pcgrad)
    small = train(corpus, model_yaml, tmp_path / "small", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  **pcgrad)  # fmt: skip
    plain = train(corpus, model_yaml, tmp_path / "plain", per_device_train_batch_size=4, **one_step)
    assert large.state.log_history[0]["pcgrad_projected_fraction"] == 1.0  # this step conflicts: a real test
    for (name, a), b in zip(_trainable(large.model).items(), _trainable(small.model).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    changed = [
        name for (name, a), b in zip(_trainable(large.model).items(), _trainable(plain.model).values())
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    ]  # fmt: skip
    # Projected: parameters both losses reach; the projector, which only CE reaches, keeps its update.
    assert changed and all(name.startswith(("qformer.", "query_tokens", "bias_compensation")) for name in changed)


def test_cosines_are_logged_every_n_steps(corpus, model_yaml, tmp_path):
    trainer = train(corpus, model_yaml, tmp_path / "run", max_steps=4, save_steps=100, test_split=None,
                    ot_gradient_cosine_every=2)  # fmt: skip
    history = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    keys = {f"grad_cosine_layer_{layer}" for layer in (1, 2, 3)} | {"grad_cosine_ot"}
    assert all(keys <= set(history[step]) for step in (2, 4))
    assert not any(key.startswith("grad_cosine") for step in (1, 3) for key in history[step])
    assert all(-1.0 <= history[step][key] <= 1.0 for step in (2, 4) for key in keys)
    assert "pcgrad_projected_fraction" not in history[2]  # surgery is off


class _GradientCapture(TrainerCallback):
    """The gradient the optimizer is about to apply at the first step."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.gradients:
            self.gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_logged_cosines_and_applied_pcgrad_gradient_match_an_independent_computation(
    corpus, model_yaml, tmp_path, monkeypatch
):
    captured = {}
    compute_loss, init = PotsaTrainer.compute_loss, PotsaTrainer.__init__

    def spy(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and not captured:
            captured.update(batch=dict(inputs), num_items=num_items_in_batch, params=_trainable(model))
        return compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    capture = _GradientCapture()

    def init_with_capture(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(capture)

    monkeypatch.setattr(PotsaTrainer, "compute_loss", spy)
    monkeypatch.setattr(PotsaTrainer, "__init__", init_with_capture)
    # Seed 3's first step conflicts; lambda 1e5 makes the OT gradient big enough for the projection to show.
    trainer = train(corpus, model_yaml, tmp_path / "run", max_steps=1, save_steps=100, test_split=None,
                    max_grad_norm=0.0, ot_loss_weight=1e5, ot_gradient_surgery="pcgrad", ot_gradient_cosine_every=1)
    logged = trainer.state.log_history[0]
    assert logged["pcgrad_projected_fraction"] == 1.0 and logged["grad_cosine_ot"] < -1e-4

    # Recompute the step's gradients by hand at the parameters it started from (one micro-batch: share 1).
    model = trainer.model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in captured["params"]:
                param.copy_(captured["params"][name])
    model.train()
    batch = captured["batch"]
    inputs = {key: value for key, value in batch.items() if key not in METADATA_KEYS}
    outputs = model(**inputs, output_qformer_hidden_states=True, num_items_in_batch=captured["num_items"])
    names = list(captured["params"])
    params = [dict(model.named_parameters())[name] for name in names]
    alignment = trainer.alignment_args

    def ot_at(layer: int) -> torch.Tensor:
        return alignment.ot_loss_weight * alignment_loss(
            outputs.qformer_hidden_states[layer], batch["ot_pairs"], alignment.ot_pair_strategy, blur=alignment.ot_blur
        )

    def grad(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True))

    ce = grad(outputs.loss, params)
    for layer in (1, 2, 3):
        block = [i for i, name in enumerate(names) if name.startswith(f"qformer.encoder.layer.{layer - 1}.")]
        layer_ot = grad(ot_at(layer), [params[i] for i in block])
        both = [(ce[i], g) for i, g in zip(block, layer_ot) if g is not None and ce[i] is not None]
        expected = F.cosine_similarity(_flat(c for c, _ in both), _flat(g for _, g in both), dim=0)
        assert logged[f"grad_cosine_layer_{layer}"] == pytest.approx(expected.item(), rel=1e-3, abs=1e-6), layer

    ot = grad(ot_at(trainer.layer_callback.scheduler.current_layer), params)
    shared = [i for i, g in enumerate(ot) if g is not None]
    ce_shared, ot_shared = _flat(ce[i] for i in shared), _flat(ot[i] for i in shared)
    assert logged["grad_cosine_ot"] == pytest.approx(F.cosine_similarity(ce_shared, ot_shared, dim=0).item(), rel=1e-3)
    coefficient = torch.dot(ot_shared, ce_shared) / ce_shared.square().sum()
    assert coefficient < 0
    for i, name in enumerate(names):
        if ce[i] is None:  # e.g. the Q-Former's text-branch feed-forward: queries never reach it
            assert ot[i] is None and name not in capture.gradients
            continue
        expected = ce[i] if ot[i] is None else ce[i] + ot[i] - coefficient * ce[i]
        torch.testing.assert_close(capture.gradients[name], expected, rtol=1e-4, atol=1e-8, msg=name)
    applied_ot = _flat(capture.gradients[names[i]] - ce[i] for i in shared)  # what the step applied for OT
    assert F.cosine_similarity(applied_ot, ce_shared, dim=0).abs() < 1e-5  # the conflict (< -1e-4) is gone


DDP_SCRIPT = """
import json, os, sys
import torch
from potsa_training.run import run
trainer = run(sys.argv[1:])
rank = int(os.environ["RANK"])
logged = [{k: v for k, v in e.items() if k.startswith(("grad_cosine", "pcgrad", "ot_group"))}
          for e in trainer.state.log_history if "loss" in e]
checksum = sum(p.double().sum().item() for p in trainer.model.parameters() if p.requires_grad)
state = trainer.layer_callback.scheduler.state_dict()
with open(os.path.join(trainer.args.output_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"logged": logged, "checksum": checksum, "state": state}, f)
"""


def test_pcgrad_and_cosines_under_two_process_ddp(corpus, model_yaml, tmp_path):
    """gloo DDP over 2 CPU processes with PCGrad, cosines and UCB over groups: every rank measures and projects the
    *global* step gradient (the cosines agree although each rank sees other data) and the weights stay in sync."""
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    overrides = settings(corpus, model_yaml, out, per_device_train_batch_size=3, test_split=None, save_steps=100,
                         ot_gradient_surgery="pcgrad", ot_gradient_cosine_every=1, ot_layer_groups=[[1], [1, 2, 3]])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "--config", str(REPO / "training/configs/tiny_stage3_potsa.yaml"), *overrides]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment, cwd=REPO, timeout=300)
    rank0, rank1 = (json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["state"] == rank1["state"] and sum(rank0["state"]["pick_counts"]) == 6
    assert len(rank0["logged"]) == 6 and all("grad_cosine_layer_3" in entry for entry in rank0["logged"])
    for entry0, entry1 in zip(rank0["logged"], rank1["logged"], strict=True):
        assert entry0 == pytest.approx(entry1, rel=1e-6)
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-12)
