"""Arguments of `training/run.py`: one flat YAML file plus `key=value` overrides, parsed into three dataclasses.

A key is routed by its name: `TrainingArguments` fields (learning_rate, ...), `ModelArguments` / `DataArguments`
fields below, or any `PotsaConfig` field (ot_loss_weight, ot_candidate_layers, use_bias_compensation, ...), which
updates the model config, so the checkpoint records how it was trained. An unknown key is an error, not ignored.
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

TASKS = ("transcribe", "translate", "chain")


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


@dataclass
class DataArguments:
    data_source: str = field(metadata={"help": "'disk' (save_to_disk dir), 'fleurs', 'manifest' or 'hub'."})
    data_path: str = field(metadata={"help": "Directory, manifest file, or hub repo id of the data."})
    task: str = field(default="translate", metadata={"help": f"Training target, one of {TASKS}."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default="validation", metadata={"help": "Split to evaluate on (None: skip)."})
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


def parse_settings(
    settings: dict[str, Any],
) -> tuple[ModelArguments, DataArguments, PotsaTrainingArguments, dict[str, Any]]:
    """Route every key to its dataclass or to the model-config overrides; unknown keys raise."""
    inherited = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    model_config_fields = {f.name for f in dataclasses.fields(PotsaConfig)} - inherited
    argument_fields = {
        f.name for cls in (ModelArguments, DataArguments, PotsaTrainingArguments) for f in dataclasses.fields(cls)
    }
    model_overrides = {k: v for k, v in settings.items() if k in model_config_fields and k not in argument_fields}
    unknown = sorted(set(settings) - argument_fields - model_config_fields)
    if unknown:
        raise ValueError(f"Unknown settings {unknown}: not a training, data, model or PotsaConfig field.")
    arguments = {k: v for k, v in settings.items() if k not in model_overrides}
    parser = HfArgumentParser((ModelArguments, DataArguments, PotsaTrainingArguments))
    model_args, data_args, training_args = parser.parse_dict(arguments)
    return model_args, data_args, training_args, model_overrides


__all__ = ["DataArguments", "ModelArguments", "PotsaTrainingArguments", "load_settings", "parse_settings"]
