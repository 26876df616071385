"""Arguments of `training/run.py`: one flat YAML file plus `key=value` overrides, parsed into four dataclasses.

A key is routed by its name: `TrainingArguments` fields (learning_rate, ...), the `ModelArguments`, `DataArguments`
and `AlignmentArguments` fields below, or a `PotsaConfig` field (use_bias_compensation, num_query_tokens, ...), which
updates the model config. The config holds what the model *is* (architecture and inference settings, Hub remote code);
how it is *trained* (the OT term, its layer scheduler, pairing, gradient surgery) lives here, beside
`TrainingArguments`, the way transformers keeps training knobs out of model configs. An unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, PreTrainedConfig, TrainingArguments

from modeling_potsa import PotsaConfig
from modeling_potsa.processing_potsa import TASKS

from .alignment import ALIGNMENT_STRATEGIES, ANCHOR_STRATEGIES
from .gradient_surgery import GRADIENT_SURGERY
from .layer_scheduler import LayerScheduler
from .layer_scheduler_callback import build_layer_scheduler
from .objectives import ALIGNMENT_LOSSES, PAIR_REDUCTIONS, check_objective
from .ucb_scheduler import UCB_REWARDS, UCB_RULES

SINKHORN_MODES = ("geomloss", "converged")


@dataclass
class ModelArguments:
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "Where the model comes from when `init_from` is empty: a PotsaConfig YAML (with base model ids "
            "or paths; the base weights are loaded from them) or 'tiny' (a random tiny model, for smoke tests)."
        }
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "A previous stage's checkpoint (its trainable parts, config and processor) to start from."},
    )
    model_dtype: str | None = field(default=None, metadata={"help": "dtype of the frozen encoder and LLM."})
    train_bias: bool = field(
        default=True,
        metadata={"help": "Keep the bias table trainable after its estimate, as the paper's code does (False: frozen)."},
    )


@dataclass
class DataArguments:
    data_source: str = field(metadata={"help": "'disk' (save_to_disk dir), 'fleurs', 'manifest' or 'hub'."})
    data_path: str = field(metadata={"help": "Directory, manifest file, or hub repo id of the data."})
    task: str = field(default="translate", metadata={"help": f"Training target, one of {TASKS}."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default="validation",
        metadata={"help": "Split evaluated during training (`eval_strategy`); also the final report's when "
                  "`test_split` is None. None: no evaluation set."},  # fmt: skip
    )
    test_split: str | None = field(
        default=None,
        metadata={"help": "Split of the final report, after training only (never used to choose anything)."},
    )
    train_languages: list[str] | None = field(
        default=None, metadata={"help": "Languages trained with labels (default: the model's languages)."}
    )
    zero_shot_languages: list[str] = field(
        default_factory=list, metadata={"help": "Languages never trained with labels; evaluated as zero-shot."}
    )
    zero_shot_protocol: str = field(
        default="strict",
        metadata={
            "help": "'strict' (paper): zero-shot audio is only used to estimate its bias vector; 'parallel_audio': "
            "its unlabeled training audio also joins the OT pairs."
        },
    )
    report_groups: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={"help": "More named language groups to average in reports, beside 'seen' and 'zero_shot', e.g. "
                  "{related: [it, pt], distant: [de, ko]}."},  # fmt: skip
    )
    report_category_sets: dict[str, list[str]] | None = field(
        default=None,
        metadata={"help": "Named sets of the data's categories pooled in reports, e.g. {number+time: [number, time]} "
                  "(None: that one, when the data has both categories; {}: none)."},  # fmt: skip
    )
    pair_ratio: float = field(default=1.0, metadata={"help": "Share of sentences batched with their parallels."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the train set to this many utterances: whole sentences, spread over it."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the eval set to this many utterances: whole sentences, spread over it."}
    )
    on_bad_data: str = field(default="raise", metadata={"help": "'raise' or 'skip' (counted and logged)."})
    estimate_bias: bool = field(
        default=False, metadata={"help": "Estimate the language bias table from the training audio before training."}
    )
    bias_max_per_language: int | None = field(
        default=None, metadata={"help": "Utterances per language used to estimate its bias (None: all)."}
    )
    encoder_cache_dir: str | None = field(
        default=None, metadata={"help": "Precompute the frozen encoder's outputs here once and train from them."}
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {self.task!r}.")
        if self.zero_shot_protocol not in ("strict", "parallel_audio"):
            raise ValueError(f"`zero_shot_protocol` must be 'strict' or 'parallel_audio', got {self.zero_shot_protocol!r}.")
        if not 0.0 <= self.pair_ratio <= 1.0:
            raise ValueError(f"`pair_ratio` must be in [0, 1], got {self.pair_ratio}.")
        if self.on_bad_data not in ("raise", "skip"):
            raise ValueError(f"`on_bad_data` must be 'raise' or 'skip', got {self.on_bad_data!r}.")

    @property
    def report_split(self) -> str | None:
        """The split of the final report, after training: `test_split`, else `eval_split` (None: no report)."""
        return self.test_split or self.eval_split


@dataclass
class AlignmentArguments:
    """How training aligns parallel utterances: ``loss = CE + ot_loss_weight * OT`` at the Q-Former layer(s) a
    scheduler picks each step, between pairs a strategy draws, with the objective ``alignment_loss`` names (the
    paper's, or a collapse-free one: `objectives.py`). Validated here once, at construction; what needs the model
    (its Q-Former depth, its languages) is checked by `check_model`. The released code's settings: `ucb_scheduler.py`.
    """

    ot_loss_weight: float = field(default=10.0, metadata={"help": "lambda in CE + lambda * OT (the paper: 10)."})
    alignment_loss: str = field(
        default="sinkhorn",
        metadata={
            "help": f"The OT term, one of {ALIGNMENT_LOSSES}: 'sinkhorn' (the paper: mean divergence of parallel "
            "pairs; a constant Q-Former output minimises it), 'infonce_sinkhorn' (InfoNCE over -S / tau against "
            "in-batch negatives) or 'centred_sinkhorn' (divergence of states standardised by the batch)."
        },
    )
    ot_blur: float = field(default=0.05, metadata={"help": "Sinkhorn blur; epsilon = blur ** 2 (the paper: 0.05)."})
    ot_sinkhorn_mode: str = field(
        default="geomloss",
        metadata={"help": "'geomloss' (the paper's solver, stopped early) or 'converged' (the exact divergence)."},
    )
    ot_pair_reduction: str = field(
        default="mean",
        metadata={"help": f"One of {PAIR_REDUCTIONS}: the OT terms of a micro-batch's pairs averaged, summed, or "
                  "summed and halved (the released code); 'sum'/'half_sum' are averaged over a step's micro-batches."},
    )  # fmt: skip
    ot_infonce_temperature: float = field(default=0.05, metadata={"help": "tau of 'infonce_sinkhorn'."})
    ot_num_negatives: int = field(
        default=8,
        metadata={"help": "In-batch negatives per row of 'infonce_sinkhorn' (other sentences in the positive's "
                  "language); it costs rows * (1 + this) divergences per layer."},
    )  # fmt: skip
    ot_variance_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the variance hinge added to the OT term (VICReg-style; 0: off)."},
    )
    ot_variance_target_std: float = field(
        default=0.5,
        metadata={"help": "The hinge's target per-slot std of the unit states over the batch (sqrt of state_var)."},
    )
    ot_candidate_layers: list[int] = field(
        default_factory=lambda: [1, 2, 3],
        metadata={"help": "Q-Former layers (1-based block outputs) the scheduler may align (the paper: 1-3)."},
    )
    ot_layer_scheduler: str = field(
        default="ucb",
        metadata={
            "help": "'ucb' (the paper), 'fixed', 'uniform', 'round_robin' (one arm per step: a layer, or a group of "
            "ot_layer_groups) or 'all' (every candidate layer every step, weighted by ot_layer_weights)."
        },
    )
    ot_layer_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Relative weights of ot_candidate_layers inside an arm of several layers (the 'all' scheduler or "
            "ot_layer_groups), normalised over the arm so lambda keeps its meaning. None: equal."
        },
    )
    ot_layer_groups: list[list[int]] | None = field(
        default=None,
        metadata={"help": "Arms made of several candidate layers, aligned together when picked. None: one per layer."},
    )
    ot_gradient_surgery: str = field(
        default="none",
        metadata={"help": "'pcgrad': project the OT gradient off the CE gradient when they conflict (see "
                  "gradient_surgery.py)."},  # fmt: skip
    )
    ot_gradient_cosine_every: int = field(
        default=0,
        metadata={"help": "Every N optimizer steps, log the cosine between the CE and per-layer OT gradients. 0: never."},
    )
    ot_pair_strategy: str = field(
        default="random_pairwise",
        metadata={"help": f"How pairs are drawn, one of {ALIGNMENT_STRATEGIES} (the paper: random_pairwise)."},
    )
    anchor_language: str = field(default="en", metadata={"help": "Anchor of the English-anchor strategies."})
    ucb_rule: str = field(
        default="potsa",
        metadata={"help": f"One of {UCB_RULES}: sample softmax((Q + bonus) / T) (the paper's intent) or "
                  "softmax((bonus - Q) / T) (the released code, which prefers the layer whose loss falls least)."},
    )  # fmt: skip
    ucb_reward: str = field(
        default="loss_drop",
        metadata={"help": f"One of {tuple(UCB_REWARDS)}: the fall of the OT loss (the paper; a collapse earns it) "
                  "or of ot_ratio (parallel / non-parallel divergence; measured every step at the chosen layers)."},
    )  # fmt: skip
    ucb_normalize_reward: bool = field(
        default=False,
        metadata={"help": "Divide UCB rewards by their running RMS, so they are on the exploration bonus's scale."},
    )
    ucb_beta: float = field(default=1.0, metadata={"help": "UCB exploration weight."})
    ucb_ema: float = field(default=0.9, metadata={"help": "Weight of the old value in UCB's reward EMA."})
    ucb_temperature_floor: float = field(default=0.05, metadata={"help": "Lowest UCB softmax temperature."})
    ucb_temperature_decay: float = field(
        default=0.999, metadata={"help": "UCB softmax temperature at step t: max(floor, decay ** t)."}
    )

    def __post_init__(self) -> None:
        if self.ot_loss_weight < 0:
            raise ValueError(f"`ot_loss_weight` (lambda) must be >= 0, got {self.ot_loss_weight}.")
        if self.ot_blur <= 0:
            raise ValueError(f"`ot_blur` must be > 0, got {self.ot_blur}.")
        if self.ot_pair_strategy not in ALIGNMENT_STRATEGIES:
            raise ValueError(f"`ot_pair_strategy` must be one of {ALIGNMENT_STRATEGIES}, got {self.ot_pair_strategy!r}.")
        if self.ot_gradient_surgery not in GRADIENT_SURGERY:
            raise ValueError(
                f"`ot_gradient_surgery` must be one of {GRADIENT_SURGERY}, got {self.ot_gradient_surgery!r}."
            )
        every = self.ot_gradient_cosine_every
        if isinstance(every, bool) or not (isinstance(every, int) and every >= 0):
            raise ValueError(f"`ot_gradient_cosine_every` must be an integer >= 0 (0 = off), got {every!r}.")
        if self.ot_sinkhorn_mode not in SINKHORN_MODES:
            raise ValueError(f"`ot_sinkhorn_mode` must be one of {SINKHORN_MODES}, got {self.ot_sinkhorn_mode!r}.")
        negatives = self.ot_num_negatives
        if isinstance(negatives, bool) or not (isinstance(negatives, int) and negatives >= 1):
            raise ValueError(f"`ot_num_negatives` must be an integer >= 1, got {negatives!r}.")
        try:
            check_objective(self.alignment_loss, self.ot_pair_reduction, self.ot_infonce_temperature,
                            self.ot_variance_weight, self.ot_variance_target_std)  # fmt: skip
        except ValueError as error:
            raise ValueError(f"Invalid objective settings (alignment_loss, ot_pair_reduction, ot_infonce_temperature, "
                             f"ot_variance_weight, ot_variance_target_std): {error}") from None  # fmt: skip
        if self.ucb_rule not in UCB_RULES:
            raise ValueError(f"`ucb_rule` must be one of {UCB_RULES}, got {self.ucb_rule!r}.")
        if self.ucb_reward not in UCB_REWARDS:
            raise ValueError(f"`ucb_reward` must be one of {tuple(UCB_REWARDS)}, got {self.ucb_reward!r}.")
        self.layer_scheduler(seed=0)  # the scheduler checks its layers, weights, groups and hyper-parameters

    @property
    def enabled(self) -> bool:
        """Whether training has an OT term at all (stages 1-2 set lambda to 0)."""
        return self.ot_loss_weight > 0

    def layer_scheduler(self, seed: int) -> LayerScheduler:
        """The scheduler these arguments name, seeded (use the same seed on every rank)."""
        ucb = {
            "rule": self.ucb_rule,
            "reward": self.ucb_reward,
            "normalize_reward": self.ucb_normalize_reward,
            "beta": self.ucb_beta,
            "ema": self.ucb_ema,
            "temperature_floor": self.ucb_temperature_floor,
            "temperature_decay": self.ucb_temperature_decay,
        }
        return build_layer_scheduler(
            self.ot_layer_scheduler,
            self.ot_candidate_layers,
            seed=seed,
            layer_weights=self.ot_layer_weights,
            groups=self.ot_layer_groups,
            **(ucb if self.ot_layer_scheduler == "ucb" else {}),
        )

    def objective_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `alignment.alignment_loss` these settings name (beside pairs and negatives)."""
        return {
            "objective": self.alignment_loss, "blur": self.ot_blur, "mode": self.ot_sinkhorn_mode,
            "reduction": self.ot_pair_reduction, "temperature": self.ot_infonce_temperature,
            "variance_weight": self.ot_variance_weight, "variance_target_std": self.ot_variance_target_std,
        }  # fmt: skip

    def check_model(self, config: PotsaConfig) -> None:
        """Refuse settings this model cannot train with: layers it lacks, an anchor language it does not know."""
        if not self.enabled:
            return
        outside = [layer for layer in self.ot_candidate_layers if layer > config.num_qformer_layers]
        if outside:
            raise ValueError(
                f"OT candidate layers {outside} are outside the Q-Former's layers 1..{config.num_qformer_layers}."
            )
        if self.ot_pair_strategy in ANCHOR_STRATEGIES and self.anchor_language not in config.languages:
            raise ValueError(f"`anchor_language` {self.anchor_language!r} is not in the model's languages "
                             f"{config.languages}.")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values, for results.json and the model card."""
        return dataclasses.asdict(self)


@dataclass
class PotsaTrainingArguments(TrainingArguments):
    """`TrainingArguments` with POTSA's defaults (batches carry sentence ids; eval loss only, then generation)."""

    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: OT needs sentence ids."})
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation computes metrics by generation."})
    generation_num_beams: int = field(default=1, metadata={"help": "Beams in evaluation generation."})
    generation_max_new_tokens: int = field(default=64, metadata={"help": "Token limit in evaluation generation."})
    generation_no_repeat_ngram_size: int = field(default=0, metadata={"help": "n-gram blocking in evaluation."})

    def generation_kwargs(self) -> dict[str, Any]:
        return {
            "num_beams": self.generation_num_beams,
            "max_new_tokens": self.generation_max_new_tokens,
            "no_repeat_ngram_size": self.generation_no_repeat_ngram_size,
        }


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as a string; every config writer expects a float."""
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    return value


def _parse_value(text: str) -> Any:
    """`key=value` values are YAML scalars or lists: 1e-5, true, [1, 2, 3], ./path."""
    return yaml.safe_load(text)


def load_settings(config_path: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """The YAML file's keys updated by `key=value` overrides (later wins)."""
    settings = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key:
            raise ValueError(f"Override {override!r} is not of the form key=value.")
        settings[key.strip()] = _parse_value(value)
    return {key: _numbers(value) for key, value in settings.items()}


@dataclass
class Settings:
    """Everything one stage run is told, parsed and validated."""

    model: ModelArguments
    data: DataArguments
    alignment: AlignmentArguments
    training: PotsaTrainingArguments
    config_overrides: dict[str, Any]


_ARGUMENT_CLASSES = (ModelArguments, DataArguments, AlignmentArguments, PotsaTrainingArguments)


def parse_settings(settings: dict[str, Any]) -> Settings:
    """Route every key to its dataclass or to the model-config overrides; unknown keys raise."""
    inherited = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    model_config_fields = {f.name for f in dataclasses.fields(PotsaConfig)} - inherited
    argument_fields = {f.name for cls in _ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    model_overrides = {k: v for k, v in settings.items() if k in model_config_fields and k not in argument_fields}
    unknown = sorted(set(settings) - argument_fields - model_config_fields)
    if unknown:
        raise ValueError(f"Unknown settings {unknown}: not a training, data, alignment, model or PotsaConfig field.")
    arguments = {k: v for k, v in settings.items() if k not in model_overrides}
    model_args, data_args, alignment_args, training_args = HfArgumentParser(_ARGUMENT_CLASSES).parse_dict(arguments)
    return Settings(model_args, data_args, alignment_args, training_args, model_overrides)


__all__ = [
    "AlignmentArguments",
    "DataArguments",
    "ModelArguments",
    "PotsaTrainingArguments",
    "Settings",
    "load_settings",
    "parse_settings",
]
