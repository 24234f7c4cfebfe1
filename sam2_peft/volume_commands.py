"""`sam2-peft predict` and `eval` on 3D volumes (NIfTI, multi-page TIFF): their flags and what they run.

`cli.py` hands over when the input is a volume file or a volume folder (`images/` + `labels/`, or the Decathlon's
`imagesTr/` + `labelsTr/`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .flags import Applies

VOLUME_FLAGS = ("--window", "--slice-axis", "--volume-prompt", "--directions")
PREDICT_VOLUME_FLAGS = (*VOLUME_FLAGS, "--slice-prompts", "--prompt-labels")
EVAL_VOLUME_FLAGS = (*VOLUME_FLAGS, "--nsd-tolerance")
SLICE_RATE = 10
"""Frames per second of the mask and overlay videos of a volume (one frame per slice)."""


def is_volume_input(path: str | None) -> bool:
    """Whether `path` is a volume file or a volume folder."""
    from .data.volumes import volume_suffix

    return path is not None and (volume_suffix(path) is not None and not Path(path).is_dir() or _is_volume_folder(path))


def _is_volume_folder(path: str) -> bool:
    from .data.volumes import volume_folders

    return Path(path).is_dir() and volume_folders(path) is not None


def add_volume_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The volume flags of `predict` or `eval` (`command`)."""
    from .data.volumes import WINDOW_PRESETS
    from .evaluation.volume_metrics import NSD_TOLERANCE_MM

    group = parser.add_argument_group("volumes (NIfTI .nii/.nii.gz, multi-page TIFF; see the Volumes guide)")
    group.add_argument(
        "--window",
        default=None,
        help=f"CT window: a preset ({', '.join(WINDOW_PRESETS)}) or LEVEL,WIDTH in HU "
        "(default: the 0.5-99.5 percentiles of each volume span black to white)",
    )
    group.add_argument(
        "--slice-axis",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="array axis to slice along (default: the one with the coarsest voxel spacing)",
    )
    group.add_argument(
        "--volume-prompt",
        choices=("box", "point", "mask"),
        default="box",
        help="prompt of each object on the middle slice of its extent (from the label volume)",
    )
    group.add_argument(
        "--directions",
        choices=("both", "forward"),
        default="both",
        help="propagate from the prompted slice both ways, or forward only (towards higher slice numbers)",
    )
    if command == "predict":
        group.add_argument(
            "--prompt-labels",
            default=None,
            help="a label volume (or a folder of them, by file name) whose objects prompt their middle slices",
        )
        group.add_argument(
            "--slice-prompts",
            default=None,
            help='JSON: {"NAME": [{"id": 1, "slice": 40, "box": [x0, y0, x1, y1]} or {"id": 2, "slice": 12, '
            '"points": [[x, y]], "labels": [1]}]} in slice pixels',
        )
    else:
        group.add_argument(
            "--nsd-tolerance",
            type=float,
            default=NSD_TOLERANCE_MM,
            help="normalised surface distance tolerance, in the spacing's unit (mm for NIfTI)",
        )


def volume_rules(command: str, path_of, image_only: tuple[str, ...]) -> tuple[Applies, ...]:
    """Volume flags act on volume input only; `image_only` flags on other input only (`path_of(args)`: the input)."""
    flags = PREDICT_VOLUME_FLAGS if command == "predict" else EVAL_VOLUME_FLAGS
    prompts = Applies(
        ("--volume-prompt",),
        lambda a: command == "eval" or a.prompt_labels is not None,
        "applies with --prompt-labels only (--slice-prompts give their own prompts)",
    )
    return (
        Applies(flags, lambda a: is_volume_input(path_of(a)), "applies to volumes (NIfTI, TIFF) only"),
        prompts,
        Applies(
            image_only,
            lambda a: not is_volume_input(path_of(a)),
            "does not apply to volumes: drop it (see the volume flags)",
        ),
    )


def _volume_predictor(args: argparse.Namespace):
    """A `VideoPredictor` for `--model`, or for `--adapter` on the base it records (or `--base-model`)."""
    import torch

    from .adapters.files import load_adapter
    from .adapters.resolve import download_adapter, inspect_adapter
    from .inference.video import VideoPredictor
    from .models.loading import load_base_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.adapter is None:
        model, processor = load_base_model(args.model, video=True, revision=args.revision)
        return VideoPredictor(model, processor, device)
    info = inspect_adapter(download_adapter(args.adapter, revision=args.revision, token=args.token))
    model, processor = load_base_model(args.base_model or info.base_model, video=True)
    return VideoPredictor(load_adapter(model, info.directory), processor, device)


def _open_inputs(path: str, args: argparse.Namespace, with_labels: bool):
    """The `VolumeSequence`s of a volume file or folder (with their label volumes when `with_labels`)."""
    from .data.volumes import open_volume, open_volume_folder, parse_window, volume_folders, volume_stem

    window = parse_window(args.window)
    if _is_volume_folder(path):
        if with_labels:
            return open_volume_folder(path, slice_axis=args.slice_axis, window=window)
        image_dir = volume_folders(path)[0]
        files = sorted(p for p in image_dir.iterdir() if volume_stem(p) != p.name and not p.name.startswith("."))
        return [open_volume(p, slice_axis=args.slice_axis, window=window) for p in files]
    return [open_volume(path, slice_axis=args.slice_axis, window=window)]


def _prompts_for(sequence, args: argparse.Namespace, slice_prompts: dict | None) -> dict:
    """Object id -> `SlicePrompt` for one volume, from --slice-prompts or --prompt-labels."""
    from .data.sources import DataError
    from .data.volumes import read_label_volume, read_volume, volume_suffix
    from .inference.volumes import SlicePrompt, middle_slice_prompts

    if slice_prompts is not None:
        entries = slice_prompts.get(sequence.image_file.name, slice_prompts.get(sequence.name))
        if entries is None:
            raise DataError(f"--slice-prompts '{args.slice_prompts}' has no entry for volume '{sequence.name}'.")
        prompts = {}
        for entry in entries:
            where = f"--slice-prompts '{args.slice_prompts}', volume '{sequence.name}', object {entry.get('id')}"
            if not 0 <= int(entry.get("slice", -1)) < len(sequence.frames):
                raise DataError(f"{where}: 'slice' must be between 0 and {len(sequence.frames) - 1}.")
            if ("box" in entry) == ("points" in entry):
                raise DataError(f"{where}: give either 'box' [x0, y0, x1, y1] or 'points' [[x, y], ...].")
            prompts[int(entry["id"])] = SlicePrompt(
                int(entry["slice"]),
                box=np.asarray(entry["box"], np.float32) if "box" in entry else None,
                points=np.asarray(entry["points"], np.float32) if "points" in entry else None,
                labels=np.asarray(entry.get("labels", [1] * len(entry.get("points", [])))),
            )
        return prompts
    source = Path(args.prompt_labels)
    if source.is_dir():
        source = source / sequence.image_file.name
    elif volume_suffix(source) is None:
        raise DataError(f"--prompt-labels '{source}' is neither a label volume nor a folder of them.")
    labels = read_label_volume(source, read_volume(sequence.image_file).data.shape)
    return middle_slice_prompts(np.moveaxis(labels, sequence.slice_axis, 0), args.volume_prompt)


def predict_volumes(args: argparse.Namespace) -> None:
    """Write `OUT_DIR/NAME<suffix>` label volumes (the input's format and header), `OUT_DIR/NAME/` with the
    `--video-outputs` of its slices (see `write_slice_outputs`) and `OUT_DIR/volumes.json`."""
    from .data.sources import DataError
    from .data.video_files import import_av
    from .data.volumes import read_volume, volume_suffix, write_label_volume
    from .inference.video_files import parse_video_outputs
    from .inference.volumes import segment_volume
    from .io import atomic_write_dir, atomic_write_json, check_output_dir

    outputs = parse_video_outputs(args.video_outputs)
    if {"mask-video", "overlay"} & set(outputs):
        import_av()  # the install hint before the model runs

    if (args.slice_prompts is None) == (args.prompt_labels is None):
        raise DataError(
            "Volumes need prompts: give --prompt-labels (a label volume or folder; each object is prompted on the "
            f"middle slice of its extent) or --slice-prompts (a JSON of boxes, points or masks per slice){_labels_beside(args.images)}."
        )
    slice_prompts = None
    if args.slice_prompts is not None:
        try:
            slice_prompts = json.loads(Path(args.slice_prompts).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"Cannot read --slice-prompts '{args.slice_prompts}': {err}") from err
    sequences = _open_inputs(args.images, args, with_labels=False)
    prompts = {s.name: _prompts_for(s, args, slice_prompts) for s in sequences}  # all checked before the model loads
    names = {s.name: s.name + volume_suffix(s.image_file) for s in sequences}
    written = (*names.values(), *names, "volumes.json")
    check_output_dir(args.out_dir, outputs=written, overwrite=args.overwrite)
    predictor = _volume_predictor(args)
    summary = {}
    with atomic_write_dir(args.out_dir, replaces=written) as staging:
        for sequence in sequences:
            labels = segment_volume(predictor, sequence, prompts[sequence.name], args.directions)
            like = read_volume(sequence.image_file)
            name = names[sequence.name]
            write_label_volume(np.moveaxis(labels, 0, sequence.slice_axis), like, staging / name)
            write_slice_outputs(sequence, labels, staging / sequence.name, outputs)
            summary[name] = _record(sequence, args) | {
                "prompts": {str(i): p.slice for i, p in prompts[sequence.name].items()}
            }
        atomic_write_json(staging / "volumes.json", summary)
    print(f"Wrote {len(summary)} label volume(s) to {args.out_dir}")


def _labels_beside(images: str) -> str:
    """A hint naming the label folder of the volume folder that holds `images` (a file or the image folder), if any."""
    from .data.volumes import volume_folders

    path = Path(images)
    for root in (path, path.parent, path.parent.parent):
        found = volume_folders(root)
        if found and found[1].is_dir():
            return f" (this volume folder has labels: --prompt-labels {found[1]})"
    return ""


def write_slice_outputs(sequence, labels: np.ndarray, out_dir: Path, outputs: tuple[str, ...]) -> None:
    """The `(S, H, W)` label slices as the frames of `outputs` in `out_dir` (`masks.mkv`: grey level = label id,
    16-bit when an id exceeds 255; `masks/00000.png` ...; `overlay.mp4` on the windowed slices), frame t = slice t
    along the slicing axis, at `SLICE_RATE` frames per second."""
    from fractions import Fraction

    from .inference.video_files import MaskOutputs

    ids = np.unique(labels[labels > 0])
    wide = labels.dtype != np.uint8
    with MaskOutputs(out_dir, outputs, labels.shape[1:], Fraction(SLICE_RATE), wide) as written:
        for t, slice_labels in enumerate(labels):
            written.write(t, sequence.load_frame(t), slice_labels, slice_labels[None] == ids[:, None, None])


def _record(sequence, args: argparse.Namespace) -> dict:
    """What a volume's result records: slicing, spacing, intensity mapping, propagation."""
    return {
        "slice_axis": sequence.slice_axis,
        "spacing": list(sequence.spacing),
        "window": list(sequence.window) if sequence.window else "percentiles 0.5-99.5",
        "directions": args.directions,
        "prompt": "--slice-prompts" if getattr(args, "slice_prompts", None) else args.volume_prompt,
    }


def evaluate_volumes(args: argparse.Namespace) -> None:
    """3D Dice and NSD per object and volume, each object prompted on the middle slice of its true extent."""
    from .evaluation.volume_metrics import volume_metrics
    from .inference.volumes import middle_slice_prompts, segment_volume
    from .io import atomic_write_json

    sequences = _open_inputs(args.data, args, with_labels=True)
    predictor = _volume_predictor(args)
    per_volume = {}
    for sequence in sequences:
        truth = sequence.arrays()[1]
        prompts = middle_slice_prompts(truth, args.volume_prompt)
        pred = segment_volume(predictor, sequence, prompts, args.directions)
        objects = volume_metrics(pred, truth, sequence.spacing, list(prompts), args.nsd_tolerance)
        per_volume[sequence.name] = {
            "dice": float(np.mean([o["dice"] for o in objects.values()])) if objects else float("nan"),
            "nsd": float(np.mean([o["nsd"] for o in objects.values()])) if objects else float("nan"),
            "objects": objects,
            **_record(sequence, args),
        }
    metrics = {
        "dice": float(np.nanmean([v["dice"] for v in per_volume.values()])),
        "nsd": float(np.nanmean([v["nsd"] for v in per_volume.values()])),
        "nsd_tolerance": args.nsd_tolerance,
    }
    if args.output:
        atomic_write_json(
            args.output,
            {
                "metrics": metrics,
                "per_volume": per_volume,
                "adapter": args.adapter,
                "model": args.model,
                "data": args.data,
            },
        )
    print(json.dumps(metrics, indent=2))
