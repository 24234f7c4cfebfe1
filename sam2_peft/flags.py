"""Flags that act only in some settings, and the refusal of one given where it would do nothing: a flag a command
accepts acts or is refused, never ignored. A flag left at its default is never refused.

Each command (and recipe) declares a table of `Applies` rules; `refuse_unused_flags` checks the flags the command
line gave against it after parsing. No torch import.
"""

from __future__ import annotations

from argparse import SUPPRESS, ArgumentParser, Namespace
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Applies:
    """`flags` act only when `when(values)` holds (`values`: every parsed flag, defaults included); otherwise a
    given one is refused with '<flag> <reason>', e.g. '--max-clicks applies to --protocol interactive only'."""

    flags: tuple[str, ...]
    when: Callable[[Namespace], bool]
    reason: str


def flags_of(settings: type, leave_out: Iterable[str] = ()) -> tuple[str, ...]:
    """The `--kebab-case` flags of a settings dataclass's fields (as `RecipeParser` names them), but `leave_out`."""
    return tuple(f"--{f.name.replace('_', '-')}" for f in fields(settings) if f.init and f.name not in leave_out)


def given_flags(parser: ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags `argv` gives, as opposed to those left at their defaults (argparse sets a
    default only where the namespace has no value yet, so a marker that survives parsing means 'not given')."""
    unset = _Unset()
    namespace = Namespace(**{action.dest: unset for action in parser._actions if action.dest != SUPPRESS})
    parsed, _ = parser.parse_known_args(argv, namespace)
    return {dest for dest, value in vars(parsed).items() if value is not unset}


class _Unset(list):
    """The 'not given' marker: a list, so that append and extend actions can add to it (they add to a copy, which is
    then not the marker)."""


def unused_flag(parser: ArgumentParser, argv: Sequence[str] | None, rules: Iterable[Applies], values) -> str | None:
    """The refusal of the first flag of `argv` that `rules` say does nothing with these `values`, or None."""
    rules = list(rules)
    dests = {flag: parser._option_string_actions[flag].dest for rule in rules for flag in rule.flags}  # all known
    given = None
    for rule in rules:
        if rule.when(values):
            continue
        given = given_flags(parser, argv) if given is None else given
        for flag in rule.flags:
            if dests[flag] in given:
                return f"{flag} {rule.reason}"
    return None


def refuse_unused_flags(parser: ArgumentParser, argv: Sequence[str] | None, rules: Iterable[Applies], values) -> None:
    """Exit with a usage error (one `error:` line) naming the first given flag that does nothing here, if any."""
    message = unused_flag(parser, argv, rules, values)
    if message:
        parser.error(message)
