"""Layer scheduling inside the Trainer: build a scheduler by name, drive it through the training loop (one pick per
optimizer step, one update with the step's measurement: its OT loss or ot_ratio), and keep its state in the
Trainer's checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .layer_scheduler import (
    AllLayersScheduler,
    FixedLayerScheduler,
    LayerScheduler,
    RoundRobinLayerScheduler,
    UniformLayerScheduler,
)
from .ucb_scheduler import UCBLayerScheduler

logger = logging.getLogger(__name__)

_SCHEDULERS: dict[str, type[LayerScheduler]] = {
    scheduler.name: scheduler
    for scheduler in (
        UCBLayerScheduler, FixedLayerScheduler, AllLayersScheduler, UniformLayerScheduler, RoundRobinLayerScheduler
    )
}  # fmt: skip


LAYER_SCHEDULERS = tuple(_SCHEDULERS)


def build_layer_scheduler(name: str, candidate_layers: Iterable[int], seed: int = 0, **kwargs: Any) -> LayerScheduler:
    """Build the scheduler called ``name`` ("ucb", "fixed", "uniform", "round_robin" or "all").

    ``kwargs`` are ``layer_weights`` / ``groups`` (see `LayerScheduler`) and the scheduler's hyper-parameters (only
    "ucb" has any: its rule, reward and the bandit's constants; see `UCBLayerScheduler`).
    """
    if name not in _SCHEDULERS:
        raise ValueError(f"Unknown layer scheduler {name!r}; choose one of {sorted(_SCHEDULERS)}.")
    return _SCHEDULERS[name](candidate_layers, seed=seed, **kwargs)


class LayerSchedulerCallback(TrainerCallback, ExportableState):
    """Drives a `LayerScheduler` from the `Trainer` loop and saves it with the Trainer's checkpoints.

    The trainer's loss code reads ``callback.scheduler.current_layers`` and calls ``record(measurement)`` with the
    scheduler's `signal` (the detached OT loss, or ``ot_ratio``) of every training micro-batch that has one (not
    during evaluation).

    When the events fire (``Trainer._run_epoch``, transformers 5.23): the Trainer prefetches the
    ``gradient_accumulation_steps`` micro-batches of an optimizer step; ``on_step_begin`` fires once, before the
    first micro-batch's forward; ``on_substep_end`` follows each other micro-batch; ``on_step_end`` fires once, after
    the last micro-batch's backward, the optimizer step, ``zero_grad`` and ``global_step += 1``, and before
    logging, saving and evaluation. So every micro-batch of a step sees the same layer, ``update`` sees all of them,
    and the shorter last step of an epoch still gets one begin/end pair. Measurements recorded after ``on_step_end``
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
        self._measurements: list[float] = []

    def record(self, measurement: float) -> None:
        """Collect the scheduler's `signal` measured on one training micro-batch of the current step."""
        self._measurements.append(float(measurement))

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
        self._measurements.clear()
        self.scheduler.select()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # update(None) rather than no call: under DDP every rank must join the scheduler's all-reduce.
        measured = self._measurements
        self.scheduler.update(sum(measured) / len(measured) if measured else None)


__all__ = ["LAYER_SCHEDULERS", "LayerSchedulerCallback", "build_layer_scheduler"]
