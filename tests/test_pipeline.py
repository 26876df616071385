"""The speech-translation pipeline: input forms, real batching, long audio, language detection, clear errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import pipeline

from modeling_potsa import PotsaSpeechTranslationPipeline
from modeling_potsa.bias_compensation import masked_time_mean
from modeling_potsa.configuration_potsa import PIPELINE_TASKS
from modeling_potsa.pipeline_potsa import join_translations, split_at_pauses

from .conftest import SAMPLING_RATE, synthetic_audio

SHORT = {"max_new_tokens": 3}  # random weights: what matters is the path, not the text


@pytest.fixture(scope="module")
def pipe(tiny):
    model, processor = tiny
    return pipeline("speech-translation", model=model, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def clip():
    return synthetic_audio(1.5)


def texts(outputs):
    return [output["translation_text"] for output in outputs]


def tone_language(index: int, seed: int, seconds: float = 1.5) -> np.ndarray:
    """Synthetic "language" `index`: a tone family whose pitch sets it apart from the other indices."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    pitch = 150 * (index + 1) * (1 + 0.02 * rng.standard_normal())
    envelope = (1 + np.sin(2 * np.pi * rng.uniform(3, 5) * t)) / 2
    return (0.3 * np.sin(2 * np.pi * pitch * t) * envelope + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def detecting_pipe(tiny):
    """A copy of the tiny model whose bias rows are the centroids of each tone family, as estimation would set."""
    model, processor = copy.deepcopy(tiny)
    with torch.no_grad():
        for index, code in enumerate(processor.languages):
            waveforms = [torch.from_numpy(tone_language(index, seed)) for seed in range(3)]
            features = processor.extract_features(waveforms)
            frames, frame_mask = model.encode_speech(features["input_features"], features["feature_attention_mask"])
            model.set_language_bias(code, masked_time_mean(frames, frame_mask).mean(dim=0))
    return PotsaSpeechTranslationPipeline(model=model, processor=processor, device="cpu")


def test_saving_names_the_pipeline_for_both_tasks(tiny, pipe, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model/config.json").read_text())
    impl = {"impl": "pipeline_potsa.PotsaSpeechTranslationPipeline", "pt": ["AutoModel"]}
    assert config["custom_pipelines"] == {task: impl for task in PIPELINE_TASKS}
    assert (tmp_path / "model/pipeline_potsa.py").is_file()
    pipe.save_pretrained(tmp_path / "pipe")  # the pipeline's own save also writes the processor
    saved = {path.name for path in (tmp_path / "pipe").iterdir()}
    assert {"pipeline_potsa.py", "processor_config.json", "config.json"} <= saved


def test_every_input_form_gives_the_same_translation(pipe, clip, tmp_path):
    soundfile.write(tmp_path / "clip.wav", clip, SAMPLING_RATE, subtype="FLOAT")
    forms = [
        clip,
        torch.from_numpy(clip),
        {"array": clip, "sampling_rate": SAMPLING_RATE},
        {"raw": clip, "sampling_rate": SAMPLING_RATE},
        {"audio": {"array": clip, "sampling_rate": SAMPLING_RATE}, "language": "es"},  # a datasets row
        str(tmp_path / "clip.wav"),
        np.stack([clip, clip]),  # stereo (channels, time) is averaged
        np.stack([clip, clip], axis=1),  # and (time, channels)
    ]
    expected = texts(pipe(clip, sampling_rate=SAMPLING_RATE, language="es", **SHORT))
    assert len(expected) == 1 and isinstance(expected[0], str)
    for form in forms:
        rate = None if isinstance(form, (str, dict)) else SAMPLING_RATE
        assert texts(pipe(form, sampling_rate=rate, language="es", **SHORT)) == expected, type(form)


def test_other_rates_pcm_and_compressed_files_translate(pipe, clip, tmp_path):
    pcm = (clip * 32767).astype(np.int16)
    soundfile.write(tmp_path / "clip.flac", clip, SAMPLING_RATE)
    soundfile.write(tmp_path / "clip.ogg", clip, SAMPLING_RATE)
    inputs = [
        {"array": pcm, "sampling_rate": SAMPLING_RATE},
        {"array": synthetic_audio(1.5, sampling_rate=22_050), "sampling_rate": 22_050},
        {"array": synthetic_audio(1.5, sampling_rate=8_000).astype(np.float64), "sampling_rate": 8_000},
        str(tmp_path / "clip.flac"),
        str(tmp_path / "clip.ogg"),
    ]
    outputs = pipe(inputs, language="ja", batch_size=2, **SHORT)
    assert [set(output) for output in outputs] == [{"translation_text", "language"}] * len(inputs)
    assert all(output["language"] == "ja" for output in outputs)


def test_batches_are_one_generate_call_each_and_match_batch_size_one(pipe, monkeypatch):
    inputs = [synthetic_audio(seconds, seed) for seed, seconds in enumerate((1.0, 2.0, 9.0, 0.5, 3.5))]
    languages = ["es", "ja", "ko", "ru", "en"]
    calls = []
    generate = pipe.model.generate
    monkeypatch.setattr(pipe.model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or generate(**kw))
    one_by_one = pipe(inputs, sampling_rate=SAMPLING_RATE, language=languages, batch_size=1, **SHORT)
    assert calls == [1] * 7  # the 9 s input is 3 windows of at most 4 s
    calls.clear()
    batched = pipe(inputs, sampling_rate=SAMPLING_RATE, language=languages, batch_size=4, **SHORT)
    assert calls == [4, 3]
    assert batched == one_by_one
    assert [output["language"] for output in batched] == languages


def test_split_at_pauses_cuts_in_the_quietest_frame_of_each_window():
    waveform = torch.from_numpy(synthetic_audio(10.0))
    for pause in (3.5, 7.0):  # 100 ms of silence inside the last 20 % of each 4 s window
        waveform[int(pause * SAMPLING_RATE) : int((pause + 0.1) * SAMPLING_RATE)] = 0
    pieces = split_at_pauses(waveform, window=4 * SAMPLING_RATE, frame=320)
    assert torch.equal(torch.cat(pieces), waveform)
    ends = np.cumsum([piece.numel() for piece in pieces])[:-1] / SAMPLING_RATE
    assert len(pieces) == 3 and all(piece.numel() <= 4 * SAMPLING_RATE for piece in pieces)
    assert 3.5 <= ends[0] <= 3.6 and 7.0 <= ends[1] <= 7.1
    assert len(split_at_pauses(waveform[: 4 * SAMPLING_RATE], window=4 * SAMPLING_RATE, frame=320)) == 1


def speech_with_pauses(stretches: list[tuple[float, float]], seed: int = 0) -> tuple[torch.Tensor, list, list]:
    """Voiced stretches (`synthetic_audio`), each followed by a pause of room noise 40 dB below the voice, from
    `(voiced seconds, pause seconds)`; returns the waveform and the (start, end) samples of its voiced stretches
    and of its pauses."""
    rng = np.random.default_rng(seed)
    parts, voiced, pauses, position = [], [], [], 0
    for index, (speech, pause) in enumerate(stretches):
        parts += [synthetic_audio(speech, seed=seed + index)]
        parts += [(0.003 * rng.standard_normal(int(pause * SAMPLING_RATE))).astype(np.float32)]
        voiced.append((position, position + parts[-2].size))
        pauses.append((voiced[-1][1], voiced[-1][1] + parts[-1].size))
        position = pauses[-1][1]
    return torch.from_numpy(np.concatenate(parts)), voiced, pauses


def cut_positions(pieces: list[torch.Tensor]) -> list[int]:
    return np.cumsum([piece.numel() for piece in pieces])[:-1].tolist()


WINDOW = 4 * SAMPLING_RATE
FRAME = 320


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.5, 6.0), st.floats(0.12, 1.0)), min_size=1, max_size=8), st.integers(0, 99))
def test_no_cut_falls_inside_speech_when_the_window_holds_a_pause(stretches, seed):
    """Pauses of at least 120 ms hold five whole 20 ms frames of silence wherever they fall: a pause by the rule."""
    waveform, voiced, pauses = speech_with_pauses(stretches, seed)
    pieces = split_at_pauses(waveform, WINDOW, FRAME)
    assert torch.equal(torch.cat(pieces), waveform)
    assert all(piece.numel() <= WINDOW for piece in pieces)
    start = 0
    for cut in cut_positions(pieces):
        # The searched part of the window is its last 80 %; a pause in it, clear of its edges, must be found.
        searched = (start + WINDOW // 5 + 2 * FRAME, start + WINDOW - 2 * FRAME)
        if any(searched[0] <= begin and end <= searched[1] for begin, end in pauses):
            assert not any(begin < cut < end for begin, end in voiced), (cut, start)
            event("a pause in the window: cut in it")
        else:
            event("no pause in the window")
        start = cut


def test_a_window_without_a_pause_near_its_end_is_cut_at_an_earlier_pause():
    waveform, voiced, _ = speech_with_pauses([(1.5, 0.3), (6.0, 0.0)])  # speech from 1.8 s to 7.8 s: past the window
    pieces = split_at_pauses(waveform, WINDOW, FRAME)
    assert voiced[0][1] < cut_positions(pieces)[0] < voiced[1][0]  # in the pause at 1.5-1.8 s, not in the last 0.8 s


def test_continuous_speech_is_cut_at_the_quietest_frame_near_the_window_end():
    waveform = torch.from_numpy(synthetic_audio(10.0, seed=4))  # syllable dips, but no 100 ms pause
    pieces = split_at_pauses(waveform, WINDOW, FRAME)
    assert torch.equal(torch.cat(pieces), waveform) and len(pieces) == 3
    assert all(0.8 * WINDOW <= piece.numel() <= WINDOW for piece in pieces[:-1])
    with pytest.raises(ValueError, match="at least 5 frames"):
        split_at_pauses(waveform, window=4 * FRAME, frame=FRAME)


def test_long_audio_is_translated_window_by_window_and_joined(pipe):
    audio = synthetic_audio(9.0, seed=3)
    pieces = split_at_pauses(torch.from_numpy(audio), window=4 * SAMPLING_RATE, frame=320)
    windows = texts(pipe([piece.numpy() for piece in pieces], sampling_rate=SAMPLING_RATE, language="es", **SHORT))
    whole = texts(pipe(audio, sampling_rate=SAMPLING_RATE, language="es", **SHORT))
    assert whole == ["".join(windows)]  # Chinese target: no space
    assert join_translations(["uno", "", "dos"], "es") == "uno dos"
    assert join_translations(["一", "二"], "zh") == join_translations(["一", "二"], "zh-TW") == "一二"


def test_language_is_detected_from_the_nearest_bias_centroid(detecting_pipe, tiny):
    languages = detecting_pipe.processor.languages
    held_out = [(tone_language(index, seed=100 + index), code) for index, code in enumerate(languages)]
    audio = [{"array": array, "sampling_rate": SAMPLING_RATE} for array, _ in held_out]
    assert detecting_pipe.detect_language(audio) == languages
    assert detecting_pipe.detect_language(audio[1]) == languages[1]
    outputs = detecting_pipe(audio, batch_size=4, **SHORT)  # language=None: detected inside the batched forward
    assert [output["language"] for output in outputs] == languages

    untrained = PotsaSpeechTranslationPipeline(model=tiny[0], processor=tiny[1], device="cpu")
    with pytest.raises(ValueError, match=r"never estimated.*Pass `language=`"):
        untrained(audio[0], **SHORT)
    with pytest.raises(ValueError, match="never estimated"):
        untrained.detect_language(audio[0])


def test_generation_arguments_pass_through(pipe, clip):
    generation = {"num_beams": 2, "no_repeat_ngram_size": 2, "max_new_tokens": 2}
    output = pipe(clip, sampling_rate=SAMPLING_RATE, language="es", **generation)
    assert len(output[0]["translation_text"]) <= 2  # character tokenizer: at most one character per token
    with pytest.raises(ValueError, match="num_beam"):
        pipe(clip, sampling_rate=SAMPLING_RATE, language="es", num_beam=2)  # a typo is not silently ignored


@pytest.mark.parametrize(
    ("audio", "kwargs", "message"),
    [
        (np.zeros(0, np.float32), {}, "Empty audio"),
        (np.zeros(16000, np.float32), {}, "silent"),
        (np.full(16000, np.nan, np.float32), {}, "NaN"),
        (np.full(16000, np.inf, np.float32), {}, "NaN or infinite"),
        (np.ones(16000, np.float32) * 1e20, {}, "amplitude too large"),
        (np.ones(16000, np.int64), {}, "silent"),  # int64 is read as 16-bit PCM: 1/32768 is silence
        (np.full(16000, 2**40, np.int64), {}, "not 16- or 32-bit PCM"),
        (np.ones(16000, bool), {}, "dtype"),
        (np.ones(16000, np.complex64), {}, "dtype"),
        (np.ones((2, 2, 16000), np.float32), {}, "shape"),
        ("/no/such/file.wav", {}, "not found"),
        (np.ones(16000, np.float32), {"sampling_rate": None}, "Missing sampling rate"),
        (np.ones(16000, np.float32), {"sampling_rate": 0}, "sampling rate"),
        (np.ones(16000, np.float32), {"language": "xx"}, r"Unknown language 'xx'.*'en'"),
        ([], {}, "Empty batch"),
        ([np.ones(16000, np.float32)] * 2, {"language": ["es"]}, "1 languages for 2"),
        ([np.ones(16000, np.float32), np.zeros(8, np.float32)], {}, "Input 1: All-silent"),
    ],
)
def test_bad_input_is_a_value_error_that_names_the_problem(pipe, audio, kwargs, message):
    kwargs = {"sampling_rate": SAMPLING_RATE, "language": "es", **kwargs, **SHORT}
    with pytest.raises(ValueError, match=message):
        pipe(audio, **kwargs)


def test_unreadable_file_is_a_value_error(pipe, tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(ValueError, match="Cannot decode"):
        pipe(str(tmp_path / "notes.wav"), language="es", **SHORT)


# Repeats weight the draws so that about a quarter of the examples are valid audio.
DTYPES = [np.float32, np.float32, np.float64, np.float16, np.int16, np.int32, np.int64, np.uint8, np.bool_]
KINDS = ["noise"] * 6 + ["zeros", "constant", "nan", "inf", "huge"]


@st.composite
def audio_inputs(draw):
    """Arrays of any shape up to 3-D, dtype, length (up to ~3 windows) and values, at any rate (or none)."""
    dtype = draw(st.sampled_from(DTYPES))
    rate = draw(st.sampled_from([None, 0, 7_999, 8_000, 16_000, 16_000, 22_050, 44_100, 400_000]))
    length = draw(st.sampled_from([0, 1, 2, 50, 4_000, 16_000, 70_000, 150_000]))
    shape = draw(st.sampled_from([(length,), (1, length), (2, length), (length, 2), (3, 2, length)]))
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = {
        "noise": rng.standard_normal(shape) * draw(st.sampled_from([1e-6, 0.3, 1.0, 1e3])),
        "zeros": np.zeros(shape),
        "constant": np.full(shape, 0.5),
        "nan": np.where(rng.random(shape) < 0.01, np.nan, 0.1),
        "inf": np.where(rng.random(shape) < 0.01, np.inf, 0.1),
        "huge": np.full(shape, 1e30),
    }[kind]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.nan_to_num(values * info.max), info.min, info.max)
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype), rate


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(audio_inputs())
def test_any_array_translates_or_raises_a_value_error(pipe, example):
    """No other exception type, no NaN reaching the model, no hang (max_new_tokens bounds the work)."""
    array, rate = example
    encoder_outputs = []
    hook = pipe.model.speech_encoder.register_forward_hook(
        lambda module, args, output: encoder_outputs.append(bool(torch.isfinite(output.last_hidden_state).all()))
    )
    try:
        outputs = pipe(array, sampling_rate=rate, language="es", max_new_tokens=2)
    except ValueError as error:
        event(f"ValueError: {str(error).split(':')[0][:40]}")  # --hypothesis-show-statistics lists the outcomes
    else:
        event("translated")
        assert isinstance(outputs[0]["translation_text"], str) and encoder_outputs and all(encoder_outputs)
    finally:
        hook.remove()
