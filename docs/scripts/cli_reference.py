"""Write the command-line reference (docs/reference/cli.md) from the real parsers, at build time, so it cannot drift.

Each command and recipe builds its parser inside its entry point; here `ArgumentParser.parse_known_args` (which
`parse_args` and `HfArgumentParser.parse_args_into_dataclasses` call) is replaced, for the moment of the call, by one
that hands the parser back instead of parsing, so the parser documented is the one users get.
mkdocs-gen-files runs this file (`plugins: gen-files` in mkdocs.yml); `tests/test_docs.py` imports it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sam2_peft

PAGE = "reference/cli.md"


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@contextmanager
def _capturing() -> Iterator[None]:
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    original, argv = argparse.ArgumentParser.parse_known_args, sys.argv
    argparse.ArgumentParser.parse_known_args = capture
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args, sys.argv = original, argv


def captured_parser(entry_point: Callable[[list[str]], object], prog: str) -> argparse.ArgumentParser:
    """The parser that `entry_point(argv)` builds, taken when it parses (nothing runs after it); `prog`
    is the program name a parser that names none takes from `sys.argv`."""
    with _capturing():
        sys.argv = [prog]
        try:
            entry_point([])
        except _Captured as captured:
            return captured.parser
    raise RuntimeError(f"{entry_point} did not parse its command line")


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command line users type, by its invocation: the commands of `sam2-peft`, each recipe, the scene writer."""
    from sam2_peft.cli import COMMANDS
    from sam2_peft.recipes import RECIPES

    found = {}
    for name, (entry_point, _) in COMMANDS.items():
        if name != "train":
            found[f"sam2-peft {name}"] = captured_parser(entry_point, f"sam2-peft {name}")
    for name in RECIPES:
        module = importlib.import_module(f"sam2_peft.recipes.{name}")
        found[f"sam2-peft train {name}"] = captured_parser(module.main, f"sam2-peft train {name}")
    synthetic = importlib.import_module("sam2_peft.data.synthetic")
    found["python -m sam2_peft.data.synthetic"] = captured_parser(synthetic.main, "python -m sam2_peft.data.synthetic")
    return found


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    if isinstance(action.default, (list, tuple)) and not action.default:
        return ""
    package = str(Path(sam2_peft.__file__).parent.parent) + os.sep  # the bundled sample's path, as in the repository
    return f"`{_cell(str(action.default).removeprefix(package))}`"


def _name(action: argparse.Action) -> str:
    """`--flag VALUE` (its kebab-case spelling; the snake_case one works too), or a positional's metavar."""
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    options = [o for o in action.option_strings if "_" not in o] or action.option_strings
    value = ""
    if action.nargs != 0:
        if action.choices:
            value = "{" + ",".join(map(str, action.choices)) + "}"
        elif isinstance(action.metavar, tuple):
            value = " ".join(action.metavar)
        else:
            value = action.metavar or action.dest.upper()
        if action.nargs == "?":
            value = f"[{value}]"
    return ", ".join(f"`{o}{' ' + _cell(value) if value else ''}`" for o in options)


def _help(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    """The help text as `--help` prints it, less the "(default: ...)" that the default column shows."""
    text = formatter._expand_help(action) if action.help else ""
    return re.sub(r"\s*\(default: [^()]*(\([^()]*\)[^()]*)*\)$", "", text)


def markdown(command: str, parser: argparse.ArgumentParser) -> str:
    """One command's section: its description, usage, and a table of flags per argument group."""
    lines = [f"## `{command}`", "", parser.description or "", ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| flag | default | what it does |", "|---|---|---|"]
        formatter = parser._get_formatter()
        lines += [f"| {_name(a)} | {_default(a)} | {_cell(_help(formatter, a))} |" for a in actions]
        lines.append("")
    if parser.epilog:
        lines += ["```text", parser.epilog.strip(), "```", ""]
    return "\n".join(lines)


def page() -> str:
    """The whole reference page."""
    from sam2_peft.cli import COMMANDS
    from sam2_peft.recipes import ALIASES, RECIPES

    def row(command: str, about: str) -> str:
        anchor = command.replace(" ", "-")
        return f"| [`{command}`](#{anchor}) | {_cell(about)} |"

    commands = "\n".join(row(f"sam2-peft {name}", about) for name, (_, about) in COMMANDS.items() if name != "train")
    recipes = "\n".join(row(f"sam2-peft train {name}", about) for name, about in RECIPES.items())
    sections = [markdown(command, parser) for command, parser in parsers().items()]
    aliases = "\n".join(
        f"- `{old}`: `{name}`" + (f" with {', '.join(f'`{k}={v}`' for k, v in defaults.items())}" if defaults else "")
        for old, (name, defaults) in ALIASES.items()
    )
    intro = (
        "# Command-line reference\n\n"
        "Generated from the parsers when the site is built (`docs/scripts/cli_reference.py`). Recipe flags are "
        "fields of settings dataclasses, parsed by transformers' `HfArgumentParser`: each works as `--kebab-case` "
        "and `--snake_case`, and `--help` of any command shows the same text with its default.\n\n"
        "A recipe runs as `sam2-peft train NAME` (one process), `accelerate launch -m sam2_peft.recipes.NAME` (any "
        "number), or from a clone `accelerate launch recipes/FILE.py`. The first release's recipe names still work:\n\n"
        f"{aliases}\n\n| command | what it does |\n|---|---|\n{commands}\n{recipes}\n"
        "| `python -m sam2_peft.data.synthetic` | write synthetic scenes as an images/ + masks/ folder |\n"
    )
    return intro + "\n" + "\n".join(sections)


def write_page() -> None:
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as file:
        file.write(page())


if __name__ in ("__main__", "<run_path>"):
    write_page()
