r"""The UCB layer scheduler: POTSA's bandit over Q-Former layers (or groups of layers).

The rule, written as a maximisation (larger is better everywhere; ``rule="potsa"``):

.. math::

    r &= M_l^{\text{prev}} - M_l^{\text{now}}
        \qquad \text{(reward: how much layer } l \text{'s measurement fell since } l \text{ was last chosen)} \\
    Q_l &\leftarrow \text{ema} \cdot Q_l + (1 - \text{ema}) \cdot r \\
    U_l &= Q_l + \beta \sqrt{\log t / (n_l + \varepsilon)} \\
    \tau_t &= \max(\tau_{\min}, \text{decay}^t) \\
    p_t(l) &= \operatorname{softmax}_l(U_l / \tau_t)

- ``t``: 1-based index of the current optimizer step (the number of ``select()`` calls, this one included).
- ``M_l``: what the reward measures at layer ``l`` (``reward``), averaged over the step's micro-batches and over all
  ranks: ``"loss_drop"`` (the paper) measures the detached OT loss, ``"ratio_drop"`` the step's ``ot_ratio`` (mean
  divergence of parallel pairs over that of non-parallel ones, see `alignment_diagnostics.py`).
- ``n_l``: how many rewards layer ``l`` has received. An untried layer gets a bonus of about
  ``sqrt(log t / eps)``, so every layer is tried once before the rewards decide (at ``t = 1`` all bonuses are 0 and
  the first pick is uniform).
- First visit: there is no earlier measurement to improve on, so the reward is 0, the value ``Q`` starts from: the
  first visit neither favours nor penalises the layer, stores the baseline for the next visit, and counts.

Why the paper's reward does not decide. On the tiny benchmark (as measured for issue 17) its loss drops were ~1e-3
against a bonus of ~0.25 and a temperature >= 0.67 for the first 400 steps: the picks stayed even. And an OT loss
falls fastest where the layer collapses (every divergence shrinks with the states' spread), so its reward favours
collapse. The ratio cannot be gamed that way (a collapse shrinks both divergences), and ``normalize_reward`` puts
any reward on the bonus's scale: each reward is divided by the root mean square of the rewards so far (an EMA with
weight ``ema``, bias-corrected as in Adam, over all arms), so ``|r| <= 1 / sqrt(1 - ema)`` and a steadily improving
arm's ``Q`` approaches 1 while a flat one's stays near 0. With ``beta = 1`` the bonus is then on that scale
(``t = 20, n = 10``: 0.55; ``t = 100, n = 50``: 0.30; ``t = 400, n = 200``: 0.17). The paper's temperature
(``max(0.05, 0.999^t)``: 0.90 at step 100, 0.67 at step 400, the floor from step 2995) turns a unit difference in
``Q`` into only a 3:1 preference at step 100 and 4.5:1 at step 400; for runs of a few hundred steps
``temperature_decay = 0.99`` (0.37 at step 100, the floor from step 299) lets the bandit decide while the bonus
keeps it exploring. In the simulated loop of ``test_layer_scheduler.py`` (one layer's ratio improves by 0.002 per
visit under noise of std 0.002, the other's does not) that setting gives the improving layer over 80% of 400 picks
and over 90% of the last 100, the paper's temperature a majority, raw rewards a coin toss, and two flat layers stay
balanced.

Mapping to the paper's formula, ``score = Q - beta * sqrt(log t / (n + eps))`` sampled with
``softmax(-score / tau)``: that form is right only when its ``Q`` is a *cost*, the EMA of the loss change
``L_now - L_prev``. Its ``Q`` is then minus ours, ``-score`` equals ``U`` above and the two sample the same
distribution; in both the exploration bonus *raises* the probability of rarely tried layers.

``rule="released"``: the released code reads it with ``Q`` as the improvement. Sslnon/semst,
``examples/st_covost2/model/slam_model_st_cl.py`` (commit 0dd6c805), class ``LayerSampler``, strategy
``"ucb_bandit"``: ``Q`` is the EMA (``alpha`` 0.9) of ``prev_cost - cost_now`` from an arm's second update on, ``n``
counts every update, ``score = Q - beta * sqrt(log t / (n + 1e-6))`` with ``t`` the number of draws so far,
``temperature = max(0.05, 0.999^t)`` and the arm is drawn from ``softmax(-score / temperature)``, i.e. from
``softmax((beta * bonus - Q) / temperature)``: the arm whose loss falls *least* is preferred. ``rule="released"``
samples exactly that (with ``beta``, ``ema`` and the temperature schedule as set; their defaults are the released
values). Where its training loop (``src/slam_llm/utils/deepspeed_utils_cl.py``) differs from ours:

- it draws a layer at every forward pass (micro-batch) and updates with that micro-batch's loss on each rank alone,
  drawing from torch's global RNG; here a layer holds for an optimizer step, the loss is averaged over the step's
  micro-batches and the ranks, and rank 0's draw is broadcast (the two agree with one micro-batch per step on one
  process);
- its cost is ``loss_w = sum over pairs of 0.5 * S(x, en)`` with ``loss = CE + 10 * loss_w``:
  ``ot_pair_reduction="half_sum"`` with ``ot_loss_weight=10``;
- its pairs come from a sampler laying batches out as ``[en, x, en, x, ...]`` and pair ``(2k, 2k + 1)``, both sides
  trained: ``ot_pair_strategy="english_anchor"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from .distributed import global_mean
from .layer_scheduler import Arm, LayerScheduler, arm_label

logger = logging.getLogger(__name__)

UCB_RULES = ("potsa", "released")
UCB_REWARDS = {"loss_drop": "ot", "ratio_drop": "ot_ratio"}  # reward -> the measurement update() is fed
_PAPER_SETTINGS = {"rule": "potsa", "reward": "loss_drop", "normalize_reward": False}


class UCBLayerScheduler(LayerScheduler):
    """POTSA's UCB scheduler (the module docstring gives the rules, the rewards and their mapping to the paper).

    Args:
        candidate_layers, seed, layer_weights, groups: See `LayerScheduler`; the arms are the bandit's arms.
        rule (`str`, *optional*, defaults to "potsa"):
            "potsa" (sample ``softmax((Q + bonus) / tau)``) or "released" (``softmax((bonus - Q) / tau)``).
        reward (`str`, *optional*, defaults to "loss_drop"):
            "loss_drop" (the fall of the OT loss, the paper) or "ratio_drop" (the fall of ``ot_ratio``); sets
            `signal`, what ``update`` must be fed.
        normalize_reward (`bool`, *optional*, defaults to False):
            Divide each reward by the running root mean square of the rewards (module docstring).
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
        rule: str = "potsa",
        reward: str = "loss_drop",
        normalize_reward: bool = False,
        beta: float = 1.0,
        ema: float = 0.9,
        temperature_floor: float = 0.05,
        temperature_decay: float = 0.999,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(candidate_layers, seed, layer_weights=layer_weights, groups=groups)
        if rule not in UCB_RULES:
            raise ValueError(f"Unknown UCB rule {rule!r}; choose one of {list(UCB_RULES)}.")
        if reward not in UCB_REWARDS:
            raise ValueError(f"Unknown UCB reward {reward!r}; choose one of {list(UCB_REWARDS)}.")
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
        self.rule = rule
        self.reward = reward
        self.signal = UCB_REWARDS[reward]
        self.normalize_reward = bool(normalize_reward)
        self.beta = beta
        self.ema = ema
        self.temperature_floor = temperature_floor
        self.temperature_decay = temperature_decay
        self.eps = eps
        self._value = dict.fromkeys(self.arms, 0.0)
        self._visits = dict.fromkeys(self.arms, 0)
        self._last_measurement: dict[Arm, float | None] = dict.fromkeys(self.arms)
        self._reward_moment = 0.0  # EMA of squared rewards, all arms (normalize_reward)
        self._rewards_seen = 0

    def temperature(self, step: int) -> float:
        """Softmax temperature at 1-based step ``step``."""
        return max(self.temperature_floor, self.temperature_decay**step)

    def probabilities(self) -> dict[Arm, float]:
        """The distribution the next ``select()`` samples from (worth logging)."""
        step = self.step + 1
        log_t = math.log(step)
        sign = 1.0 if self.rule == "potsa" else -1.0  # "released": the value counts against the arm
        ucb = {
            arm: sign * self._value[arm] + self.beta * math.sqrt(log_t / (self._visits[arm] + self.eps))
            for arm in self.arms
        }
        # Subtracting the maximum keeps exp() finite with an untried arm's huge bonus.
        top = max(ucb.values())
        tau = self.temperature(step)
        weights = {arm: math.exp((value - top) / tau) for arm, value in ucb.items()}
        total = sum(weights.values())
        return {arm: weight / total for arm, weight in weights.items()}

    def update(self, measurement: float | None) -> None:
        """Turn the step's `signal` at ``current_layers`` (the OT loss, or ``ot_ratio``) into a reward; skipped if no
        rank has a finite one."""
        arm = self._require_selection()
        value = global_mean(measurement)
        if value is None:
            return
        if not math.isfinite(value):
            logger.warning("Layer scheduler: %s %s at %s is not finite; no reward.", self.signal, value, arm_label(arm))
            return
        previous = self._last_measurement[arm]
        reward = 0.0 if previous is None else self._scaled(previous - value)
        self._value[arm] = self.ema * self._value[arm] + (1 - self.ema) * reward
        self._visits[arm] += 1
        self._last_measurement[arm] = value

    def _scaled(self, reward: float) -> float:
        """``reward`` over the bias-corrected running RMS of the rewards so far, this one included (when
        ``normalize_reward``); a zero RMS (every reward 0 so far) leaves it 0."""
        if not self.normalize_reward:
            return reward
        self._rewards_seen += 1
        self._reward_moment = self.ema * self._reward_moment + (1 - self.ema) * reward**2
        rms = math.sqrt(self._reward_moment / (1 - self.ema**self._rewards_seen))
        return reward / rms if rms > 0 else 0.0

    def config(self) -> dict[str, Any]:
        config = super().config() | {
            "beta": self.beta,
            "ema": self.ema,
            "temperature_floor": self.temperature_floor,
            "temperature_decay": self.temperature_decay,
            "eps": self.eps,
        }
        # Left out at their defaults, so that checkpoints saved before these settings existed still resume.
        chosen = {"rule": self.rule, "reward": self.reward, "normalize_reward": self.normalize_reward}
        return config | {key: value for key, value in chosen.items() if value != _PAPER_SETTINGS[key]}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict() | {
            "value": self._as_list(self._value),
            "visits": self._as_list(self._visits),
            "last_loss": self._as_list(self._last_measurement),  # the signal's value; the key older states use
        }
        if self.normalize_reward:
            state |= {"reward_moment": self._reward_moment, "rewards_seen": self._rewards_seen}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._value = self._from_list(state["value"])
        self._visits = self._from_list(state["visits"])
        self._last_measurement = self._from_list(state["last_loss"])
        if self.normalize_reward:
            self._reward_moment, self._rewards_seen = state["reward_moment"], state["rewards_seen"]

    def _choose(self, step: int) -> Arm:
        probabilities = self.probabilities()
        return self._rng(step).choices(list(probabilities), weights=list(probabilities.values()))[0]


__all__ = ["UCB_REWARDS", "UCB_RULES", "UCBLayerScheduler"]
