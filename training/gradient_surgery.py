"""Per-loss gradients of one optimizer step: PCGrad for the OT term and CE/OT gradient cosines.

`PotsaTrainer` takes the CE and OT gradients apart on steps that need them (``config.ot_gradient_surgery =
"pcgrad"`` or a ``config.ot_gradient_cosine_every`` step); these helpers sum them over the step's micro-batches,
average them over processes, project the OT gradient where it conflicts with CE, and measure cosines.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

Gradients = Sequence[torch.Tensor | None]
"""One gradient per trainable parameter, ``None`` where the loss does not reach the parameter."""


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _shared(a: Gradients, b: Gradients) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (a, b) gradient pairs of the parameters both losses reach."""
    return [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]


def _dot(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Sum of the pairs' dot products, in float64 and with one device sync."""
    products = [torch.dot(x.flatten().double(), y.flatten().double()) for x, y in pairs]
    return torch.stack(products).sum().item() if products else 0.0


def gradient_cosine(a: Gradients, b: Gradients) -> float | None:
    """Cosine between two gradients on the parameters both reach; ``None`` if either is zero there."""
    shared = _shared(a, b)
    norm = (_dot((x, x) for x, _ in shared) * _dot((y, y) for _, y in shared)) ** 0.5
    return _dot(shared) / norm if norm > 0 else None


def project_conflicting_gradient(ot: Gradients, ce: Gradients) -> tuple[list[torch.Tensor | None], bool]:
    r"""PCGrad (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning") for the OT term, one-sided.

    On the parameters both losses reach (the Q-Former blocks up to the aligned layer, the queries, the bias table),
    if :math:`\langle g_{OT}, g_{CE} \rangle < 0` the OT gradient loses its component along the CE gradient:

    .. math::

        g_{OT} \leftarrow g_{OT} - \frac{\langle g_{OT}, g_{CE} \rangle}{\lVert g_{CE} \rVert^2} g_{CE}

    so the alignment step no longer undoes the translation step (afterwards the dot product is 0). Two-task PCGrad
    also projects the CE gradient; here translation is the task and alignment serves it, so CE is never changed.
    Parameters only one loss reaches keep their gradients. Returns the OT gradients and whether they were projected.
    """
    shared = _shared(ot, ce)
    dot = _dot(shared)
    if dot >= 0:
        return list(ot), False
    coefficient = dot / _dot((c, c) for _, c in shared)
    projected = [o if o is None or c is None else o - coefficient * c for o, c in zip(ot, ce, strict=True)]
    return projected, True


class StepGradients:
    """Named gradients (e.g. "ce", "ot"), each summed over the micro-batches of one optimizer step."""

    def __init__(self) -> None:
        self.sums: dict[str, list[torch.Tensor | None]] = {}

    def add(self, name: str, gradients: Gradients) -> None:
        current = self.sums.get(name)
        self.sums[name] = list(gradients) if current is None else list(map(_add, current, gradients))

    def all_reduce_mean(self) -> None:
        """Average every sum over the processes (no-op without torch.distributed). Each process's gradients are
        already scaled for DDP's averaging, so the mean is the global step gradient. Every rank reaches the same
        parameters (same layers, same graph), so the tensors line up."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for gradients in self.sums.values():
            present = [g for g in gradients if g is not None]
            flat = torch.cat([g.flatten() for g in present])  # one collective per name
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, chunk in zip(present, flat.split([g.numel() for g in present])):
                g.copy_(chunk.view_as(g))

    def step_gradient(self, pcgrad: bool) -> tuple[list[torch.Tensor | None], bool]:
        """The step's gradient, CE + OT, the OT sum projected first under PCGrad, and whether it was projected.

        The projection acts on the step's sums, not on each micro-batch: a conflict is judged on the gradient the
        optimizer applies, so gradient accumulation still equals one large batch.
        """
        ce, ot = self.sums["ce"], self.sums["ot"]
        projected = False
        if pcgrad:
            ot, projected = project_conflicting_gradient(ot, ce)
        return list(map(_add, ce, ot)), projected

    def clear(self) -> None:
        self.sums.clear()


__all__ = ["Gradients", "StepGradients", "gradient_cosine", "project_conflicting_gradient"]
