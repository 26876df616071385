"""PotsaProcessor: audio + language (+ target text) -> the tensors `PotsaForSpeechTranslation` takes.

It owns every convention the model relies on, so training and inference cannot drift apart: encoder inputs (Whisper
log-mels or wav2vec2-style waveforms, whichever the feature extractor makes) padded to the encoder window with a
mask, the language id of each utterance, the prompt with `num_query_tokens` speech-token placeholders, labels that
are -100 everywhere except the target, right padding for training and left padding for generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerFast, ProcessorMixin

from .audio import load_waveform
from .configuration_potsa import IGNORE_INDEX, LANGUAGE_NAMES, SPEECH_TOKEN, TASK_INSTRUCTIONS, PotsaConfig
from .speech_encoders import speech_encoder_family

TASKS = tuple(TASK_INSTRUCTIONS)
DEFAULT_WINDOW_SECONDS = 30.0  # Whisper's window, for feature extractors that define none (wav2vec2, HuBERT)


def _window_seconds(feature_extractor: Any, requested: float | None) -> float:
    """The encoder window: the longest audio encoded at once (features are padded to it, the pipeline cuts longer
    audio into windows). Whisper-style extractors fix it (`chunk_length`), so a different request is an error;
    raw-waveform extractors (wav2vec2, HuBERT) have none and take the request, or `DEFAULT_WINDOW_SECONDS`."""
    fixed_samples = getattr(feature_extractor, "n_samples", None)
    if fixed_samples is None:
        return float(requested or DEFAULT_WINDOW_SECONDS)
    fixed = fixed_samples / feature_extractor.sampling_rate
    if requested is not None and requested != fixed:
        raise ValueError(
            f"`window_seconds={requested}` disagrees with the feature extractor's own window of {fixed:g} s (its "
            f"`chunk_length`): leave `window_seconds` unset, or build the extractor with `chunk_length={requested}`."
        )
    return fixed


def _as_list(value: Any, batch_size: int, name: str) -> list[Any]:
    if value is None or isinstance(value, str):
        return [value] * batch_size
    values = list(value)
    if len(values) != batch_size:
        raise ValueError(f"Got {len(values)} values for `{name}` but {batch_size} audio inputs.")
    return values


class PotsaProcessor(ProcessorMixin):
    r"""
    The speech encoder's feature extractor + the LLM's tokenizer + POTSA's prompt conventions.

    Args:
        feature_extractor (`WhisperFeatureExtractor` or `Wav2Vec2FeatureExtractor`): the encoder's own one (see
            `speech_encoders.py`): log-mel features whose `chunk_length` is the encoder window, or the normalised
            waveform.
        tokenizer (`PreTrainedTokenizerBase`): the LLM's tokenizer (the speech token is added if missing).
        languages (`list[str]`): language codes in bias-table order (same as the model config).
        target_language (`str`): code of the output language, used in the instruction.
        num_query_tokens (`int`): soft-prompt length (speech-token placeholders per prompt).
        speech_token, prompt_template, task_instructions, chain_separator: as in `PotsaConfig`.
        window_seconds (`float`, *optional*): the encoder window, the longest audio encoded at once (inputs are
            padded to it, the pipeline cuts longer audio). A Whisper extractor fixes it itself (`chunk_length`);
            set it only for raw-waveform extractors, which default to 30 s.
    """

    def __init__(
        self,
        feature_extractor: Any = None,
        tokenizer: Any = None,
        languages: list[str] | None = None,
        target_language: str = "zh",
        num_query_tokens: int = 80,
        speech_token: str = SPEECH_TOKEN,
        prompt_template: str = f"{SPEECH_TOKEN}{{instruction}}",
        task_instructions: dict[str, str] | None = None,
        chain_separator: str = "\n",
        window_seconds: float | None = None,
    ) -> None:
        if not languages:
            raise ValueError("PotsaProcessor needs the model's `languages` (use `PotsaProcessor.from_config`).")
        self.languages = list(languages)
        self.target_language = target_language
        self.num_query_tokens = num_query_tokens
        self.speech_token = speech_token
        self.prompt_template = prompt_template
        self.task_instructions = dict(task_instructions or TASK_INSTRUCTIONS)
        self.chain_separator = chain_separator
        self.window_seconds = _window_seconds(feature_extractor, window_seconds)
        if speech_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [speech_token]})
        if tokenizer.pad_token is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before building the processor.")
        super().__init__(feature_extractor, tokenizer)

    @classmethod
    def from_config(
        cls, config: PotsaConfig, feature_extractor: Any, tokenizer: Any, window_seconds: float | None = None
    ) -> PotsaProcessor:
        """A processor that follows `config`; also records the speech token's id in `config`. A feature extractor
        that cannot feed the configured encoder is refused here."""
        speech_encoder_family(config.encoder_config).check_feature_extractor(config.encoder_config, feature_extractor)
        processor = cls(
            feature_extractor,
            tokenizer,
            languages=list(config.languages),
            target_language=config.target_language,
            num_query_tokens=config.num_query_tokens,
            speech_token=config.speech_token,
            prompt_template=config.prompt_template,
            task_instructions=dict(config.task_instructions),
            chain_separator=config.chain_separator,
            window_seconds=window_seconds,
        )
        config.speech_token_id = processor.speech_token_id
        return processor

    @classmethod
    def from_base_models(cls, config: PotsaConfig, window_seconds: float | None = None) -> PotsaProcessor:
        """The processor of a new model: the encoder checkpoint's feature extractor (of the class its encoder family
        reads) and the LLM's tokenizer. `window_seconds` as in the class (for wav2vec2-style encoders only).

        The tokenizer is read from the LLM's `tokenizer.json` as written (`PreTrainedTokenizerFast`).
        `AutoTokenizer` would pick the class registered for the LLM's model type instead, and for some types
        (Qwen2 among them) that class rebuilds the tokenizer from a fixed recipe, silently garbling any tokenizer
        that is not the original one (a character-level tokenizer came back byte-level). LLMs shipped without a
        `tokenizer.json` fall back to `AutoTokenizer`.
        """
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(config.text_model_id)
        except (OSError, ValueError):
            tokenizer = AutoTokenizer.from_pretrained(config.text_model_id)
        extractor_class = speech_encoder_family(config.encoder_config).feature_extractor_class
        feature_extractor = extractor_class.from_pretrained(config.encoder_model_id)
        return cls.from_config(config, feature_extractor, tokenizer, window_seconds)

    @property
    def speech_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.speech_token)

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    @property
    def max_seconds(self) -> float:
        """The encoder window: longer audio must be split (the pipeline does it)."""
        return self.window_seconds

    @property
    def window_samples(self) -> int:
        """The encoder window in samples at the feature extractor's rate: what every input is padded to."""
        return round(self.window_seconds * self.sampling_rate)

    def language_id(self, language: str) -> int:
        if language not in self.languages:
            raise ValueError(f"Unknown language {language!r}; this model supports {self.languages}.")
        return self.languages.index(language)

    # --------------------------------------------------------------------------------------------------- text
    def prompt_ids(self, language: str, task: str = "translate") -> list[int]:
        """Token ids of the prompt for one utterance, with `num_query_tokens` speech placeholders."""
        if task not in self.task_instructions:
            raise ValueError(f"Unknown task {task!r}; choose one of {sorted(self.task_instructions)}.")
        instruction = self.task_instructions[task].format(
            source_language=LANGUAGE_NAMES.get(language, language),
            target_language=LANGUAGE_NAMES.get(self.target_language, self.target_language),
        )
        prefix, suffix = self.prompt_template.replace("{instruction}", instruction).split(self.speech_token)
        encode = self.tokenizer.encode
        speech = [self.speech_token_id] * self.num_query_tokens
        return encode(prefix, add_special_tokens=False) + speech + encode(suffix, add_special_tokens=False)

    def target_text(self, task: str, text: str | None, transcript: str | None) -> str:
        """The string the model must write: translation, transcript, or the paper's chain of both."""
        if task == "transcribe":
            if transcript is None and text is None:
                raise ValueError("The transcribe task needs the transcript (`transcript=` or `text=`).")
            return transcript if transcript is not None else text
        if text is None:
            raise ValueError(f"The {task} task needs the translation as `text=`.")
        if task == "chain":
            if transcript is None:
                raise ValueError("The chain task needs `transcript=` as well as the translation `text=`.")
            return f"{transcript}{self.chain_separator}{text}"
        return text

    def _pad(self, rows: list[list[int]], left: bool, value: int) -> torch.Tensor:
        width = max(len(row) for row in rows)
        padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    # -------------------------------------------------------------------------------------------------- audio
    def extract_features(self, waveforms: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoder inputs padded to the window, as `input_features` + `feature_attention_mask` (1 on real positions):
        log-mels (B, n_mels, frames) with a per-frame mask from a Whisper extractor, normalised waveforms
        (B, samples) with a per-sample mask from a wav2vec2 one (which calls them `input_values`; with the mask, each
        clip is normalised over its own samples only, whatever the padding)."""
        features = self.feature_extractor(
            [waveform.numpy() for waveform in waveforms],
            sampling_rate=self.sampling_rate,
            padding="max_length",
            max_length=self.window_samples,
            return_attention_mask=True,
            return_tensors="pt",
        )
        inputs = features[self.feature_extractor.model_input_names[0]]
        return {"input_features": inputs, "feature_attention_mask": features["attention_mask"]}

    def __call__(
        self,
        audio: Any = None,
        sampling_rate: int | None = None,
        language: str | Sequence[str] | None = None,
        text: str | Sequence[str] | None = None,
        transcript: str | Sequence[str] | None = None,
        task: str = "translate",
        downmix: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        """
        Args:
            audio: one input or a list of inputs (arrays, `{"array", "sampling_rate"}` dicts, file paths).
            sampling_rate (`int`): rate of raw arrays; resampled to the feature extractor's rate.
            language (`str` or `list[str]`): language code of each utterance (selects its bias row).
            text (`str` or `list[str]`, *optional*): target text (translation; transcript for "transcribe").
                With it, the output has right-padded `input_ids` + `labels` for training; without it,
                left-padded prompts for `generate`.
            transcript (`str` or `list[str]`, *optional*): source transcript (for the "chain" task).
            task (`str`): "translate", "transcribe" or "chain".
            downmix (`bool`): average multi-channel audio instead of raising.

        Returns:
            `BatchFeature` with `input_features` (log-mels or waveforms, see `extract_features`),
            `feature_attention_mask`, `language_ids`, `input_ids`, `attention_mask` and, with `text`, `labels`.
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments for PotsaProcessor: {sorted(kwargs)}.")
        if audio is None:
            raise ValueError("No audio given.")
        audios = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        if not audios:
            raise ValueError("Empty batch: no audio inputs.")
        if language is None:
            raise ValueError(f"Pass `language=` (one of {self.languages}) for each utterance.")
        languages = _as_list(language, len(audios), "language")
        language_ids = [self.language_id(code) for code in languages]
        waveforms = [
            load_waveform(a, sampling_rate, self.sampling_rate, downmix=downmix, max_seconds=self.max_seconds)
            for a in audios
        ]
        batch = self.extract_features(waveforms)
        batch["language_ids"] = torch.tensor(language_ids, dtype=torch.long)
        batch.update(self.tokenize(languages, task, text, transcript))
        return BatchFeature(batch)

    def tokenize(
        self,
        languages: Sequence[str],
        task: str = "translate",
        text: str | Sequence[str | None] | None = None,
        transcript: str | Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prompt (+ target) ids for a batch.

        Without any target (`text` and `transcript` None) the prompts are left-padded for `generate`. With targets
        the rows are right-padded with `labels`; a row whose target is None (an utterance without a translation,
        e.g. a zero-shot language that only joins the alignment loss) gets labels -100 everywhere.
        """
        prompts = [self.prompt_ids(code, task) for code in languages]
        pad_id = self.tokenizer.pad_token_id
        if text is None and transcript is None:
            return {
                "input_ids": self._pad(prompts, left=True, value=pad_id),
                "attention_mask": self._pad([[1] * len(p) for p in prompts], left=True, value=0),
            }
        texts = _as_list(text, len(prompts), "text")
        transcripts = _as_list(transcript, len(prompts), "transcript")
        rows, labels = [], []
        for prompt, row_text, row_transcript in zip(prompts, texts, transcripts):
            target = []
            if row_text is not None or (task == "transcribe" and row_transcript is not None):
                target_text = self.target_text(task, row_text, row_transcript)
                target = self.tokenizer.encode(target_text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            rows.append(prompt + target)
            labels.append([IGNORE_INDEX] * len(prompt) + target)
        return {
            "input_ids": self._pad(rows, left=False, value=pad_id),
            "attention_mask": self._pad([[1] * len(r) for r in rows], left=False, value=0),
            "labels": self._pad(labels, left=False, value=IGNORE_INDEX),
        }

    def decode_translation(self, token_ids: torch.Tensor | Sequence[int], task: str = "translate") -> str:
        """Generated ids -> text; for the chain task only the translation after the separator."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
        if task == "chain" and self.chain_separator in text:
            text = text.split(self.chain_separator, 1)[1].strip()
        return text

    def batch_decode_translations(self, token_ids: torch.Tensor, task: str = "translate") -> list[str]:
        return [self.decode_translation(row, task) for row in token_ids]


__all__ = ["PotsaProcessor", "IGNORE_INDEX", "TASKS"]
