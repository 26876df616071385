"""An offline n-way parallel speech corpus for X -> Chinese speech translation, spoken by eSpeak NG.

The same sentence (a number, a date, a time, a quantity, a digit string or a list of colours) is read by
espeak in each requested language, with one exact Chinese target, and keyed by a FLEURS-style `sentence_id`;
splits are disjoint by sentence. Words, word order and irregular readings per language are data in
lexicons/*.json; `python -m benchmarks.corpus --help` is the command line.
"""

from .build import FEATURES, generate_corpus
from .chinese import chinese_digits, chinese_numeral
from .lexicon import load_lexicon, supported_languages
from .reading import reading_problems
from .sentences import CATEGORY_WEIGHTS, DEFAULT_SENTENCES, SPLITS, Sentence, sentence_inventory, split_targets
from .synthesis import SpeakerRanges

__all__ = [
    "CATEGORY_WEIGHTS",
    "DEFAULT_SENTENCES",
    "FEATURES",
    "SPLITS",
    "Sentence",
    "SpeakerRanges",
    "chinese_digits",
    "chinese_numeral",
    "generate_corpus",
    "load_lexicon",
    "reading_problems",
    "sentence_inventory",
    "split_targets",
    "supported_languages",
]
