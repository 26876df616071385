"""The frozen LLM inside POTSA: optional LoRA adapters (through peft), and gradient checkpointing of its layers while it
stays in eval mode.

transformers checkpoints a layer only in training mode, but POTSA keeps its frozen LLM in eval mode (no dropout), and
the loss gradient must still cross every LLM layer to reach the soft prompt: without checkpointing those layers keep
all their activations for the backward pass, by far the largest share of training memory
(`benchmarks/memory_estimate.py`). So the model gives the frozen layers the training flag that makes transformers
checkpoint them, and a checkpoint function that computes them in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

from .configuration_potsa import PotsaConfig


def checkpoint_in_eval_mode(
    layer: nn.Module, checkpoint_function: Callable, layer_forward: Callable, *inputs: Any
) -> Any:
    """`checkpoint_function(layer_forward, *inputs)` with `layer` in eval mode while it computes, in the forward
    pass and in the backward pass's recomputation. A frozen layer carries the training flag only so that
    transformers checkpoints it; some layers (OPT's, Falcon's) read that flag for dropout themselves."""

    def forward_in_eval_mode(*args: Any) -> Any:
        training, layer.training = layer.training, False
        try:
            return layer_forward(*args)
        finally:
            layer.training = training

    return checkpoint_function(forward_in_eval_mode, *inputs)


def checkpointed_layers(language_model: nn.Module) -> list[GradientCheckpointingLayer]:
    """The LLM's layers that gradient checkpointing recomputes (those whose checkpointing is enabled)."""
    return [
        layer
        for layer in language_model.modules()
        if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing
    ]


def add_lora(language_model: nn.Module, config: PotsaConfig) -> nn.Module:
    """LoRA adapters on the LLM modules named in `config.lora_target_modules`. The default (q_proj, k_proj, v_proj,
    o_proj) suits Qwen2, Llama, Mistral and Gemma; other families name their projections differently (GPT-2:
    c_attn, c_proj), and a name this LLM lacks is an error rather than a silently smaller adapter."""
    # Optional, only for LoRA. In a `try`, which transformers' remote-code import check skips: a bare import here
    # would make every checkpoint, LoRA or not, refuse to load with trust_remote_code where peft is missing.
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError(
            "This model has LoRA adapters (`use_lora=True`), which need the `peft` package: `pip install peft`. "
            "A model published by examples/push_to_hub.py without `--unmerged` has them merged and needs no peft."
        ) from error

    projections = {
        name.rsplit(".", 1)[-1]
        for name, module in language_model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }
    missing = sorted(set(config.lora_target_modules) - projections)
    if missing:
        raise ValueError(
            f"`lora_target_modules` {missing} are not modules of this {language_model.config.model_type} LLM; its "
            f"projections are {sorted(projections)} (GPT-2: ['c_attn', 'c_proj']). Set `lora_target_modules`."
        )

    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(language_model, lora_config)


__all__ = ["add_lora", "checkpoint_in_eval_mode", "checkpointed_layers"]
