"""A minimal ctypes binding to the libespeak-ng shipped by the `espeakng-loader` wheel.

Synchronous mode: espeak_Synth returns when the utterance is done and a callback has collected every sample,
so one short utterance costs about a millisecond. The library is a process-wide singleton that is not
thread-safe. Its breath-noise generators (espeak's own and libc's rand) are reseeded before every utterance,
but it also keeps hidden synthesis state across utterances (pitch-flutter phase, gain control) that no call
resets: the same call sequence from a fresh process gives the same samples, another history slightly different ones.
"""

import ctypes
import functools

import espeakng_loader
import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_PHONEMES_IPA = 2
_RATE, _VOLUME, _PITCH = 1, 2, 3  # espeak_PARAMETER
_NOISE_SEED = 1
_BUFFER_MS = 1000  # audio handed to the callback per call: a whole short utterance at once
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """The process's espeak-ng: synthesis to int16 arrays and text-to-phoneme conversion."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.sampling_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, espeakng_loader.get_data_path().encode(), 0
        )
        if self.sampling_rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        self._lib = lib
        self._libc = ctypes.CDLL(None)
        self._chunks: list[np.ndarray] = []
        self._voice: str | None = None
        self._callback = _SYNTH_CALLBACK(self._collect)  # referenced here so ctypes does not free it
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples: "ctypes._Pointer[ctypes.c_short]", count: int, events: int | None) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0: go on synthesizing

    def set_voice(self, voice: str) -> None:
        """Selects an espeak voice name, optionally with a variant ("es", "es+f3", "cmn+m2").

        Skipped when `voice` is already selected: selecting reloads the dictionary, 5 ms for ru's 8 MB one.
        """
        if voice == self._voice:
            return
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak has no voice {voice!r}")
        self._voice = voice

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, volume: int) -> np.ndarray:
        """int16 samples at `sampling_rate` for `text`; rate in words per minute, pitch 0-100, volume 0-200."""
        self.set_voice(voice)
        for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_VOLUME, volume)):
            self._lib.espeak_SetParameter(parameter, value, 0)
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(_NOISE_SEED))
        self._libc.srand(_NOISE_SEED)
        self._chunks.clear()
        data = text.encode()
        if self._lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak_Synth failed for {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def phonemes(self, text: str, voice: str) -> str:
        """IPA phonemes of `text` as `voice` reads it, clauses joined by " | ".

        Where espeak switches language to read a word (a script the voice lacks), the switch shows as a
        marker such as "(en)" in the phonemes. A trailing newline is converted too: espeak holds back a
        one-character last clause ("升、度" leaves 度) until the next call, and the newline flushes it.
        """
        self.set_voice(voice)
        clauses = []
        for part in (text, "\n"):
            pointer = ctypes.c_char_p(part.encode())
            while pointer.value:
                clauses.append(
                    self._lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA).decode()
                )
        return " | ".join(clause for clause in clauses if clause)


@functools.cache
def espeak() -> Espeak:
    """The process's one Espeak (the library cannot be initialised twice in a process)."""
    return Espeak()
