import os
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam2_peft.data.synthetic import (
    SHAPE_KINDS,
    SyntheticSceneConfig,
    SyntheticSceneDataset,
    generate_scene,
    main,
    write_scene_folder,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sam2_peft" / "data" / "sample"
SMALL = SyntheticSceneConfig(image_size=96)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def assert_same_scene(first, second) -> None:
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.instances, second.instances)
    assert first.shape_kinds == second.shape_kinds
    assert first.texture_kinds == second.texture_kinds


def test_same_seed_gives_identical_scene():
    assert_same_scene(generate_scene(7), generate_scene(7))


def test_different_seeds_give_different_scenes():
    first, second = generate_scene(7), generate_scene(8)
    assert not np.array_equal(first.image, second.image)
    assert not np.array_equal(first.instances, second.instances)


def test_generation_leaves_global_rng_alone():
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    generate_scene(3, SMALL)
    assert np.random.random() == expected


@pytest.mark.parametrize(
    "config",
    [
        SyntheticSceneConfig(image_size=128),
        SyntheticSceneConfig(image_size=96, min_objects=5, max_objects=6),
        SyntheticSceneConfig(image_size=128, min_objects=12, min_object_area=60),
    ],
)
def test_instances_are_contiguous_and_large_enough(config):
    for seed in range(12):
        scene = generate_scene(seed, config)
        size = config.image_size
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.instances.shape == (size, size)
        assert scene.instances.dtype == np.int32
        count = scene.num_objects
        assert config.min_objects <= count <= config.max_objects
        assert len(scene.texture_kinds) == count
        labels = set(np.unique(scene.instances).tolist()) - {0}
        assert labels == set(range(1, count + 1))
        areas = np.bincount(scene.instances.ravel(), minlength=count + 1)[1:]
        assert areas.min() >= config.min_object_area


def test_forced_grey_scenes_have_equal_channels():
    config = SyntheticSceneConfig(image_size=96, grey_probability=1.0)
    for seed in range(6):
        scene = generate_scene(seed, config)
        assert scene.is_grey
        np.testing.assert_array_equal(scene.image[..., 0], scene.image[..., 1])
        np.testing.assert_array_equal(scene.image[..., 0], scene.image[..., 2])


def test_colour_scenes_are_not_grey():
    config = SyntheticSceneConfig(image_size=96, grey_probability=0.0)
    for seed in range(6):
        scene = generate_scene(seed, config)
        assert not scene.is_grey
        assert np.any(scene.image[..., 0] != scene.image[..., 1])


def test_scenes_are_varied():
    scenes = list(SyntheticSceneDataset(50, seed=1, config=SMALL))
    shapes = Counter(kind for scene in scenes for kind in scene.shape_kinds)
    assert set(shapes) == set(SHAPE_KINDS)
    assert len({kind for scene in scenes for kind in scene.texture_kinds}) >= 3
    assert len({scene.background_kind for scene in scenes}) >= 3
    assert len({scene.num_objects for scene in scenes}) >= 5
    assert 0 < sum(scene.is_grey for scene in scenes) < len(scenes)


def test_dataset_derives_scenes_from_seed_and_index():
    dataset = SyntheticSceneDataset(4, seed=5, config=SMALL)
    assert len(dataset) == 4
    assert len(list(dataset)) == 4
    assert_same_scene(dataset[2], generate_scene(dataset.scene_seed(2), SMALL))
    assert_same_scene(dataset[-1], dataset[3])
    # Any non-negative index works and does not depend on the dataset length.
    longer = SyntheticSceneDataset(1000, seed=5, config=SMALL)
    assert_same_scene(dataset[2], longer[2])
    assert_same_scene(dataset[999], longer[999])
    assert dataset.scene_seed(2) != SyntheticSceneDataset(4, 6).scene_seed(2)
    with pytest.raises(IndexError):
        dataset[-5]


def test_written_folder_round_trips(tmp_path):
    write_scene_folder(tmp_path, num_scenes=3, seed=2, config=SMALL)
    dataset = SyntheticSceneDataset(3, seed=2, config=SMALL)
    names = [f"scene_{index:04d}.png" for index in range(3)]
    assert sorted(os.listdir(tmp_path / "images")) == names
    assert sorted(os.listdir(tmp_path / "masks")) == names
    for name, scene in zip(names, dataset):
        with Image.open(tmp_path / "images" / name) as image:
            assert image.mode == "RGB"
        with Image.open(tmp_path / "masks" / name) as mask:
            assert mask.mode == "L"
        np.testing.assert_array_equal(read_png(tmp_path / "images" / name), scene.image)
        np.testing.assert_array_equal(read_png(tmp_path / "masks" / name), scene.instances)


def test_masks_switch_to_16_bit_for_many_objects(tmp_path):
    config = SyntheticSceneConfig(
        image_size=64,
        min_objects=1,
        max_objects=300,
        object_radius=(0.2, 0.3),
        max_attempts=1,
    )
    write_scene_folder(tmp_path, num_scenes=1, seed=0, config=config)
    with Image.open(tmp_path / "masks" / "scene_0000.png") as mask:
        assert mask.mode.startswith("I")
        labels = np.asarray(mask)
    scene = SyntheticSceneDataset(1, seed=0, config=config)[0]
    assert scene.num_objects > 1
    np.testing.assert_array_equal(labels, scene.instances)


def test_documented_command_reproduces_sample(tmp_path):
    readme = (SAMPLE_DIR / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("python -m sam2_peft.data.synthetic ")]
    args = shlex.split(command)
    assert args[3] == "sam2_peft/data/sample"
    args[3] = str(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, *args[1:]], cwd=REPO_ROOT, env=env, check=True, timeout=300)
    for folder in ("images", "masks"):
        committed = sorted(os.listdir(SAMPLE_DIR / folder))
        assert len(committed) == 24
        assert sorted(os.listdir(tmp_path / folder)) == committed
        for name in committed:
            np.testing.assert_array_equal(
                read_png(tmp_path / folder / name),
                read_png(SAMPLE_DIR / folder / name),
                err_msg=f"{folder}/{name}",
            )


def test_style_flags_of_the_command_line_set_the_scene_config(tmp_path):
    main([
        str(tmp_path), "--num-scenes", "2", "--size", "64", "--shape-kinds", "ring,blob", "--illumination-strength", "0",
        "--object-radius", "0.1", "0.2", "--min-objects", "2",
    ])  # fmt: skip
    config = SyntheticSceneConfig(
        image_size=64, shape_kinds=("ring", "blob"), illumination_strength=0.0, object_radius=(0.1, 0.2), min_objects=2
    )
    for index, scene in enumerate(SyntheticSceneDataset(2, 0, config)):
        np.testing.assert_array_equal(read_png(tmp_path / "images" / f"scene_{index:04d}.png"), scene.image)
        np.testing.assert_array_equal(read_png(tmp_path / "masks" / f"scene_{index:04d}.png"), scene.instances)


def test_texture_by_shape_gives_each_shape_kind_its_texture(tmp_path):
    kinds, textures = ("ellipse", "polygon", "ring"), ("stripes", "noise")
    config = SyntheticSceneConfig(image_size=64, shape_kinds=kinds, texture_kinds=textures, texture_by_shape=True)
    scenes = list(SyntheticSceneDataset(4, 0, config))
    drawn = {(kind, texture) for scene in scenes for kind, texture in zip(scene.shape_kinds, scene.texture_kinds)}
    assert {kind for kind, _ in drawn} == set(kinds)
    assert drawn == {(kind, textures[kinds.index(kind) % 2]) for kind, _ in drawn}


@pytest.mark.parametrize(("flags", "by_shape"), [([], True), (["--no-texture-by-shape"], False)])
def test_semantic_folders_texture_by_shape_unless_told_not_to(tmp_path, flags, by_shape):
    main([str(tmp_path), "--num-scenes", "1", "--size", "64", "--shape-kinds", "ellipse,ring", "--semantic", *flags])
    config = SyntheticSceneConfig(image_size=64, shape_kinds=("ellipse", "ring"), texture_by_shape=by_shape)
    np.testing.assert_array_equal(
        read_png(tmp_path / "images" / "scene_0000.png"), SyntheticSceneDataset(1, 0, config)[0].image
    )


def test_help_shows_every_style_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in out for f in fields(SyntheticSceneConfig) if f.name != "image_size")


def test_invalid_style_flag_stops_with_the_config_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--shape-kinds", "ring,square"])
    assert exit_info.value.code == 2
    assert "error: shape_kinds must be a non-empty subset" in capsys.readouterr().err
    assert not (tmp_path / "images").exists()


def test_sample_is_small():
    total = sum(path.stat().st_size for path in SAMPLE_DIR.rglob("*") if path.is_file())
    assert total < 1_500_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_objects": 5, "max_objects": 4},
        {"shape_kinds": ("square",)},
        {"grey_probability": 1.5},
        {"object_radius": (0.3, 0.1)},
    ],
)
def test_invalid_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        SyntheticSceneConfig(**kwargs)


def test_unplaceable_objects_raise():
    config = SyntheticSceneConfig(image_size=64, min_object_area=64 * 64 + 1)
    with pytest.raises(RuntimeError, match="min_objects"):
        generate_scene(0, config)
