"""What POTSA's forward pass and its speech half (`encode`) return: transformers-style output dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import ModelOutput


@dataclass
class PotsaOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy on target tokens (labels != -100), when `labels` is given.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            LLM logits over the merged sequence (prompt, soft prompt, target).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The LLM's: its input embeddings (index 0, the soft prompt merged in) and each decoder layer's output,
            `num_hidden_layers + 1` tensors of shape `(batch_size, sequence_length, llm_hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            The LLM's self-attention weights, one `(batch_size, num_heads, sequence_length, sequence_length)` tensor
            per decoder layer.
        qformer_hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True` or
            `output_qformer_hidden_states=True`):
            `num_qformer_layers + 1` tensors of shape `(batch_size, num_query_tokens, qformer_hidden_size)`: the
            query embeddings (index 0) and each block's output (index l = layer l, what the OT loss aligns).
        qformer_attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            Self-attention weights among the queries, one `(batch_size, num_heads, num_query_tokens,
            num_query_tokens)` tensor per Q-Former layer.
        qformer_cross_attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            Cross-attention weights of the queries over the encoder frames, one `(batch_size, num_heads,
            num_query_tokens, frames)` tensor per Q-Former layer with cross-attention.
        pooled_speech (`torch.FloatTensor` of shape `(batch_size, encoder_hidden_size)`, *optional*):
            Encoder frames averaged over valid frames *before* bias compensation (bias estimation, language id).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    qformer_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    qformer_attentions: tuple[torch.FloatTensor, ...] | None = None
    qformer_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    pooled_speech: torch.FloatTensor | None = None


@dataclass
class PotsaSpeechOutput(ModelOutput):
    """
    Args:
        soft_prompt (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, llm_hidden_size)`):
            What replaces the speech placeholders in the LLM input.
        qformer_hidden_states (`tuple(torch.FloatTensor)`):
            Query embeddings (index 0) and every Q-Former block's output, each `(batch_size, num_query_tokens,
            qformer_hidden_size)`.
        pooled_speech (`torch.FloatTensor` of shape `(batch_size, encoder_hidden_size)`):
            Encoder frames averaged over valid frames, before bias compensation.
        qformer_attentions / qformer_cross_attentions (`tuple(torch.FloatTensor)`, *optional*):
            The Q-Former's attention weights, with `output_attentions=True` (see `PotsaOutput`).
    """

    soft_prompt: torch.FloatTensor | None = None
    qformer_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pooled_speech: torch.FloatTensor | None = None
    qformer_attentions: tuple[torch.FloatTensor, ...] | None = None
    qformer_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


__all__ = ["PotsaOutput", "PotsaSpeechOutput"]
