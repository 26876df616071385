"""Model-agnostic POTSA: Whisper, wav2vec2 and HuBERT encoders under Qwen2, Llama and GPT-2 LLMs, on tiny random
configs of the real classes. Training and generation work for each pair, a clip is encoded the same way alone and
padded next to a longer one, checkpoints and processors round-trip, and the pipeline and training data path take
waveform encoders."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    AutoProcessor,
    BertConfig,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
    pipeline,
)

from modeling_potsa import PotsaForSpeechTranslation, PotsaProcessor
from modeling_potsa.speech_encoders import Wav2Vec2StyleEncoders, speech_encoder_family
from potsa_training.collator import PotsaCollator
from potsa_training.encoder_cache import cache_encoder_outputs
from potsa_training.tiny import build_tiny_potsa

from .conftest import SAMPLING_RATE, synthetic_audio
from .test_hub_loading import FRESH_PROCESS_SCRIPT

TRAINABLE_PREFIXES = ("query_tokens", "bias_compensation.", "qformer.", "projector.")
LAYER_NORM = {"feat_extract_norm": "layer", "do_stable_layer_norm": True}  # the large models' front end
# name -> (encoder_type, encoder config overrides); wav2vec2 and HuBERT default to their base models' "group" norm
ENCODERS = {
    "whisper": ("whisper", {}),
    "wav2vec2": ("wav2vec2", {}),
    "wav2vec2-layer": ("wav2vec2", LAYER_NORM),
    "hubert": ("hubert", {}),
    "hubert-layer": ("hubert", LAYER_NORM),
}
WAVEFORM_ENCODERS = [name for name in ENCODERS if name != "whisper"]
# every encoder family under two LLM families, and GPT-2 (other module names, absolute positions) once
PAIRS = [(encoder, llm) for encoder in ("whisper", "wav2vec2", "hubert") for llm in ("qwen2", "llama")]
PAIRS += [("wav2vec2-layer", "llama"), ("wav2vec2", "gpt2")]
SHORT = {"max_new_tokens": 4, "do_sample": False}


@functools.cache
def tiny_pair(encoder: str, llm: str = "qwen2") -> tuple[PotsaForSpeechTranslation, PotsaProcessor]:
    """One random tiny model per pair, shared by the tests (which must not modify it in place)."""
    encoder_type, overrides = ENCODERS[encoder]
    return build_tiny_potsa(seed=0, encoder_type=encoder_type, llm_type=llm, encoder_overrides=overrides)


def _training_batch(processor):
    clips = [synthetic_audio(1.0, seed=1), synthetic_audio(2.7, seed=2), synthetic_audio(0.4, seed=3)]
    texts = ["三月三日", "十四点", "七"]
    return processor(clips, sampling_rate=SAMPLING_RATE, language=["es", "ja", "ru"], text=texts)


def _model_inputs(collated):
    """A collator batch without the lists the trainer pops before calling the model."""
    return {key: value for key, value in collated.items() if key not in ("sentence_ids", "languages")}


def _logits(model, processor, clip):
    with torch.no_grad():
        return model(**processor(clip, sampling_rate=SAMPLING_RATE, language="es", text="三月三日")).logits


# ----------------------------------------------------------------------------------------------- every pair
@pytest.mark.parametrize("encoder, llm", PAIRS)
def test_loss_is_finite_and_gradients_reach_only_trainable_parts(encoder, llm):
    model, processor = tiny_pair(encoder, llm)
    model = copy.deepcopy(model).train()
    output = model(**_training_batch(processor))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for name, param in model.named_parameters():
        trainable = name.startswith(TRAINABLE_PREFIXES)
        assert param.requires_grad == trainable and (param.grad is not None) == trainable, name
    assert model.query_tokens.grad.abs().sum() > 0 and model.projector.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("encoder, llm", PAIRS)
def test_greedy_generation_is_deterministic_and_padding_invariant(encoder, llm):
    model, processor = tiny_pair(encoder, llm)
    clips = [synthetic_audio(3.0, seed=7), synthetic_audio(1.2, seed=6)]
    batch = processor(clips, sampling_rate=SAMPLING_RATE, language=["ja", "en"])
    first = model.generate(**batch, **SHORT)
    torch.testing.assert_close(model.generate(**batch, **SHORT), first, rtol=0, atol=0)
    alone = model.generate(**processor(clips[1], sampling_rate=SAMPLING_RATE, language="en"), **SHORT)
    torch.testing.assert_close(first[1, : alone.shape[1]], alone[0], rtol=0, atol=0)


@pytest.mark.parametrize("encoder, llm", PAIRS)
def test_bundle_round_trip_through_automodel_gives_identical_logits(encoder, llm, tmp_path):
    model, processor = tiny_pair(encoder, llm)
    model.save_pretrained(tmp_path, include_base_weights=True)
    assert (tmp_path / "speech_encoders.py").is_file()  # shipped with the code, for trust_remote_code
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    clip = synthetic_audio(1.5)
    torch.testing.assert_close(_logits(loaded, processor, clip), _logits(model, processor, clip), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- encoder frames
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_soft_prompt_of_a_clip_does_not_depend_on_its_batch(encoder):
    model, processor = tiny_pair(encoder)
    clips = [synthetic_audio(3.9, seed=5), synthetic_audio(0.8, seed=4)]
    batch = processor(clips, sampling_rate=SAMPLING_RATE, language=["ko", "es"])
    alone = processor(clips[1], sampling_rate=SAMPLING_RATE, language="es")
    with torch.no_grad():
        together = model.encode(batch["input_features"], batch["feature_attention_mask"], batch["language_ids"])
        single = model.encode(alone["input_features"], alone["feature_attention_mask"], alone["language_ids"])
    torch.testing.assert_close(together.soft_prompt[1], single.soft_prompt[0])
    torch.testing.assert_close(together.pooled_speech[1], single.pooled_speech[0])


@pytest.mark.parametrize("encoder", WAVEFORM_ENCODERS)
def test_waveform_frames_equal_the_encoder_on_each_unpadded_clip(encoder):
    """Valid frames and their count are exactly the HF encoder's output on the clip alone, without padding; clips
    shorter than the receptive field get one frame."""
    model, processor = tiny_pair(encoder)
    clips = [synthetic_audio(2.5, seed=1), synthetic_audio(0.7, seed=2), synthetic_audio(0.005, seed=3)]
    batch = processor(clips, sampling_rate=SAMPLING_RATE, language="es")
    with torch.no_grad():
        frames, frame_mask = model.encode_speech(batch["input_features"], batch["feature_attention_mask"])
        for row, clip in enumerate(clips):
            samples = max(len(clip), Wav2Vec2StyleEncoders.receptive_field(model.config.encoder_config))
            reference = model.speech_encoder(batch["input_features"][row : row + 1, :samples]).last_hidden_state[0]
            assert int(frame_mask[row].sum()) == len(reference) == int(
                model.speech_encoder._get_feat_extract_output_lengths(torch.tensor(samples))
            )
            torch.testing.assert_close(frames[row, : len(reference)], reference, rtol=1e-5, atol=1e-5)
    assert frame_mask.sum(dim=1).tolist() == [125, 35, 1]  # 20 ms frames, as in the released models


def test_group_norm_encoders_need_one_pass_per_clip():
    """Why the two paths exist: a "group"-norm front end mixes padding into every frame even with an attention
    mask, so those encoders see each clip alone; "layer"-norm ones take the padded batch in one call."""
    clips = [synthetic_audio(2.5, seed=1), synthetic_audio(0.7, seed=2)]
    for encoder, expected_calls in (("wav2vec2", 2), ("wav2vec2-layer", 1)):
        model, processor = tiny_pair(encoder)
        batch = processor(clips, sampling_rate=SAMPLING_RATE, language="es")
        calls = []
        hook = model.speech_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            with torch.no_grad():
                model.encode_speech(batch["input_features"], batch["feature_attention_mask"])
        finally:
            hook.remove()
        assert len(calls) == expected_calls, encoder
    model, processor = tiny_pair("wav2vec2")
    batch = processor(clips, sampling_rate=SAMPLING_RATE, language="es")
    with torch.no_grad():
        unpadded = model.speech_encoder(batch["input_features"][1:, : len(clips[1])]).last_hidden_state
        masked = model.speech_encoder(batch["input_features"], attention_mask=batch["feature_attention_mask"])
    assert not torch.allclose(masked.last_hidden_state[1:, : unpadded.shape[1]], unpadded, atol=1e-3)


def test_sub_models_declare_their_unsplittable_layers():
    model, _ = tiny_pair("hubert", "llama")
    assert {"HubertEncoderLayer", "LlamaDecoderLayer", "Blip2QFormerLayer"} <= set(model._no_split_modules)


def test_unsupported_encoder_is_refused_with_what_is_supported():
    with pytest.raises(ValueError, match="Unsupported speech encoder type 'bert'.*wav2vec2"):
        speech_encoder_family(BertConfig())


def test_unknown_keyword_still_raises():
    model, processor = tiny_pair("wav2vec2")
    batch = _training_batch(processor)
    with pytest.raises(TypeError, match="input_values"):
        model(**batch, input_values=batch["input_features"])


# ------------------------------------------------------------------------------------------------ processor
@pytest.mark.parametrize("encoder", ["whisper", "wav2vec2", "hubert"])
def test_processor_round_trip_keeps_the_encoders_feature_extractor(encoder, tmp_path):
    _, processor = tiny_pair(encoder)
    processor.save_pretrained(tmp_path)
    clip = synthetic_audio(1.0)
    expected = processor(clip, sampling_rate=SAMPLING_RATE, language="ja", text="五")
    reloaded = PotsaProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    for loaded in reloaded:
        assert type(loaded.feature_extractor) is type(processor.feature_extractor)
        assert loaded.max_seconds == processor.max_seconds == 4
        batch = loaded(clip, sampling_rate=SAMPLING_RATE, language="ja", text="五")
        assert batch.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)


def test_waveform_inputs_are_padded_to_the_window_and_normalised_per_clip():
    _, processor = tiny_pair("wav2vec2")
    clips = [synthetic_audio(1.0, seed=1), 3 * synthetic_audio(2.0, seed=2)]
    batch = processor(clips, sampling_rate=SAMPLING_RATE, language="es")
    assert batch["input_features"].shape == batch["feature_attention_mask"].shape == (2, 4 * SAMPLING_RATE)
    assert batch["feature_attention_mask"].sum(dim=1).tolist() == [SAMPLING_RATE, 2 * SAMPLING_RATE]
    for values, mask in zip(batch["input_features"], batch["feature_attention_mask"].bool()):
        assert abs(values[mask].mean()) < 1e-4 and abs(values[mask].std() - 1) < 1e-3 and (values[~mask] == 0).all()
    with pytest.raises(ValueError, match="longer than the encoder window of 4 s"):
        processor(synthetic_audio(4.5), sampling_rate=SAMPLING_RATE, language="es")


def test_processor_refuses_a_feature_extractor_the_encoder_cannot_read():
    whisper_model, whisper_processor = tiny_pair("whisper")
    wav2vec2_model, wav2vec2_processor = tiny_pair("wav2vec2")
    tokenizer = whisper_processor.tokenizer
    with pytest.raises(ValueError, match="produces `input_features`.*reads `input_values`"):
        PotsaProcessor.from_config(copy.deepcopy(wav2vec2_model.config), whisper_processor.feature_extractor, tokenizer)
    with pytest.raises(ValueError, match="produces `input_values`.*reads `input_features`"):
        PotsaProcessor.from_config(copy.deepcopy(whisper_model.config), wav2vec2_processor.feature_extractor, tokenizer)
    with pytest.raises(ValueError, match="80 mel bins"):
        other_bins = WhisperFeatureExtractor(feature_size=80, hop_length=320, chunk_length=4)
        PotsaProcessor.from_config(copy.deepcopy(whisper_model.config), other_bins, tokenizer)


def test_window_is_the_whisper_extractors_own_and_chosen_for_waveform_extractors():
    _, processor = tiny_pair("whisper")
    with pytest.raises(ValueError, match="chunk_length"):
        PotsaProcessor(processor.feature_extractor, processor.tokenizer, languages=["es"], window_seconds=10)
    assert PotsaProcessor(processor.feature_extractor, processor.tokenizer, languages=["es"]).max_seconds == 4
    waveform = PotsaProcessor(Wav2Vec2FeatureExtractor(), processor.tokenizer, languages=["es"])
    assert waveform.max_seconds == 30 and waveform.window_samples == 30 * SAMPLING_RATE


# ------------------------------------------------------------------------------------------- checkpoints
def test_trainable_only_checkpoint_reloads_a_wav2vec2_encoder_from_its_id(tmp_path):
    """`from_base_models` / `from_pretrained` read the frozen encoder with `AutoModel` from its own checkpoint."""
    model, processor = tiny_pair("wav2vec2", "llama")
    model.speech_encoder.save_pretrained(tmp_path / "encoder")
    processor.feature_extractor.save_pretrained(tmp_path / "encoder")
    model.language_model.save_pretrained(tmp_path / "llm")
    processor.tokenizer.save_pretrained(tmp_path / "llm")
    config = copy.deepcopy(model.config)
    config.encoder_model_id, config.text_model_id = str(tmp_path / "encoder"), str(tmp_path / "llm")
    fresh = PotsaForSpeechTranslation.from_base_models(config).eval()
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(tmp_path / "trainable")
    reloaded = PotsaForSpeechTranslation.from_pretrained(tmp_path / "trainable")
    base_processor = PotsaProcessor.from_base_models(config, window_seconds=processor.max_seconds)
    clip = synthetic_audio(1.5)
    expected = _logits(model, processor, clip)
    torch.testing.assert_close(_logits(reloaded, base_processor, clip), expected, rtol=0, atol=0)




def test_fresh_process_loads_a_wav2vec2_checkpoint_with_trust_remote_code(tmp_path):
    model, processor = tiny_pair("wav2vec2", "llama")
    clip = synthetic_audio(1.5)
    model.save_pretrained(tmp_path / "bundle", include_base_weights=True)
    processor.save_pretrained(tmp_path / "bundle")
    np.save(tmp_path / "bundle" / "clip.npy", clip)
    # one thread, as in this process (conftest): the conv front end's sums then run in the same order
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    arguments = [str(tmp_path / "bundle"), str(tmp_path / "logits.pt")]
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, *arguments], check=True, cwd=tmp_path, env=environment)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _logits(model, processor, clip), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- LoRA
def test_lora_targets_must_exist_in_the_llm_family():
    llama, _ = build_tiny_potsa(llm_type="llama", use_lora=True)
    assert any(name.startswith("language_model.") and "lora_" in name for name, _ in llama.named_parameters())
    with pytest.raises(ValueError, match=r"\['k_proj', 'o_proj', 'q_proj', 'v_proj'\] are not modules.*c_attn"):
        build_tiny_potsa(llm_type="gpt2", use_lora=True)
    gpt2, processor = build_tiny_potsa(encoder_type="wav2vec2", llm_type="gpt2", use_lora=True,
                                       lora_target_modules=["c_attn"])  # fmt: skip
    gpt2.train()(**_training_batch(processor)).loss.backward()
    lora = [param for name, param in gpt2.named_parameters() if "lora_B" in name]
    assert lora and all(param.grad is not None for param in lora)


# ------------------------------------------------------------------------------------- pipeline and training
def test_pipeline_translates_arrays_for_a_wav2vec2_model(tmp_path):
    model, processor = tiny_pair("wav2vec2", "llama")
    clip = synthetic_audio(1.5)
    expected = processor.decode_translation(
        model.generate(**processor(clip, sampling_rate=SAMPLING_RATE, language="es"), max_new_tokens=3)[0]
    )
    translate = pipeline("speech-translation", model=model, processor=processor, device="cpu")
    assert translate(clip, sampling_rate=SAMPLING_RATE, language="es", max_new_tokens=3) == [
        {"translation_text": expected, "language": "es"}
    ]
    long_audio = np.concatenate([synthetic_audio(3.5, seed=1), synthetic_audio(3.5, seed=2)])  # two windows
    outputs = translate([long_audio, clip], sampling_rate=SAMPLING_RATE, language="ja", batch_size=3, max_new_tokens=3)
    assert [output["language"] for output in outputs] == ["ja", "ja"]
    translate.save_pretrained(tmp_path)
    from_directory = pipeline("translation", model=str(tmp_path), trust_remote_code=True, device="cpu")
    reloaded = from_directory(clip, sampling_rate=SAMPLING_RATE, language="es", max_new_tokens=3)
    assert reloaded == [{"translation_text": expected, "language": "es"}]


@torch.no_grad()
def test_collator_and_encoder_cache_feed_a_hubert_model(tmp_path):
    model, processor = tiny_pair("hubert", "qwen2")
    rows = [
        {"audio": {"array": synthetic_audio(seconds, seed), "sampling_rate": SAMPLING_RATE}, "language": code,
         "sentence_id": f"s{seed}", "transcript": None, "translation": "三月"}
        for seed, (seconds, code) in enumerate([(1.0, "es"), (2.2, "ja"), (0.6, "ru")])
    ]  # fmt: skip
    from_audio = _model_inputs(PotsaCollator(processor)(rows))
    assert from_audio["input_features"].shape == (3, 4 * SAMPLING_RATE)
    cache = cache_encoder_outputs(model, datasets.Dataset.from_list(rows), processor, tmp_path)
    from_cache = _model_inputs(PotsaCollator(processor, encoder_cache=cache)(rows))
    assert from_cache["encoder_attention_mask"].sum(dim=1).tolist() == [50, 110, 30]
    torch.testing.assert_close(model(**from_cache).loss, model(**from_audio).loss, rtol=1e-3, atol=1e-3)
