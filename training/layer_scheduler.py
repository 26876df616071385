r"""Choose, at every optimizer step, the Q-Former layer that receives the OT alignment loss.

POTSA (arXiv 2511.09232, "layer scheduling") treats the candidate Q-Former layers as the arms of a bandit: each
optimizer step applies the OT loss at one layer, and a layer whose OT loss keeps falling is chosen more often.
Layers are numbered from 1 (layer ``l`` is the output of Q-Former block ``l``); the paper's default candidates are
the lower layers ``[1, 2, 3]``, and every layer is an option.

The schedulers here are the non-adaptive ones (fixed, all, uniform, round-robin) and the base they share;
the bandits are in `ucb_scheduler.py`, and `layer_scheduler_callback.py` builds any of them by name and drives it
from the Trainer loop.

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
choice from the same state, rank 0's choice is broadcast as a safeguard, and the loss behind each reward is
averaged over ranks, so all ranks keep identical state.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from .distributed import broadcast_from_rank0

logger = logging.getLogger(__name__)


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
    ``current_layers`` and calls ``update(measurement)`` once at the step's end with the scheduler's `signal` there,
    detached and averaged over the step's micro-batches: ``"ot"``, the (weighted) OT loss, unless an adaptive
    scheduler asks for another (``"ot_ratio"``, see `ucb_scheduler.py`). Subclasses only decide which arm to pick
    (``_choose``) and, for adaptive ones, what to learn from the measurement (``update``).

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
    signal: str = "ot"  # what update() is fed

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
        arm = self.arms[broadcast_from_rank0(self.arms.index(self._choose(self.step + 1)))]
        self.current_arm = arm
        self._pick_counts[arm] += 1
        return arm

    def update(self, measurement: float | None) -> None:
        """Report the step's `signal` at ``current_layers`` (detached); ``None`` when this rank measured none.

        Call it on every rank, even with ``None``. Non-adaptive schedulers ignore it.
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


__all__ = [
    "AllLayersScheduler",
    "Arm",
    "FixedLayerScheduler",
    "LayerScheduler",
    "RoundRobinLayerScheduler",
    "UniformLayerScheduler",
    "arm_label",
]
