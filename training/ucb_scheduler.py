r"""The UCB layer scheduler: POTSA's bandit over Q-Former layers (or groups of layers).

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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from .distributed import global_mean
from .layer_scheduler import Arm, LayerScheduler, arm_label

logger = logging.getLogger(__name__)


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
        loss = global_mean(ot_loss)
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


__all__ = ["UCBLayerScheduler"]
