"""Batch inference over a dataset: `predict`, `segment-all` and `eval` under `accelerate launch` (2 CPU processes)
give the one-process outputs; `--resume` computes only what an earlier (killed) run left undone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sam2_peft.cli import main
from sam2_peft.data import sources
from tests.conftest import write_folder_dataset

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_FLAGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """5 images: two processes get uneven shares (3 and 2)."""
    return write_folder_dataset(tmp_path_factory.mktemp("data"), num_images=5)


def visible_files(folder: Path) -> dict[str, bytes]:
    """Every output file under `folder` (relative path -> bytes), without the hidden resume records."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not str(p.relative_to(folder)).startswith(".")
    }


def launch_two(*argv: str) -> subprocess.CompletedProcess:
    """`sam2-peft ARGV` in 2 CPU processes (gloo) under accelerate launch."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sam2_peft.cli", *argv,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def bar_totals(stderr: str, name: str) -> set[int]:
    """The totals of the progress bars labelled `name`."""
    return {int(total) for total in re.findall(rf"{name}: [^\r\n]*?\d+/(\d+) \[", stderr)}


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the images read (decoded) in this process; raises KeyboardInterrupt (a kill) on the read after
    `reads.kill_after` of them, when set."""
    calls, read_image = Reads(), sources.read_image

    def counted(path):
        if calls.kill_after is not None and len(calls) == calls.kill_after:
            raise KeyboardInterrupt
        calls.append(Path(path).name)
        return read_image(path)

    monkeypatch.setattr(sources, "read_image", counted)
    return calls


class Reads(list):
    kill_after: int | None = None


def test_resume_recomputes_only_the_deleted_outputs(saved_tiny_model, data, tmp_path, reads):
    plain, resumed = tmp_path / "plain", tmp_path / "resumed"
    main(["predict", str(data / "images"), str(plain), "--model", str(saved_tiny_model)])
    main(["predict", str(data / "images"), str(resumed), "--model", str(saved_tiny_model), "--resume"])
    assert visible_files(resumed) == visible_files(plain) and len(reads) == 10
    (resumed / "masks" / "img_001.png").unlink()
    (resumed / "overlays" / "img_003.png").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (resumed / "masks").glob("*.png")}
    main(["predict", str(data / "images"), str(resumed), "--model", str(saved_tiny_model), "--resume"])
    assert reads[10:] == ["img_001.png", "img_003.png"]
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items() if p.name != "img_003.png")
    assert visible_files(resumed) == visible_files(plain)


def test_a_killed_run_resumes_and_a_half_written_file_is_not_taken_as_done(saved_tiny_model, data, tmp_path, reads):
    plain, out = tmp_path / "plain", tmp_path / "out"
    main(["segment-all", str(data / "images"), str(plain), "--model", str(saved_tiny_model), *SEGMENT_FLAGS])
    assert json.loads((plain / "instances.json").read_text())["annotations"]  # something to compare
    reads.clear()
    reads.kill_after = 3
    with pytest.raises(KeyboardInterrupt):
        main(["segment-all", str(data / "images"), str(out), "--model", str(saved_tiny_model), *SEGMENT_FLAGS,
              "--resume"])  # fmt: skip
    assert sorted(p.name for p in (out / ".done").iterdir()) == ["img_000.json", "img_001.json", "img_002.json"]
    (out / "labels" / "img_003.png").write_bytes(b"\x89PNG cut off")  # as if killed while writing, by a tool not ours
    (out / ".staging-killed").mkdir()  # a killed run's staging folder
    reads.clear()
    reads.kill_after = None
    main(["segment-all", str(data / "images"), str(out), "--model", str(saved_tiny_model), *SEGMENT_FLAGS, "--resume"])
    assert reads == ["img_003.png", "img_004.png"]
    assert not (out / ".staging-killed").exists()
    assert visible_files(out) == visible_files(plain)  # COCO ids, summary, labels as one uninterrupted run's


def test_resume_and_overwrite_exclude_each_other(saved_tiny_model, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", str(data / "images"), str(tmp_path), "--model", "tiny-random", "--resume", "--overwrite"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("--overwrite: not allowed with argument --resume")


@pytest.mark.slow
def test_two_processes_predict_as_one_and_resume(saved_tiny_model, data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    main(["predict", str(data / "images"), str(one), "--model", str(saved_tiny_model)])
    result = launch_two("predict", str(data / "images"), str(two), "--model", str(saved_tiny_model))
    assert bar_totals(result.stderr, "predict") == {3, 2}  # each process its share
    assert visible_files(two) == visible_files(one) and len(list((two / "masks").iterdir())) == 5
    for name in ("img_000", "img_004"):  # one in each process's share
        (two / "masks" / f"{name}.png").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (two / "overlays").glob("*.png")}
    result = launch_two("predict", str(data / "images"), str(two), "--model", str(saved_tiny_model), "--resume")
    assert "3 image(s) already done" in result.stderr and "2 to go" in result.stderr
    changed = sorted(p.stem for p, mtime in kept.items() if p.stat().st_mtime_ns != mtime)
    assert changed == ["img_000", "img_004"]
    assert visible_files(two) == visible_files(one)


@pytest.mark.slow
def test_two_processes_segment_all_as_one(saved_tiny_model, data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    main(["segment-all", str(data / "images"), str(one), "--model", str(saved_tiny_model), *SEGMENT_FLAGS])
    launch_two("segment-all", str(data / "images"), str(two), "--model", str(saved_tiny_model), *SEGMENT_FLAGS)
    coco = json.loads((two / "instances.json").read_text())
    ids = [a["id"] for a in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1)) and {a["image_id"] for a in coco["annotations"]} == {1, 2, 3, 4, 5}
    assert visible_files(two) == visible_files(one)


def without_timings(report):
    """`report` without the seconds it took (which differ from run to run)."""
    if isinstance(report, dict):
        return {k: without_timings(v) for k, v in report.items() if k != "seconds_per_image"}
    return report


@pytest.mark.slow
def test_two_processes_eval_as_one(saved_tiny_model, data, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    main(["eval", "--data", str(data), "--model", str(saved_tiny_model), "--output", str(one)])
    result = launch_two("eval", "--data", str(data), "--model", str(saved_tiny_model), "--output", str(two))
    assert bar_totals(result.stderr, "evaluate") == {3}  # the main process's bar: its share
    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    assert list(double["per_image"]) == list(single["per_image"]) and len(single["per_image"]) == 5
    assert double["metrics"] == pytest.approx(single["metrics"], abs=1e-6)
    for name, scores in single["per_image"].items():
        assert double["per_image"][name] == pytest.approx(scores, abs=1e-6)
    assert double["num_images"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["automatic", "interactive"])
def test_two_processes_eval_instances_as_one(protocol, saved_tiny_model, data, tmp_path):
    flags = ["--protocol", protocol, "--data", str(data), "--model", str(saved_tiny_model)]
    flags += SEGMENT_FLAGS if protocol == "automatic" else ["--max-clicks", "3"]
    main(["eval", *flags, "--output", str(tmp_path / "one.json")])
    launch_two("eval", *flags, "--output", str(tmp_path / "two.json"))
    single, double = (without_timings(json.loads((tmp_path / f"{n}.json").read_text())) for n in ("one", "two"))
    assert single["num_images"] == 5 and double == single
