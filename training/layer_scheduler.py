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


def _broadcast_from_rank0(layer: int) -> int:
    if not _is_distributed():
        return layer
    tensor = torch.tensor([layer], dtype=torch.long, device=_collective_device())
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


class LayerScheduler:
    """Base of all layer schedulers: validation, pick counts, the rank-0 broadcast and (de)serialisation.

    The trainer calls ``select()`` once at the start of every optimizer step and ``update(ot_loss)`` once at its end
    with the detached OT loss measured at ``current_layer``, averaged over the step's micro-batches. Subclasses only
    decide which layer to pick (``_choose``) and, for adaptive ones, what to learn from the loss (``update``).

    Args:
        candidate_layers (`Iterable[int]`):
            The 1-based Q-Former layers to choose from, each once. Their order is kept (round-robin follows it).
        seed (`int`, *optional*, defaults to 0):
            Seeds the scheduler's own draws; use the same seed on every rank.
    """

    name: ClassVar[str]

    def __init__(self, candidate_layers: Iterable[int], seed: int = 0) -> None:
        self.candidate_layers = _check_layers(candidate_layers)
        self.seed = seed
        self.current_layer: int | None = None
        self._pick_counts = dict.fromkeys(self.candidate_layers, 0)

    @property
    def pick_counts(self) -> dict[int, int]:
        """How often ``select()`` returned each candidate layer."""
        return dict(self._pick_counts)

    @property
    def step(self) -> int:
        """Number of ``select()`` calls so far; the next call is step ``t = step + 1``."""
        return sum(self._pick_counts.values())

    def select(self) -> int:
        """Pick the layer for this optimizer step, store it as ``current_layer`` and return it (same on every rank)."""
        layer = _broadcast_from_rank0(self._choose(self.step + 1))
        self.current_layer = layer
        self._pick_counts[layer] += 1
        return layer

    def update(self, ot_loss: float | None) -> None:
        """Report the step's detached OT loss at ``current_layer``; ``None`` when this rank measured none.

        Call it on every rank, even with ``None``. Non-adaptive schedulers ignore the loss.
        """
        self._require_selection()

    def config(self) -> dict[str, Any]:
        """Keyword arguments of `build_layer_scheduler` that rebuild this scheduler (JSON-serialisable)."""
        return {"name": self.name, "candidate_layers": list(self.candidate_layers), "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; per-layer values are lists in ``candidate_layers`` order."""
        return {
            "config": self.config(),
            "current_layer": self.current_layer,
            "pick_counts": self._as_list(self._pick_counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`, refusing one saved by a scheduler with other settings."""
        if state["config"] != self.config():
            raise ValueError(
                f"This state was saved by the layer scheduler {state['config']}, but this one is {self.config()}; "
                "build the scheduler with the saved settings to resume."
            )
        self.current_layer = state["current_layer"]
        self._pick_counts = self._from_list(state["pick_counts"])

    def _choose(self, step: int) -> int:
        raise NotImplementedError

    def _rng(self, step: int) -> random.Random:
        """The generator for step ``step``: a pure function of ``(seed, step)``, so it needs no saved state."""
        return random.Random(f"{self.seed}:{step}")

    def _require_selection(self) -> int:
        if self.current_layer is None:
            raise RuntimeError("update() was called before select(); call select() at the start of each step.")
        return self.current_layer

    def _as_list(self, per_layer: Mapping[int, Any]) -> list[Any]:
        return [per_layer[layer] for layer in self.candidate_layers]

    def _from_list(self, values: list[Any]) -> dict[int, Any]:
        return dict(zip(self.candidate_layers, values, strict=True))


class UCBLayerScheduler(LayerScheduler):
    """POTSA's UCB scheduler (the module docstring gives the rule and its mapping to the paper).

    Args:
        candidate_layers (`Iterable[int]`): See `LayerScheduler`.
        seed (`int`, *optional*, defaults to 0): See `LayerScheduler`.
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
        beta: float = 1.0,
        ema: float = 0.9,
        temperature_floor: float = 0.05,
        temperature_decay: float = 0.999,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(candidate_layers, seed)
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
        self._value = dict.fromkeys(self.candidate_layers, 0.0)
        self._visits = dict.fromkeys(self.candidate_layers, 0)
        self._last_loss: dict[int, float | None] = dict.fromkeys(self.candidate_layers)

    def temperature(self, step: int) -> float:
        """Softmax temperature at 1-based step ``step``."""
        return max(self.temperature_floor, self.temperature_decay**step)

    def probabilities(self) -> dict[int, float]:
        """The distribution the next ``select()`` samples from (worth logging)."""
        step = self.step + 1
        log_t = math.log(step)
        ucb = {
            layer: self._value[layer] + self.beta * math.sqrt(log_t / (self._visits[layer] + self.eps))
            for layer in self.candidate_layers
        }
        # Subtracting the maximum keeps exp() finite with an untried layer's huge bonus.
        top = max(ucb.values())
        tau = self.temperature(step)
        weights = {layer: math.exp((value - top) / tau) for layer, value in ucb.items()}
        total = sum(weights.values())
        return {layer: weight / total for layer, weight in weights.items()}

    def update(self, ot_loss: float | None) -> None:
        """Turn the OT loss at ``current_layer`` into a reward; skipped if no rank has a finite loss."""
        layer = self._require_selection()
        loss = _global_mean(ot_loss)
        if loss is None:
            return
        if not math.isfinite(loss):
            logger.warning("Layer scheduler: OT loss %s at layer %d is not finite; no reward this step.", loss, layer)
            return
        previous = self._last_loss[layer]
        reward = 0.0 if previous is None else previous - loss
        self._value[layer] = self.ema * self._value[layer] + (1 - self.ema) * reward
        self._visits[layer] += 1
        self._last_loss[layer] = loss

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

    def _choose(self, step: int) -> int:
        probabilities = self.probabilities()
        return self._rng(step).choices(list(probabilities), weights=list(probabilities.values()))[0]


class FixedLayerScheduler(LayerScheduler):
    """Ablation: always the single candidate layer."""

    name = "fixed"

    def __init__(self, candidate_layers: Iterable[int], seed: int = 0) -> None:
        super().__init__(candidate_layers, seed)
        if len(self.candidate_layers) != 1:
            raise ValueError(
                f"The 'fixed' scheduler needs exactly one candidate layer, got {list(self.candidate_layers)}; "
                "pass candidate_layers=[l] for the layer to use."
            )

    def _choose(self, step: int) -> int:
        return self.candidate_layers[0]


class UniformLayerScheduler(LayerScheduler):
    """Ablation: a uniformly random candidate every step."""

    name = "uniform"

    def _choose(self, step: int) -> int:
        return self._rng(step).choice(self.candidate_layers)


class RoundRobinLayerScheduler(LayerScheduler):
    """Ablation: the candidates in their given order, cyclically."""

    name = "round_robin"

    def _choose(self, step: int) -> int:
        return self.candidate_layers[(step - 1) % len(self.candidate_layers)]


_SCHEDULERS: dict[str, type[LayerScheduler]] = {
    scheduler.name: scheduler
    for scheduler in (UCBLayerScheduler, FixedLayerScheduler, UniformLayerScheduler, RoundRobinLayerScheduler)
}


def build_layer_scheduler(name: str, candidate_layers: Iterable[int], seed: int = 0, **kwargs: Any) -> LayerScheduler:
    """Build the scheduler called ``name`` ("ucb", "fixed", "uniform" or "round_robin").

    ``kwargs`` are that scheduler's hyper-parameters (only "ucb" has any; see `UCBLayerScheduler`).
    """
    if name not in _SCHEDULERS:
        raise ValueError(f"Unknown layer scheduler {name!r}; choose one of {sorted(_SCHEDULERS)}.")
    return _SCHEDULERS[name](candidate_layers, seed=seed, **kwargs)


class LayerSchedulerCallback(TrainerCallback, ExportableState):
    """Drives a `LayerScheduler` from the `Trainer` loop and saves it with the Trainer's checkpoints.

    The trainer's loss code reads ``callback.scheduler.current_layer`` and calls ``record(ot_loss)`` with the
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
    "FixedLayerScheduler",
    "LayerScheduler",
    "LayerSchedulerCallback",
    "RoundRobinLayerScheduler",
    "UCBLayerScheduler",
    "UniformLayerScheduler",
    "build_layer_scheduler",
]
