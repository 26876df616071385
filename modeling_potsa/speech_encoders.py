"""Speech encoder families: everything POTSA must know about a frozen speech encoder, in one place.

The rest of POTSA only sees frames `(B, P, d_enc)` and a `(B, P)` mask of the frames that hold audio. Encoders differ
in how they are built and loaded, which feature extractor feeds them and how input lengths become frames; each
family answers those questions for its encoders, chosen by `speech_encoder_family(encoder_config)`:

- `WhisperEncoders`: log-mel features `(B, n_mels, frames)` from a `WhisperFeatureExtractor`. Only the encoder half
  of a Whisper checkpoint is read. Whisper was trained on full 30 s windows and drifts on shorter inputs, so
  features are always padded to the window; a clip is thus encoded the same way alone or next to a longer one.
- `Wav2Vec2StyleEncoders` (wav2vec2, HuBERT, and other encoders with wav2vec2's convolutional front end on raw
  audio): the normalised waveform `(B, samples)` from a `Wav2Vec2FeatureExtractor`; frames come from the conv
  front end (`_get_feat_extract_output_lengths`, 20 ms each in the released models). See the class for how
  padding is kept out of the frames.

Both input kinds reach the model under one name, `input_features` with a `feature_attention_mask` over their positions
(mel frames or samples): the LLM's `attention_mask` already takes the name HF audio models use, and one name keeps
the collator, the encoder cache and the pipeline independent of the encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

# Whisper checkpoints store the encoder under `model.encoder.` (ForConditionalGeneration) or `encoder.` (WhisperModel).
_WHISPER_ENCODER_KEYS = {r"^model\.encoder\.": "", r"^encoder\.": ""}


def _length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) lengths -> (B, width) bool mask, True on the first `length` positions of each row."""
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)


def _with_width(waveforms: torch.Tensor, width: int) -> torch.Tensor:
    """(B, samples) -> (B, width): cut off padding beyond `width`, or extend with zeros (silence) up to it."""
    if waveforms.shape[1] >= width:
        return waveforms[:, :width]
    return F.pad(waveforms, (0, width - waveforms.shape[1]))


class SpeechEncoderFamily(ABC):
    """What POTSA needs from one family of speech encoders; the defaults suit encoders that `AutoModel` loads."""

    feature_extractor_class: type  # what `PotsaProcessor.from_base_models` loads from the encoder checkpoint
    input_name: str  # the feature extractor's output the encoder reads (its `model_input_names[0]`)

    @abstractmethod
    def handles(self, encoder_config: PreTrainedConfig) -> bool:
        """Whether `encoder_config` describes an encoder of this family."""

    def build(self, encoder_config: PreTrainedConfig) -> PreTrainedModel:
        """A randomly initialised encoder of this architecture (weights come later)."""
        return AutoModel.from_config(encoder_config)

    def from_pretrained(self, model_id: str, **kwargs: Any) -> PreTrainedModel:
        """Encoder weights from a hub id or local path."""
        return AutoModel.from_pretrained(model_id, **kwargs)

    @abstractmethod
    def encode(
        self, encoder: PreTrainedModel, inputs: torch.Tensor, input_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder inputs + mask of their real positions -> frames (B, P, d_enc) and a (B, P) bool mask of the valid
        frames."""

    def check_feature_extractor(self, encoder_config: PreTrainedConfig, feature_extractor: Any) -> None:
        """Refuse a feature extractor that cannot feed this encoder, before it fails deep inside the encoder."""
        produced = feature_extractor.model_input_names[0]
        if produced != self.input_name:
            raise ValueError(
                f"A {type(feature_extractor).__name__} produces `{produced}`, but the {encoder_config.model_type} "
                f"speech encoder reads `{self.input_name}`: use a {self.feature_extractor_class.__name__} (what "
                "`PotsaProcessor.from_base_models` loads from the encoder checkpoint)."
            )


class WhisperEncoders(SpeechEncoderFamily):
    """Whisper's encoder on log-mel features padded to its window (POTSA's original path, unchanged)."""

    feature_extractor_class = WhisperFeatureExtractor
    input_name = "input_features"

    def handles(self, encoder_config: PreTrainedConfig) -> bool:
        return encoder_config.model_type == "whisper"

    def build(self, encoder_config: PreTrainedConfig) -> PreTrainedModel:
        return WhisperEncoder(encoder_config)

    def from_pretrained(self, model_id: str, **kwargs: Any) -> PreTrainedModel:
        """Only the encoder half of the checkpoint is read."""
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the decoder half is "unexpected" by design; do not report 1000 keys
        try:
            return WhisperEncoder.from_pretrained(model_id, key_mapping=_WHISPER_ENCODER_KEYS, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)

    def encode(
        self, encoder: PreTrainedModel, inputs: torch.Tensor, input_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, n_mels, 2P) padded to the window -> frames (B, P, d_enc); the mask follows the stride."""
        frames = encoder(inputs).last_hidden_state
        if input_mask is None:
            return frames, torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
        stride = input_mask.shape[1] // frames.shape[1]  # 2 for Whisper's stride-2 convolution
        frame_mask = input_mask[:, ::stride][:, : frames.shape[1]].bool()  # (B, P)
        return frames, frame_mask

    def check_feature_extractor(self, encoder_config: PreTrainedConfig, feature_extractor: Any) -> None:
        super().check_feature_extractor(encoder_config, feature_extractor)
        window_frames = 2 * encoder_config.max_source_positions
        expected = (encoder_config.num_mel_bins, window_frames)
        if (feature_extractor.feature_size, feature_extractor.nb_max_frames) != expected:
            raise ValueError(
                f"The feature extractor makes {feature_extractor.feature_size} mel bins x "
                f"{feature_extractor.nb_max_frames} frames, the Whisper encoder takes {encoder_config.num_mel_bins} x "
                f"{window_frames}: use the encoder checkpoint's own feature extractor."
            )


class Wav2Vec2StyleEncoders(SpeechEncoderFamily):
    """Encoders with wav2vec2's convolutional front end on the raw waveform: wav2vec2, HuBERT, WavLM, ...

    Padding invariance (a clip gives the same frames alone and padded next to a longer clip) depends on the
    front end's normalisation, `config.feat_extract_norm`:

    - "layer" (wav2vec2-large-lv60, HuBERT-large/xlarge, WavLM): the batch is cut to its longest clip and encoded
      once with an attention mask. Every conv frame sees only its receptive field, the LayerNorm is per frame, and
      the encoder zeroes padded frames before its positional convolution and masks them out of self-attention, so
      the frames of real audio do not depend on the padding.
    - "group" (wav2vec2-base, HuBERT-base): a GroupNorm in the first conv layer normalises each channel over the
      whole time axis, padding included, and no attention mask reaches it, so padding would change every frame.
      These encoders get each clip alone, cut to its own length: exactly the input they were pretrained on
      (unpadded crops), at the price of one encoder call per clip (the encoder is frozen; training can cache it).

    A clip shorter than the front end's receptive field (25 ms in the released models) is extended with zeros to it,
    so that every clip has at least one frame, the same way alone or in a batch.
    """

    feature_extractor_class = Wav2Vec2FeatureExtractor
    input_name = "input_values"

    def handles(self, encoder_config: PreTrainedConfig) -> bool:
        return hasattr(encoder_config, "conv_kernel") and hasattr(encoder_config, "conv_stride")

    @staticmethod
    def encodes_padded_batches(encoder_config: PreTrainedConfig) -> bool:
        """Whether padding with an attention mask leaves the frames of real audio unchanged (see the class)."""
        return getattr(encoder_config, "feat_extract_norm", "group") == "layer"

    @staticmethod
    def receptive_field(encoder_config: PreTrainedConfig) -> int:
        """Fewest samples that give one frame: the conv layers' kernels and strides, inverted from the last."""
        samples = 1
        for kernel, stride in zip(reversed(encoder_config.conv_kernel), reversed(encoder_config.conv_stride)):
            samples = (samples - 1) * stride + kernel
        return samples

    def encode(
        self, encoder: PreTrainedModel, inputs: torch.Tensor, input_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms (B, samples) + (B, samples) mask of real samples -> frames (B, P, d_enc) and their mask, where P
        is the longest clip's frame count."""
        if input_mask is None:
            lengths = torch.full(inputs.shape[:1], inputs.shape[1], device=inputs.device)
        else:
            lengths = input_mask.sum(dim=1).long()
        lengths = lengths.clamp(min=self.receptive_field(encoder.config))  # (B,) samples of each clip
        inputs = _with_width(inputs, int(lengths.max()))  # (B, longest clip)
        if self.encodes_padded_batches(encoder.config):
            frames = encoder(inputs, attention_mask=_length_mask(lengths, inputs.shape[1]).long()).last_hidden_state
        else:
            # each clip alone, unpadded: (n_frames_b, d_enc) per clip -> (B, P, d_enc) zero-padded
            clips = [encoder(clip[None, :n]).last_hidden_state[0] for clip, n in zip(inputs, lengths.tolist())]
            frames = pad_sequence(clips, batch_first=True)
        frame_lengths = encoder._get_feat_extract_output_lengths(lengths)  # (B,)
        return frames, _length_mask(frame_lengths, frames.shape[1])


_FAMILIES = (WhisperEncoders(), Wav2Vec2StyleEncoders())


def speech_encoder_family(encoder_config: PreTrainedConfig) -> SpeechEncoderFamily:
    """The family that knows how to build, feed and read the encoder `encoder_config` describes."""
    for family in _FAMILIES:
        if family.handles(encoder_config):
            return family
    raise ValueError(
        f"Unsupported speech encoder type {encoder_config.model_type!r}: POTSA supports Whisper and encoders with "
        "wav2vec2's convolutional front end on raw audio (wav2vec2, HuBERT, WavLM, ...). Add a `SpeechEncoderFamily` "
        "in speech_encoders.py for another one."
    )


__all__ = ["SpeechEncoderFamily", "Wav2Vec2StyleEncoders", "WhisperEncoders", "speech_encoder_family"]
