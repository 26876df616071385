"""Configuration of POTSA: frozen speech encoder -> language-bias compensation -> Q-Former -> frozen causal LLM.

The defaults describe the paper's real-size system (Whisper-large-v3 encoder, Qwen2.5-7B-Instruct, an 8-block
Q-Former with 80 queries, X -> Chinese) so that ``PotsaConfig()`` can be inspected, counted on the meta device or
trained without downloading anything but the two base checkpoints. The sub-config defaults copy the published
``config.json`` values of those checkpoints; ``PotsaConfig.from_base_models`` reads the real ones instead.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import Any

from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)

# English names used in prompts ("Translate the Spanish speech into Chinese."). Codes missing here fall back to
# the code itself, so any language can be added; these are the FLEURS languages the paper and the demo use.
LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic", "de": "German", "en": "English", "es": "Spanish", "fr": "French", "hi": "Hindi",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish",
    "pt": "Portuguese", "ru": "Russian", "sv": "Swedish", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip

SPEECH_TOKEN = "<|speech|>"
IGNORE_INDEX = -100  # label of prompt, speech and padding positions (PyTorch's cross-entropy default)

# Qwen2.5-Instruct chat format; `<|speech|>` marks where the soft prompt goes, `{instruction}` the task text.
QWEN_CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|speech|>\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
)

TASK_INSTRUCTIONS: dict[str, str] = {
    "transcribe": "Transcribe the {source_language} speech.",
    "translate": "Translate the {source_language} speech into {target_language}.",
    "chain": "Transcribe the {source_language} speech, then translate it into {target_language}.",
}

BIAS_COMPENSATION_MODES = ("mean", "affine")
# How the model is trained is not part of what it is: these keys, which configs written before the training settings
# moved to `potsa_training`'s AlignmentArguments hold, are dropped on load (with one notice).
TRAINING_ONLY_KEYS = (
    "ot_loss_weight", "ot_blur", "ot_candidate_layers", "ot_layer_scheduler", "ot_layer_weights", "ot_layer_groups",
    "ot_gradient_surgery", "ot_gradient_cosine_every", "ot_pair_strategy", "anchor_language", "ucb_beta", "ucb_ema",
    "ucb_temperature_floor", "ucb_temperature_decay", "train_bias",
)  # fmt: skip
# config.json's `custom_pipelines`, written by the model's `save_pretrained`: both task names -> the speech-translation
# pipeline (pipeline_potsa.py, which it copies beside the model code), its model loaded by AutoModel.
PIPELINE_TASKS = ("translation", "speech-translation")
CUSTOM_PIPELINES = {
    task: {"impl": "pipeline_potsa.PotsaSpeechTranslationPipeline", "pt": ["AutoModel"]} for task in PIPELINE_TASKS
}
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")

# Published config.json values of openai/whisper-large-v3 (encoder side) and Qwen/Qwen2.5-7B-Instruct.
WHISPER_LARGE_V3_ENCODER = {
    "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
    "decoder_layers": 32, "decoder_attention_heads": 20, "decoder_ffn_dim": 5120, "num_mel_bins": 128,
    "max_source_positions": 1500, "vocab_size": 51866,
}  # fmt: skip
QWEN25_7B_INSTRUCT = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645,
}  # fmt: skip
PAPER_QFORMER = {
    "hidden_size": 768, "num_hidden_layers": 8, "num_attention_heads": 12, "intermediate_size": 3072,
    "cross_attention_frequency": 1,
}  # fmt: skip


class PotsaConfig(PreTrainedConfig):
    r"""
    Configuration of [`PotsaForSpeechTranslation`].

    Args:
        encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            Speech encoder config: a `WhisperConfig` (only its encoder is used) or a wav2vec2-style one
            (`Wav2Vec2Config`, `HubertConfig`, ...; see `speech_encoders.py`). Defaults to Whisper-large-v3.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Causal LLM config (any `AutoConfig` model type with an `AutoModelForCausalLM`). Defaults to Qwen2.5-7B.
        qformer_config (`dict` or `Blip2QFormerConfig`, *optional*):
            Q-Former blocks. `encoder_hidden_size` is always set from the speech encoder's width.
        encoder_model_id (`str`, *optional*, defaults to `"openai/whisper-large-v3"`):
            Hub id or local path of the pretrained encoder weights, loaded at `from_pretrained` (not stored in
            POTSA checkpoints). `None` means the encoder weights live in the checkpoint itself.
        text_model_id (`str`, *optional*, defaults to `"Qwen/Qwen2.5-7B-Instruct"`):
            Same for the LLM.
        base_weights_in_checkpoint (`bool`, *optional*, defaults to `False`):
            Set by `save_pretrained(..., include_base_weights=True)`: the checkpoint is a fully offline bundle and
            the ids above are only provenance.
        num_query_tokens (`int`, *optional*, defaults to 80):
            Learned Q-Former queries = soft-prompt tokens fed to the LLM per utterance.
        languages (`list[str]`, *optional*):
            Language codes with a row in the bias table (order = `language_ids`).
        target_language (`str`, *optional*, defaults to `"zh"`):
            Language the model writes.
        use_bias_compensation (`bool`, *optional*, defaults to `True`):
            Subtract the per-language mean encoder output from every frame.
        bias_compensation_mode (`str`, *optional*, defaults to `"mean"`):
            "mean" (the paper): `frames - mean[language]`. "affine": also equalise each language's per-dimension
            spread, `(frames - mean[language]) * scale[language]` with `scale = reference_std / std[language]`
            (see `LanguageBiasCompensation`); the scales are estimated with the means and trained like them.
        speech_token_id (`int`, *optional*):
            Id of `speech_token` in the LLM tokenizer (added as a special token by `PotsaProcessor`); recorded here
            so the model can find the soft-prompt positions.
        speech_token / prompt_template / task_instructions:
            The prompt: `prompt_template` contains `speech_token` once (where the soft prompt goes) and may contain
            `{instruction}` (a template without it, like the tiny demo's, ignores the task text);
            `task_instructions[task]` may use `{source_language}` and `{target_language}`.
        chain_separator (`str`, *optional*, defaults to `"\n"`):
            Joins transcript and translation in the "chain" task's target.
        use_lora, lora_rank, lora_alpha, lora_dropout, lora_target_modules:
            Optional LoRA adapters on the LLM (through peft), off by default as in the paper.
        merged_lora_modules (`list[str]`, *optional*, defaults to `[]`):
            LLM modules (peft `target_modules` names) whose weights hold trained LoRA adapters merged in, as
            `examples/push_to_hub.py` publishes a LoRA model (with `use_lora=False`). The adapters are deltas on
            frozen weights that `text_model_id` reloads, so the checkpoint stores these modules' merged weights and
            they replace the base LLM's at `from_pretrained`: the merged model loads without peft.

    The config describes what the model is (architecture, languages, prompt): it is Hub remote code. How a model is
    trained (the OT loss, its layer scheduler, pairing) is `potsa_training.arguments.AlignmentArguments`.
    """

    model_type = "potsa"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(AutoConfig, model_type="whisper", init_kwargs=WHISPER_LARGE_V3_ENCODER),
        "text_config": SubConfigSpec(AutoConfig, model_type="qwen2", init_kwargs=QWEN25_7B_INSTRUCT),
        "qformer_config": SubConfigSpec(Blip2QFormerConfig, init_kwargs=PAPER_QFORMER),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    encoder_model_id: str | None = "openai/whisper-large-v3"
    text_model_id: str | None = "Qwen/Qwen2.5-7B-Instruct"
    base_weights_in_checkpoint: bool = False
    num_query_tokens: int = 80
    languages: list[str] = field(default_factory=lambda: ["en", "es", "ja", "ko", "ru", "zh"])
    target_language: str = "zh"
    use_bias_compensation: bool = True
    bias_compensation_mode: str = "mean"
    speech_token: str = SPEECH_TOKEN
    speech_token_id: int | None = None
    prompt_template: str = QWEN_CHAT_TEMPLATE
    task_instructions: dict[str, str] = field(default_factory=lambda: dict(TASK_INSTRUCTIONS))
    chain_separator: str = "\n"
    use_lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merged_lora_modules: list[str] = field(default_factory=list)

    def __post_init__(self, **kwargs: Any) -> None:
        legacy = sorted(key for key in TRAINING_ONLY_KEYS if key in kwargs)
        for key in legacy:
            kwargs.pop(key)
        if legacy:
            logger.warning_once(
                f"This config holds training-only settings {legacy}, which are now stage settings of potsa_training "
                "(AlignmentArguments, ModelArguments.train_bias); they are ignored."
            )
        super().__post_init__(**kwargs)
        # The Q-Former cross-attends to encoder frames, so its key/value width is the encoder's width.
        self.qformer_config.encoder_hidden_size = self.encoder_hidden_size
        self._validate()

    @property
    def encoder_hidden_size(self) -> int:
        """Width of the speech encoder's frames (`d_model` for Whisper, `hidden_size` for wav2vec2-style models)."""
        return getattr(self.encoder_config, "d_model", None) or self.encoder_config.hidden_size

    @property
    def num_qformer_layers(self) -> int:
        return self.qformer_config.num_hidden_layers

    def language_id(self, language: str) -> int:
        """Row of `language` in the bias table; a clear error for codes the model does not know."""
        if language not in self.languages:
            raise ValueError(
                f"Unknown language {language!r}. This model supports {self.languages}; add a new language with "
                "`model.add_language(code, bias)` after estimating its bias from unlabeled audio."
            )
        return self.languages.index(language)

    @staticmethod
    def language_name(language: str) -> str:
        return LANGUAGE_NAMES.get(language.split("-")[0].split("_")[0], language)

    def _validate(self) -> None:
        """Fail at construction on values that would otherwise break training much later (or silently)."""
        if not self.languages:
            raise ValueError("`languages` must list at least one language code, e.g. ['en', 'es'].")
        for code in self.languages:
            if not isinstance(code, str) or not _LANGUAGE_CODE.match(code):
                raise ValueError(f"Invalid language code {code!r} in `languages`: use ISO codes such as 'en', 'es'.")
        if len(set(self.languages)) != len(self.languages):
            raise ValueError(f"`languages` has duplicates: {self.languages}.")
        if not _LANGUAGE_CODE.match(self.target_language or ""):
            raise ValueError(f"Invalid `target_language` {self.target_language!r}: use an ISO code such as 'zh'.")
        if self.num_query_tokens < 1:
            raise ValueError(f"`num_query_tokens` must be >= 1, got {self.num_query_tokens}.")
        if self.prompt_template.count(self.speech_token) != 1:
            raise ValueError(
                f"`prompt_template` must contain the speech token {self.speech_token!r} exactly once, got "
                f"{self.prompt_template.count(self.speech_token)} in {self.prompt_template!r}."
            )
        unknown_fields = set(re.findall(r"{(\w*)}", self.prompt_template)) - {"instruction"}
        if unknown_fields:
            raise ValueError(f"`prompt_template` may only use the `{{instruction}}` field, found {sorted(unknown_fields)}.")
        vocab_size = getattr(self.text_config, "vocab_size", None)
        if self.speech_token_id is not None and vocab_size and not 0 <= self.speech_token_id < vocab_size:
            raise ValueError(
                f"`speech_token_id` {self.speech_token_id} is outside the LLM vocabulary (size {vocab_size})."
            )
        if self.bias_compensation_mode not in BIAS_COMPENSATION_MODES:
            raise ValueError(
                f"`bias_compensation_mode` must be one of {BIAS_COMPENSATION_MODES}, got "
                f"{self.bias_compensation_mode!r}."
            )
        if self.use_lora and (self.lora_rank < 1 or not self.lora_target_modules):
            raise ValueError("LoRA needs `lora_rank` >= 1 and at least one module in `lora_target_modules`.")
        if self.qformer_config.hidden_size % self.qformer_config.num_attention_heads:
            raise ValueError(
                f"Q-Former hidden size {self.qformer_config.hidden_size} is not divisible by its "
                f"{self.qformer_config.num_attention_heads} attention heads."
            )

    @classmethod
    def from_base_models(cls, encoder_model_id: str, text_model_id: str, **kwargs: Any) -> PotsaConfig:
        """Build a config whose sub-configs are read from the two base checkpoints (config files only)."""
        encoder_config = AutoConfig.from_pretrained(encoder_model_id)
        text_config = AutoConfig.from_pretrained(text_model_id)
        return cls(
            encoder_config=encoder_config,
            text_config=text_config,
            encoder_model_id=encoder_model_id,
            text_model_id=text_model_id,
            **kwargs,
        )


__all__ = ["PotsaConfig", "CUSTOM_PIPELINES", "IGNORE_INDEX", "LANGUAGE_NAMES", "SPEECH_TOKEN", "TRAINING_ONLY_KEYS"]
