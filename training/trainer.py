"""PotsaTrainer: transformers' Trainer with POTSA's joint loss, parallel batches and generation-based evaluation.

    loss = CE(translation tokens) + lambda * OT(Q-Former states of parallel utterances at the scheduled layer)

Scaling, so that gradient accumulation and data parallelism give the update of one large batch:
- CE is a sum over target tokens divided by `num_items_in_batch` (all target tokens of the optimizer step, over
  micro-batches and, with `average_tokens_across_devices`, processes; then multiplied by the number of processes
  because DDP averages gradients). This is transformers' own convention for models that accept loss kwargs.
- OT is a mean over the pairs of a micro-batch, weighted by that micro-batch's share of the step's pairs (the
  pairs of all micro-batches, with their negatives and non-parallel controls, are drawn up front in
  `get_batch_samples`, from a generator seeded by the step, so a resumed run draws the same ones). With
  ``ot_pair_reduction`` "sum" / "half_sum" a micro-batch's OT is its (halved) sum over pairs, as the released code
  computes it per forward pass, and the step's OT is their mean over the step's micro-batches.
Both terms are therefore already scaled for accumulation (`loss_is_scaled_for_ga = True`).

Logged terms are on the logged loss's scale for any number of processes: the Trainer logs the mean over processes
of each process's loss, so ``ce`` and ``weighted_ot`` are the same means of each process's terms, and
``loss = ce + weighted_ot`` holds (``ot`` is the unweighted OT loss, averaged over the steps that had pairs).

Layers: the scheduler's ``current_layers`` are ``(layer, weight)`` pairs (one layer of weight 1 in the paper's
setting; a group or a fixed set of layers otherwise, see `layer_scheduler.py`), and the OT term is their weighted
sum of the objective ``alignment_loss`` names (`objectives.py`). The scheduler is fed its `signal` per micro-batch:
the OT term, or (``ucb_reward="ratio_drop"``) the arm's ``ot_ratio``, measured without gradients on the micro-batch's
pairs and non-parallel controls. Gradient surgery and CE/OT gradient cosines are
`gradient_surgery.SplitGradientStep`'s.

Diagnostics (`alignment_diagnostics.py`): every training log carries ``state_var``, ``ot_par``, ``ot_nonpar`` and
``ot_ratio`` of every candidate layer (``state_var_layer_1``, ...), computed without gradients when the log is
written, from the last micro-batch before it (its states are kept, detached, for that), averaged over processes.
Measuring one batch per log keeps the cost at one `sinkhorn_divergence` call of ``layers x 2 x pairs`` per log.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from .alignment import (
    alignment_loss,
    contrast_rows,
    draw_negatives,
    find_parallel_pairs,
    nonparallel_pairs,
    weighted_alignment_loss,
)
from .alignment_diagnostics import arm_ratio, batch_statistics, empty_statistics, statistics_logs
from .arguments import AlignmentArguments
from .distributed import all_reduce_sum
from .evaluation import eval_batches, evaluate_model, write_results
from .gradient_surgery import SplitGradientStep
from .layer_scheduler import LayerScheduler, arm_label
from .layer_scheduler_callback import LayerSchedulerCallback
from .sampler import ParallelBatchSampler

logger = logging.getLogger(__name__)

METADATA_KEYS = ("sentence_ids", "languages", "ot_pairs", "ot_negatives", "ot_nonparallel", "references")
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


class RunningTerms:
    """Sums of logged loss terms since the last log, and the counts they are averaged over, reduced over processes
    when read (every process must read them together, as the Trainer's logging step does)."""

    def __init__(self) -> None:
        self.sums: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()

    def add(self, name: str, value: float) -> None:
        self.sums[name] += value

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def pop_means(self, denominators: Mapping[str, str]) -> dict[str, float]:
        """``{term: global sum / global count}`` for each ``term -> count name`` in ``denominators``, then reset."""
        names = sorted(set(denominators) | set(denominators.values()))
        values = [self.sums[name] if name in denominators else self.counts[name] for name in names]
        totals = dict(zip(names, all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()))
        self.sums.clear()
        self.counts.clear()
        return {term: totals[term] / totals[count] for term, count in denominators.items() if totals[count]}


class PotsaTrainer(Trainer):
    """`Trainer` + POTSA's OT loss, logged per term, with a layer scheduler callback.

    Args:
        alignment_args (`AlignmentArguments`, *optional*): the OT term's settings (lambda, blur, layers, scheduler,
            pairing, gradient surgery); defaults to the paper's.
        layer_scheduler (`LayerScheduler`, *optional*): overrides the scheduler `alignment_args` name.
        pair_ratio (`float`, *optional*, defaults to 1.0): share of sentences whose parallel utterances are batched
            together (see `ParallelBatchSampler`).
        eval_groups (`Mapping[str, Iterable[str]]`, *optional*): named language groups averaged in evaluation,
            e.g. {"seen": [...], "zero_shot": [...]}.
        eval_category_sets (`Mapping[str, Sequence[str]]`, *optional*): named sets of categories pooled in
            evaluation (see `score_predictions`; None: number+time when the data has both).
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
        alignment_args: AlignmentArguments | None = None,
        layer_scheduler: LayerScheduler | None = None,
        pair_ratio: float = 1.0,
        eval_groups: Mapping[str, Iterable[str]] | None = None,
        eval_category_sets: Mapping[str, Sequence[str]] | None = None,
        eval_task: str = "translate",
        generation_kwargs: Mapping[str, Any] | None = None,
        language_probe: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("PotsaTrainer needs `remove_unused_columns=False` (batches carry sentence ids).")
        check_frozen(self.model)
        self.alignment_args = alignment_args or AlignmentArguments()
        self.alignment_args.check_model(self.model.config)
        self.pair_ratio = pair_ratio
        self.eval_groups = dict(eval_groups or {})
        self.eval_category_sets = eval_category_sets
        self.eval_task = eval_task
        self.generation_kwargs = dict(generation_kwargs or {})
        self.language_probe = language_probe
        self.ot_enabled = self.alignment_args.enabled
        if self.ot_enabled:
            self.add_callback(LayerSchedulerCallback(layer_scheduler or self.alignment_args.layer_scheduler(self.args.seed)))
        surgery = self.alignment_args.ot_gradient_surgery == "pcgrad"
        cosine_every = self.alignment_args.ot_gradient_cosine_every
        self.split_gradients = SplitGradientStep(self.ot_enabled and surgery, cosine_every if self.ot_enabled else 0)
        if self.split_gradients.needed:
            SplitGradientStep.check_supported(self.is_deepspeed_enabled, self.is_fsdp_enabled, self.args.n_gpu,
                                              self.args.fp16)  # fmt: skip
        self._pairs_in_step = 0
        self._micro_batches_in_step = 0
        self._terms = RunningTerms()
        self._diagnosed_batch: tuple[dict[int, torch.Tensor], list, list] | None = None  # (states, pairs, controls)

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
            alignment = self.alignment_args
            for index, batch in enumerate(batch_samples):
                generator = torch.Generator().manual_seed(
                    hash((self.args.seed, self.args.process_index, self.state.global_step, index)) % 2**63
                )
                sentence_ids, languages = batch["sentence_ids"], batch["languages"]
                pairs = find_parallel_pairs(sentence_ids, languages, alignment.ot_pair_strategy,
                                            anchor_language=alignment.anchor_language, generator=generator)  # fmt: skip
                batch["ot_pairs"] = pairs
                if alignment.alignment_loss == "infonce_sinkhorn":
                    rows = contrast_rows(pairs, alignment.ot_pair_strategy)
                    batch["ot_negatives"] = draw_negatives(sentence_ids, languages, rows, alignment.ot_num_negatives,
                                                           generator)  # fmt: skip
                batch["ot_nonparallel"] = nonparallel_pairs(sentence_ids, languages, pairs, generator)
            self._pairs_in_step = sum(len(batch["ot_pairs"]) for batch in batch_samples)
            self._micro_batches_in_step = len(batch_samples)
            self._terms.count("ot_steps", 1 if self._pairs_in_step else 0)
        self.split_gradients.begin_step(self.state.global_step + 1, len(batch_samples))
        self._terms.count("steps")
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------------------------------------------ loss
    def _alignment_kwargs(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        alignment = self.alignment_args
        return {
            "pairs": metadata["ot_pairs"], "strategy": alignment.ot_pair_strategy, "languages": metadata["languages"],
            "anchor_language": alignment.anchor_language, "negatives": metadata["ot_negatives"],
            **alignment.objective_kwargs(),
        }  # fmt: skip

    def _share(self, pairs: Sequence[tuple[int, int]]) -> float:
        """This micro-batch's weight in the step's OT term (module docstring)."""
        if self.alignment_args.ot_pair_reduction == "mean":
            return len(pairs) / max(self._pairs_in_step, 1)
        return 1 / max(self._micro_batches_in_step, 1)

    def _statistics(
        self,
        states: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
        layers: Sequence[int],
        pairs: Sequence[tuple[int, int]],
        controls: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """`batch_statistics` at ``layers`` with the loss's blur and solver."""
        alignment = self.alignment_args
        return batch_statistics(states, layers, pairs, controls, blur=alignment.ot_blur,
                                mode=alignment.ot_sinkhorn_mode)  # fmt: skip

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
        loss = outputs.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if model.training:
            self._terms.add("ce", loss.detach().item())  # micro-batch terms of one step sum to the step's CE
        if align:
            loss = self._add_alignment(model, loss, outputs.qformer_hidden_states, metadata)
        return (loss, outputs) if return_outputs else loss

    def _add_alignment(
        self,
        model: torch.nn.Module,
        ce: torch.Tensor,
        hidden_states: Sequence[torch.Tensor],
        metadata: Mapping[str, Any],
    ) -> torch.Tensor:
        """CE + this micro-batch's share of lambda * OT, through the gradient split on the steps that need it; feeds
        the scheduler and keeps the states for the next log's diagnostics."""
        weight = self.alignment_args.ot_loss_weight
        kwargs = self._alignment_kwargs(metadata)
        pairs, controls = metadata["ot_pairs"], metadata["ot_nonparallel"]
        scheduler = self.layer_callback.scheduler
        ot = weighted_alignment_loss(hidden_states, scheduler.current_layers, **kwargs)
        share = self._share(pairs)
        ot_term = weight * share * ot
        if pairs:
            self._record_signal(scheduler, hidden_states, pairs, controls, ot)
            self._terms.add("ot", share * ot.detach().item())
            self._terms.add("weighted_ot", ot_term.detach().item())
        layers = scheduler.candidate_layers
        self._diagnosed_batch = ({layer: hidden_states[layer].detach() for layer in layers}, pairs, controls)
        if not self.split_gradients.splitting:
            return ce + ot_term
        per_layer = {}
        if self.split_gradients.measuring:
            layers = range(1, len(hidden_states))  # index 0 holds the query embeddings
            per_layer = {layer: weight * share * alignment_loss(hidden_states[layer], **kwargs) for layer in layers}
        trainable = [(n, p) for n, p in self.accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        return self.split_gradients.surrogate_loss(trainable, ce, ot_term, per_layer)

    def _record_signal(
        self,
        scheduler: LayerScheduler,
        hidden_states: Sequence[torch.Tensor],
        pairs: Sequence[tuple[int, int]],
        controls: Sequence[tuple[int, int]],
        ot: torch.Tensor,
    ) -> None:
        """Give the scheduler this micro-batch's measurement of its `signal` (none when it cannot be measured)."""
        if scheduler.signal == "ot":
            self.layer_callback.record(ot.detach().item())
            return
        layers, weights = zip(*scheduler.current_layers)
        ratio = arm_ratio(self._statistics(hidden_states, layers, pairs, controls), weights)
        if ratio is not None:
            self.layer_callback.record(ratio)

    def _diagnostics(self) -> dict[str, float]:
        """The candidate layers' statistics on the last training micro-batch, averaged over processes (every process
        must call this together, as the training log does)."""
        layers = self.layer_callback.scheduler.candidate_layers
        if self._diagnosed_batch is None:  # this process trained no aligned micro-batch since the last log
            totals = empty_statistics(len(layers))
        else:
            states, pairs, controls = self._diagnosed_batch
            totals = self._statistics(states, layers, pairs, controls)
        self._diagnosed_batch = None
        return statistics_logs(all_reduce_sum(totals), layers)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss terms, the alignment diagnostics per candidate layer, the current OT layer (or group) and the
        pick counts to training logs, and, when they are on, the share of steps PCGrad projected and the mean
        gradient cosines measured since the last log."""
        if "loss" in logs:  # a training log, made on every process at once: the terms' reduction can run
            means = self._terms.pop_means({"ce": "steps", "weighted_ot": "steps", "ot": "ot_steps"})
            logs.update({key: means[key] for key in ("ce", "ot", "weighted_ot") if key in means})
            if self.ot_enabled:
                logs.update(self._diagnostics())
                scheduler = self.layer_callback.scheduler
                arm = scheduler.current_arm
                if isinstance(arm, tuple):
                    logs["ot_group"] = scheduler.arms.index(arm) + 1  # 1-based position among the groups
                elif arm is not None:
                    logs["ot_layer"] = arm
                logs.update({f"ot_picks_{arm_label(arm)}": n for arm, n in scheduler.pick_counts.items()})
            logs.update(self.split_gradients.pop_metrics())
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
                language_probe=self.language_probe, category_sets=self.eval_category_sets, **self.generation_kwargs,
            )  # fmt: skip
            generation_metrics = result.flat_metrics(prefix=f"{metric_key_prefix}_")
            write_results(result, Path(self.args.output_dir) / f"eval-step-{self.state.global_step}")
            self.log(generation_metrics)
            metrics.update(generation_metrics)
        self.accelerator.wait_for_everyone()
        return metrics


__all__ = ["PotsaTrainer", "RunningTerms", "check_frozen"]
