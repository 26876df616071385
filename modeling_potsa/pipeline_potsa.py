"""Speech translation pipeline: any audio a user has -> `[{"translation_text": ..., "language": ...}]`.

transformers 5 removed the built-in "translation" task, so this pipeline ships with every checkpoint as remote code:
saving a model writes `custom_pipelines` (both "translation" and "speech-translation") into its config.json and
copies this file next to the model code, and

    pipe = pipeline("translation", model="user/potsa-model", trust_remote_code=True)
    pipe("clip.flac", language="es", num_beams=4)  # -> [{"translation_text": "...", "language": "es"}]

works without installing potsa. Importing `modeling_potsa` also registers "speech-translation" in this process, for
`pipeline("speech-translation", model=model, processor=processor)` with objects already in memory.

What it adds to `model.generate`:

- Inputs: file paths (wav/flac/ogg), arrays with `sampling_rate=`, `{"array"|"raw", "sampling_rate"}` dicts,
  `datasets` rows `{"audio": ..., "language": ...}` and lists of all of these. Any rate is resampled to 16 kHz,
  channels are averaged, int16/int32 PCM is scaled; bad input is a `ValueError` that names the problem.
- Batching: the windows of a list of inputs go through the model `batch_size` at a time, one `generate` call each.
- Long audio: cut into pieces no longer than the encoder window, without overlap so that no speech is translated
  twice, each cut in a pause so that no word is split. Energy is measured in 20 ms frames (Whisper's frame rate) and
  averaged over 100 ms; a *pause* is a 100 ms stretch at least 25 dB quieter than the clip's speech level (the 90th
  percentile of its frame energies, so that a clip with long silences still has speech as its reference). Each
  window is cut at the quietest point of its last 20 % if that point is a pause; if not (speech runs up to the
  window's end), of its last 40 %, 60 % or 80 %, the first of these spans that holds a pause; and only when none
  does (no pause anywhere but the window's first fifth) at the quietest point of the last 20 %, the least bad cut
  that keeps pieces long. Pieces are thus at least a fifth of the window, and a cut falls inside a word only when
  the window holds no pause. The pieces' translations are joined with no space for targets written without spaces
  (Chinese, Japanese, Thai, ...) and with one space otherwise.
- `language=None`: each window's language is the nearest language centroid (bias row) to its time-pooled encoder
  output; `detect_language` does this per input, over all its windows.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Pipeline

from .audio import SILENCE_PEAK, load_waveform
from .bias_compensation import masked_time_mean

DEFAULT_MAX_NEW_TOKENS = 128  # the LLM's own default (max_length=20) would cut most translations short
FRAME_SECONDS = 0.02  # energy frame of the pause search: Whisper's frame rate after its stride-2 convolution
PAUSE_FRAMES = 5  # a pause lasts at least 100 ms: shorter dips (between syllables, in a stop consonant) are no pause
PAUSE_DB = 25.0  # ... and is this much quieter than the clip's speech level
SPEECH_LEVEL_QUANTILE = 0.9  # the clip's speech level: the frame energy that 10 % of its frames exceed
SEARCH_FRACTIONS = (0.2, 0.4, 0.6, 0.8)  # end-of-window spans searched for a pause, shortest first
# Written without spaces between words: window translations are concatenated as they are.
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo"})


def split_at_pauses(waveform: torch.Tensor, window: int, frame: int) -> list[torch.Tensor]:
    """Cut a 1-D waveform into consecutive pieces of at most `window` samples, each cut in the middle of a `frame`
    chosen by the rule of the module docstring. Audio no longer than `window` stays whole; the pieces concatenate
    back to `waveform`."""
    if window < PAUSE_FRAMES * frame:
        raise ValueError(f"The window ({window} samples) must hold at least {PAUSE_FRAMES} frames of {frame} samples.")
    if waveform.numel() <= window:
        return [waveform]
    # (frames,) mean power of consecutive frames (a short last frame is averaged over its own samples)
    power = F.avg_pool1d(waveform.float().pow(2).view(1, 1, -1), frame, frame, ceil_mode=True).view(-1)
    pause_level = power.quantile(SPEECH_LEVEL_QUANTILE) * 10 ** (-PAUSE_DB / 10)
    # (frames,) the same, averaged over the PAUSE_FRAMES frames centred on each frame
    power = F.avg_pool1d(power.view(1, 1, -1), PAUSE_FRAMES, 1, PAUSE_FRAMES // 2, count_include_pad=False).view(-1)
    window_frames = window // frame
    pieces, start = [], 0
    while waveform.numel() - start > window:
        last = (start + window - frame // 2) // frame  # the window's last frame whose middle is inside it
        cut = _cut_frame(power, pause_level, last, window_frames) * frame + frame // 2
        pieces.append(waveform[start:cut])
        start = cut
    pieces.append(waveform[start:])
    return pieces


def _quietest_frame(power: torch.Tensor, last: int, span: int) -> int:
    """Index of the quietest of the `span` frames that end with frame `last`."""
    first = last + 1 - span
    return first + int(power[first : last + 1].argmin())


def _cut_frame(power: torch.Tensor, pause_level: torch.Tensor, last: int, window_frames: int) -> int:
    """The frame to cut in, for a window of `window_frames` frames ending with frame `last`: the quietest frame of the
    shortest end span (`SEARCH_FRACTIONS`) that holds a pause, else the quietest frame of the shortest span."""
    spans = [int(fraction * window_frames) for fraction in SEARCH_FRACTIONS]
    for span in spans:
        quietest = _quietest_frame(power, last, span)
        if power[quietest] <= pause_level:
            return quietest
    return _quietest_frame(power, last, spans[0])


def join_translations(texts: Iterable[str], target_language: str) -> str:
    """One text from the translations of consecutive windows (see the module docstring for the rule)."""
    separator = "" if target_language.split("-")[0].split("_")[0] in UNSPACED_LANGUAGES else " "
    return separator.join(text for text in texts if text)


def _unwrap(inputs: Any, language: str | None) -> tuple[Any, str | None]:
    """A `datasets` row `{"audio": ..., "language": ...}` -> (audio, its language); other inputs are the audio."""
    if isinstance(inputs, dict) and "audio" in inputs:
        return inputs["audio"], inputs.get("language", language)
    return inputs, language


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class PotsaSpeechTranslationPipeline(Pipeline):
    """Speech -> text in `model.config.target_language`, for `PotsaForSpeechTranslation`.

    Build it with `pipeline("translation", model=path_or_repo, trust_remote_code=True)` or, with objects in memory,
    `PotsaSpeechTranslationPipeline(model=model, processor=processor)`. Inputs are one audio input or a list of them
    (a `datasets.Dataset` or a generator is not a list: pass lists of rows, as examples/batch_translate.py does).

    Call arguments (also accepted at construction, as defaults):
        language (`str`, `list[str]` or `None`): language code of the inputs (one per input as a list); a row's own
            "language" wins. `None` detects it from the audio (needs an estimated bias table).
        sampling_rate (`int`): rate of raw arrays (files and dicts carry their own).
        task (`str`, defaults to `"translate"`): the processor's prompt task ("translate", "transcribe", "chain").
        batch_size (`int`, defaults to 1): windows per `generate` call.
        anything else (`num_beams`, `max_new_tokens`, `no_repeat_ngram_size`, ...): passed to `generate`, which
            rejects unknown names. `max_new_tokens` defaults to 128.

    `detect_language(audio)` gives the language of inputs without translating them.

    Returns:
        Following transformers' text2text pipelines: for one input a list with one dict, for a list of inputs one dict
        per input; each dict has "translation_text" and "language" (given or detected; the most frequent one over
        the windows of a long input).
    """

    _load_processor = True
    _load_tokenizer = False  # the processor holds the tokenizer and builds (left-padded) prompts itself
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False

    def __init__(self, model: Any, processor: Any = None, **kwargs: Any) -> None:
        if processor is None:
            raise ValueError(
                "The speech-translation pipeline needs the checkpoint's PotsaProcessor: pass `processor=`, or give "
                "`pipeline()` a checkpoint directory / repo id that contains it."
            )
        super().__init__(model=model, processor=processor, **kwargs)

    # ------------------------------------------------------------------------------------------------- parameters
    def _sanitize_parameters(
        self, language: Any = None, sampling_rate: int | None = None, task: str | None = None, **generate_kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Split call arguments into preprocess / forward / postprocess ones (only those actually given)."""
        preprocess_params: dict[str, Any] = {}
        if language is not None:
            preprocess_params["language"] = language
        if sampling_rate is not None:
            preprocess_params["sampling_rate"] = sampling_rate
        forward_params: dict[str, Any] = dict(generate_kwargs)
        postprocess_params: dict[str, Any] = {}
        if task is not None:
            forward_params["task"] = postprocess_params["task"] = task
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, inputs: Any, batch_size: int | None = None, **kwargs: Any) -> list[dict[str, str]]:
        """Translate one input or a list of inputs (see the class docstring); one `generate` call per batch."""
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("Empty batch: pass at least one audio input.")
        batch_size = batch_size or self._batch_size or 1
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        preprocess_params, forward_params, postprocess_params = (
            {**defaults, **given}
            for defaults, given in zip(
                (self._preprocess_params, self._forward_params, self._postprocess_params),
                self._sanitize_parameters(**kwargs),
            )
        )
        languages = preprocess_params.pop("language", None)
        if isinstance(languages, (list, tuple)):
            if len(languages) != len(items):
                raise ValueError(f"Got {len(languages)} languages for {len(items)} audio inputs.")
        else:
            languages = [languages] * len(items)

        windows = (
            (index, window)
            for index, (item, language) in enumerate(zip(items, languages))
            for window in self._preprocess_item(item, language, preprocess_params, None if single else index)
        )
        window_outputs: list[list[dict[str, Any]]] = [[] for _ in items]
        for batch in _batched(windows, batch_size):
            indices, model_inputs = zip(*batch)
            collated = {key: torch.cat([inputs[key] for inputs in model_inputs]) for key in model_inputs[0]}
            for index, output in zip(indices, self.forward(collated, **forward_params)):
                window_outputs[index].append(output)
        results = [self.postprocess(outputs, **postprocess_params) for outputs in window_outputs]
        return results[0] if single else [result[0] for result in results]

    def _preprocess_item(
        self, item: Any, language: str | None, params: dict[str, Any], index: int | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """`preprocess`, with the position of a failing input of a list in its error message."""
        try:
            yield from self.preprocess(item, language=language, **params)
        except ValueError as error:
            if index is None:
                raise
            raise ValueError(f"Input {index}: {error}") from error

    # ------------------------------------------------------------------------------------------------------ steps
    def preprocess(
        self, inputs: Any, language: str | None = None, sampling_rate: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One input -> its windows' encoder inputs (each padded to the window: `(1, n_mels, frames)` log-mels or a
        `(1, samples)` waveform, so windows batch together), mask and language id (-1: detect)."""
        audio, language = _unwrap(inputs, language)
        language_id = -1 if language is None else self.processor.language_id(language)
        for window in self._windows(audio, sampling_rate):
            yield {**self._features([window]), "language_ids": torch.tensor([language_id])}

    def _forward(
        self, model_inputs: dict[str, torch.Tensor], task: str = "translate", **generate_kwargs: Any
    ) -> list[dict[str, Any]]:
        """A batch of windows -> one `generate` call. The encoder runs once: its frames also give the language."""
        frames, frame_mask = self._encode(model_inputs)
        language_ids = model_inputs["language_ids"].clone()
        unknown = language_ids < 0
        if unknown.any():
            language_ids[unknown] = self._nearest_language(masked_time_mean(frames[unknown], frame_mask[unknown]))
        languages = [self.processor.languages[i] for i in language_ids.tolist()]
        prompts = self.processor.tokenize(languages, task)
        if "max_new_tokens" not in generate_kwargs and "max_length" not in generate_kwargs:
            generate_kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        tokens = self.model.generate(
            input_ids=prompts["input_ids"].to(self.device),
            attention_mask=prompts["attention_mask"].to(self.device),
            language_ids=language_ids,
            encoder_hidden_states=frames,
            encoder_attention_mask=frame_mask,
            **generate_kwargs,
        )
        return [{"tokens": row, "language": language} for row, language in zip(tokens, languages)]

    def postprocess(self, model_outputs: list[dict[str, Any]], task: str = "translate") -> list[dict[str, str]]:
        """The windows of one input -> `[{"translation_text", "language"}]`."""
        texts = [self.processor.decode_translation(output["tokens"], task) for output in model_outputs]
        language = Counter(output["language"] for output in model_outputs).most_common(1)[0][0]
        return [{"translation_text": join_translations(texts, self.processor.target_language), "language": language}]

    # -------------------------------------------------------------------------------------------------- language
    @torch.no_grad()
    def detect_language(self, audio: Any, sampling_rate: int | None = None) -> str | list[str]:
        """Language code of each input (a list for a list): the bias row nearest to the input's encoder output
        averaged over all valid frames of all its windows. Needs an estimated bias table."""
        single = not isinstance(audio, (list, tuple))
        codes = []
        for item in [audio] if single else audio:
            frames, frame_mask = self._encode(self._features(self._windows(_unwrap(item, None)[0], sampling_rate)))
            # (windows, P, d) -> (1, windows * P, d): the time mean over every valid frame of the input
            pooled = masked_time_mean(frames.reshape(1, -1, frames.shape[-1]), frame_mask.reshape(1, -1))
            codes.append(self.processor.languages[int(self._nearest_language(pooled))])
        return codes[0] if single else codes

    def _encode(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen encoder: float32 inputs -> frames in the encoder's dtype (bfloat16 at real size) and their mask."""
        return self.model.encode_speech(
            features["input_features"].to(self.device, self.model.speech_encoder.dtype),
            features["feature_attention_mask"].to(self.device),
        )

    def _nearest_language(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, d) pooled encoder outputs -> (B,) language ids; a zero bias row is a language never estimated."""
        bias = self.model.bias_compensation.bias
        unestimated = [code for code, row in zip(self.processor.languages, bias) if not row.any()]
        if unestimated:
            raise ValueError(
                f"Cannot detect the language: the bias rows of {unestimated} were never estimated (all zeros), so "
                f"they are no language centroids. Pass `language=` (one of {self.processor.languages}), or estimate "
                "the bias table from unlabeled audio of every language first."
            )
        return self.model.bias_compensation.nearest_language(pooled)

    # ------------------------------------------------------------------------------------------------------ audio
    def _windows(self, audio: Any, sampling_rate: int | None) -> list[torch.Tensor]:
        """Validated 16 kHz mono pieces no longer than the encoder window; silent pieces (e.g. a trailing pause) are
        dropped rather than given to the model to hallucinate on."""
        rate = self.processor.sampling_rate
        waveform = load_waveform(audio, sampling_rate, rate, downmix=True)
        pieces = split_at_pauses(waveform, int(self.processor.max_seconds * rate), int(FRAME_SECONDS * rate))
        return [piece for piece in pieces if piece.abs().max() >= SILENCE_PEAK]

    def _features(self, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.processor.extract_features(windows)
        if not torch.isfinite(features["input_features"]).all():
            peak = max(float(window.abs().max()) for window in windows)
            raise ValueError(
                f"Audio amplitude too large (peak {peak:.3g}): its spectrum overflows. Float audio must be in [-1, 1]."
            )
        return features

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> None:
        """Model (config with `custom_pipelines`, code files, weights) and processor: all `pipeline()` reloads."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)


__all__ = ["PotsaSpeechTranslationPipeline", "join_translations", "split_at_pauses"]
