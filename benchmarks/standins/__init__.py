"""Pretrained stand-ins for Whisper and Qwen2, made offline on the parallel-speech corpus.

POTSA freezes a pretrained speech encoder and a pretrained LLM. Random weights make freezing meaningless, so the
tiny recipe first pretrains small models of the same classes, then the POTSA stages freeze them exactly as the real
recipe freezes Whisper-large-v3 and Qwen2.5-7B:

- the encoder stand-in: a `WhisperEncoder` trained on multilingual ASR of the corpus (every language, as Whisper
  is multilingual) with a CTC head over transcript characters, plus a small auxiliary head that predicts each
  frame's position in the window. Whisper's encoder feeds a cross-attending decoder, so its outputs say where in
  the window each frame is; a CTC-only encoder has no use for that and washes it out, and a Q-Former reading such
  frames cannot tell "3 1 4" from "4 1 3" (measured: exact match on digit strings and dates fell by a third).
  Both heads are dropped afterwards, as Whisper's decoder is by POTSA.
- the LLM stand-in: a `Qwen2ForCausalLM` trained on the *train-split* text of the corpus only (never a test
  target: that would leak): plain sentences, and the two in-context abilities a real LLM brings to a SpeechLLM,
  in the format of the demo's prompt ([24 soft tokens][instruction][answer]): text translation "T=Z" and copying
  "T:T", where the transcript T is spread over the 24 slots in order with fillers between (as a soft prompt lays
  speech out over its queries) and its embeddings carry noise (as a soft prompt only approximates token
  embeddings). It knows every corpus language's text, as Qwen knows German and Korean, so zero-shot languages are
  unseen only as *speech*. A model trained on plain text alone cannot be steered by a soft prompt (a prototype's
  Q-Former never left the LM's unconditional loss); with these abilities the POTSA stages mean what they mean at
  real size: ASR pretraining teaches the Q-Former to write transcript-like soft prompts (":"), S2TT then asks for
  translations ("=").

Both are saved with `save_pretrained` next to their feature extractor / tokenizer, so `PotsaConfig.from_base_models`
and `PotsaForSpeechTranslation.from_base_models` load them by path exactly as they load hub ids. They play the role
of the Hub checkpoints the real recipe downloads, so they are shipped in the repository (`checkpoints/`, a few MB,
with the CTC head that measures the encoder and their quality figures in `checkpoints/quality.json`) and hear every
language the corpus can speak; `python -m benchmarks.standins` rebuilds them (about 20 minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

from .build import STANDIN_LANGUAGES, CorpusSpec, build_standins, check_standins, standins_for
from .encoder import EncoderRecipe, character_error_rate
from .language_model import LanguageModelRecipe, language_model_text, train_language_model

SHIPPED = Path(__file__).resolve().parent / "checkpoints"

__all__ = [
    "SHIPPED",
    "STANDIN_LANGUAGES",
    "CorpusSpec",
    "EncoderRecipe",
    "LanguageModelRecipe",
    "build_standins",
    "character_error_rate",
    "check_standins",
    "language_model_text",
    "standins_for",
    "train_language_model",
]
