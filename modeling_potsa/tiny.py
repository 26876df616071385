"""Tiny, random, fully offline POTSA models: the real classes (WhisperEncoder, Qwen2ForCausalLM, Blip2QFormerModel)
at toy sizes, a character tokenizer trained locally with `tokenizers`, and a feature extractor whose window matches
the encoder. Tests and the demo use them; the real-size path is the same code with hub ids instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor

from .configuration_potsa import SPEECH_TOKEN, PotsaConfig
from .modeling_potsa import PotsaForSpeechTranslation
from .processing_potsa import PotsaProcessor

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<|endoftext|>", "<unk>"
# Enough characters for prompts and the offline corpus' targets (Chinese numerals, dates, times).
DEFAULT_CHARACTERS = (
    "\n" + "".join(chr(c) for c in range(32, 127)) + "零一二两三四五六七八九十百千万年月日号星期天点分秒整半"
)
TINY_PROMPT_TEMPLATE = f"{SPEECH_TOKEN}="


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


def tiny_potsa_config(
    tokenizer: PreTrainedTokenizerFast,
    feature_extractor: WhisperFeatureExtractor,
    languages: Sequence[str] = ("en", "es", "ja", "ko", "ru", "zh"),
    encoder_hidden_size: int = 32,
    encoder_layers: int = 2,
    qformer_hidden_size: int = 32,
    qformer_layers: int = 3,
    num_query_tokens: int = 8,
    llm_hidden_size: int = 32,
    llm_layers: int = 2,
    **config_kwargs,
) -> PotsaConfig:
    """A `PotsaConfig` of toy sizes whose encoder window and vocabulary match `feature_extractor` / `tokenizer`."""
    mel_frames = feature_extractor.nb_max_frames
    encoder_config = {
        "model_type": "whisper", "d_model": encoder_hidden_size, "encoder_layers": encoder_layers,
        "encoder_attention_heads": 2, "encoder_ffn_dim": 2 * encoder_hidden_size, "decoder_layers": 1,
        "decoder_attention_heads": 2, "decoder_ffn_dim": 2 * encoder_hidden_size,
        "num_mel_bins": feature_extractor.feature_size, "max_source_positions": mel_frames // 2,
    }  # fmt: skip
    text_config = {
        "model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": llm_hidden_size,
        "intermediate_size": 2 * llm_hidden_size, "num_hidden_layers": llm_layers, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    qformer_config = {
        "hidden_size": qformer_hidden_size, "num_hidden_layers": qformer_layers, "num_attention_heads": 2,
        "intermediate_size": 2 * qformer_hidden_size, "cross_attention_frequency": 1,
    }  # fmt: skip
    defaults = {
        "encoder_model_id": None, "text_model_id": None, "languages": list(languages),
        "num_query_tokens": num_query_tokens, "prompt_template": TINY_PROMPT_TEMPLATE,
        "ot_candidate_layers": [layer for layer in (1, 2, 3) if layer <= qformer_layers],
    }  # fmt: skip
    defaults.update(config_kwargs)
    return PotsaConfig(encoder_config=encoder_config, text_config=text_config, qformer_config=qformer_config, **defaults)


def build_tiny_potsa(
    languages: Sequence[str] = ("en", "es", "ja", "ko", "ru", "zh"),
    seed: int = 0,
    texts: Iterable[str] = (DEFAULT_CHARACTERS,),
    window_seconds: int = 4,
    num_mel_bins: int = 40,
    **config_kwargs,
) -> tuple[PotsaForSpeechTranslation, PotsaProcessor]:
    """A random tiny model and its processor, ready for `forward`, `generate` and `save_pretrained`."""
    tokenizer = train_char_tokenizer(texts)
    feature_extractor = tiny_feature_extractor(window_seconds, num_mel_bins)
    config = tiny_potsa_config(tokenizer, feature_extractor, languages, **config_kwargs)
    processor = PotsaProcessor.from_config(config, feature_extractor, tokenizer)
    torch.manual_seed(seed)
    model = PotsaForSpeechTranslation(config)
    model.language_model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


__all__ = ["build_tiny_potsa", "tiny_potsa_config", "tiny_feature_extractor", "train_char_tokenizer"]
