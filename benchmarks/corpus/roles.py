"""Which corpus languages a benchmark trains on (seen) and which it holds out (zero-shot), in named groups.

On the command line a zero-shot group is `name:code,code` and a bare code joins the group "zero_shot", so

    --seen en es ru ja --zero-shot related:it,pt distant:de,ko

trains on four languages and reports two held-out groups side by side: *related* (a seen language shares their
roots, here Spanish for Italian and Portuguese: transfer can come from sounding alike) and *distant* (no seen
language is close, so transfer has to come from alignment).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .lexicon import supported_languages

SEEN_GROUP = "seen"
DEFAULT_ZERO_SHOT_GROUP = "zero_shot"


@dataclass(frozen=True)
class LanguageRoles:
    """Seen languages and the zero-shot groups, in command-line order."""

    seen: tuple[str, ...]
    zero_shot: dict[str, tuple[str, ...]]

    @property
    def zero_shot_languages(self) -> list[str]:
        return [code for group in self.zero_shot.values() for code in group]

    @property
    def languages(self) -> list[str]:
        return [*self.seen, *self.zero_shot_languages]

    def groups(self) -> dict[str, list[str]]:
        """Every group by name, "seen" first."""
        return {SEEN_GROUP: list(self.seen), **{name: list(codes) for name, codes in self.zero_shot.items()}}


def parse_zero_shot(arguments: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """`name:code,code` arguments -> {name: codes}; bare codes join the "zero_shot" group."""
    groups: dict[str, list[str]] = {}
    for argument in arguments:
        name, separator, codes = argument.rpartition(":")
        name = name if separator else DEFAULT_ZERO_SHOT_GROUP
        if not name.isidentifier() or name == SEEN_GROUP:
            raise ValueError(f"Bad zero-shot group name {name!r} in {argument!r}: use a word such as 'related'.")
        groups.setdefault(name, []).extend(code for code in codes.split(",") if code)
    return {name: tuple(codes) for name, codes in groups.items()}


def language_roles(seen: Sequence[str], zero_shot: Iterable[str]) -> LanguageRoles:
    """Parse and check the roles: known languages, each in one role only, at least one seen language."""
    roles = LanguageRoles(tuple(seen), parse_zero_shot(zero_shot))
    if not roles.seen:
        raise ValueError("Name at least one seen language (--seen): the model must learn to translate from some.")
    unknown = sorted(set(roles.languages) - set(supported_languages()))
    if unknown:
        raise ValueError(f"No lexicon for {unknown}; the corpus speaks {' '.join(supported_languages())}.")
    repeated = sorted({code for code in roles.languages if roles.languages.count(code) > 1})
    if repeated:
        raise ValueError(f"{repeated} named twice: a language is seen or in one zero-shot group, not both.")
    return roles


__all__ = ["DEFAULT_ZERO_SHOT_GROUP", "SEEN_GROUP", "LanguageRoles", "language_roles", "parse_zero_shot"]
