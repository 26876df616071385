"""The sentence inventory: which sentences exist, which split each belongs to, and their texts.

Sentences are chosen without looking at the languages, so the split of a sentence id (and the set of training
targets) is the same whichever languages are synthesized. Splits are disjoint by sentence, like FLEURS:
every language's clip of a test sentence is in test.
"""

import itertools
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .lexicon import TARGET_LANGUAGE, load_lexicon, supported_languages

SPLITS = ("train", "validation", "test")
# Share of each split's sentences per category (the default mix). Their inventories hold 10,000 numbers,
# 6,986 quantities, 2,562 dates, 1,416 times, 111,000 digit strings and 810 colour lists.
CATEGORY_WEIGHTS = {"number": 0.3, "quantity": 0.2, "date": 0.15, "time": 0.15, "digits": 0.1, "colours": 0.1}
DEFAULT_SENTENCES = {"train": 3500, "validation": 250, "test": 500}

_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # no year, so 29 February is a date
_QUANTITIES = range(2, 1000)  # from 2: no singular noun forms, no gender agreement of "one"
_DIGIT_LENGTHS = (3, 4, 5)


@dataclass(frozen=True)
class Sentence:
    """One n-way parallel sentence: its id (the FLEURS-style key), target and per-language transcripts."""

    sentence_id: str
    category: str
    translation: str  # the Chinese target
    transcripts: Mapping[str, str]  # language code -> text given to espeak (languages whose lexicon reads it)


def stable_hash(text: str) -> int:
    """A process-independent hash (Python's hash() of str is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def _slots(category: str) -> Iterator[tuple[str, dict[str, object]]]:
    """Every sentence of `category` as (sentence id, slots), in a fixed order."""
    target = load_lexicon(TARGET_LANGUAGE)
    if category == "number":
        for n in range(10000):
            yield f"number-{n}", {"n": n}
    elif category == "quantity":
        for unit, n in itertools.product(target.units, _QUANTITIES):
            yield f"quantity-{n}-{unit}", {"n": n, "unit": unit}
    elif category == "date":
        for month, weekday in itertools.product(range(12), range(7)):
            for day in range(1, _DAYS_IN_MONTH[month] + 1):
                yield f"date-{month + 1:02d}-{day:02d}-w{weekday + 1}", {"weekday": weekday, "month": month, "day": day}
    elif category == "time":
        # On-the-hour times are left out: their natural readings differ by language ("fourteen hundred",
        # "vierzehn Uhr", 十四点整) in ways one clock template per language cannot say.
        for hour, minute in itertools.product(range(24), range(1, 60)):
            yield f"time-{hour:02d}{minute:02d}", {"hour": hour, "minute": minute}
    elif category == "digits":
        for length in _DIGIT_LENGTHS:
            for digits in itertools.product(range(10), repeat=length):
                yield f"digits-{''.join(map(str, digits))}", {"digits": digits}
    elif category == "colours":
        for length in (2, 3):
            for colours in itertools.permutations(target.colours, length):
                yield f"colours-{'-'.join(colours)}", {"colours": colours}
    else:
        raise ValueError(f"unknown category {category!r}; known: {sorted(CATEGORY_WEIGHTS)}")


def split_sizes(num_sentences: Mapping[str, int] | int) -> dict[str, int]:
    """Sentences per split: a mapping names them; an int is a total shared 80/10/10."""
    if isinstance(num_sentences, int):
        held_out = num_sentences // 10
        return {"train": num_sentences - 2 * held_out, "validation": held_out, "test": held_out}
    if not set(num_sentences) <= set(SPLITS):
        raise ValueError(f"num_sentences keys must be among {SPLITS}, got {sorted(num_sentences)}")
    return {split: num_sentences.get(split, 0) for split in SPLITS}


def _allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Splits `total` over categories in proportion to `weights` (largest remainder, ties in weight order)."""
    scale = total / sum(weights.values())
    counts = {category: int(weight * scale) for category, weight in weights.items()}
    by_remainder = sorted(weights, key=lambda category: counts[category] - weights[category] * scale)
    for category in by_remainder[: total - sum(counts.values())]:
        counts[category] += 1
    return counts


def sentence_inventory(
    num_sentences: Mapping[str, int] | int = DEFAULT_SENTENCES,
    seed: int = 0,
    categories: Sequence[str] | Mapping[str, float] = tuple(CATEGORY_WEIGHTS),
    languages: Sequence[str] | None = None,
) -> dict[str, list[Sentence]]:
    """The sentences of each split, with transcripts in `languages` (default: all supported); no audio.

    `categories` is a subset of CATEGORY_WEIGHTS (default weights) or a mapping to weights. Within a
    category the sentences are shuffled by `seed` and dealt test first, then validation, then train, so
    the test sentences depend only on the seed and the test size, not on how much training data is asked for.
    """
    if isinstance(categories, Mapping):
        weights = dict(categories)
    else:
        weights = {name: CATEGORY_WEIGHTS.get(name, 0.0) for name in categories}
    if not weights or not set(weights) <= set(CATEGORY_WEIGHTS):
        raise ValueError(f"categories must be among {sorted(CATEGORY_WEIGHTS)}, got {sorted(weights)}")
    sizes = split_sizes(num_sentences)
    shares = {split: _allocate(sizes[split], weights) for split in SPLITS}
    lexicons = [load_lexicon(code) for code in (supported_languages() if languages is None else languages)]
    target = load_lexicon(TARGET_LANGUAGE)
    inventory: dict[str, list[Sentence]] = {split: [] for split in SPLITS}
    for category in weights:
        candidates = list(_slots(category))
        needed = sum(shares[split][category] for split in SPLITS)
        if needed > len(candidates):
            raise ValueError(f"{needed} {category} sentences asked for, only {len(candidates)} exist")
        order = iter(np.random.default_rng([seed, stable_hash(category)]).permutation(len(candidates)))
        for split in ("test", "validation", "train"):
            for index in itertools.islice(order, shares[split][category]):
                sentence_id, slots = candidates[index]
                transcripts = {lexicon.code: lexicon.render(category, slots) for lexicon in lexicons}
                inventory[split].append(
                    Sentence(
                        sentence_id=sentence_id,
                        category=category,
                        translation=target.render(category, slots),
                        transcripts={code: text for code, text in transcripts.items() if text is not None},
                    )
                )
    return inventory


def split_targets(
    split: str = "train",
    num_sentences: Mapping[str, int] | int = DEFAULT_SENTENCES,
    seed: int = 0,
    categories: Sequence[str] | Mapping[str, float] = tuple(CATEGORY_WEIGHTS),
) -> list[str]:
    """The Chinese targets of one split only: text for pretraining a stand-in LM without leaking test targets.

    Pass the same num_sentences/seed/categories as the corpus was generated with.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    inventory = sentence_inventory(num_sentences, seed, categories, languages=[TARGET_LANGUAGE])
    return [sentence.translation for sentence in inventory[split]]
