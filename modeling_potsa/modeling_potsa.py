"""POTSA speech translation model: frozen speech encoder + bias compensation + Q-Former + frozen causal LLM.

```
audio features (B, n_mels, 2P) or waveform (B, samples) --speech encoder (frozen)--> frames (B, P, d_enc)
  --minus bias[language]--> --Q-Former (80 queries, cross-attention to valid frames)--> (B, 80, d_q) per layer
  --projector (Linear + LayerNorm)--> soft prompt (B, 80, d_llm)
LLM inputs_embeds: [prompt prefix][soft prompt][prompt suffix][target] --LLM (frozen)--> CE on target tokens
```

Only the Q-Former, its queries, the projector, the bias table (and LoRA adapters, if enabled) are trained and saved
(`checkpoint_potsa.py`); the frozen LLM's LoRA and gradient checkpointing are `language_model_potsa.py`'s, the output
classes `outputs_potsa.py`'s. The encoder may be Whisper or a wav2vec2-style model (wav2vec2, HuBERT; see
`speech_encoders.py`), the LLM any `AutoModelForCausalLM` (Qwen2, Llama, GPT-2, ...).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, Blip2QFormerModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.utils import logging

from .bias_compensation import LanguageBiasCompensation, masked_time_mean
from .checkpoint_potsa import PotsaCheckpointMixin, mark_initialized
from .configuration_potsa import IGNORE_INDEX, PotsaConfig
from .language_model_potsa import add_lora, checkpoint_in_eval_mode, checkpointed_layers
from .outputs_potsa import PotsaOutput, PotsaSpeechOutput
from .speech_encoders import SpeechEncoderFamily, speech_encoder_family

logger = logging.get_logger(__name__)


class PotsaProjector(nn.Module):
    """Maps Q-Former outputs to the LLM's embedding width; the LayerNorm keeps the soft prompt at the scale the
    frozen LLM expects from its own embeddings."""

    def __init__(self, qformer_hidden_size: int, llm_hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(qformer_hidden_size, llm_hidden_size)
        self.layer_norm = nn.LayerNorm(llm_hidden_size)

    def forward(self, query_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.linear(query_states))


class PotsaPreTrainedModel(PreTrainedModel):
    config_class = PotsaConfig
    config: PotsaConfig
    base_model_prefix = "potsa"
    main_input_name = "input_features"
    # forward takes `num_items_in_batch`, so Trainer passes it and the CE is exact under gradient accumulation.
    accepts_loss_kwargs = True
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # `post_init` adds the sub-models' own (Whisper, HuBERT, Qwen2, Llama, ... layers); these are the layers whose
    # models declare none.
    _no_split_modules = ["Blip2QFormerLayer", "Wav2Vec2EncoderLayer", "Wav2Vec2EncoderLayerStableLayerNorm"]
    # The trained connector stays in float32 whatever dtype the frozen encoder / LLM are loaded in (as BLIP-2 does).
    _keep_in_fp32_modules_strict = ["query_tokens", "bias_compensation", "qformer", "projector"]

    @classmethod
    def is_custom_code(cls) -> bool:
        """POTSA initialises every tensor through `transformers.initialization`, which leaves loaded tensors alone,
        so it opts out of the guard transformers adds for custom code that writes weights in place. That guard
        takes a module without parameters of its own for initialised and skips it, and with it the sub-models' own
        init of such modules: Whisper's encoder, whose sinusoidal position table would stay uninitialised memory
        on meta-device construction or when a checkpoint lacks it."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise POTSA's own parameters; the encoder, Q-Former and LLM sub-models initialise themselves.

        The model itself comes last (`initialize_weights` visits children first), so the projector's LayerNorm gain,
        which depends on the LLM's embeddings, is set once those are initialised or loaded."""
        std = self.config.qformer_config.initializer_range
        if isinstance(module, PotsaForSpeechTranslation):
            init.normal_(module.query_tokens, mean=0.0, std=std)
            embeddings = module.get_input_embeddings().weight
            if not embeddings.is_meta:  # on the meta device there is nothing to read yet, nor to write
                init.constant_(module.projector.layer_norm.weight, _root_mean_square(embeddings))
        elif isinstance(module, LanguageBiasCompensation):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def _root_mean_square(embeddings: torch.Tensor) -> float:
    """RMS of the LLM's own token embeddings: where the projector's LayerNorm gain starts. A unit-scale output is
    ~50x larger than Qwen's embeddings, and the frozen LLM only learns to read the soft prompt after hundreds of steps
    of shrinking the gain."""
    return embeddings.detach().float().pow(2).mean().sqrt().item()


def _require_eager_attention(model: PreTrainedModel, name: str) -> None:
    """Only eager attention computes attention weights; the others would return none, without an error."""
    implementation = model.config._attn_implementation
    if implementation != "eager":
        raise ValueError(
            f"`output_attentions=True` needs eager attention, but the {name} uses {implementation!r}: load the model "
            'with `attn_implementation="eager"` or call `model.set_attn_implementation("eager")`.'
        )


def _self_attentions(qformer_output: BaseModelOutputWithPoolingAndCrossAttentions) -> tuple[torch.Tensor, ...]:
    """The Q-Former's self-attention weights. `Blip2QFormerModel` records its cross-attention weights among its
    `attentions` too (the pattern that picks its `.attention` modules also matches `.crossattention.attention`), so
    drop those, by identity: the same tensors are its `cross_attentions`."""
    cross = {id(weights) for weights in qformer_output.cross_attentions}
    return tuple(weights for weights in qformer_output.attentions if id(weights) not in cross)


class PotsaForSpeechTranslation(PotsaCheckpointMixin, PotsaPreTrainedModel):
    """POTSA: speech in any configured language -> text in `config.target_language`.

    Args:
        config (`PotsaConfig`): the model configuration.
        speech_encoder (`PreTrainedModel`, *optional*): an already loaded encoder (used by `from_pretrained` and
            `from_base_models`); built from `config.encoder_config` when omitted.
        language_model (`PreTrainedModel`, *optional*): an already loaded causal LLM; likewise.
    """

    def __init__(
        self,
        config: PotsaConfig,
        speech_encoder: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        if speech_encoder is not None:
            mark_initialized(speech_encoder)
        if language_model is not None:
            mark_initialized(language_model)
        if speech_encoder is None:
            speech_encoder = self.speech_encoder_family.build(config.encoder_config)
        self.speech_encoder = speech_encoder
        self.bias_compensation = LanguageBiasCompensation(
            len(config.languages), config.encoder_hidden_size, mode=config.bias_compensation_mode
        )
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.projector = PotsaProjector(config.qformer_config.hidden_size, config.text_config.hidden_size)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self.freeze_base_models()
        if config.use_lora:
            self.language_model = add_lora(self.language_model, config)
        self.post_init()

    # ----------------------------------------------------------------------------------------------- construction
    @property
    def speech_encoder_family(self) -> SpeechEncoderFamily:
        """How this model's speech encoder is built, loaded and read (Whisper or wav2vec2-style)."""
        return speech_encoder_family(self.config.encoder_config)

    def freeze_base_models(self) -> None:
        """The paper trains only the connector: freeze encoder and LLM. The bias table is trainable when it is used,
        as in the paper's code (training's `train_bias=False` freezes it at its estimate)."""
        self.speech_encoder.requires_grad_(False)
        for name, param in self.language_model.named_parameters():
            param.requires_grad_("lora_" in name)  # LoRA adapters, when enabled, are the LLM's only trainable part
        self.bias_compensation.requires_grad_(self.config.use_bias_compensation)

    def train(self, mode: bool = True) -> PotsaForSpeechTranslation:
        """Training mode for the connector only: the frozen encoder and LLM stay in eval mode (no dropout, no layer
        drop), so their outputs match a cache and the paper's frozen setup; LoRA adapters, if any, train.

        transformers checkpoints a layer only in training mode, and the loss gradient must cross the frozen LLM to
        reach the soft prompt: with gradient checkpointing on, the frozen LLM's checkpointed layers carry the
        training flag themselves (nothing below them does), and their checkpoint function computes them in eval
        mode (see `_set_gradient_checkpointing`)."""
        super().train(mode)
        self.speech_encoder.eval()
        self.language_model.train(mode and self.config.use_lora)
        for layer in self._checkpointed_frozen_llm_layers():
            layer.training = mode
        return self

    def _checkpointed_frozen_llm_layers(self) -> list[GradientCheckpointingLayer]:
        """The frozen LLM's layers that gradient checkpointing recomputes (none with LoRA: that LLM trains)."""
        return [] if self.config.use_lora else checkpointed_layers(self.language_model)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        """Checkpoint the frozen LLM's layers too, computed in eval mode: the LLM keeps every activation of the
        backward pass otherwise, by far the largest share of training memory (benchmarks/memory_estimate.py).
        transformers' default, non-reentrant checkpointing suits it: the LLM's inputs are its only tensors that
        need a gradient."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        for layer in self._checkpointed_frozen_llm_layers():
            layer._gradient_checkpointing_func = partial(checkpoint_in_eval_mode, layer, gradient_checkpointing_func)
        self.train(self.training)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def num_parameters_by_part(self) -> dict[str, int]:
        """Parameter counts per component and trainable total (works on the meta device)."""
        parts = {
            "speech_encoder": self.speech_encoder,
            "bias_compensation": self.bias_compensation,
            "qformer": self.qformer,
            "projector": self.projector,
            "language_model": self.language_model,
        }
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["query_tokens"] = self.query_tokens.numel()
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    # --------------------------------------------------------------------------------------------------- languages
    @torch.no_grad()
    def set_language_bias(self, language: str, bias: torch.Tensor) -> None:
        """Store an estimated bias vector (d_enc,) for a language the model already knows."""
        row = self.config.language_id(language)
        self.bias_compensation.bias[row] = bias.to(self.bias_compensation.bias)

    @torch.no_grad()
    def add_language(self, language: str, bias: torch.Tensor) -> None:
        """Add a language (e.g. zero-shot) with its bias vector, estimated from unlabeled audio only."""
        if language in self.config.languages:
            raise ValueError(f"{language!r} is already supported; use `set_language_bias` to update its vector.")
        old = self.bias_compensation.bias
        table = torch.cat([old.detach(), bias.to(old).view(1, -1)], dim=0)
        self.bias_compensation.bias = nn.Parameter(table, requires_grad=old.requires_grad)
        self.config.languages = [*self.config.languages, language]
        self.config._validate()

    # ------------------------------------------------------------------------------------------------------- speech
    def encode_speech(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen encoder: its inputs -> frames (B, P, d_enc) and a (B, P) bool mask of valid frames.

        `input_features` are what the processor makes for this encoder: log-mel features (B, n_mels, 2P) padded to
        Whisper's window, or waveforms (B, samples) for wav2vec2-style encoders; `feature_attention_mask` marks their
        real positions. The frame mask keeps padding out of the Q-Former's cross-attention and of pooled statistics,
        and each encoder family encodes so that a clip's frames do not depend on how it is padded (see
        `speech_encoders.py`).
        """
        return self.speech_encoder_family.encode(self.speech_encoder, input_features, feature_attention_mask)

    def speech_to_soft_prompt(
        self,
        frames: torch.Tensor,
        frame_mask: torch.Tensor,
        language_ids: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPoolingAndCrossAttentions]:
        """Encoder frames -> (soft prompt (B, Q, d_llm), the Q-Former's output with its hidden states per layer and,
        with `output_attentions`, its attention weights)."""
        if self.config.use_bias_compensation:
            if language_ids is None:
                raise ValueError(
                    "`language_ids` are required with bias compensation (one id per utterance, from "
                    "`config.language_id(code)` or the processor's `language=`)."
                )
            frames = self.bias_compensation(frames, language_ids)
        queries = self.query_tokens.expand(frames.shape[0], -1, -1)  # (B, Q, d_q)
        qformer_output = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=frames,
            encoder_attention_mask=frame_mask.long(),
            output_hidden_states=True,
            output_attentions=output_attentions,
        )
        soft_prompt = self.projector(qformer_output.last_hidden_state)
        return soft_prompt, qformer_output

    def _merge_soft_prompt(self, input_ids: torch.Tensor | None, soft_prompt: torch.Tensor) -> torch.Tensor:
        """Embed `input_ids` and write the soft prompt over the speech-token placeholders, row by row."""
        if input_ids is None:
            raise ValueError(
                "`input_ids` are required: the prompt with its speech placeholders, from `PotsaProcessor`."
            )
        speech_token_id = self.config.speech_token_id
        if speech_token_id is None:
            raise ValueError(
                "`config.speech_token_id` is not set: build the processor with `PotsaProcessor.from_config` (it adds "
                "the speech token to the tokenizer) and copy `processor.speech_token_id` into the config."
            )
        placeholder = input_ids == speech_token_id  # (B, S)
        counts = placeholder.sum(dim=1)
        if (counts != self.config.num_query_tokens).any():
            raise ValueError(
                f"Every row of `input_ids` needs exactly {self.config.num_query_tokens} speech tokens "
                f"(id {speech_token_id}), found {counts.tolist()}. Build inputs with `PotsaProcessor`."
            )
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, S, d_llm)
        soft_prompt = soft_prompt.to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(placeholder.unsqueeze(-1), soft_prompt)

    def encode(
        self,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        language_ids: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> PotsaSpeechOutput:
        """Speech -> soft prompt, without the LLM: features (or cached encoder frames) through bias compensation,
        Q-Former and projector. What alignment metrics, bias estimation and language detection need."""
        if (input_features is None) == (encoder_hidden_states is None):
            raise ValueError(
                "Pass exactly one of `input_features` (audio features) or `encoder_hidden_states` (cached encoder "
                "outputs)."
            )
        if input_features is not None:
            frames, frame_mask = self.encode_speech(input_features, feature_attention_mask)
        else:
            frames = encoder_hidden_states
            frame_mask = (
                torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
                if encoder_attention_mask is None
                else encoder_attention_mask.bool()
            )
        if output_attentions:
            _require_eager_attention(self.qformer, "Q-Former")
        soft_prompt, qformer_output = self.speech_to_soft_prompt(frames, frame_mask, language_ids, output_attentions)
        return PotsaSpeechOutput(
            soft_prompt=soft_prompt,
            qformer_hidden_states=qformer_output.hidden_states,
            pooled_speech=masked_time_mean(frames, frame_mask),
            qformer_attentions=_self_attentions(qformer_output) if output_attentions else None,
            qformer_cross_attentions=qformer_output.cross_attentions,
        )

    # -------------------------------------------------------------------------------------------------- interfaces
    def forward(
        self,
        input_features: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        feature_attention_mask: torch.LongTensor | None = None,
        language_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.FloatTensor | None = None,
        encoder_attention_mask: torch.LongTensor | None = None,
        output_qformer_hidden_states: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> PotsaOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            input_features (`torch.FloatTensor` of shape `(batch_size, n_mels, 2 * max_source_positions)` or
                `(batch_size, window_samples)`):
                The speech encoder's input from `PotsaProcessor`, padded to the encoder window: log-mel features
                for Whisper, the normalised waveform for wav2vec2-style encoders (which call it `input_values`).
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Prompt (+ target) token ids with `num_query_tokens` speech-token placeholders per row. Required.
            feature_attention_mask (`torch.LongTensor` of shape `(batch_size, input_features.shape[-1])`):
                1 for feature frames (Whisper) or samples (wav2vec2-style) of the audio, 0 for padding.
            language_ids (`torch.LongTensor` of shape `(batch_size,)`):
                Row of each utterance's language in the bias table.
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`): LLM attention mask.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Target ids; -100 on prompt, speech placeholders and padding (the processor does this).
            encoder_hidden_states / encoder_attention_mask:
                Cached frozen-encoder outputs `(batch_size, frames, d_enc)` and their mask, instead of features.
            output_qformer_hidden_states (`bool`): return every Q-Former layer's states (for the OT loss).
            output_attentions (`bool`, *optional*, defaults to `config.output_attentions`):
                Return the LLM's and the Q-Former's attention weights; needs eager attention
                (`attn_implementation="eager"`), the only kind that computes them.
            output_hidden_states (`bool`, *optional*, defaults to `config.output_hidden_states`):
                Return the LLM's and the Q-Former's hidden states.
            return_dict (`bool`, *optional*, defaults to `config.return_dict`):
                A `PotsaOutput`, or else the tuple of its fields that are set.
            num_items_in_batch (`int`, *optional*):
                Target tokens in the whole accumulated batch; the CE is a sum divided by it, so that gradient
                accumulation gives the same update as one large batch.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if output_attentions:
            _require_eager_attention(self.language_model, "LLM")
        speech = self.encode(
            input_features,
            feature_attention_mask,
            language_ids,
            encoder_hidden_states,
            encoder_attention_mask,
            output_attentions=output_attentions,
        )
        inputs_embeds = self._merge_soft_prompt(input_ids, speech.soft_prompt)
        llm_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        has_targets = labels is not None and bool((labels[:, 1:] != IGNORE_INDEX).any())
        llm_output = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels if has_targets else None,
            use_cache=False,  # one pass over the whole sequence: a KV cache would only hold memory
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **(llm_kwargs if has_targets else {}),
        )
        loss = llm_output.loss
        if labels is not None and not has_targets:
            # Rows without targets (audio that only joins the alignment loss): zero CE, not 0/0 = NaN.
            loss = llm_output.logits.sum() * 0.0
        output = PotsaOutput(
            loss=loss,
            logits=llm_output.logits,
            hidden_states=llm_output.hidden_states,  # None unless asked for
            attentions=llm_output.attentions,
            qformer_hidden_states=(
                speech.qformer_hidden_states if output_qformer_hidden_states or output_hidden_states else None
            ),
            qformer_attentions=speech.qformer_attentions,
            qformer_cross_attentions=speech.qformer_cross_attentions,
            pooled_speech=speech.pooled_speech,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def generate(
        self,
        input_features: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        feature_attention_mask: torch.LongTensor | None = None,
        language_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        encoder_hidden_states: torch.FloatTensor | None = None,
        encoder_attention_mask: torch.LongTensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """Translate: returns only the new token ids `(batch_size, new_tokens)`.

        Prompts must be left-padded (the processor does this when no target text is given) so that every row's
        last prompt token sits at the same position. `generate_kwargs` (num_beams, max_new_tokens,
        no_repeat_ngram_size, do_sample, ...) go to the LLM's `generate`, which rejects unknown ones.
        """
        if attention_mask is not None and (attention_mask[:, -1] == 0).any():
            raise ValueError("Prompts must be left-padded for generation: call the processor without target text.")
        speech = self.encode(
            input_features, feature_attention_mask, language_ids, encoder_hidden_states, encoder_attention_mask
        )
        inputs_embeds = self._merge_soft_prompt(input_ids, speech.soft_prompt)
        with warnings.catch_warnings():
            # n-gram blocking over generated tokens only is what we want: the prompt holds speech placeholders.
            warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
            )


__all__ = ["PotsaForSpeechTranslation", "PotsaPreTrainedModel", "PotsaOutput", "PotsaProjector", "PotsaSpeechOutput"]
