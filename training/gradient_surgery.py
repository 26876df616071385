"""Per-loss gradients of one optimizer step: PCGrad for the OT term and CE/OT gradient cosines.

Gradient surgery (``ot_gradient_surgery = "pcgrad"``) and gradient diagnostics (``ot_gradient_cosine_every``) need
the CE and OT gradients apart. On such a step `SplitGradientStep` takes them with `torch.autograd.grad` on the
trainable parameters for every micro-batch and adds them to per-step sums (two extra copies of the trainable
parameters' gradients), so that both act on the *step's* gradients, as the optimizer does: gradient accumulation
stays equivalent to one large batch. On the step's last micro-batch the sums are averaged over processes (under DDP
every rank then holds the global step gradients, and DDP's own averaging of identical gradients changes nothing),
measured, projected, and handed to the Trainer's normal backward as the gradient of a surrogate
``sum_p <p, g_p>`` whose value is zero: clipping, DDP reduction and the optimizer step run unchanged, and the
reported loss is the true one. DeepSpeed, FSDP (sharded parameters), DataParallel and fp16 loss scaling are refused:
`torch.autograd.grad` would see shards, replicas or unscaled fp16 gradients.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import torch

from .distributed import all_reduce_sum, rank_and_world_size

GRADIENT_SURGERY = ("none", "pcgrad")

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
        world_size = rank_and_world_size()[1]
        if world_size == 1:
            return
        for gradients in self.sums.values():
            present = [g for g in gradients if g is not None]
            flat = all_reduce_sum(torch.cat([g.flatten() for g in present])) / world_size  # one collective per name
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


def qformer_block_indices(names: Sequence[str], layer: int) -> list[int]:
    """Positions in ``names`` of Q-Former block ``layer``'s parameters (layer l = block l, counted from 1)."""
    prefix = f"qformer.encoder.layer.{layer - 1}."
    return [index for index, name in enumerate(names) if name.startswith(prefix)]


class SplitGradientStep:
    """The CE / OT gradient split of the optimizer steps that need it (module docstring), driven by the trainer.

    Per step: `begin_step` says how many micro-batches come and whether this step splits; per micro-batch,
    `surrogate_loss` takes the gradients apart and returns the loss to back-propagate; `pop_metrics` gives what was
    measured since the last call (PCGrad's projected share, mean cosines).

    Args:
        pcgrad (`bool`): project the OT gradient on every step (PCGrad).
        cosine_every (`int`): measure the cosines every this many optimizer steps (0: never).
    """

    def __init__(self, pcgrad: bool, cosine_every: int) -> None:
        self.pcgrad = pcgrad
        self.cosine_every = cosine_every
        self.splitting = self.measuring = False
        self._micro_batches_left = 0
        self._sums = StepGradients()
        self._steps = self._projected = 0
        self._cosines: dict[str, list[float]] = defaultdict(list)

    @property
    def needed(self) -> bool:
        """Whether any step of this run splits its gradients."""
        return self.pcgrad or bool(self.cosine_every)

    @staticmethod
    def check_supported(deepspeed: bool, fsdp: bool, n_gpu: int, fp16: bool) -> None:
        unsupported = {
            "DeepSpeed": deepspeed,
            "FSDP": fsdp,
            "DataParallel (several GPUs in one process; launch one process per GPU)": n_gpu > 1,
            "fp16 loss scaling (use bf16 or fp32)": fp16,
        }
        found = [name for name, enabled in unsupported.items() if enabled]
        if found:
            raise ValueError(
                f"`ot_gradient_surgery` / `ot_gradient_cosine_every` take per-loss gradients with torch.autograd.grad, "
                f"which does not work with {', '.join(found)}. Turn them off ('none' / 0) or train with plain DDP."
            )

    def begin_step(self, step: int, micro_batches: int) -> None:
        """Before the micro-batches of optimizer step ``step`` (1-based)."""
        self.measuring = bool(self.cosine_every) and step % self.cosine_every == 0
        self.splitting = self.pcgrad or self.measuring
        self._micro_batches_left = micro_batches
        self._steps += 1

    def surrogate_loss(
        self,
        named_parameters: Sequence[tuple[str, torch.nn.Parameter]],
        ce_term: torch.Tensor,
        ot_term: torch.Tensor,
        layer_ot_terms: Mapping[int, torch.Tensor],
    ) -> torch.Tensor:
        """The micro-batch's loss value, whose backward gives this step's surgery-treated gradient.

        ``layer_ot_terms`` (measured steps only): the OT term at each Q-Former layer alone, whose gradient on that
        layer's block is compared with the CE gradient there.
        """
        names = [name for name, _ in named_parameters]
        params = [param for _, param in named_parameters]
        ce = torch.autograd.grad(ce_term, params, retain_graph=True, allow_unused=True)
        self._sums.add("ce", ce)
        for layer, term in layer_ot_terms.items():
            block = [params[index] for index in qformer_block_indices(names, layer)]
            if block:  # a frozen block has nothing to compare
                layer_ot = torch.autograd.grad(term, block, retain_graph=True, allow_unused=True)
                self._sums.add(f"ot_layer_{layer}", layer_ot)
        ot = torch.autograd.grad(ot_term, params, allow_unused=True)
        self._sums.add("ot", ot)
        value = (ce_term + ot_term).detach()
        self._micro_batches_left -= 1
        if self._micro_batches_left:  # gradients arrive with the last micro-batch; zero ones keep backward valid
            reached = [p for p, c, o in zip(params, ce, ot) if c is not None or o is not None]
            return value + sum(p.sum() for p in reached) * 0.0
        gradients = self._finish(names)
        surrogate = sum((p * g).sum() for p, g in zip(params, gradients) if g is not None)
        return value + (surrogate - surrogate.detach())  # parenthesised: adding and removing it must not round

    def _finish(self, names: Sequence[str]) -> list[torch.Tensor | None]:
        """Average the step's gradients over processes, record the cosines, and sum them (projected under PCGrad)."""
        self._sums.all_reduce_mean()
        if self.measuring:
            self._record_cosines(names)
        gradients, projected = self._sums.step_gradient(self.pcgrad)
        self._projected += projected
        self._sums.clear()
        return gradients

    def _record_cosines(self, names: Sequence[str]) -> None:
        """``grad_cosine_ot``: CE vs the applied OT gradient on the parameters both reach (what PCGrad tests);
        ``grad_cosine_layer_{l}``: CE vs the gradient of OT at layer l alone, on Q-Former block l's parameters."""
        ce, ot = self._sums.sums["ce"], self._sums.sums["ot"]
        measured = {"grad_cosine_ot": gradient_cosine(ce, ot)}
        for name, layer_ot in self._sums.sums.items():
            if name.startswith("ot_layer_"):
                layer = int(name.removeprefix("ot_layer_"))
                block_ce = [ce[index] for index in qformer_block_indices(names, layer)]
                measured[f"grad_cosine_layer_{layer}"] = gradient_cosine(block_ce, layer_ot)
        for key, cosine in measured.items():
            if cosine is not None:
                self._cosines[key].append(cosine)

    def pop_metrics(self) -> dict[str, float]:
        """Since the last call: the share of steps PCGrad projected (under PCGrad) and each mean cosine measured."""
        metrics = {key: sum(values) / len(values) for key, values in self._cosines.items()}
        if self.pcgrad and self._steps:
            metrics["pcgrad_projected_fraction"] = self._projected / self._steps
        self._cosines.clear()
        self._steps = self._projected = 0
        return metrics


__all__ = [
    "GRADIENT_SURGERY",
    "Gradients",
    "SplitGradientStep",
    "StepGradients",
    "gradient_cosine",
    "project_conflicting_gradient",
    "qformer_block_indices",
]
