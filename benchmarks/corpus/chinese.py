"""Chinese numerals: the one normal form every target sentence of the corpus uses.

Conventions (chosen once, applied everywhere, so the target text of a sentence is unique):
- 二 is always written for 2, also before 百/千/万 and measure words ("二千零二十四", "二公里"),
  never 两: one spelling per value keeps the target vocabulary and the exact-match metric simple.
- Ten to nineteen at the start of a number drop the leading 一 ("十五", "十万"); inside a number
  the 一 stays ("一百一十", "一万零一十").
- A run of zeros inside a number is read as a single 零 ("一千零一", "一万零一十").
- Digit strings (phone-number style) are digit by digit with 零 for 0 ("三零一").
"""

DIGITS = "零一二三四五六七八九"
_PLACES = ("千", "百", "十", "")  # positions inside one four-digit group
_GROUPS = ("", "万", "亿")  # four-digit groups, lowest first
LIMIT = 10 ** (4 * len(_GROUPS))


def _group(value: int) -> str:
    """Reads 1..9999 without group unit; zeros between non-zero digits become one 零."""
    text = ""
    zero_pending = False
    for place, digit in zip(_PLACES, f"{value:04d}"):
        if digit == "0":
            zero_pending = bool(text)
            continue
        if zero_pending:
            text += DIGITS[0]
            zero_pending = False
        text += DIGITS[int(digit)] + place
    return text


def chinese_numeral(value: int, width: int = 0) -> str:
    """Cardinal `value` in Chinese numerals, left-padded with 零 to `width` digits.

    The padding is for clock minutes ("十四点零五分": width 2 turns 5 into 零五 but leaves 10 as 十).
    """
    if not 0 <= value < LIMIT:
        raise ValueError(f"chinese_numeral supports 0 <= value < {LIMIT}, got {value}")
    padding = DIGITS[0] * max(0, width - len(str(value)))
    if value == 0:
        return padding + DIGITS[0]
    text = ""
    zero_pending = False
    for exponent in reversed(range(len(_GROUPS))):
        group = value // 10 ** (4 * exponent) % 10000
        if group == 0:
            zero_pending = bool(text)
            continue
        if text and (zero_pending or group < 1000):
            text += DIGITS[0]
        text += _group(group) + _GROUPS[exponent]
        zero_pending = False
    if text.startswith("一十"):
        text = text[1:]
    return padding + text


def chinese_digits(digits: tuple[int, ...]) -> str:
    """A digit string read digit by digit ("三一四")."""
    return "".join(DIGITS[digit] for digit in digits)
