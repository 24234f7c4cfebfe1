"""Shared fixtures: tiny random SAM 2 models, a small synthetic dataset on disk, and the real data folder; the quick
suite by default (`--all` adds the slow tests)."""

from __future__ import annotations

import os

# Tests never reach the Hub (the Hub tests point huggingface_hub at a loopback server and lift this themselves).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam2_peft.models.loading import build_model_from_config, processor_for_image_size, tiny_config

pytest_plugins = ["tests.hub_fixtures"]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", help="run the whole suite: the tests marked slow too")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Plain `pytest` is the quick suite: tests marked slow (over 10 s on 2 CPU cores) are deselected unless
    `--all` is given or a `-m` expression chooses by marker itself (`-m slow`, `-m real_data`)."""
    if config.getoption("--all") or config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


REAL_DATA = Path(os.environ.get("SAM2_PEFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The research-licensed datasets (read in place, never copied): `$SAM2_PEFT_DATA` or `../shared/data`."""

TINY_SIZE = 128


def real_dataset(name: str) -> Path:
    """Path of a dataset under REAL_DATA, or skip the test saying where it was looked for."""
    path = REAL_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset '{name}' not found at {path} (set SAM2_PEFT_DATA to the shared data folder)")
    return path


@pytest.fixture
def tiny_model():
    """A fresh ~0.5 M parameter `Sam2Model` at 128 px with random weights and tied positional encodings."""
    return build_model_from_config(tiny_config(TINY_SIZE), seed=0)


@pytest.fixture
def tiny_processor():
    return processor_for_image_size(TINY_SIZE)


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory) -> Path:
    """The tiny model (seed 0) and its processor saved with `save_pretrained`: a base-model folder, which resolves
    with the Hub down too."""
    folder = tmp_path_factory.mktemp("tiny-base")
    build_model_from_config(tiny_config(TINY_SIZE), seed=0).save_pretrained(folder)
    processor_for_image_size(TINY_SIZE).save_pretrained(folder)
    return folder


def write_folder_dataset(root: Path, num_images: int = 6, size: tuple[int, int] = (96, 120), seed: int = 0) -> Path:
    """Write `root/images/*.png` and `root/masks/*.png`: bright rectangles and discs on noise, instance labels."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    for index in range(num_images):
        image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        labels = np.zeros((height, width), dtype=np.uint8)
        for label in range(1, 4):
            cy, cx = rng.integers(15, height - 15), rng.integers(15, width - 15)
            radius = rng.integers(7, 13)
            region = (
                (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
                if label % 2
                else ((abs(yy - cy) <= radius) & (abs(xx - cx) <= radius))
            )
            labels[region] = label
            image[region] = rng.integers(150, 255, 3)
        Image.fromarray(image).save(root / "images" / f"img_{index:03d}.png")
        Image.fromarray(labels).save(root / "masks" / f"img_{index:03d}.png")
    return root


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    return write_folder_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state (mixed precision, ...); give every test a clean one."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
