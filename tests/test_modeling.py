"""PotsaForSpeechTranslation: what trains, what the loss covers, padding invariance, generation, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from modeling_potsa import PotsaForSpeechTranslation
from modeling_potsa.processing_potsa import IGNORE_INDEX

from .conftest import SAMPLING_RATE, synthetic_audio

TRAINABLE_PREFIXES = ("query_tokens", "bias_compensation.", "qformer.", "projector.")


@pytest.fixture
def training_batch(tiny_processor):
    audio = [synthetic_audio(1.0, seed=1), synthetic_audio(2.7, seed=2), synthetic_audio(0.4, seed=3)]
    return tiny_processor(
        audio, sampling_rate=SAMPLING_RATE, language=["es", "ja", "ru"], text=["三月三日", "十四点三十分", "七"]
    )


def test_gradients_reach_only_trainable_parts(tiny_model, training_batch):
    model = copy.deepcopy(tiny_model).train()
    output = model(**training_batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith(TRAINABLE_PREFIXES):
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert model.query_tokens.grad.abs().sum() > 0 and model.bias_compensation.bias.grad.abs().sum() > 0


def test_loss_covers_target_tokens_only(tiny_model, training_batch):
    labels = training_batch["labels"]
    speech = training_batch["input_ids"] == tiny_model.config.speech_token_id
    assert (labels[speech] == IGNORE_INDEX).all()
    output = tiny_model(**training_batch)
    shifted_logits, shifted_labels = output.logits[:, :-1], labels[:, 1:]
    expected = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(output.loss, expected)
    target_tokens = int((labels != IGNORE_INDEX).sum())
    summed = tiny_model(**training_batch, num_items_in_batch=1).loss
    torch.testing.assert_close(summed / target_tokens, expected)


def test_unknown_keyword_argument_raises(tiny_model, training_batch):
    with pytest.raises(TypeError, match="input_values"):
        tiny_model(**training_batch, input_values=training_batch["input_features"])


def test_qformer_hidden_states_for_every_layer(tiny_model, training_batch):
    output = tiny_model(**training_batch, output_qformer_hidden_states=True)
    config = tiny_model.config
    assert len(output.qformer_hidden_states) == config.num_qformer_layers + 1
    for states in output.qformer_hidden_states:
        assert states.shape == (3, config.num_query_tokens, config.qformer_config.hidden_size)
    assert tiny_model(**training_batch).qformer_hidden_states is None


def test_forward_is_padding_invariant(tiny_model, tiny_processor):
    """An utterance gives the same logits alone and next to a longer one (features pad to the window)."""
    short, long = synthetic_audio(0.8, seed=4), synthetic_audio(3.9, seed=5)
    alone = tiny_processor(short, sampling_rate=SAMPLING_RATE, language="es", text="二十")
    batch = tiny_processor([long, short], sampling_rate=SAMPLING_RATE, language=["ko", "es"], text=["二千零五", "二十"])
    width = alone["input_ids"].shape[1]
    torch.testing.assert_close(tiny_model(**batch).logits[1, :width], tiny_model(**alone).logits[0])


def test_generate_is_deterministic_and_padding_invariant(tiny_model, tiny_processor):
    clips = [synthetic_audio(1.2, seed=6), synthetic_audio(3.0, seed=7)]
    batch = tiny_processor(clips, sampling_rate=SAMPLING_RATE, language=["en", "ja"])
    first = tiny_model.generate(**batch, max_new_tokens=6, do_sample=False)
    again = tiny_model.generate(**batch, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(first, again)
    alone = tiny_processor(clips[1], sampling_rate=SAMPLING_RATE, language="ja")
    single = tiny_model.generate(**alone, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(first[1, : single.shape[1]], single[0])


def test_generation_kwargs_pass_through(tiny_model, tiny_processor):
    batch = tiny_processor(synthetic_audio(1.0, seed=8), sampling_rate=SAMPLING_RATE, language="ru")
    beams = tiny_model.generate(**batch, num_beams=3, no_repeat_ngram_size=2, max_new_tokens=5, do_sample=False)
    assert beams.shape[1] <= 5
    tokens = beams[0].tolist()
    bigrams = list(zip(tokens, tokens[1:]))
    assert len(bigrams) == len(set(bigrams))
    with pytest.raises(ValueError, match="not_a_generation_argument"):
        tiny_model.generate(**batch, max_new_tokens=2, not_a_generation_argument=1)


def test_generation_needs_left_padding(tiny_model, training_batch):
    inputs = {k: v for k, v in training_batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="left-padded"):
        tiny_model.generate(**inputs, max_new_tokens=2)


def test_wrong_placeholder_count_is_an_error(tiny_model, training_batch):
    batch = dict(training_batch)
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][0, batch["input_ids"][0] == tiny_model.config.speech_token_id] = 5
    with pytest.raises(ValueError, match="exactly 8 speech tokens"):
        tiny_model(**batch)


def test_language_ids_are_checked(tiny_model, training_batch):
    batch = dict(training_batch)
    with pytest.raises(ValueError, match="language_ids"):
        tiny_model(**{**batch, "language_ids": None})
    with pytest.raises(ValueError, match=r"must be in \[0, 6\)"):
        tiny_model(**{**batch, "language_ids": torch.tensor([0, 1, 6])})


def test_qformer_ignores_masked_frames(tiny_model):
    """Cached-encoder input: frames outside the mask cannot change the soft prompt."""
    frames = torch.randn(2, 20, tiny_model.config.encoder_hidden_size)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, :12] = True
    ids = torch.tensor([1, 2])
    reference, _ = tiny_model.speech_to_soft_prompt(frames, mask, ids)
    perturbed = frames.clone()
    perturbed[:, 12:] += 100 * torch.randn_like(perturbed[:, 12:])
    torch.testing.assert_close(tiny_model.speech_to_soft_prompt(perturbed, mask, ids)[0], reference)


def test_cached_encoder_outputs_match_features(tiny_model, training_batch):
    frames, frame_mask = tiny_model.encode_speech(
        training_batch["input_features"], training_batch["feature_attention_mask"]
    )
    cached = {k: v for k, v in training_batch.items() if k not in ("input_features", "feature_attention_mask")}
    from_cache = tiny_model(**cached, encoder_hidden_states=frames, encoder_attention_mask=frame_mask)
    torch.testing.assert_close(from_cache.logits, tiny_model(**training_batch).logits)


def test_bias_compensation_removes_a_language_offset(tiny_model):
    """Shifting a language's frames by v and its bias row by v leaves the model's view unchanged."""
    model = copy.deepcopy(tiny_model)
    frames = torch.randn(1, 16, model.config.encoder_hidden_size)
    mask = torch.ones(1, 16, dtype=torch.bool)
    ids = torch.tensor([model.config.language_id("ko")])
    offset = torch.randn(model.config.encoder_hidden_size)
    reference, _ = model.speech_to_soft_prompt(frames, mask, ids)
    model.set_language_bias("ko", offset)
    torch.testing.assert_close(model.speech_to_soft_prompt(frames + offset, mask, ids)[0], reference)


def test_add_language_for_zero_shot(tiny_model):
    model = copy.deepcopy(tiny_model)
    vector = torch.randn(model.config.encoder_hidden_size)
    model.add_language("de", vector)
    assert model.config.languages[-1] == "de" and model.config.language_id("de") == 6
    torch.testing.assert_close(model.bias_compensation.bias[6], vector)
    assert model.bias_compensation.bias.requires_grad
    with pytest.raises(ValueError, match="already supported"):
        model.add_language("de", vector)


def test_lora_is_optional_and_trainable(tiny):
    model, _ = tiny
    config = copy.deepcopy(model.config)
    config.use_lora, config.lora_target_modules = True, ["q_proj", "v_proj"]
    lora_model = PotsaForSpeechTranslation(config)
    lora_names = [name for name, p in lora_model.named_parameters() if p.requires_grad and "lora_" in name]
    assert lora_names and all(name.startswith("language_model.") for name in lora_names)
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_rows_without_targets_add_no_loss_and_no_nan(tiny_model, tiny_processor):
    """Unlabeled audio (zero-shot languages joining only the OT loss) must not turn the CE into 0/0."""
    audio = [synthetic_audio(1.0, seed=9), synthetic_audio(1.5, seed=10)]
    mixed = tiny_processor(audio, sampling_rate=SAMPLING_RATE, language=["ko", "es"], text=[None, "三"])
    assert (mixed["labels"][0] == IGNORE_INDEX).all()
    labeled = tiny_processor(audio[1], sampling_rate=SAMPLING_RATE, language="es", text="三")
    width = labeled["input_ids"].shape[1]
    assert torch.isfinite(tiny_model(**mixed).loss)
    torch.testing.assert_close(tiny_model(**mixed).logits[1, :width], tiny_model(**labeled).logits[0])
    unlabeled = tiny_processor(audio, sampling_rate=SAMPLING_RATE, language=["ko", "es"], text=[None, None])
    model = copy.deepcopy(tiny_model).train()
    loss = model(**unlabeled, num_items_in_batch=0).loss
    assert loss.item() == 0.0
    loss.backward()
