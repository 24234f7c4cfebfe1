"""Hub warnings are printed once, also when the application has configured logging (as the recipes do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging
logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
import sam2_peft.hub.push  # what push and from_pretrained import
from huggingface_hub.utils import logging as hub_logging
hub_logging.get_logger("huggingface_hub.file_download").warning("a hub warning")
"""


def test_hub_warning_is_printed_once_with_logging_configured():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stderr.count("a hub warning") == 1, result.stderr
