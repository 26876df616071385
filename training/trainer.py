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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from .alignment import alignment_loss, find_parallel_pairs
from .data import ParallelBatchSampler
from .evaluation import eval_batches, evaluate_model, write_results
from .layer_scheduler import LayerScheduler, LayerSchedulerCallback, build_layer_scheduler

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
    return build_layer_scheduler(config.ot_layer_scheduler, config.ot_candidate_layers, seed=seed, **extra)


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
        self._pairs_in_step = 0
        self._running = {"ce": 0.0, "ot": 0.0, "ot_steps": 0.0, "steps": 0.0}

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
            layer = self.layer_callback.scheduler.current_layer
            ot = alignment_loss(
                outputs.qformer_hidden_states[layer], pairs, config.ot_pair_strategy,
                languages=metadata["languages"], anchor_language=config.anchor_language, blur=config.ot_blur,
            )  # fmt: skip
            share = len(pairs) / max(self._pairs_in_step, 1)
            loss = loss + config.ot_loss_weight * share * ot
            if pairs:
                self.layer_callback.record(ot.detach().item())
                self._running["ot"] += share * ot.detach().item()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss terms, the current OT layer and the per-layer pick counts to training logs."""
        steps = self._running["steps"]
        if "loss" in logs and steps:
            config = self.model.config
            logs["ce"] = self._running["ce"] / steps
            if self.ot_enabled:
                ot = self._running["ot"] / max(self._running["ot_steps"], 1)
                logs["ot"] = ot
                logs["weighted_ot"] = config.ot_loss_weight * ot
                scheduler = self.layer_callback.scheduler
                logs["ot_layer"] = scheduler.current_layer
                logs.update({f"ot_picks_layer_{layer}": n for layer, n in scheduler.pick_counts.items()})
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
                model, self.processing_class, batches, self.eval_groups, self.eval_task, **self.generation_kwargs
            )
            generation_metrics = result.flat_metrics(prefix=f"{metric_key_prefix}_")
            write_results(result, Path(self.args.output_dir) / f"eval-step-{self.state.global_step}")
            self.log(generation_metrics)
            metrics.update(generation_metrics)
        self.accelerator.wait_for_everyone()
        return metrics


__all__ = ["PotsaTrainer", "build_scheduler_from_config", "check_frozen"]
