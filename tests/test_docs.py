"""The documentation site's generated command-line reference covers every command, recipe and flag."""

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    """The generator `mkdocs build` runs (docs/scripts/cli_reference.py), imported from its file."""
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parsers(reference):
    return reference.parsers()


@pytest.fixture(scope="module")
def sections(reference) -> dict[str, str]:
    """The generated page's text under each `## \\`command\\`` heading, by command."""
    parts = re.split(r"^## `([^`]+)`$", reference.page(), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_command_and_recipe_has_a_section(parsers, sections):
    from sam2_peft.cli import COMMANDS
    from sam2_peft.recipes import RECIPES

    expected = {f"sam2-peft {name}" for name in COMMANDS if name != "train"}
    expected |= {f"sam2-peft train {name}" for name in RECIPES}
    assert expected <= set(parsers)
    assert set(sections) == set(parsers)


def test_every_flag_appears_in_its_command_section(parsers, sections):
    missing = []
    for command, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            # each flag under its kebab-case spelling (the snake_case one is the same flag), positionals by metavar
            names = [o for o in action.option_strings if "_" not in o] or action.option_strings
            names = names or [action.metavar or action.dest]
            missing += [f"{command} {name}" for name in names if f"`{name}" not in sections[command]]
    assert not missing, f"flags missing from the CLI reference: {missing}"


def test_help_texts_quote_no_benchmark_figures(parsers):
    """Measured figures live in the docs' Benchmarks pages, with their commands, not in `--help`."""
    figure = re.compile(r"\d(\.\d+)?x\b|\d\s?ms\b|benchmarks/|measured", re.IGNORECASE)
    found = {
        f"{command} {action.option_strings}"
        for command, parser in parsers.items()
        for action in parser._actions
        if action.help and figure.search(action.help)
    }
    assert not found, f"benchmark figures in --help: {sorted(found)}"
