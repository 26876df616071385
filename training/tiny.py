"""Tiny, random, fully offline POTSA models: the real classes (WhisperEncoder, Qwen2ForCausalLM, Blip2QFormerModel)
at toy sizes, a character tokenizer trained locally with `tokenizers`, and a feature extractor whose window matches
the encoder. Tests and the demo use them; the real-size path is the same code with hub ids instead.

The encoder may also be wav2vec2 or HuBERT (`encoder_type=`), the LLM Llama or GPT-2 (`llm_type=`), to check that
POTSA is model-agnostic on the real classes of several families.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

from modeling_potsa.configuration_potsa import SPEECH_TOKEN, PotsaConfig
from modeling_potsa.modeling_potsa import PotsaForSpeechTranslation
from modeling_potsa.processing_potsa import PotsaProcessor

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<|endoftext|>", "<unk>"
# Enough characters for prompts and the offline corpus' targets (Chinese numerals, dates, times).
DEFAULT_CHARACTERS = (
    "\n" + "".join(chr(c) for c in range(32, 127)) + "零一二两三四五六七八九十百千万年月日号星期天点分秒整半"
)
# A tiny LLM follows one-character instructions (what the demo's stand-in LLM is pretrained on): ":" transcribe,
# "=" translate, ";" transcript then translation.
TINY_PROMPT_TEMPLATE = f"{SPEECH_TOKEN}{{instruction}}"
TINY_TASK_INSTRUCTIONS = {"transcribe": ":", "translate": "=", "chain": ";"}
ENCODER_TYPES = ("whisper", "wav2vec2", "hubert")
LLM_TYPES = ("qwen2", "llama", "gpt2")


def train_char_tokenizer(texts: Iterable[str] = (DEFAULT_CHARACTERS,)) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over every character in `texts` (plus pad/eos/unk and the speech token).

    Character level keeps tiny LMs honest: no merges to memorise, and every Chinese numeral is one token.
    """
    characters = sorted({char for text in texts for char in text})
    specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, SPEECH_TOKEN]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[SPEECH_TOKEN],
    )


def tiny_feature_extractor(window_seconds: int = 4, num_mel_bins: int = 40) -> WhisperFeatureExtractor:
    """Whisper log-mel features with a short window and a 20 ms hop (real Whisper: 30 s, 10 ms, 128 bins)."""
    return WhisperFeatureExtractor(
        feature_size=num_mel_bins, sampling_rate=16_000, hop_length=320, chunk_length=window_seconds, n_fft=400
    )


def tiny_waveform_feature_extractor() -> Wav2Vec2FeatureExtractor:
    """The raw-waveform feature extractor of wav2vec2 / HuBERT: 16 kHz samples, normalised per clip."""
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, do_normalize=True, return_attention_mask=True)


def tiny_encoder_config(encoder_type: str, feature_extractor: Any, hidden_size: int, layers: int) -> dict[str, Any]:
    """A toy speech encoder config of `encoder_type`. Whisper's window and mel bins follow `feature_extractor`;
    wav2vec2 / HuBERT get a 3-layer conv front end with the real models' 320-sample (20 ms) frame stride and their
    base models' "group" feature norm (override `feat_extract_norm` for the large models' "layer")."""
    if encoder_type == "whisper":
        return {
            "model_type": "whisper", "d_model": hidden_size, "encoder_layers": layers, "encoder_attention_heads": 2,
            "encoder_ffn_dim": 2 * hidden_size, "decoder_layers": 1, "decoder_attention_heads": 2,
            "decoder_ffn_dim": 2 * hidden_size, "num_mel_bins": feature_extractor.feature_size,
            "max_source_positions": feature_extractor.nb_max_frames // 2,
        }  # fmt: skip
    if encoder_type in ("wav2vec2", "hubert"):
        return {
            "model_type": encoder_type, "hidden_size": hidden_size, "num_hidden_layers": layers,
            "num_attention_heads": 2, "intermediate_size": 2 * hidden_size, "conv_dim": (16, 16, 16),
            "conv_kernel": (10, 8, 4), "conv_stride": (5, 8, 8), "feat_extract_norm": "group",
            "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2, "mask_time_prob": 0.0,
        }  # fmt: skip
    raise ValueError(f"Unknown tiny encoder type {encoder_type!r}; choose one of {ENCODER_TYPES}.")


def tiny_llm_config(llm_type: str, tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int) -> dict[str, Any]:
    """A toy causal LM config of `llm_type` over `tokenizer`'s vocabulary (GPT-2 names its sizes differently)."""
    shared = {
        "model_type": llm_type, "vocab_size": len(tokenizer), "tie_word_embeddings": False, "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    if llm_type == "gpt2":
        return {**shared, "n_embd": hidden_size, "n_layer": layers, "n_head": 2, "n_inner": 2 * hidden_size,
                "n_positions": 512}  # fmt: skip
    if llm_type in ("qwen2", "llama"):
        return {**shared, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
                "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
                "max_position_embeddings": 512}  # fmt: skip
    raise ValueError(f"Unknown tiny LLM type {llm_type!r}; choose one of {LLM_TYPES}.")


def tiny_potsa_config(
    tokenizer: PreTrainedTokenizerFast,
    feature_extractor: Any,
    languages: Sequence[str] = ("en", "es", "ja", "ko", "ru", "zh"),
    encoder_hidden_size: int = 32,
    encoder_layers: int = 2,
    qformer_hidden_size: int = 32,
    qformer_layers: int = 3,
    num_query_tokens: int = 8,
    llm_hidden_size: int = 32,
    llm_layers: int = 2,
    encoder_type: str = "whisper",
    llm_type: str = "qwen2",
    encoder_overrides: Mapping[str, Any] | None = None,
    **config_kwargs,
) -> PotsaConfig:
    """A `PotsaConfig` of toy sizes whose encoder window and vocabulary match `feature_extractor` / `tokenizer`.

    `encoder_overrides` replace entries of the encoder config (e.g. `{"feat_extract_norm": "layer"}`)."""
    encoder_config = tiny_encoder_config(encoder_type, feature_extractor, encoder_hidden_size, encoder_layers)
    encoder_config.update(encoder_overrides or {})
    text_config = tiny_llm_config(llm_type, tokenizer, llm_hidden_size, llm_layers)
    qformer_config = {
        "hidden_size": qformer_hidden_size, "num_hidden_layers": qformer_layers, "num_attention_heads": 2,
        "intermediate_size": 2 * qformer_hidden_size, "cross_attention_frequency": 1,
    }  # fmt: skip
    defaults = {
        "encoder_model_id": None, "text_model_id": None, "languages": list(languages),
        "num_query_tokens": num_query_tokens, "prompt_template": TINY_PROMPT_TEMPLATE,
        "task_instructions": dict(TINY_TASK_INSTRUCTIONS),
    }  # fmt: skip
    defaults.update(config_kwargs)
    return PotsaConfig(encoder_config=encoder_config, text_config=text_config, qformer_config=qformer_config, **defaults)


def build_tiny_potsa(
    languages: Sequence[str] = ("en", "es", "ja", "ko", "ru", "zh"),
    seed: int = 0,
    texts: Iterable[str] = (DEFAULT_CHARACTERS,),
    window_seconds: int = 4,
    num_mel_bins: int = 40,
    encoder_type: str = "whisper",
    llm_type: str = "qwen2",
    **config_kwargs,
) -> tuple[PotsaForSpeechTranslation, PotsaProcessor]:
    """A random tiny model and its processor, ready for `forward`, `generate` and `save_pretrained`.

    `encoder_type` is one of `ENCODER_TYPES` ("whisper", "wav2vec2", "hubert"), `llm_type` one of `LLM_TYPES`
    ("qwen2", "llama", "gpt2"); `num_mel_bins` only concerns Whisper."""
    tokenizer = train_char_tokenizer(texts)
    whisper = encoder_type == "whisper"
    feature_extractor = (
        tiny_feature_extractor(window_seconds, num_mel_bins) if whisper else tiny_waveform_feature_extractor()
    )
    config = tiny_potsa_config(
        tokenizer, feature_extractor, languages, encoder_type=encoder_type, llm_type=llm_type, **config_kwargs
    )
    # A Whisper extractor fixes its own window (`chunk_length`); a waveform extractor takes it from the processor.
    processor = PotsaProcessor.from_config(config, feature_extractor, tokenizer, None if whisper else window_seconds)
    torch.manual_seed(seed)
    model = PotsaForSpeechTranslation(config)
    model.language_model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


__all__ = [
    "ENCODER_TYPES",
    "LLM_TYPES",
    "build_tiny_potsa",
    "tiny_encoder_config",
    "tiny_feature_extractor",
    "tiny_llm_config",
    "tiny_potsa_config",
    "tiny_waveform_feature_extractor",
    "train_char_tokenizer",
]
