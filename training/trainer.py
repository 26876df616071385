"""PotsaTrainer: transformers' Trainer with POTSA's joint loss, parallel batches and generation-based evaluation.

    loss = CE(translation tokens) + lambda * OT(Q-Former states of parallel utterances at the scheduled layer)

Scaling, so that gradient accumulation and data parallelism give the update of one large batch:
- CE is a sum over target tokens divided by `num_items_in_batch` (all target tokens of the optimizer step, over
  micro-batches and, with `average_tokens_across_devices`, processes; then multiplied by the number of processes
  because DDP averages gradients). This is transformers' own convention for models that accept loss kwargs.
- OT is a mean over the pairs of a micro-batch, weighted by that micro-batch's share of the step's pairs (the
  pairs of all micro-batches are drawn up front in `get_batch_samples`, from a generator seeded by the step, so a
  resumed run draws the same pairs).
Both terms are therefore already scaled for accumulation (`loss_is_scaled_for_ga = True`).

Layers: the scheduler's ``current_layers`` are ``(layer, weight)`` pairs (one layer of weight 1 in the paper's
setting; a group or a fixed set of layers otherwise, see `training/layer_scheduler.py`), and the OT term is their
weighted sum.

Gradient surgery (``config.ot_gradient_surgery = "pcgrad"``) and gradient diagnostics
(``config.ot_gradient_cosine_every``) need the CE and OT gradients apart. On such a step every micro-batch takes
them with `torch.autograd.grad` on the trainable parameters and adds them to per-step sums (two extra copies of the
trainable parameters' gradients), so that both act on the *step's* gradients, as the optimizer does: gradient
accumulation stays equivalent to one large batch. On the step's last micro-batch the sums are averaged over
processes (under DDP every rank then holds the global step gradients, and DDP's own averaging of identical
gradients changes nothing), measured, projected, and handed to the Trainer's normal backward as the gradient of a
surrogate ``sum_p <p, g_p>`` whose value is zero: clipping, DDP reduction and the optimizer step run unchanged, and
the reported loss is the true one. DeepSpeed, FSDP (sharded parameters), DataParallel and fp16 loss scaling are
refused: `torch.autograd.grad` would see shards, replicas or unscaled fp16 gradients.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from .alignment import alignment_loss, find_parallel_pairs, weighted_alignment_loss
from .data import ParallelBatchSampler
from .evaluation import eval_batches, evaluate_model, write_results
from .gradient_surgery import Gradients, StepGradients, gradient_cosine
from .layer_scheduler import (
    LayerScheduler,
    LayerSchedulerCallback,
    arm_label,
    build_layer_scheduler,
)

logger = logging.getLogger(__name__)

METADATA_KEYS = ("sentence_ids", "languages", "ot_pairs", "references")
FROZEN_PREFIXES = ("speech_encoder.", "language_model.")


def check_frozen(model: torch.nn.Module) -> None:
    """The paper trains only the connector: refuse to train if a frozen base weight requires grad (LoRA aside)."""
    leaking = [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and name.startswith(FROZEN_PREFIXES) and "lora_" not in name
    ]
    if leaking:
        raise ValueError(
            f"{len(leaking)} encoder/LLM parameters require grad (e.g. {leaking[0]}); POTSA keeps them frozen. "
            "Call `model.freeze_base_models()` or enable LoRA through the config."
        )


def build_scheduler_from_config(config: Any, seed: int) -> LayerScheduler:
    """The layer scheduler named in the model config, with the paper's UCB hyper-parameters."""
    ucb = {
        "beta": config.ucb_beta,
        "ema": config.ucb_ema,
        "temperature_floor": config.ucb_temperature_floor,
        "temperature_decay": config.ucb_temperature_decay,
    }
    extra = ucb if config.ot_layer_scheduler == "ucb" else {}
    arms = {"layer_weights": config.ot_layer_weights, "groups": config.ot_layer_groups}
    return build_layer_scheduler(config.ot_layer_scheduler, config.ot_candidate_layers, seed=seed, **arms, **extra)


class PotsaTrainer(Trainer):
    """`Trainer` + POTSA's OT loss, logged per term, with a UCB layer scheduler callback.

    Args:
        layer_scheduler (`LayerScheduler`, *optional*): overrides the scheduler named in the model config.
        pair_ratio (`float`, *optional*, defaults to 1.0): share of sentences whose parallel utterances are batched
            together (see `ParallelBatchSampler`).
        eval_groups (`Mapping[str, Iterable[str]]`, *optional*): named language groups averaged in evaluation,
            e.g. {"seen": [...], "zero_shot": [...]}.
        eval_task (`str`, *optional*, defaults to "translate"): the task generated in evaluation.
        generation_kwargs (`dict`, *optional*): passed to `generate` in evaluation (num_beams, max_new_tokens, ...).
        language_probe (`bool`, *optional*, defaults to True): add the language-ID probe accuracies to evaluation
            (see `evaluate_model`; a few LBFGS fits on pooled vectors, cheap next to generation).
        All other arguments are `Trainer`'s; pass `processing_class=processor`.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        layer_scheduler: LayerScheduler | None = None,
        pair_ratio: float = 1.0,
        eval_groups: Mapping[str, Iterable[str]] | None = None,
        eval_task: str = "translate",
        generation_kwargs: Mapping[str, Any] | None = None,
        language_probe: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("PotsaTrainer needs `remove_unused_columns=False` (batches carry sentence ids).")
        check_frozen(self.model)
        self.pair_ratio = pair_ratio
        self.eval_groups = dict(eval_groups or {})
        self.eval_task = eval_task
        self.generation_kwargs = dict(generation_kwargs or {})
        config = self.model.config
        self.ot_enabled = config.ot_loss_weight > 0
        if self.ot_enabled:
            scheduler = layer_scheduler or build_scheduler_from_config(config, seed=self.args.seed)
            self.add_callback(LayerSchedulerCallback(scheduler))
        self.language_probe = language_probe
        self.pcgrad = self.ot_enabled and config.ot_gradient_surgery == "pcgrad"
        self.cosine_every = config.ot_gradient_cosine_every if self.ot_enabled else 0
        if self.pcgrad or self.cosine_every:
            self._check_split_gradients_supported()
        self._pairs_in_step = 0
        self._running = {"ce": 0.0, "ot": 0.0, "ot_steps": 0.0, "steps": 0.0, "pcgrad_projected": 0.0}
        self._split_step = self._measure_step = False  # this step takes CE and OT gradients apart / measures them
        self._micro_batches_left = 0
        self._step_gradients = StepGradients()
        self._cosines: dict[str, list[float]] = defaultdict(list)

    def _check_split_gradients_supported(self) -> None:
        unsupported = {
            "DeepSpeed": self.is_deepspeed_enabled,
            "FSDP": self.is_fsdp_enabled,
            "DataParallel (several GPUs in one process; launch one process per GPU)": self.args.n_gpu > 1,
            "fp16 loss scaling (use bf16 or fp32)": self.args.fp16,
        }
        found = [name for name, enabled in unsupported.items() if enabled]
        if found:
            raise ValueError(
                f"`ot_gradient_surgery` / `ot_gradient_cosine_every` take per-loss gradients with torch.autograd.grad, "
                f"which does not work with {', '.join(found)}. Turn them off ('none' / 0) or train with plain DDP."
            )

    # ------------------------------------------------------------------------------------------------------ data
    @property
    def layer_callback(self) -> LayerSchedulerCallback:
        """Looked up each time: resuming with `restore_callback_states_from_checkpoint` swaps the instance."""
        return next(c for c in self.callback_handler.callbacks if isinstance(c, LayerSchedulerCallback))

    def get_train_dataloader(self) -> DataLoader:
        """Batches that keep parallel utterances together (OT pairs), each row once per epoch."""
        dataset = self.train_dataset
        sampler = ParallelBatchSampler(
            dataset["sentence_id"],
            dataset["language"],
            batch_size=self._train_batch_size,
            pair_ratio=self.pair_ratio,
            seed=self.args.seed,
            drop_last=self.args.dataloader_drop_last,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)  # under DDP each process gets whole batches (BatchSamplerShard)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Prefetch the step's micro-batches and draw their OT pairs, seeded by the step (resume-safe)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.ot_enabled:
            config = self.model.config
            for index, batch in enumerate(batch_samples):
                generator = torch.Generator().manual_seed(
                    hash((self.args.seed, self.args.process_index, self.state.global_step, index)) % 2**63
                )
                batch["ot_pairs"] = find_parallel_pairs(
                    batch["sentence_ids"], batch["languages"], config.ot_pair_strategy,
                    anchor_language=config.anchor_language, generator=generator,
                )  # fmt: skip
            self._pairs_in_step = sum(len(batch["ot_pairs"]) for batch in batch_samples)
            self._running["ot_steps"] += 1 if self._pairs_in_step else 0
        step = self.state.global_step + 1  # the optimizer step these micro-batches make
        self._measure_step = bool(self.cosine_every) and step % self.cosine_every == 0
        self._split_step = self.pcgrad or self._measure_step
        self._micro_batches_left = len(batch_samples)
        self._running["steps"] += 1
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        metadata = {key: inputs.pop(key, None) for key in METADATA_KEYS}
        pairs = metadata["ot_pairs"]
        align = self.ot_enabled and model.training and pairs is not None
        outputs = model(**inputs, output_qformer_hidden_states=align, num_items_in_batch=num_items_in_batch)
        ce = outputs.loss
        loss = ce
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if model.training:
            self._running["ce"] += ce.detach().item()  # micro-batch terms of one step sum to the step's mean CE
        if align:
            config = self.accelerator.unwrap_model(model).config
            alignment = {
                "pairs": pairs, "strategy": config.ot_pair_strategy, "languages": metadata["languages"],
                "anchor_language": config.anchor_language, "blur": config.ot_blur,
            }  # fmt: skip
            layers = self.layer_callback.scheduler.current_layers
            ot = weighted_alignment_loss(outputs.qformer_hidden_states, layers, **alignment)
            share = len(pairs) / max(self._pairs_in_step, 1)
            ot_term = config.ot_loss_weight * share * ot
            if pairs:
                self.layer_callback.record(ot.detach().item())
                self._running["ot"] += share * ot.detach().item()
            if self._split_step:
                per_layer = {}
                if self._measure_step:
                    scale = config.ot_loss_weight * share
                    per_layer = self._layer_ot_terms(outputs.qformer_hidden_states, alignment, scale)
                loss = self._split_gradient_loss(model, loss, ot_term, per_layer)
            else:
                loss = loss + ot_term
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _layer_ot_terms(
        hidden_states: Sequence[torch.Tensor], alignment: Mapping[str, Any], scale: float
    ) -> dict[int, torch.Tensor]:
        """The OT term as if applied at each Q-Former layer alone (scaled like the applied one): for the cosines."""
        layers = range(1, len(hidden_states))  # index 0 holds the query embeddings
        return {layer: scale * alignment_loss(hidden_states[layer], **alignment) for layer in layers}

    def _trainable_parameters(self, model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter]]:
        named = [(name, p) for name, p in self.accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        return [name for name, _ in named], [p for _, p in named]

    @staticmethod
    def _block_indices(names: Sequence[str], layer: int) -> list[int]:
        """Positions in ``names`` of Q-Former block ``layer``'s parameters (layer l = block l, counted from 1)."""
        prefix = f"qformer.encoder.layer.{layer - 1}."
        return [index for index, name in enumerate(names) if name.startswith(prefix)]

    def _split_gradient_loss(
        self, model: torch.nn.Module, ce_term: torch.Tensor, ot_term: torch.Tensor, layer_ot_terms: Mapping[int, Any]
    ) -> torch.Tensor:
        """The micro-batch's loss value, whose backward gives this step's surgery-treated gradient (module docstring).

        ``layer_ot_terms`` (measured steps only): the OT term at each Q-Former layer alone, whose gradient on that
        layer's block is compared with the CE gradient there.
        """
        names, params = self._trainable_parameters(model)
        ce = torch.autograd.grad(ce_term, params, retain_graph=True, allow_unused=True)
        self._step_gradients.add("ce", ce)
        for layer, term in layer_ot_terms.items():
            block = [params[index] for index in self._block_indices(names, layer)]
            if block:  # a frozen block has nothing to compare
                layer_ot = torch.autograd.grad(term, block, retain_graph=True, allow_unused=True)
                self._step_gradients.add(f"ot_layer_{layer}", layer_ot)
        ot = torch.autograd.grad(ot_term, params, allow_unused=True)
        self._step_gradients.add("ot", ot)
        value = (ce_term + ot_term).detach()
        self._micro_batches_left -= 1
        if self._micro_batches_left:  # gradients arrive with the last micro-batch; zero ones keep backward valid
            reached = [p for p, c, o in zip(params, ce, ot) if c is not None or o is not None]
            return value + sum(p.sum() for p in reached) * 0.0
        gradients = self._finish_split_step(names)
        surrogate = sum((p * g).sum() for p, g in zip(params, gradients) if g is not None)
        return value + (surrogate - surrogate.detach())  # parenthesised: adding and removing it must not round

    def _finish_split_step(self, names: Sequence[str]) -> list[torch.Tensor | None]:
        """Average the step's gradients over processes, record the cosines, and sum them (projected under PCGrad)."""
        sums = self._step_gradients
        sums.all_reduce_mean()
        if self._measure_step:
            self._record_cosines(names, sums.sums["ce"], sums.sums["ot"])
        gradients, projected = sums.step_gradient(self.pcgrad)
        self._running["pcgrad_projected"] += projected
        sums.clear()
        return gradients

    def _record_cosines(self, names: Sequence[str], ce: Gradients, ot: Gradients) -> None:
        """``grad_cosine_ot``: CE vs the applied OT gradient on the parameters both reach (what PCGrad tests);
        ``grad_cosine_layer_{l}``: CE vs the gradient of OT at layer l alone, on Q-Former block l's parameters."""
        measured = {"grad_cosine_ot": gradient_cosine(ce, ot)}
        for name, layer_ot in self._step_gradients.sums.items():
            if name.startswith("ot_layer_"):
                layer = int(name.removeprefix("ot_layer_"))
                block_ce = [ce[index] for index in self._block_indices(names, layer)]
                measured[f"grad_cosine_layer_{layer}"] = gradient_cosine(block_ce, layer_ot)
        for key, cosine in measured.items():
            if cosine is not None:
                self._cosines[key].append(cosine)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss terms, the current OT layer (or group) and the pick counts to training logs, and, when they
        are on, the share of steps PCGrad projected and the mean gradient cosines measured since the last log."""
        steps = self._running["steps"]
        if "loss" in logs and steps:
            config = self.model.config
            logs["ce"] = self._running["ce"] / steps
            if self.ot_enabled:
                ot = self._running["ot"] / max(self._running["ot_steps"], 1)
                logs["ot"] = ot
                logs["weighted_ot"] = config.ot_loss_weight * ot
                scheduler = self.layer_callback.scheduler
                arm = scheduler.current_arm
                if isinstance(arm, tuple):
                    logs["ot_group"] = scheduler.arms.index(arm) + 1  # 1-based position among the groups
                else:
                    logs["ot_layer"] = arm
                logs.update({f"ot_picks_{arm_label(arm)}": n for arm, n in scheduler.pick_counts.items()})
            if self.pcgrad:
                logs["pcgrad_projected_fraction"] = self._running["pcgrad_projected"] / steps
            logs.update({key: sum(values) / len(values) for key, values in self._cosines.items()})
            self._cosines.clear()
            self._running = dict.fromkeys(self._running, 0.0)
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """The Trainer's loss evaluation, plus generation: BLEU / exact match per language and alignment metrics.

        Generation runs on the main process over the whole eval set (results are identical on every process);
        the per-language table is written to `output_dir/eval-step-{N}/results.md`.
        """
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.is_world_process_zero() and dataset is not None:
            model = self.accelerator.unwrap_model(self.model)
            batches = eval_batches(dataset, self.data_collator, self.args.per_device_eval_batch_size, self.eval_task)
            result = evaluate_model(
                model, self.processing_class, batches, self.eval_groups, self.eval_task,
                language_probe=self.language_probe, **self.generation_kwargs,
            )  # fmt: skip
            generation_metrics = result.flat_metrics(prefix=f"{metric_key_prefix}_")
            write_results(result, Path(self.args.output_dir) / f"eval-step-{self.state.global_step}")
            self.log(generation_metrics)
            metrics.update(generation_metrics)
        self.accelerator.wait_for_everyone()
        return metrics


__all__ = ["PotsaTrainer", "build_scheduler_from_config", "check_frozen"]
