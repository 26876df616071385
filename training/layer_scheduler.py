r"""Choose, at every optimizer step, the Q-Former layer that receives the OT alignment loss.

POTSA (arXiv 2511.09232, "layer scheduling") treats the candidate Q-Former layers as the arms of a bandit: each
optimizer step applies the OT loss at one layer, and a layer whose OT loss keeps falling is chosen more often.
Layers are numbered from 1 (layer ``l`` is the output of Q-Former block ``l``); the paper's default candidates are
the lower layers ``[1, 2, 3]``, and every layer is an option.

The UCB rule, written as a maximisation (larger is better everywhere):

.. math::

    r &= L_l^{\text{prev}} - L_l^{\text{now}}
        \qquad \text{(reward: how much layer } l \text{'s OT loss fell since } l \text{ was last chosen)} \\
    Q_l &\leftarrow \text{ema} \cdot Q_l + (1 - \text{ema}) \cdot r \\
    U_l &= Q_l + \beta \sqrt{\log t / (n_l + \varepsilon)} \\
    \tau_t &= \max(\tau_{\min}, \text{decay}^t) \\
    p_t(l) &= \operatorname{softmax}_l(U_l / \tau_t)

- ``t``: 1-based index of the current optimizer step (the number of ``select()`` calls, this one included).
- ``L_l``: the detached OT loss at layer ``l``, averaged over the step's micro-batches and over all ranks.
- ``n_l``: how many rewards layer ``l`` has received. An untried layer gets a bonus of about
  ``sqrt(log t / eps)``, so every layer is tried once before the rewards decide (at ``t = 1`` all bonuses are 0 and
  the first pick is uniform).
- First visit: there is no earlier loss to improve on, so the reward is 0, the value ``Q`` starts from: the first
  visit neither favours nor penalises the layer, stores the baseline for the next visit, and counts as a visit.

Mapping to the paper's formula, ``score = Q - beta * sqrt(log t / (n + eps))`` sampled with
``softmax(-score / tau)``: that form is right only when its ``Q`` is a *cost*, the EMA of the loss change
``L_now - L_prev`` (the paper's code minimises). Its ``Q`` is then minus ours, ``-score`` equals ``U`` above and the
two sample the same distribution; in both the exploration bonus *raises* the probability of rarely tried layers.
Read with ``Q`` as the improvement instead, the same formula would favour layers whose loss falls least.

Arms. By default every candidate layer is an arm (the paper). Two generalisations answer "which layers?":

- ``groups``: each arm is a group of layers (e.g. ``[[1], [1, 2], [1, 2, 3]]``), aligned together when picked; the
  arm's loss is the weighted mean of its layers' OT losses, and UCB's reward is the fall of that loss.
- the ``"all"`` scheduler: one arm holding every candidate layer, so a fixed set of layers is aligned every step.

Inside an arm, ``layer_weights`` (aligned with ``candidate_layers``) weigh the layers, normalised to sum to 1 over
the arm: ``OT_arm = sum_l w_l OT_l / sum_l w_l``. Normalising keeps lambda's meaning and makes arms of different
sizes comparable (their rewards are on one scale). ``current_layers`` gives the step's ``(layer, weight)`` pairs.

Randomness never touches the global RNGs (training randomness stays as it was): the draw at step ``t`` comes from a
``random.Random`` seeded with ``(seed, t)``, so the generator state is just ``seed`` and ``t`` and a restored
scheduler draws exactly what an uninterrupted one would. Under ``torch.distributed`` every rank computes the same
choice from the same state, rank 0's choice is broadcast as a safeguard, and the OT loss behind each reward is
averaged over ranks, so all ranks keep identical state.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_from_rank0(value: int) -> int:
    if not _is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_collective_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def _global_mean(value: float | None) -> float | None:
    """Mean of ``value`` over the ranks that have one (``None``: this rank has none); ``None`` if no rank has one.

    Every rank receives the same float, and every rank must call this, with or without a value: that keeps the
    collectives matched when only some ranks measured an OT loss.
    """
    total, count = (0.0, 0.0) if value is None else (float(value), 1.0)
    if _is_distributed():
        tensor = torch.tensor([total, count], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        total, count = tensor.tolist()
    return total / count if count else None


def _check_layers(candidate_layers: Iterable[int]) -> tuple[int, ...]:
    layers = tuple(candidate_layers)
    if not layers:
        raise ValueError("candidate_layers is empty; pass the Q-Former layers the OT loss may use, e.g. [1, 2, 3].")
    invalid = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1]
    if invalid:
        raise ValueError(
            f"candidate_layers must be positive integers (layer l is the output of Q-Former block l, counted from "
            f"1); got {invalid}."
        )
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ValueError(f"candidate_layers lists {repeated} more than once; give each layer once.")
    return layers


def _check_weights(
    layer_weights: Iterable[float] | None, candidate_layers: tuple[int, ...]
) -> tuple[float, ...] | None:
    if layer_weights is None:
        return None
    weights = tuple(float(weight) for weight in layer_weights)
    if len(weights) != len(candidate_layers):
        raise ValueError(
            f"layer_weights has {len(weights)} values for the candidate layers {list(candidate_layers)}; give one "
            "weight per candidate layer, in the same order."
        )
    if not all(0 <= weight < math.inf for weight in weights):
        raise ValueError(f"layer_weights must be finite and >= 0; got {list(weights)}.")
    return weights


def _check_groups(
    groups: Iterable[Iterable[int]] | None, candidate_layers: tuple[int, ...]
) -> tuple[tuple[int, ...], ...] | None:
    if groups is None:
        return None
    checked = tuple(tuple(group) for group in groups)
    if not checked or not all(checked):
        raise ValueError(f"groups must be non-empty lists of candidate layers; got {[list(g) for g in checked]}.")
    for group in checked:
        outside = [layer for layer in group if layer not in candidate_layers]
        if outside:
            raise ValueError(
                f"The group {list(group)} uses {outside}, which are not candidate layers {list(candidate_layers)}."
            )
        if len(set(group)) != len(group):
            raise ValueError(f"The group {list(group)} lists a layer more than once.")
    if len({frozenset(group) for group in checked}) != len(checked):
        raise ValueError(f"groups lists the same group twice: {[list(g) for g in checked]}.")
    return checked


Arm = int | tuple[int, ...]
"""What a scheduler picks for one step: a Q-Former layer, or a group of layers aligned together."""


def arm_label(arm: Arm) -> str:
    """The arm's name in logs: ``layer_2`` for a layer, ``layers_1_2_3`` for a group."""
    return f"layer_{arm}" if isinstance(arm, int) else "layers_" + "_".join(map(str, arm))


def _arm_to_json(arm: Arm | None) -> int | list[int] | None:
    return list(arm) if isinstance(arm, tuple) else arm


def _arm_from_json(value: int | list[int] | None) -> Arm | None:
    return tuple(value) if isinstance(value, list) else value


class LayerScheduler:
    """Base of all layer schedulers: validation, arms, pick counts, the rank-0 broadcast and (de)serialisation.

    The trainer calls ``select()`` once at the start of every optimizer step, applies the OT loss at
    ``current_layers`` and calls ``update(ot_loss)`` once at the step's end with that (weighted) OT loss, detached
    and averaged over the step's micro-batches. Subclasses only decide which arm to pick (``_choose``) and, for
    adaptive ones, what to learn from the loss (``update``).

    Args:
        candidate_layers (`Iterable[int]`):
            The 1-based Q-Former layers to choose from, each once. Their order is kept (round-robin follows it).
        seed (`int`, *optional*, defaults to 0):
            Seeds the scheduler's own draws; use the same seed on every rank.
        layer_weights (`Iterable[float]`, *optional*):
            Relative weights of ``candidate_layers`` inside arms of several layers (the module docstring gives the
            normalisation); ``None``: equal. Refused when every arm is one layer, where they would do nothing.
        groups (`Iterable[Iterable[int]]`, *optional*):
            Arms made of several candidate layers, in this order; ``None``: each candidate layer is an arm.
    """

    name: ClassVar[str]

    def __init__(
        self,
        candidate_layers: Iterable[int],
        seed: int = 0,
        *,
        layer_weights: Iterable[float] | None = None,
        groups: Iterable[Iterable[int]] | None = None,
    ) -> None:
        self.candidate_layers = _check_layers(candidate_layers)
        self.seed = seed
        self.layer_weights = _check_weights(layer_weights, self.candidate_layers)
        self.groups = _check_groups(groups, self.candidate_layers)
        self.arms: tuple[Arm, ...] = self._arms()
        self._check_arm_weights()
        self.current_arm: Arm | None = None
        self._pick_counts = dict.fromkeys(self.arms, 0)

    def _arms(self) -> tuple[Arm, ...]:
        return self.candidate_layers if self.groups is None else self.groups

    def _check_arm_weights(self) -> None:
        if self.layer_weights is not None and all(isinstance(arm, int) for arm in self.arms):
            raise ValueError(
                "layer_weights weigh the layers of an arm of several layers; with one layer per arm they have no "
                "effect. Use the 'all' scheduler or groups, or drop the weights."
            )
        for arm in self.arms:
            if not sum(self._weight(layer) for layer in self.layers_of(arm)) > 0:
                raise ValueError(f"The layers {list(self.layers_of(arm))} all have weight 0; give one a weight > 0.")

    @staticmethod
    def layers_of(arm: Arm) -> tuple[int, ...]:
        return (arm,) if isinstance(arm, int) else arm

    def _weight(self, layer: int) -> float:
        return 1.0 if self.layer_weights is None else self.layer_weights[self.candidate_layers.index(layer)]

    def arm_weights(self, arm: Arm) -> tuple[tuple[int, float], ...]:
        """``(layer, weight)`` of the arm's layers with a weight > 0, normalised to sum to 1."""
        weights = {layer: self._weight(layer) for layer in self.layers_of(arm)}
        total = sum(weights.values())
        return tuple((layer, weight / total) for layer, weight in weights.items() if weight > 0)

    @property
    def current_layers(self) -> tuple[tuple[int, float], ...]:
        """This step's ``(layer, weight)`` pairs: the OT loss is ``sum(weight * OT(layer))``."""
        return self.arm_weights(self._require_selection())

    @property
    def current_layer(self) -> int | None:
        """This step's layer when every arm is one layer (the paper's setting); ``None`` before the first step.

        Raises for an arm of several layers, where one layer would misreport the step: read `current_layers`."""
        if isinstance(self.current_arm, tuple):
            raise RuntimeError(
                f"This scheduler picks groups of layers ({list(self.current_arm)}); read current_layers."
            )
        return self.current_arm

    @property
    def pick_counts(self) -> dict[Arm, int]:
        """How often ``select()`` returned each arm."""
        return dict(self._pick_counts)

    @property
    def step(self) -> int:
        """Number of ``select()`` calls so far; the next call is step ``t = step + 1``."""
        return sum(self._pick_counts.values())

    def select(self) -> Arm:
        """Pick the arm for this optimizer step, store it as ``current_arm`` and return it (same on every rank)."""
        arm = self.arms[_broadcast_from_rank0(self.arms.index(self._choose(self.step + 1)))]
        self.current_arm = arm
        self._pick_counts[arm] += 1
        return arm

    def update(self, ot_loss: float | None) -> None:
        """Report the step's detached OT loss at ``current_layers``; ``None`` when this rank measured none.

        Call it on every rank, even with ``None``. Non-adaptive schedulers ignore the loss.
        """
        self._require_selection()

    def config(self) -> dict[str, Any]:
        """Keyword arguments of `build_layer_scheduler` that rebuild this scheduler (JSON-serialisable)."""
        config = {"name": self.name, "candidate_layers": list(self.candidate_layers), "seed": self.seed}
        if self.layer_weights is not None:
            config["layer_weights"] = list(self.layer_weights)
        if self.groups is not None:
            config["groups"] = [list(group) for group in self.groups]
        return config

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; per-arm values are lists in ``arms`` order."""
        return {
            "config": self.config(),
            "current_arm": _arm_to_json(self.current_arm),
            "pick_counts": self._as_list(self._pick_counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`, refusing one saved by a scheduler with other settings."""
        if state["config"] != self.config():
            raise ValueError(
                f"This state was saved by the layer scheduler {state['config']}, but this one is {self.config()}; "
                "build the scheduler with the saved settings to resume."
            )
        self.current_arm = _arm_from_json(state["current_arm"])
        self._pick_counts = self._from_list(state["pick_counts"])

    def _choose(self, step: int) -> Arm:
        raise NotImplementedError

    def _rng(self, step: int) -> random.Random:
        """The generator for step ``step``: a pure function of ``(seed, step)``, so it needs no saved state."""
        return random.Random(f"{self.seed}:{step}")

    def _require_selection(self) -> Arm:
        if self.current_arm is None:
            raise RuntimeError("No layer is selected yet; call select() at the start of each step.")
        return self.current_arm

    def _as_list(self, per_arm: Mapping[Arm, Any]) -> list[Any]:
        return [per_arm[arm] for arm in self.arms]

    def _from_list(self, values: list[Any]) -> dict[Arm, Any]:
        return dict(zip(self.arms, values, strict=True))


class UCBLayerScheduler(LayerScheduler):
    """POTSA's UCB scheduler (the module docstring gives the rule and its mapping to the paper).

    Args:
        candidate_layers, seed, layer_weights, groups: See `LayerScheduler`; the arms are the bandit's arms.
        beta (`float`, *optional*, defaults to 1.0):
            Weight of the exploration bonus.
        ema (`float`, *optional*, defaults to 0.9):
            Weight of the old value in the EMA of rewards.
        temperature_floor (`float`, *optional*, defaults to 0.05):
            Lowest softmax temperature.
        temperature_decay (`float`, *optional*, defaults to 0.999):
            The temperature at step ``t`` is ``max(temperature_floor, temperature_decay ** t)``.
        eps (`float`, *optional*, defaults to 1e-6):
            Keeps the bonus of an untried layer finite (and large).
    """

    name = "ucb"

    def __init__(
        self,
        candidate_layers: Iterable[int],
        seed: int = 0,
        *,
        layer_weights: Iterable[float] | None = None,
        groups: Iterable[Iterable[int]] | None = None,
        beta: float = 1.0,
        ema: float = 0.9,
        temperature_floor: float = 0.05,
        temperature_decay: float = 0.999,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(candidate_layers, seed, layer_weights=layer_weights, groups=groups)
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (0 turns exploration off); got {beta}.")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1) (the weight of the old value); got {ema}.")
        if not 0 < temperature_floor <= 1:
            raise ValueError(f"temperature_floor must be in (0, 1]; got {temperature_floor}.")
        if not 0 < temperature_decay <= 1:
            raise ValueError(f"temperature_decay must be in (0, 1]; got {temperature_decay}.")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps the bonus of an untried layer finite); got {eps}.")
        self.beta = beta
        self.ema = ema
        self.temperature_floor = temperature_floor
        self.temperature_decay = temperature_decay
        self.eps = eps
        self._value = dict.fromkeys(self.arms, 0.0)
        self._visits = dict.fromkeys(self.arms, 0)
        self._last_loss: dict[Arm, float | None] = dict.fromkeys(self.arms)

    def temperature(self, step: int) -> float:
        """Softmax temperature at 1-based step ``step``."""
        return max(self.temperature_floor, self.temperature_decay**step)

    def probabilities(self) -> dict[Arm, float]:
        """The distribution the next ``select()`` samples from (worth logging)."""
        step = self.step + 1
        log_t = math.log(step)
        ucb = {
            arm: self._value[arm] + self.beta * math.sqrt(log_t / (self._visits[arm] + self.eps)) for arm in self.arms
        }
        # Subtracting the maximum keeps exp() finite with an untried arm's huge bonus.
        top = max(ucb.values())
        tau = self.temperature(step)
        weights = {arm: math.exp((value - top) / tau) for arm, value in ucb.items()}
        total = sum(weights.values())
        return {arm: weight / total for arm, weight in weights.items()}

    def update(self, ot_loss: float | None) -> None:
        """Turn the OT loss at ``current_layers`` into a reward; skipped if no rank has a finite loss."""
        arm = self._require_selection()
        loss = _global_mean(ot_loss)
        if loss is None:
            return
        if not math.isfinite(loss):
            logger.warning("Layer scheduler: OT loss %s at %s is not finite; no reward.", loss, arm_label(arm))
            return
        previous = self._last_loss[arm]
        reward = 0.0 if previous is None else previous - loss
        self._value[arm] = self.ema * self._value[arm] + (1 - self.ema) * reward
        self._visits[arm] += 1
        self._last_loss[arm] = loss

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "beta": self.beta,
            "ema": self.ema,
            "temperature_floor": self.temperature_floor,
            "temperature_decay": self.temperature_decay,
            "eps": self.eps,
        }

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "value": self._as_list(self._value),
            "visits": self._as_list(self._visits),
            "last_loss": self._as_list(self._last_loss),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._value = self._from_list(state["value"])
        self._visits = self._from_list(state["visits"])
        self._last_loss = self._from_list(state["last_loss"])

    def _choose(self, step: int) -> Arm:
        probabilities = self.probabilities()
        return self._rng(step).choices(list(probabilities), weights=list(probabilities.values()))[0]


class FixedLayerScheduler(LayerScheduler):
    """Ablation: always the single arm (one candidate layer, or one group)."""

    name = "fixed"

    def _arms(self) -> tuple[Arm, ...]:
        arms = super()._arms()
        if len(arms) != 1:
            raise ValueError(
                f"The 'fixed' scheduler needs exactly one candidate layer (or one group), got {list(arms)}; pass "
                "candidate_layers=[l] for the layer to use, or the 'all' scheduler for a fixed set of layers."
            )
        return arms

    def _choose(self, step: int) -> Arm:
        return self.arms[0]


class AllLayersScheduler(FixedLayerScheduler):
    """A fixed set instead of a choice: every candidate layer at every step, weighted by ``layer_weights``.

    With candidates ``[1, 2, 3]`` and weights ``[2, 1, 1]`` the OT loss is ``0.5 OT_1 + 0.25 OT_2 + 0.25 OT_3``.
    """

    name = "all"

    def _arms(self) -> tuple[Arm, ...]:
        if self.groups is not None:
            raise ValueError(
                "The 'all' scheduler aligns every candidate layer; groups are for the schedulers that pick one group "
                "per step (ucb, uniform, round_robin, fixed)."
            )
        return (self.candidate_layers,)


class UniformLayerScheduler(LayerScheduler):
    """Ablation: a uniformly random arm every step."""

    name = "uniform"

    def _choose(self, step: int) -> Arm:
        return self._rng(step).choice(self.arms)


class RoundRobinLayerScheduler(LayerScheduler):
    """Ablation: the arms in their given order, cyclically."""

    name = "round_robin"

    def _choose(self, step: int) -> Arm:
        return self.arms[(step - 1) % len(self.arms)]


_SCHEDULERS: dict[str, type[LayerScheduler]] = {
    scheduler.name: scheduler
    for scheduler in (
        UCBLayerScheduler, FixedLayerScheduler, AllLayersScheduler, UniformLayerScheduler, RoundRobinLayerScheduler
    )
}  # fmt: skip


def build_layer_scheduler(name: str, candidate_layers: Iterable[int], seed: int = 0, **kwargs: Any) -> LayerScheduler:
    """Build the scheduler called ``name`` ("ucb", "fixed", "uniform", "round_robin" or "all").

    ``kwargs`` are ``layer_weights`` / ``groups`` (see `LayerScheduler`) and the scheduler's hyper-parameters (only
    "ucb" has any; see `UCBLayerScheduler`).
    """
    if name not in _SCHEDULERS:
        raise ValueError(f"Unknown layer scheduler {name!r}; choose one of {sorted(_SCHEDULERS)}.")
    return _SCHEDULERS[name](candidate_layers, seed=seed, **kwargs)


class LayerSchedulerCallback(TrainerCallback, ExportableState):
    """Drives a `LayerScheduler` from the `Trainer` loop and saves it with the Trainer's checkpoints.

    The trainer's loss code reads ``callback.scheduler.current_layers`` and calls ``record(ot_loss)`` with the
    detached OT loss of every training micro-batch (not during evaluation).

    When the events fire (``Trainer._run_epoch``, transformers 5.23): the Trainer prefetches the
    ``gradient_accumulation_steps`` micro-batches of an optimizer step; ``on_step_begin`` fires once, before the
    first micro-batch's forward; ``on_substep_end`` follows each other micro-batch; ``on_step_end`` fires once, after
    the last micro-batch's backward, the optimizer step, ``zero_grad`` and ``global_step += 1``, and before
    logging, saving and evaluation. So every micro-batch of a step sees the same layer, ``update`` sees all of them,
    and the shorter last step of an epoch still gets one begin/end pair. Losses recorded after ``on_step_end``
    (e.g. by evaluation) are dropped at the next ``on_step_begin``.

    Checkpoints: ``Trainer._save_checkpoint`` stores `state` under ``stateful_callbacks["LayerSchedulerCallback"]``
    in trainer_state.json, after ``on_step_end``, so it includes that step's update. On ``resume_from_checkpoint``
    the Trainer loads that file into ``TrainerState.stateful_callbacks`` and then fires ``on_train_begin``, where
    this callback loads the scheduler state *in place*. That works with the default
    ``restore_callback_states_from_checkpoint=False``, under which the Trainer restores no callback itself. With
    ``True``, the Trainer instead builds a *new* callback, ``LayerSchedulerCallback(**state["args"])``, and sets the
    ``scheduler_state`` attribute on it (as ``ExportableState.from_state`` does); the result is the same, but code
    holding the old instance must look it up again in ``trainer.callback_handler.callbacks``.

    Args:
        scheduler (`LayerScheduler` or `Mapping`):
            The scheduler, or the keyword arguments of `build_layer_scheduler` (its ``config()``).
    """

    def __init__(self, scheduler: LayerScheduler | Mapping[str, Any]) -> None:
        self.scheduler = scheduler if isinstance(scheduler, LayerScheduler) else build_layer_scheduler(**scheduler)
        self._step_losses: list[float] = []

    def record(self, ot_loss: float) -> None:
        """Collect the detached OT loss of one training micro-batch of the current step."""
        self._step_losses.append(float(ot_loss))

    @property
    def scheduler_state(self) -> dict[str, Any]:
        """The scheduler's `state_dict`; setting it loads one (how the Trainer's own restore puts it back)."""
        return self.scheduler.state_dict()

    @scheduler_state.setter
    def scheduler_state(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

    def state(self) -> dict[str, Any]:
        return {"args": {"scheduler": self.scheduler.config()}, "attributes": {"scheduler_state": self.scheduler_state}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if saved is None:
            if state.global_step > 0:
                logger.warning(
                    "Resuming at step %d from a checkpoint without %s state; the layer scheduler starts afresh.",
                    state.global_step,
                    type(self).__name__,
                )
            return
        if isinstance(saved, list):
            raise ValueError(f"The checkpoint holds several {type(self).__name__} states; use one per Trainer.")
        self.scheduler_state = saved["attributes"]["scheduler_state"]

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._step_losses.clear()
        self.scheduler.select()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # update(None) rather than no call: under DDP every rank must join the scheduler's all-reduce.
        losses = self._step_losses
        self.scheduler.update(sum(losses) / len(losses) if losses else None)


__all__ = [
    "AllLayersScheduler",
    "Arm",
    "FixedLayerScheduler",
    "LayerScheduler",
    "LayerSchedulerCallback",
    "RoundRobinLayerScheduler",
    "UCBLayerScheduler",
    "UniformLayerScheduler",
    "arm_label",
    "build_layer_scheduler",
]
