"""Per-language lexicons (data files under lexicons/) and the rendering of a sentence's slots into text.

A sentence is a category plus slot values (numbers, indices into word lists, keys of word lists); each
language's lexicon turns the same slots into its own text, which is what makes the corpus n-way parallel.
Everything language-specific (words, word order, spelled-out irregular forms) is data; the code only knows
two numeral systems and the plural rules the unit words need.
"""

import functools
import json
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .chinese import chinese_digits, chinese_numeral

LEXICON_DIR = Path(__file__).with_name("lexicons")
TARGET_LANGUAGE = "zh"

# Plural categories a language's unit words are given in, by rule name (CLDR names; integers >= 2 only,
# so the singular forms of languages like en/es/de never occur).
PLURAL_FORMS = {"other": ("other",), "east_slavic": ("one", "few", "many")}
NUMERALS = ("arabic", "chinese")
FIELDS = (
    "name", "voice", "numerals", "plural", "list_separator", "weekdays", "months", "colours", "units", "spelled",
    "templates", "notes",
)


def plural_category(rule: str, value: int) -> str:
    """The plural form a unit word takes after `value` (ru: 21 километр, 22 километра, 25 километров)."""
    if rule == "other":
        return "other"
    if rule == "east_slavic":
        if value % 10 == 1 and value % 100 != 11:
            return "one"
        if 2 <= value % 10 <= 4 and not 12 <= value % 100 <= 14:
            return "few"
        return "many"
    raise ValueError(f"unknown plural rule {rule!r}; known: {sorted(PLURAL_FORMS)}")


class _NumeralFormatter(string.Formatter):
    """str.format whose integer fields use the lexicon's numerals; "{minute:02}" zero-pads in either system."""

    def __init__(self, numerals: str) -> None:
        self.numerals = numerals

    def format_field(self, value: object, format_spec: str) -> str:
        if isinstance(value, int):
            width = int(format_spec or 0)
            return chinese_numeral(value, width) if self.numerals == "chinese" else str(value).zfill(width)
        if format_spec:
            raise ValueError(f"format spec {format_spec!r} only applies to numbers, got the word {value!r}")
        return str(value)


@dataclass(frozen=True)
class Lexicon:
    """One language's words and templates, as read from lexicons/<code>.json."""

    code: str
    name: str
    voice: str  # espeak voice name (zh is spoken by espeak's "cmn")
    numerals: str  # "arabic": digits for espeak to read; "chinese": the target's Chinese numerals
    plural: str  # key of PLURAL_FORMS
    list_separator: str
    weekdays: tuple[str, ...]  # Monday first
    months: tuple[str, ...]
    colours: Mapping[str, str]
    units: Mapping[str, Mapping[str, str]]  # unit key -> plural category -> word
    spelled: Mapping[str, Mapping[str, str]]  # slot -> str(value) -> text used instead of the numeral
    templates: Mapping[str, str]  # category -> format string; a missing category is not read in this language
    notes: tuple[str, ...]

    def render(self, category: str, slots: Mapping[str, object]) -> str | None:
        """The sentence in this language, or None where the lexicon has no template for `category`."""
        template = self.templates.get(category)
        if template is None:
            return None
        values = {name: self._word(name, value, slots) for name, value in slots.items()}
        return _NumeralFormatter(self.numerals).vformat(template, (), values)

    def _word(self, name: str, value: object, slots: Mapping[str, object]) -> object:
        if name == "weekday":
            return self.weekdays[value]
        if name == "month":
            return self.months[value]
        if name == "colours":
            return self.list_separator.join(self.colours[key] for key in value)
        if name == "unit":
            return self.units[value][plural_category(self.plural, slots["n"])]
        if name == "digits":
            return chinese_digits(value) if self.numerals == "chinese" else " ".join(map(str, value))
        return self.spelled.get(name, {}).get(str(value), value)

    def words(self) -> list[str]:
        """Every word and spelled form of the lexicon (what the native-reading check looks at one by one)."""
        units = [form for forms in self.units.values() for form in forms.values()]
        spelled = [text for forms in self.spelled.values() for text in forms.values()]
        return [*self.weekdays, *self.months, *self.colours.values(), *units, *spelled]


def supported_languages() -> list[str]:
    """Language codes with a lexicon file: the ones the corpus can speak."""
    return sorted(path.stem for path in LEXICON_DIR.glob("*.json"))


@functools.cache
def load_lexicon(code: str) -> Lexicon:
    """Loads and checks lexicons/<code>.json; a ValueError names the supported codes for an unknown one."""
    path = LEXICON_DIR / f"{code}.json"
    if not path.is_file():
        raise ValueError(f"no lexicon for language {code!r}; supported: {', '.join(supported_languages())}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if sorted(data) != sorted(FIELDS):
        raise ValueError(f"{path.name}: fields must be exactly {sorted(FIELDS)}, got {sorted(data)}")
    if len(data["weekdays"]) != 7 or len(data["months"]) != 12:
        raise ValueError(f"{path.name}: needs 7 weekdays and 12 months")
    if data["numerals"] not in NUMERALS:
        raise ValueError(f"{path.name}: numerals must be one of {NUMERALS}")
    forms = PLURAL_FORMS.get(data["plural"])
    if forms is None or any(sorted(words) != sorted(forms) for words in data["units"].values()):
        raise ValueError(f"{path.name}: each unit needs exactly the forms of plural rule {data['plural']!r}: {forms}")
    data["weekdays"], data["months"], data["notes"] = (tuple(data[key]) for key in ("weekdays", "months", "notes"))
    return Lexicon(code=code, **data)
