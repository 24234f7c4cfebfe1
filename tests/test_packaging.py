"""The supported-Python claim, the linter's target and the CI matrix name the same lowest version."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lowest_python_agrees_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lowest = re.fullmatch(r">=\s*3\.(\d+)", project["project"]["requires-python"]).group(1)
    assert project["tool"]["ruff"]["target-version"] == f"py3{lowest}"
    matrix = re.search(r"python-version: \[([^\]]*)\]", (ROOT / ".github" / "workflows" / "ci.yml").read_text())
    versions = [v.strip().strip('"') for v in matrix.group(1).split(",")]
    assert min(versions, key=lambda v: int(v.split(".")[1])) == f"3.{lowest}"
    assert f"python3.{lowest}" in (ROOT / ".ci" / "run").read_text()


def test_lowest_versions_file_pins_what_pyproject_admits_lowest():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lowest = dict(
        re.fullmatch(r"([\w-]+)>=([\d.]+)(?:,<[\d.]+)?", requirement).groups()
        for requirement in project["project"]["dependencies"]
        if re.fullmatch(r"([\w-]+)>=([\d.]+)(?:,<[\d.]+)?", requirement)
    )
    lines = (ROOT / ".ci" / "lowest-versions.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert set(pins) == {"torch", "torchvision", "transformers", "peft", "accelerate"}
    for name, version in pins.items():  # 2.5 admits 2.5.0
        assert version.removesuffix(".0") == lowest[name].removesuffix(".0"), name
    assert "lowest-versions.txt" in (ROOT / ".github" / "workflows" / "ci.yml").read_text()
