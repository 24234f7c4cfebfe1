"""Write a benchmark's table into benchmarks/RESULTS.md, between markers of its name, replacing the previous one."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def update_section(name: str, title: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the section `<!-- name -->` ... `<!-- /name -->` of `path` with `title` and `body`."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"<!-- {name} -->\n## {title}\n\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
