"""PotsaProcessor and audio loading: the tensors it builds and the clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import soxr
import torch

from modeling_potsa import PotsaProcessor
from modeling_potsa.audio import load_waveform
from modeling_potsa.processing_potsa import IGNORE_INDEX

from .conftest import SAMPLING_RATE, synthetic_audio


def test_training_batch_layout(tiny_processor):
    batch = tiny_processor(
        [synthetic_audio(1.0), synthetic_audio(2.0, seed=1)],
        sampling_rate=SAMPLING_RATE,
        language=["es", "ko"],
        text=["三月", "十四点三十分"],
    )
    window = tiny_processor.feature_extractor.nb_max_frames
    assert batch["input_features"].shape == (2, 40, window)
    assert batch["feature_attention_mask"].shape == (2, window)
    assert batch["feature_attention_mask"][0].sum() < batch["feature_attention_mask"][1].sum() < window
    assert batch["language_ids"].tolist() == [1, 3]
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert attention[0, -1] == 0 and attention[1, -1] == 1  # right padding for training
    target = tiny_processor.tokenizer.decode(labels[1][labels[1] != IGNORE_INDEX], skip_special_tokens=True)
    assert target == "十四点三十分"
    assert (labels[0][attention[0] == 0] == IGNORE_INDEX).all()
    assert (ids == tiny_processor.speech_token_id).sum(dim=1).tolist() == [8, 8]


def test_generation_prompts_are_left_padded(tiny_processor):
    processor = PotsaProcessor(
        tiny_processor.feature_extractor,
        tiny_processor.tokenizer,
        languages=["en", "ja"],
        num_query_tokens=4,
        prompt_template="<|speech|>{instruction}",
    )
    batch = processor([synthetic_audio(1.0)] * 2, sampling_rate=SAMPLING_RATE, language=["en", "ja"])
    assert "labels" not in batch
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].tolist() == [1, 1]
    prompt = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert prompt == "Translate the English speech into Chinese."


def test_chain_task_target_and_decoding(tiny_processor):
    batch = tiny_processor(
        synthetic_audio(1.0), sampling_rate=SAMPLING_RATE, language="es", text="三", transcript="tres", task="chain"
    )
    labels = batch["labels"][0]
    assert tiny_processor.tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True) == "tres\n三"
    ids = tiny_processor.tokenizer.encode("tres\n三", add_special_tokens=False)
    assert tiny_processor.decode_translation(ids, task="chain") == "三"
    with pytest.raises(ValueError, match="transcript"):
        tiny_processor(synthetic_audio(1.0), sampling_rate=SAMPLING_RATE, language="es", text="三", task="chain")
    with pytest.raises(ValueError, match="Unknown task"):
        tiny_processor(synthetic_audio(1.0), sampling_rate=SAMPLING_RATE, language="es", task="summarise")


def test_resampling_matches_soxr_and_int16_is_scaled():
    audio = synthetic_audio(1.0, sampling_rate=22_050)
    waveform = load_waveform(audio, sampling_rate=22_050)
    expected = soxr.resample(audio, 22_050, SAMPLING_RATE, quality="HQ")
    np.testing.assert_allclose(waveform.numpy(), expected, atol=1e-6)
    pcm = (audio * 32767).astype(np.int16)
    np.testing.assert_allclose(load_waveform(pcm, 22_050).numpy(), expected, atol=2e-4)
    # `datasets` rows give int16 PCM back as Python ints: the same samples, the same waveform
    torch.testing.assert_close(load_waveform(pcm.tolist(), 22_050), load_waveform(pcm, 22_050))


def test_inputs_users_pass(tmp_path):
    audio = synthetic_audio(0.5)
    reference = load_waveform(audio, SAMPLING_RATE)
    torch.testing.assert_close(load_waveform(torch.from_numpy(audio), SAMPLING_RATE), reference)
    torch.testing.assert_close(load_waveform(audio.tolist(), SAMPLING_RATE), reference)
    torch.testing.assert_close(load_waveform({"array": audio, "sampling_rate": SAMPLING_RATE}), reference)
    torch.testing.assert_close(load_waveform({"raw": audio, "sampling_rate": SAMPLING_RATE}), reference)
    path = tmp_path / "clip.flac"
    soundfile.write(path, np.stack([audio, audio], axis=1), SAMPLING_RATE)
    with pytest.raises(ValueError, match="2 channels"):
        load_waveform(path)
    torch.testing.assert_close(load_waveform(path, downmix=True), reference, atol=1e-4, rtol=0)
    stereo = np.stack([audio, 0.5 * audio])  # (channels, time)
    torch.testing.assert_close(load_waveform(stereo, SAMPLING_RATE, downmix=True), 0.75 * reference)


@pytest.mark.parametrize(
    ("audio", "kwargs", "message"),
    [
        (synthetic_audio(1.0), {}, "Missing sampling rate"),
        (synthetic_audio(1.0), {"sampling_rate": 0}, "Wrong sampling rate 0"),
        (synthetic_audio(1.0), {"sampling_rate": 16000.5}, "whole number"),
        (np.zeros(0, np.float32), {"sampling_rate": 16000}, "Empty audio"),
        (np.zeros(16000, np.float32), {"sampling_rate": 16000}, "All-silent"),
        (np.full(16000, np.nan, np.float32), {"sampling_rate": 16000}, "NaN or infinite"),
        (np.r_[synthetic_audio(1.0), np.inf].astype(np.float32), {"sampling_rate": 16000}, "NaN or infinite"),
        (np.ones(16000, dtype=bool), {"sampling_rate": 16000}, "Unsupported audio dtype"),
        (np.ones(16000, dtype=np.complex64), {"sampling_rate": 16000}, "Unsupported audio dtype"),
        (np.ones((2, 3, 100), np.float32), {"sampling_rate": 16000}, "1-D"),
        (np.stack([synthetic_audio(1.0)] * 2), {"sampling_rate": 16000}, "downmix=True"),
        (synthetic_audio(4.5), {"sampling_rate": 16000}, "longer than the encoder window of 4 s"),
        (np.full(2, 0.5, np.float32), {"sampling_rate": 48000}, "too short"),  # < 2 samples once at 16 kHz
        ({"array": synthetic_audio(1.0)}, {}, "Missing sampling rate"),
        ({"array": synthetic_audio(1.0), "sampling_rate": 8000}, {"sampling_rate": 16000}, "Wrong sampling rate.*8000 Hz.*16000 Hz"),
        ("/no/such/file.wav", {}, "not found"),
        ("object", {"sampling_rate": 16000}, "not found"),
    ],
)
def test_bad_audio_raises_a_clear_error(tiny_processor, audio, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(audio, language="es", **kwargs)


def test_unreadable_file(tiny_processor, tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ValueError, match="Cannot decode"):
        tiny_processor(str(path), language="es")


def test_language_errors(tiny_processor):
    with pytest.raises(ValueError, match=r"Unknown language 'xx'.*'en'"):
        tiny_processor(synthetic_audio(1.0), sampling_rate=SAMPLING_RATE, language="xx")
    with pytest.raises(ValueError, match="Pass `language=`"):
        tiny_processor(synthetic_audio(1.0), sampling_rate=SAMPLING_RATE)
    with pytest.raises(ValueError, match="2 values for `language`"):
        tiny_processor([synthetic_audio(1.0)], sampling_rate=SAMPLING_RATE, language=["en", "es"])
    with pytest.raises(ValueError, match="Empty batch"):
        tiny_processor([], sampling_rate=SAMPLING_RATE, language="en")


def test_save_and_reload(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    loaded = PotsaProcessor.from_pretrained(tmp_path)
    assert loaded.languages == tiny_processor.languages and loaded.num_query_tokens == 8
    assert loaded.speech_token_id == tiny_processor.speech_token_id
    clip = synthetic_audio(1.0)
    a = tiny_processor(clip, sampling_rate=SAMPLING_RATE, language="ja", text="五")
    b = loaded(clip, sampling_rate=SAMPLING_RATE, language="ja", text="五")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
