"""What a POTSA checkpoint holds, and how it is loaded.

A checkpoint owns only what training changed: the Q-Former, its queries, the projector, the bias table (and LoRA
adapters, or the LLM weights merged adapters changed). The frozen encoder and LLM are reloaded from their own Hub
ids or paths (`config.encoder_model_id` / `config.text_model_id`), the way Ultravox ships, so a checkpoint on top of
a 7B LLM is a few hundred MB; `save_pretrained(..., include_base_weights=True)` writes a fully offline bundle
instead. `PotsaCheckpointMixin` adds this to `PotsaForSpeechTranslation`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from .configuration_potsa import CUSTOM_PIPELINES, PotsaConfig
from .speech_encoders import speech_encoder_family

logger = logging.get_logger(__name__)

# What must agree between the POTSA config and a base model loaded from its id (fields a model lacks are None).
_ENCODER_FIELDS = (
    "model_type", "d_model", "hidden_size", "num_mel_bins", "conv_kernel", "conv_stride", "feat_extract_norm",
)  # fmt: skip
_LLM_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def _config_value(config: Any, field_name: str) -> Any:
    """A config field as config.json stores it: tuples (wav2vec2's `conv_kernel`) are lists once saved."""
    value = getattr(config, field_name, None)
    return list(value) if isinstance(value, tuple) else value


def _check_same_architecture(name: str, expected: Any, loaded: Any, fields: tuple[str, ...]) -> None:
    for field_name in fields:
        expected_value, loaded_value = _config_value(expected, field_name), _config_value(loaded, field_name)
        if expected_value != loaded_value:
            raise ValueError(
                f"The {name} loaded from its id has {field_name}={loaded_value} but the POTSA config says "
                f"{expected_value}; the checkpoint was trained on another base model."
            )


def mark_initialized(module: nn.Module) -> None:
    """Pretrained sub-models must survive `post_init`, which would otherwise re-initialise every weight."""
    for submodule in module.modules():
        submodule._is_hf_initialized = True


class PotsaCheckpointMixin:
    """Loading and saving for `PotsaForSpeechTranslation` (module docstring): base models from their ids, the
    checkpoint's own weights over them."""

    @classmethod
    def from_base_models(
        cls, config: PotsaConfig, dtype: torch.dtype | str | None = None, **kwargs: Any
    ) -> Any:
        """A fresh model (new Q-Former, projector, zero bias) on top of the pretrained encoder and LLM named in
        `config.encoder_model_id` / `config.text_model_id`: how stage 1 starts."""
        if not (config.encoder_model_id and config.text_model_id):
            raise ValueError("`from_base_models` needs `encoder_model_id` and `text_model_id` in the config.")
        speech_encoder, language_model = cls._load_base_models(config, dtype=dtype, **kwargs)
        return cls(config, speech_encoder=speech_encoder, language_model=language_model)

    @classmethod
    def _load_base_models(cls, config: PotsaConfig, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedModel]:
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        family = speech_encoder_family(config.encoder_config)
        speech_encoder = family.from_pretrained(config.encoder_model_id, **kwargs)
        language_model = AutoModelForCausalLM.from_pretrained(config.text_model_id, **kwargs)
        _check_same_architecture("speech encoder", config.encoder_config, speech_encoder.config, _ENCODER_FIELDS)
        _check_same_architecture("LLM", config.text_config, language_model.config, _LLM_FIELDS)
        return speech_encoder, language_model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """Load a POTSA checkpoint; the frozen encoder and LLM come from their own ids unless the checkpoint
        bundles them (`save_pretrained(..., include_base_weights=True)`)."""
        config = kwargs.pop("config", None)
        if not isinstance(config, PreTrainedConfig):  # remote code may hand in a PotsaConfig from another module
            hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            hub_kwargs = {key: kwargs[key] for key in hub_keys if key in kwargs}
            config = PotsaConfig.from_pretrained(config or pretrained_model_name_or_path, **hub_kwargs)
        buffers = []
        if not config.base_weights_in_checkpoint and config.encoder_model_id and config.text_model_id:
            base_keys = ("dtype", "cache_dir", "local_files_only", "token", "attn_implementation")
            base_models = cls._load_base_models(config, **{key: kwargs[key] for key in base_keys if key in kwargs})
            kwargs["speech_encoder"], kwargs["language_model"] = base_models
            # Loading re-creates every non-persistent buffer (e.g. rotary frequencies) as if it were new; the base
            # models already hold the right values, so put them back afterwards.
            buffers = [
                (module, name, buffer.clone())
                for base_model in base_models
                for module in base_model.modules()
                for name, buffer in module.named_buffers(recurse=False)
                if name in module._non_persistent_buffers_set
            ]
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded  # (model, loading_info) when asked
        model.freeze_base_models()  # bundled base weights come back as fresh, trainable parameters
        for module, name, buffer in buffers:
            module.register_buffer(name, buffer.to(getattr(module, name).device), persistent=False)
        return loaded

    def _external_weight_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes whose frozen weights are reloaded from a base model id rather than stored."""
        if self.config.base_weights_in_checkpoint:
            return ()
        prefixes = []
        if self.config.encoder_model_id:
            prefixes.append("speech_encoder.")
        if self.config.text_model_id:
            prefixes.append("language_model.")
        return tuple(prefixes)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The weights this checkpoint owns: everything except frozen base-model weights that an id reloads, but
        with the LLM weights that merged LoRA adapters changed (`config.merged_lora_modules`, matched as peft
        matches `target_modules`: by module-name suffix).

        `from_pretrained` derives the expected keys from this too, so frozen base weights are neither expected
        in the checkpoint nor re-initialised over the pretrained ones, and merged weights replace the base's."""
        state = super().state_dict(*args, **kwargs)
        external = self._external_weight_prefixes()
        if not external:
            return state
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + name for name, param in self.named_parameters() if param.requires_grad}
        external = tuple(prefix + p for p in external)
        merged = tuple(f".{module}.weight" for module in self.config.merged_lora_modules)
        return {
            key: value
            for key, value in state.items()
            if key in trainable
            or not key.startswith(external)
            or (merged and key.startswith(prefix + "language_model.") and key.endswith(merged))
        }

    def save_pretrained(self, save_directory: Any, *args: Any, include_base_weights: bool = False, **kwargs: Any):
        """Save config, code files and the trainable weights (safetensors).

        Args:
            include_base_weights (`bool`, *optional*, defaults to `False`):
                Also store the frozen encoder and LLM, for fully offline bundles (the tiny demo). Never use it for
                a checkpoint on top of a 7B LLM that is on the Hub already.
        """
        self.config.custom_pipelines = {task: dict(spec) for task, spec in CUSTOM_PIPELINES.items()}
        if not include_base_weights or self.config.base_weights_in_checkpoint:
            super().save_pretrained(save_directory, *args, **kwargs)
        else:
            self.config.base_weights_in_checkpoint = True
            try:
                super().save_pretrained(save_directory, *args, **kwargs)
            finally:
                self.config.base_weights_in_checkpoint = False
        self._save_pipeline_code(save_directory)

    @staticmethod
    def _save_pipeline_code(save_directory: Any) -> None:
        """config.json names the speech-translation pipeline (`custom_pipelines`), so that `pipeline("translation",
        model=dir, trust_remote_code=True)` finds it: copy its file and the files it imports beside the model code
        (the model itself does not import the pipeline)."""
        pipeline_file = Path(__file__).with_name("pipeline_potsa.py")
        if not pipeline_file.is_file():  # remote code loaded without its pipeline file: nothing to copy
            logger.warning("pipeline_potsa.py is not beside this model's code; the saved folder lacks the pipeline.")
            return
        for source in (pipeline_file, *map(Path, get_relative_import_files(pipeline_file))):
            shutil.copy(source, Path(save_directory) / source.name)


__all__ = ["PotsaCheckpointMixin", "mark_initialized"]
