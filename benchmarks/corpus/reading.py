"""Checks that espeak reads a language's lexicon natively, from its phoneme output.

Two failure modes are caught: espeak switching to another language for text its voice cannot read (Japanese
kanji come out as English "Chinese letter", marked "(en)" in the phonemes), and a sentence read exactly as
the English voice reads it. The English comparison is for whole sentences only: single words may rightly
sound the same (German "Mai", "blau", "ein" have the IPA of English "my", "blau", "ein").
"""

import re

from .espeak import espeak
from .lexicon import load_lexicon
from .sentences import CATEGORY_WEIGHTS, sentence_inventory

_LANGUAGE_SWITCH = re.compile(r"\([a-z]{2,3}(?:-[a-z]+)*\)")
ENGLISH_VOICE = "en-us"


def reading_problems(language: str, samples: int = 60, seed: int = 0) -> list[str]:
    """Texts of `language` that espeak does not read natively, each with its phonemes; empty when all is well.

    Looks at every lexicon word and at `samples` rendered sentences spread over all categories.
    """
    lexicon = load_lexicon(language)
    engine = espeak()
    inventory = sentence_inventory({"test": samples}, seed, tuple(CATEGORY_WEIGHTS), languages=[language])
    sentences = [sentence.transcripts[language] for sentence in inventory["test"] if language in sentence.transcripts]
    problems = []
    for text in dict.fromkeys([*lexicon.words(), *sentences]):
        phonemes = engine.phonemes(text, lexicon.voice)
        if _LANGUAGE_SWITCH.search(phonemes):
            problems.append(f"{language} {text!r}: espeak switches language: {phonemes}")
    for text in sentences:
        phonemes = engine.phonemes(text, lexicon.voice)
        if lexicon.voice != ENGLISH_VOICE and phonemes == engine.phonemes(text, ENGLISH_VOICE):
            problems.append(f"{language} {text!r}: read exactly as English: {phonemes}")
    return problems
