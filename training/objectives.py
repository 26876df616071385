r"""The alignment objectives' arithmetic: what turns Sinkhorn divergences between Q-Former states into a loss.

Why there is more than the paper's objective. Both sides of a pair pass through the same trainable Q-Former, so a
Q-Former whose output does not depend on its input makes every divergence zero: a constant output is a global
minimum of the paper's mean divergence. On the tiny benchmark that is what it finds: most of the loss's fall is the
states' spread shrinking (layers stop depending on the input), not parallel utterances moving together. Once the
spread is about the blur, the divergence behaves like an MMD and its value no longer measures alignment. The
objectives below differ in what a collapse earns:

- ``sinkhorn`` (the paper): mean :math:`S_\varepsilon(H_i, H_j)` over the pairs; collapse earns everything.
- ``infonce_sinkhorn`` (contrastive, as ConST / WACO): for a (query, positive) row with in-batch negatives
  :math:`k`, :math:`-\log \frac{e^{-S(H_q, H_p)/\tau}}{e^{-S(H_q, H_p)/\tau} + \sum_k e^{-S(H_q, H_k)/\tau}}`.
  A constant output makes every divergence equal, so it pays :math:`\log(1 + K)`, while aligned states that differ
  between sentences pay almost nothing.
- ``centred_sinkhorn``: the divergence between *standardised* states (`standardise_states`): the L2-normalised
  states the paper compares, minus their slot's batch mean, divided by the batch's spread. It is invariant to how
  much the states vary, so shrinking the spread earns nothing. An exactly constant batch standardises to zero tokens
  and gives zero, the one degenerate point; nothing descends to it, and the variance hinge makes it cost.
- the variance hinge (VICReg's variance term, on the sphere), addable to any of them: per query slot, the standard
  deviation of the unit states over the batch is held above a target, :math:`\frac1Q \sum_q \max(0, \gamma -
  \sqrt{\mathrm{var}_q + 10^{-4}})`, where :math:`\mathrm{var}_q = 1 - |\bar u_q|^2` is the slot's `slot_variance`.

Pair reductions: ``mean`` over the terms (ours), ``sum``, and ``half_sum`` (:math:`\tfrac12 \sum`, exactly the
released code's ``loss_w += 0.5 * sinkhorn(x_query, en_query)`` over its pairs; see `ucb_scheduler.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGNMENT_LOSSES = ("sinkhorn", "infonce_sinkhorn", "centred_sinkhorn")
PAIR_REDUCTIONS = ("mean", "sum", "half_sum")

# VICReg's epsilon under the square root: keeps the hinge's gradient finite at zero variance.
_VARIANCE_EPS = 1e-4
# Below this spread (cosine of every state to its slot's mean above 1 - 5e-9) the differences between utterances
# are float rounding; standardising divides by this floor instead, so rounding noise is not blown up to unit scale.
MIN_SPREAD = 1e-4


def check_objective(objective: str, reduction: str, temperature: float, variance_weight: float,
                    variance_target_std: float) -> None:  # fmt: skip
    """Raise a ValueError naming the setting that is out of range."""
    if objective not in ALIGNMENT_LOSSES:
        raise ValueError(f"Unknown alignment loss {objective!r}; choose one of {list(ALIGNMENT_LOSSES)}.")
    if reduction not in PAIR_REDUCTIONS:
        raise ValueError(f"Unknown pair reduction {reduction!r}; choose one of {list(PAIR_REDUCTIONS)}.")
    if not temperature > 0:
        raise ValueError(f"The InfoNCE temperature must be > 0; got {temperature}.")
    if not variance_weight >= 0:
        raise ValueError(f"The variance hinge weight must be >= 0 (0 = off); got {variance_weight}.")
    if not variance_target_std > 0:
        raise ValueError(f"The variance hinge's target std must be > 0; got {variance_target_std}.")


def reduce_terms(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    """``terms`` (one per pair or row) reduced to a scalar by ``reduction`` (one of `PAIR_REDUCTIONS`)."""
    if reduction == "mean":
        return terms.mean()
    return terms.sum() * (0.5 if reduction == "half_sum" else 1.0)


def slot_variance(states: torch.Tensor) -> torch.Tensor:
    """Per query slot, the variance over utterances of the L2-normalised states, summed over dimensions.

    For unit vectors this is ``1 - |mean unit vector|^2``: 0 when the slot's output does not depend on the input,
    up to 1 when its directions cancel out. ``states``: (num_utterances, num_queries, hidden_size); returns
    (num_queries,) in float32 (float64 for float64 states).
    """
    units = F.normalize(states.to(torch.promote_types(states.dtype, torch.float32)), dim=-1)  # (N, Q, d)
    return (units - units.mean(dim=0)).square().sum(dim=-1).mean(dim=0)  # (Q,)


def variance_hinge(states: torch.Tensor, target_std: float) -> torch.Tensor:
    """Mean over query slots of ``max(0, target_std - sqrt(slot_variance + 1e-4))`` (VICReg's variance term)."""
    return F.relu(target_std - (slot_variance(states) + _VARIANCE_EPS).sqrt()).mean()


def standardise_states(states: torch.Tensor, participants: torch.Tensor) -> torch.Tensor:
    """The L2-normalised states, centred per slot by the participants' mean and divided by their spread.

    The spread is ``sqrt(mean over slots of slot_variance)``, so the participants' tokens come out with unit
    mean-square norm whatever the spread was: the divergence between standardised states does not change when every
    state moves towards its slot's mean by the same factor. The mean and spread stay in the graph (detaching them
    would leave a gradient that shrinks the spread, amplified by 1 / spread). The tokens are not normalised again:
    that would turn a collapsed batch's rounding noise into unit vectors and weigh every slot's deviation the same
    however little the slot varies.

    Args:
        states (`torch.Tensor` of shape `(batch_size, num_queries, hidden_size)`): every utterance's states.
        participants (`torch.Tensor` of shape `(num_participants,)`): indices of the utterances the statistics are
            taken over (those in a pair); the others are standardised with the same statistics.

    Returns:
        `torch.Tensor` of the shape of ``states``, to compare with ``normalize=False``.
    """
    units = F.normalize(states.to(torch.promote_types(states.dtype, torch.float32)), dim=-1)  # (B, Q, d)
    members = units[participants]  # (P, Q, d)
    mean = members.mean(dim=0)  # (Q, d)
    spread = (members - mean).square().sum(dim=-1).mean().sqrt()  # scalar: sqrt(mean over slots of slot_variance)
    return (units - mean) / spread.clamp_min(MIN_SPREAD)


def infonce_terms(divergences: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over ``-divergences / temperature``, the positive in column 0.

    Args:
        divergences (`torch.Tensor` of shape `(num_rows, 1 + num_negatives)`): per row, the divergence to the
            positive, then to each negative.
        valid (`torch.BoolTensor` of the same shape): False on padding (rows with fewer negatives); column 0 is
            always valid.
        temperature (`float`): tau.

    Returns:
        `torch.Tensor` of shape `(num_rows,)`: ``-log softmax(-S / tau)[positive]``, 0 for a row without negatives.
    """
    logits = (-divergences / temperature).masked_fill(~valid, -torch.inf)  # (R, 1 + K)
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


__all__ = [
    "ALIGNMENT_LOSSES",
    "MIN_SPREAD",
    "PAIR_REDUCTIONS",
    "check_objective",
    "infonce_terms",
    "reduce_terms",
    "slot_variance",
    "standardise_states",
    "variance_hinge",
]
