"""`sam2-peft`: one command with subcommands for training, conversion, evaluation, prediction and sharing."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .commandline import run_from_command_line
from .flags import Applies, flags_of, refuse_unused_flags
from .volume_commands import add_volume_arguments, evaluate_volumes, is_volume_input, predict_volumes, volume_rules


def train(argv: list[str]) -> None:
    """`sam2-peft train RECIPE [flags]`: run a recipe of `sam2_peft.recipes` (`... RECIPE --help` lists its flags)."""
    from .recipes import ALIASES, RECIPES

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sam2-peft train RECIPE [recipe flags]\n\nrecipes:")
        print("\n".join(f"  {name:<10}{about}" for name, about in RECIPES.items()))
        print("\nFor several GPUs or processes: accelerate launch -m sam2_peft.recipes.RECIPE [flags]")
        return
    name, rest = argv[0], argv[1:]
    name, defaults = ALIASES.get(name, (name, {}))
    if name not in RECIPES:
        close = difflib.get_close_matches(name, [*RECIPES, *ALIASES], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        sys.exit(f"error: unknown recipe '{argv[0]}'. {hint}Known: {', '.join(RECIPES)}.")
    recipe = importlib.import_module(f"sam2_peft.recipes.{name}")
    sys.argv = [f"sam2-peft train {name}", *rest]  # argparse's program name in usage lines
    run_from_command_line(lambda: recipe.main(rest, **defaults))


def convert_meta(argv: list[str]) -> None:
    from .models.meta_checkpoint import main as convert_main

    sys.exit(convert_main(argv))


def _parser(command: str, description: str, epilog: str = "", settings: tuple = ()) -> argparse.ArgumentParser:
    """A command's parser; with `settings` dataclasses, a `RecipeParser` that adds their flags (as the recipes do)."""
    kwargs = dict(
        prog=f"sam2-peft {command}",
        description=textwrap.fill(description, 100),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if not settings:
        return argparse.ArgumentParser(**kwargs)
    from .recipes.arguments import HelpFormatter, RecipeParser

    class Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        """Examples kept as written; defaults shown."""

    return RecipeParser(list(settings), **{**kwargs, "formatter_class": Formatter, "usage": None})


def _add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--device`: a torch device, or `auto` (None: cuda when available); help shows its default once, with or
    without a defaults-showing formatter (which adds none to a help naming `%(default)s`)."""
    parser.add_argument(
        "--device",
        default="auto",
        type=lambda name: None if name == "auto" else name,
        help="cpu, cuda, cuda:1 ..., or auto: cuda when available (default: %(default)s)",
    )


def _add_model_arguments(parser: argparse.ArgumentParser, onnx: bool = False) -> None:
    group = parser.add_argument_group(f"model (give --adapter{', --model or --onnx' if onnx else ' or --model'})")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="adapter: a training output folder or a Hub repo id (org/name)")
    which.add_argument("--model", help="a base model alone: Hub id, local folder, or tiny-random (no adapter)")
    if onnx:
        which.add_argument("--onnx", metavar="EXPORT", help="a `sam2-peft export` folder, run with onnxruntime (CPU)")
    group.add_argument("--revision", default=None, help="Hub branch, tag or commit of the adapter (or of --model)")
    group.add_argument("--base-model", default=None, help="base to load the adapter into (default: the one it records)")
    group.add_argument(
        "--token", default=None, help="Hub token of the adapter (default: HF_TOKEN or the `hf auth login` token)"
    )
    _add_device_argument(group)
    group.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="autocast dtype")


ONNX_RULE = Applies(
    ("--revision", "--base-model", "--token", "--device", "--dtype"),
    lambda a: a.onnx is None,
    "cannot apply to --onnx (an export runs on the CPU as exported): drop it",
)
"""The flags that choose or place a PyTorch model, which an ONNX export (`predict --onnx`) cannot use."""


def _model_rules() -> tuple:
    """The model flags that act with --adapter only (`_add_model_arguments`)."""
    return (
        Applies(
            ("--base-model",), lambda a: a.adapter is not None, "applies with --adapter only (the base to load it into)"
        ),
        Applies(
            ("--token",),
            lambda a: a.adapter is not None,
            "applies with --adapter only; a base model from the Hub uses HF_TOKEN or the `hf auth login` token",
        ),
    )


def _automatic_rules(grid_always: bool) -> tuple:
    """The automatic-mask flags of one mode: the specialist-guided mode runs with --foreground-adapter, the grid mode
    without it (or always: `eval` compares both)."""

    def grid(args: argparse.Namespace) -> bool:
        return grid_always or args.foreground_adapter is None

    return (
        Applies(GRID_FLAGS, grid, "applies to the grid mode only; --foreground-adapter's foreground places the points"),
        Applies(
            GUIDED_FLAGS,
            lambda a: a.foreground_adapter is not None,
            "applies to the specialist-guided mode only: give --foreground-adapter",
        ),
        Applies(CROP_FLAGS, lambda a: a.crop_n_layers > 0, "applies with --crop-n-layers 1 or more only"),
    )


GRID_FLAGS = ("--points-per-side", "--crop-n-layers", "--crop-overlap-ratio", "--crop-n-points-downscale-factor")
GUIDED_FLAGS = ("--cells-per-side", "--clip-to-foreground")
CROP_FLAGS = ("--crop-overlap-ratio", "--crop-n-points-downscale-factor")
"""Automatic-mask flags of the point-grid mode, of the specialist-guided mode, and of crops."""


def _load_predictor(args: argparse.Namespace):
    from .inference.distributed import process_device
    from .inference.predictor import Sam2PeftPredictor
    from .models.loading import load_base_model

    args.device = process_device(args.device)  # under accelerate launch, --device auto is each process's own
    if getattr(args, "onnx", None):
        from .export import load_onnx_predictor

        return load_onnx_predictor(args.onnx)
    if args.adapter:
        return Sam2PeftPredictor.from_pretrained(
            args.adapter,
            revision=args.revision,
            base_model=args.base_model,
            dtype=args.dtype,
            device=args.device,
            token=args.token,
        )
    model, processor = load_base_model(args.model, revision=args.revision)
    return Sam2PeftPredictor(model, processor, dtype=args.dtype, device=args.device)


def evaluate(argv: list[str]) -> None:
    """`sam2-peft eval`: score an adapter (or a base model) on an annotated dataset."""
    from .data.config import ValidationConfig
    from .inference.automatic_config import AutomaticMaskConfig
    from .recipes.arguments import DataSourceArguments, from_namespace

    parser = _parser(
        "eval",
        "Score an adapter or a base model on an annotated dataset and write the numbers as JSON. --protocol prompted "
        "(default): one prompt per object (IoU, Dice, boundary IoU, pixel accuracy at the original image size). "
        "automatic: automatic instance masks of the base and the adapter (SAM's point grid; with --foreground-adapter "
        "also the specialist-guided mode) scored by mSA, SA50, SA75 and COCO mAP / AP50. interactive: simulated "
        "clicks (RITM protocol, up to --max-clicks per object, clicks only and box then clicks) for the base and the "
        "adapter: NoC@85/90 and mIoU per click, with a PNG plot next to --output. video: track each sequence of a "
        "video folder (DAVIS-style frame folders, or video files NAME.mp4 with PNG annotations in NAME/) from a --prompt "
        "on its first annotated frame; DAVIS J, F and J&F. The data flags are the training recipes'.",
        "examples:\n  sam2-peft eval --adapter org/sam2-nuclei-lora --data data/val --output val_metrics.json\n"
        "  sam2-peft eval --protocol interactive --adapter outputs/lora --data data/val --output noc.json\n"
        "  sam2-peft eval --protocol automatic --adapter outputs/lora --foreground-adapter outputs/ptsam \\\n"
        "      --data data/val --output instances.json\n"
        "  sam2-peft eval --protocol video --adapter outputs/video --data videos/ --output jf.json",
        settings=(DataSourceArguments, ValidationConfig, AutomaticMaskConfig),
    )
    _add_model_arguments(parser)
    parser.add_argument(
        "--protocol",
        choices=("prompted", "automatic", "interactive", "video"),
        default="prompted",
        help="what to score",
    )
    parser.add_argument("--prompt", choices=("box", "point", "none"), default="box", help="prompt per object, or none")
    parser.add_argument(
        "--foreground-adapter",
        default=None,
        help="automatic protocol: a prompt-free PTSAM adapter whose foreground places the point prompts "
        "(specialist-guided mode); --adapter (or the base) separates the objects",
    )
    parser.add_argument("--max-clicks", type=int, default=20, help="interactive protocol: clicks per object")
    parser.add_argument(
        "--max-images", type=int, default=None, help="score only the first N usable images (checked in order)"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch")
    parser.add_argument(
        "--output",
        default=None,
        help="write metrics here (JSON; a multi-class adapter's confusion matrix beside it, NAME.confusion_matrix.png); "
        "default: print only",
    )
    add_volume_arguments(parser, "eval")
    args = parser.parse_args(argv)
    source, validation = from_namespace(DataSourceArguments, args), from_namespace(ValidationConfig, args)
    if source.data is None:
        parser.error("the following arguments are required: --data")
    refuse_unused_flags(parser, argv, _eval_rules(), args)
    if is_volume_input(source.data):
        run_from_command_line(lambda: evaluate_volumes(args))
        return
    if args.protocol == "video":
        if args.prompt == "none":
            parser.error("--protocol video needs a prompt on the first annotated frame: --prompt box or point")
        run_from_command_line(lambda: _evaluate_video(args))
        return
    if args.protocol != "prompted":
        if args.max_clicks < 1:
            parser.error("--max-clicks must be at least 1")
        config = from_namespace(AutomaticMaskConfig, args)
        run_from_command_line(lambda: _evaluate_instances(args, source, validation, config))
        return

    def run() -> None:
        from pathlib import Path

        from accelerate import Accelerator
        from torch.utils.data import DataLoader

        from .data.classes import objects_by_class
        from .data.dataset import DatasetConfig, SegmentationDataset, collate_segmentation
        from .data.prompts import PromptConfig
        from .data.sources import check_data_source, open_records, set_max_image_pixels
        from .data.validation import validate_records
        from .evaluation.panels import plot_confusion
        from .evaluation.runner import evaluate_segmenter
        from .inference.distributed import is_main_process, my_share
        from .io import atomic_write_json
        from .models.segmenter import Sam2Segmenter

        check_data_source(source.data, "--data")  # a wrong path is reported before the model loads
        predictor = _load_predictor(args)
        classes = _adapter_classes(predictor, args.prompt, source.mask_type)
        mixed = {"float16": "fp16", "bfloat16": "bf16"}.get(args.dtype or "", "no")
        accelerator = Accelerator(cpu=predictor.device.type == "cpu", mixed_precision=mixed)
        set_max_image_pixels(source.max_image_pixels)
        records = open_records(
            source.data,
            split=source.split,
            image_column=source.image_column,
            mask_column=source.mask_column,
            mask_type=source.mask_type,
        )
        if classes is None and args.prompt != "none":
            classes = _data_classes(source)  # each object keeps its class: scores per class too
        config = DatasetConfig(
            target_mode="semantic" if args.prompt == "none" else "instances",
            prompts=PromptConfig(prompt=args.prompt),
            validation=validation,
            class_ids=classes.ids if classes else None,
            ignore_index=classes.ignore_index if classes else None,
        )
        records, report = validate_records(
            objects_by_class(records, config),
            config.validation,
            limit=args.max_images,
            description="Checking evaluation images",
        )
        shard = my_share(records)  # under accelerate launch, each process scores its share; per-image results gathered
        dataset = SegmentationDataset(shard, predictor.processor, config, train=False)
        loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_segmentation)
        segmenter = Sam2Segmenter(predictor.model).to(accelerator.device)
        result = evaluate_segmenter(segmenter, loader, predictor.processor, accelerator, classes=classes)
        summary = {
            **result.details,
            "metrics": result.metrics,
            "per_image": result.per_image,
            "adapter": args.adapter,
            "model": args.model or (predictor.adapter.base_model if predictor.adapter else None),
            "data": args.data,
            "prompt": args.prompt,
            "num_images": len(records),
            "data_report": report.summary(),
        }
        if not is_main_process():
            return
        if args.output:
            atomic_write_json(args.output, summary)
            plot_confusion(result.details, Path(args.output).with_suffix(".confusion_matrix.png"))
        print(json.dumps(result.metrics, indent=2))

    run_from_command_line(run)


def _eval_rules() -> tuple:
    """`eval`'s flags that act under one --protocol only (or with another flag)."""
    from .data.config import ValidationConfig
    from .inference.automatic_config import AutomaticMaskConfig
    from .recipes.arguments import DataSourceArguments

    def protocol(name: str) -> Callable[[argparse.Namespace], bool]:
        return lambda a: a.protocol == name

    image_only = (  # volumes are scored by the prompted protocol, prompted by --volume-prompt
        *("--protocol", "--prompt", "--max-images", "--batch-size", "--dtype", "--foreground-adapter", "--max-clicks"),
        *flags_of(DataSourceArguments, leave_out=("data",)),
        *flags_of(ValidationConfig),
        *flags_of(AutomaticMaskConfig),
    )

    only = "applies to --protocol {} only"
    return (
        Applies(("--batch-size",), protocol("prompted"), only.format("prompted")),
        Applies(("--prompt",), lambda a: a.protocol in ("prompted", "video"), only.format("prompted or video")),
        Applies(
            (*flags_of(DataSourceArguments, leave_out=("data",)), *flags_of(ValidationConfig), "--max-images"),
            lambda a: a.protocol != "video",
            "applies to image data only, not to --protocol video",
        ),
        Applies(
            ("--foreground-adapter", *flags_of(AutomaticMaskConfig)), protocol("automatic"), only.format("automatic")
        ),
        Applies(("--max-clicks",), protocol("interactive"), only.format("interactive")),
        Applies(
            ("--dtype",), lambda a: a.protocol != "video", "applies to image protocols only (video runs in float32)"
        ),
        *_automatic_rules(grid_always=True),
        *_model_rules(),
        *volume_rules("eval", lambda a: a.data, image_only),
    )


def _evaluate_video(args: argparse.Namespace) -> None:
    """`eval --protocol video`: J, F and J&F of the adapter (or base) on every sequence of --data."""
    from .data.video import open_video_folder
    from .evaluation.video_runner import evaluate_video
    from .inference.video_files import load_video_predictor
    from .io import atomic_write_json

    sequences = open_video_folder(args.data)  # bad data is reported before the model loads
    predictor = load_video_predictor(args)
    result = evaluate_video(predictor.tracker, sequences, predictor.processor, predictor.device, prompt=args.prompt)
    summary = {
        "metrics": result.metrics,
        "per_sequence": result.per_image,
        "adapter": args.adapter,
        "model": args.model or args.base_model,
        "data": args.data,
        "prompt": args.prompt,
        "num_sequences": len(sequences),
    }
    if args.output:
        atomic_write_json(args.output, summary)
    print(json.dumps(result.metrics, indent=2))


def _adapter_classes(predictor, prompt: str, mask_type: str):
    """The `ClassList` of a multi-class PTSAM adapter (scored per class on semantic masks, ignore value 255), or None
    for other models; DataError when the data or prompt cannot score one."""
    from .data.classes import IGNORE_INDEX, ClassList
    from .data.sources import DataError
    from .tuners.ptsam.layer import active_classes

    classes = active_classes(predictor.model)
    if classes is None:
        return None
    if prompt != "none" or mask_type != "semantic":
        raise DataError(
            f"The adapter segments {len(classes)} classes without prompts: evaluate it with --prompt none "
            "--mask-type semantic on class-map masks."
        )
    return ClassList.from_names(classes, IGNORE_INDEX)


def _data_classes(source):
    """The classes of the objects `eval` scores by class: a semantic mask's values (named by classes.json, the COCO
    categories or a `ClassLabel`, else by their ids; the ignore value 255 is no object) or a COCO file's categories;
    None for data without classes."""
    from .data.classes import IGNORE_INDEX, ClassList, coco_classes, named_classes

    if source.mask_type != "semantic":
        return coco_classes(source.data)
    return ClassList.from_names(named_classes(source.data, None, source.split, source.mask_column) or {}, IGNORE_INDEX)


def _base_predictor(predictor, args: argparse.Namespace):
    """The base model of an adapter's predictor (the one it records, or --base-model), as a predictor."""
    from .inference.predictor import Sam2PeftPredictor
    from .models.loading import load_base_model

    model, processor = load_base_model(args.base_model or predictor.adapter.base_model)
    return Sam2PeftPredictor(model, processor, dtype=args.dtype, device=args.device)


def _load_foreground(args: argparse.Namespace):
    """The --foreground-adapter's predictor; DataError unless it is a prompt-free PTSAM adapter (one class or
    several: then `segment-all` labels each instance by class)."""
    from .data.sources import DataError
    from .inference.predictor import Sam2PeftPredictor
    from .inference.prompt_free import has_active_ptsam

    foreground = Sam2PeftPredictor.from_pretrained(
        args.foreground_adapter, dtype=args.dtype, device=args.device, token=args.token
    )
    if not has_active_ptsam(foreground.model):
        raise DataError(
            f"--foreground-adapter '{args.foreground_adapter}' is not a PTSAM adapter: give a prompt-free PTSAM "
            "adapter (sam2-peft train ptsam) for the specialist-guided mode."
        )
    return foreground


def _evaluate_instances(args: argparse.Namespace, source, validation, config) -> None:
    """`eval --protocol automatic | interactive`: base vs adapter (and specialist-guided) on the dataset's instances."""
    from .data.classes import objects_by_class
    from .data.config import DatasetConfig
    from .data.sources import check_data_source, open_records, set_max_image_pixels
    from .data.validation import validate_records
    from .evaluation import instance_runner
    from .inference.distributed import is_main_process
    from .io import atomic_write_json

    check_data_source(source.data, "--data")
    set_max_image_pixels(source.max_image_pixels)
    records = open_records(
        source.data, split=source.split, image_column=source.image_column, mask_column=source.mask_column,
        mask_type=source.mask_type,
    )  # fmt: skip
    classes = _data_classes(source)
    if args.protocol == "interactive" and classes is not None:  # clicks per object: the ignore region is none
        records = objects_by_class(records, DatasetConfig(class_ids=classes.ids, ignore_index=classes.ignore_index))
    records, report = validate_records(records, validation, limit=args.max_images, description="Checking images")
    predictor = _load_predictor(args)
    predictors = (
        {"base": _base_predictor(predictor, args), "adapter": predictor} if args.adapter else {"base": predictor}
    )
    if args.protocol == "interactive":
        result = instance_runner.interactive_report(predictors, records, args.max_clicks)
    else:
        from .inference.automatic import generate_instances, specialist_guided_instances

        segmenters = {
            f"{name} (grid)": (lambda image, p=p: generate_instances(p, image, config))
            for name, p in predictors.items()
        }
        if args.foreground_adapter:
            foreground = _load_foreground(args)
            separator = predictors.get("adapter", predictors["base"])
            name = f"specialist-guided ({'adapter' if args.adapter else 'base'} separates)"
            segmenters[name] = lambda image: specialist_guided_instances(foreground, separator, image, config)
        result = instance_runner.automatic_report(
            segmenters,
            records,
            class_names=None if classes is None else dict(zip(classes.ids, classes.names)),
            ignore_index=None if classes is None else classes.ignore_index,
        )
        result["settings"] = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    if not is_main_process():
        return
    result.update(
        adapter=args.adapter, foreground_adapter=getattr(args, "foreground_adapter", None), data=args.data,
        model=args.model or (predictor.adapter.base_model if predictor.adapter else None),
        data_report=report.summary(),
    )  # fmt: skip
    brief = {
        name: r["overall"] if "overall" in r else {start: _without_per_image(s) for start, s in r.items()}
        for name, r in result["results"].items()
    }
    if args.output:
        if args.protocol == "interactive":
            from .evaluation.interactive import write_report

            result["title"] = f"{Path(args.data).name}: {result['num_images']} images"
            _, plot = write_report(result, args.output)
            print(f"Plot: {plot}", file=sys.stderr)
        else:
            atomic_write_json(args.output, result)
    print(json.dumps(brief, indent=2, default=str))


def _without_per_image(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("per_image", "miou_per_click")}


OUTPUT_NAMES = (
    "<name> is the image's stem (a.png gives <name>.png = a.png), or its file name where two images share the stem "
    "(a.png and a.jpg give a.png.png and a.jpg.png). An OUT_DIR holding an earlier run's outputs is refused unless "
    "--overwrite."
)
SEGMENT_OUTPUTS = ("labels", "overlays", "instances.json", "summary.json")
PREDICT_OUTPUTS = ("masks", "overlays", "predictions.json")
"""What `segment-all` and `predict` write in OUT_DIR: an earlier run's are refused, or replaced with --overwrite."""


def segment_all(argv: list[str]) -> None:
    """`sam2-peft segment-all`: instance label images for a folder of images, without prompts."""
    from .inference.automatic_config import AutomaticMaskConfig
    from .recipes.arguments import from_namespace

    parser = _parser(
        "segment-all",
        "Segment every object of every image in a folder as its own instance, without prompts: SAM's automatic mask "
        "generation (a grid of point prompts) with a base model or any adapter, or, with --foreground-adapter, the "
        "specialist-guided mode (a prompt-free PTSAM adapter's foreground places the points; --adapter or the base "
        "separates the objects). Writes OUT_DIR/labels/<name>.png (or .tif; 0 background, 1..K instances, 16-bit "
        "above 255), OUT_DIR/overlays/<name>.png and OUT_DIR/instances.json (COCO results with RLE masks, scores). "
        "A multi-class PTSAM foreground labels each instance by class (COCO categories and category_id; class names "
        f"in OUT_DIR/summary.json). {OUTPUT_NAMES}",
        "examples:\n  sam2-peft segment-all --model compact-synthetic images/ instances/\n"
        "  sam2-peft segment-all --adapter outputs/lora --foreground-adapter outputs/ptsam images/ instances/",
        settings=(AutomaticMaskConfig,),
    )
    parser.add_argument("images", metavar="IMAGES", help="folder of images")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where labels/, overlays/ and instances.json go")
    _add_model_arguments(parser)
    parser.add_argument(
        "--foreground-adapter",
        default=None,
        help="prompt-free PTSAM adapter (one class or several): specialist-guided mode",
    )
    parser.add_argument("--format", choices=("png", "tif"), default="png", help="label image format")
    _add_folder_arguments(parser)
    args = parser.parse_args(argv)
    refuse_unused_flags(parser, argv, (*_automatic_rules(grid_always=False), *_model_rules()), args)
    config = from_namespace(AutomaticMaskConfig, args)
    run_from_command_line(lambda: _segment_folder(args, config))


def _segment_folder(args: argparse.Namespace, config) -> None:
    import math
    from dataclasses import asdict

    from PIL import Image

    from .data.sources import read_label_image
    from .inference.automatic import MaskFunnel, generate_instances, specialist_guided_instances
    from .inference.distributed import run_over_images
    from .inference.instance_outputs import coco_results, instance_overlay, save_label_image
    from .io import atomic_write_json
    from .tuners.ptsam.layer import active_classes

    files, names = _image_files(args, SEGMENT_OUTPUTS)
    predictor = _load_predictor(args)
    foreground = _load_foreground(args) if args.foreground_adapter else None

    def segment_image(path: Path, image: np.ndarray, staging: Path) -> dict:
        if foreground is not None:
            instances = specialist_guided_instances(foreground, predictor, image, config)
        else:
            instances = generate_instances(predictor, image, config)
        (staging / "labels").mkdir(exist_ok=True)
        (staging / "overlays").mkdir(exist_ok=True)
        save_label_image(instances.labels, staging / "labels" / f"{names[path]}.{args.format}")
        Image.fromarray(instance_overlay(image, instances.labels, instances.points)).save(
            staging / "overlays" / f"{names[path]}.png"
        )
        summary = {"instances": int(len(instances.scores)), "prompts": int(len(instances.points))}
        if instances.classes is not None:  # multi-class PTSAM foreground: each instance's class name
            summary["classes"] = {k: instances.class_names[c] for k, c in instances.class_by_label.items()}
        return {**summary, "scores": instances.score_by_label, "classes_by_label": instances.class_by_label,
                "funnel": asdict(instances.funnel)}  # fmt: skip

    def write_summary(records: dict, folder: Path) -> None:
        """instances.json (COCO, of the label images as written) and summary.json."""
        labels = {
            path.name: read_label_image(folder / "labels" / f"{names[path]}.{args.format}")
            for path in files
            if path.name in records
        }
        scores = {name: {int(k): v for k, v in record["scores"].items()} for name, record in records.items()}
        classes = {
            name: {int(k): v for k, v in record["classes_by_label"].items()}
            for name, record in records.items()
            if record.get("classes_by_label") is not None
        }
        categories = active_classes(foreground.model) if foreground is not None else None
        atomic_write_json(folder / "instances.json", coco_results(labels, scores, classes or None, categories))
        kept = ("instances", "prompts", "classes")
        summary = {name: {key: record[key] for key in kept if key in record} for name, record in records.items()}
        atomic_write_json(folder / "summary.json", summary)

    records = run_over_images(
        files, names, args.out_dir, SEGMENT_OUTPUTS,
        lambda todo: _read_images(todo, "segment-all", args.skip_bad_files), segment_image, write_summary, args.resume,
    )  # fmt: skip
    if records is None:
        return
    total = sum(r["instances"] for r in records.values())
    print(f"Wrote {total} instance(s) of {len(records)} image(s) to {args.out_dir}")
    if total == 0:
        funnel = MaskFunnel()
        for record in records.values():
            funnel += MaskFunnel(**{k: -math.inf if v is None else v for k, v in record["funnel"].items()})
        print(
            f"warning: no instances: {funnel.describe(config)}. Lower the setting that dropped most.", file=sys.stderr
        )


def _add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `predict` and `segment-all` share: large images, bad files, an earlier run's outputs."""
    parser.add_argument(
        "--max-image-pixels", type=int, default=None, help="refuse larger images (default PIL's limit; 0 = none)"
    )
    parser.add_argument(
        "--skip-bad-files", action="store_true", help="skip unreadable images with a warning (default: stop)"
    )
    earlier = parser.add_mutually_exclusive_group()
    earlier.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's outputs in OUT_DIR (default: refuse)"
    )
    earlier.add_argument(
        "--resume",
        action="store_true",
        help="continue an earlier (killed) run in OUT_DIR with the same flags: keep the images it finished, compute "
        "the others (under accelerate launch too)",
    )


def _image_files(args: argparse.Namespace, outputs: tuple[str, ...], boxes: dict | None = None):
    """(images, their output names) of the folder `args.images`, in natural order (`2.png` before `10.png`), checked
    before the model loads: the folder, OUT_DIR (`outputs` of an earlier run need --overwrite), each file's header
    (a bad one stops the run, or is skipped with --skip-bad-files). With `boxes`, only the images it names."""
    from .data.sources import (
        DEFAULT_MAX_IMAGE_PIXELS,
        IMAGE_SUFFIXES,
        DataError,
        natural_key,
        set_max_image_pixels,
        viewed_size,
    )
    from .inference.instance_outputs import output_names
    from .io import check_output_dir

    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels)
    folder = Path(args.images)
    if not folder.is_dir():
        raise FileNotFoundError(f"Expected a folder of images, found no folder at '{folder}'.")
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name)
    )
    names = output_names(files)
    if boxes is not None:
        files = _boxed_files(files, boxes, args.boxes, folder, "images")
    if not files:
        raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'.")
    check_output_dir(args.out_dir, outputs=outputs, overwrite=args.overwrite or args.resume)
    return [path for path, _ in _skipping_bad_files(files, viewed_size, args.skip_bad_files)], names


def _boxed_files(files: list[Path], boxes: dict, boxes_file: str, folder, what: str) -> list[Path]:
    """The files a boxes file names, in its order; DataError for a name that is no file of `folder`."""
    from .data.sources import DataError

    unknown = [name for name in boxes if not any(name in (path.name, path.stem) for path in files)]
    if unknown:
        raise DataError(f"'{boxes_file}' names {what} not in '{folder}': {unknown[:5]}")
    return [_boxed_file(files, name, boxes_file) for name in boxes]


def _boxed_file(files: list[Path], name: str, boxes_file: str) -> Path:
    """The image a boxes file's key names: a file name, or the stem of exactly one image."""
    from .data.sources import DataError

    matches = [p for p in files if p.name == name] or [p for p in files if p.stem == name]
    if len(matches) > 1:
        raise DataError(
            f"'{boxes_file}' names '{name}', the stem of {', '.join(p.name for p in matches)}: name the file instead."
        )
    return matches[0]


def _skipping_bad_files(paths, read: Callable[[Path], object], skip: bool):
    """(path, read(path)) for each path; a DataError stops the run (naming --skip-bad-files) or, with `skip`, is
    one warning line and the file is left out."""
    from .data.sources import SKIP_HINT, BadFileError, DataError, printable

    for path in paths:
        try:
            value = read(path)
        except DataError as err:
            if not skip:
                if isinstance(err, BadFileError):  # its message names --skip-bad-files already
                    raise
                raise BadFileError(f"{str(err).rstrip('.')}, {SKIP_HINT}.") from err
            print(f"warning: skipping '{printable(path.name)}' (--skip-bad-files): {err}", file=sys.stderr)
            continue
        yield path, value


def _read_images(files: list[Path], command: str, skip: bool):
    """(path, `(H, W, 3)` uint8 image) of each file in turn, with a progress bar (see `_skipping_bad_files`)."""
    from tqdm.auto import tqdm

    from .data.sources import read_image

    return _skipping_bad_files(tqdm(files, desc=command, unit="image", leave=False), read_image, skip)


def predict(argv: list[str]) -> None:
    """`sam2-peft predict`: masks for a folder of images."""
    parser = _parser(
        "predict",
        "Predict masks for every image in a folder. Writes OUT_DIR/masks/<name>.png (label maps: 0 background, k = "
        "k-th prompt; with a multi-class PTSAM adapter, class maps whose values are the trained class ids), "
        "OUT_DIR/overlays/<name>.png (with a legend of class names) and OUT_DIR/predictions.json (scores). "
        f"{OUTPUT_NAMES} Without --boxes every image "
        "gets one prompt-free mask (meant for prompt-free adapters such as PTSAM; an adapter trained with prompts gets a warning).",
        "boxes file: JSON mapping image file names (or stems) to [[x0, y0, x1, y1], ...] in pixels;\n"
        "only the images it lists are predicted.\n\n"
        "videos: IMAGES may be a video file or a folder of them (mp4, mov, avi, webm, mkv): the objects boxed on frame\n"
        "0 in --boxes (keys: video names), or else masked in the first annotated PNG of NAME/ beside NAME.mp4, are\n"
        "tracked; OUT_DIR/<name>/ gets --video-outputs: masks.mkv (lossless FFV1 label video, grey level k = k-th\n"
        "object), masks/00000.png ... and overlay.mp4 (H.264, to watch); OUT_DIR/predictions.json the summary.\n\n"
        "volumes (NIfTI, multi-page TIFF): OUT_DIR/NAME.nii.gz or .tif (the label volume, the input's header), OUT_DIR/NAME/\n"
        "with --video-outputs of its slices (one frame per slice along the slicing axis; grey level = label id).\n\n"
        "examples:\n  sam2-peft predict --adapter org/sam2-nuclei-lora --boxes boxes.json images/ predictions/\n"
        "  sam2-peft predict --adapter outputs/video --boxes boxes.json clip.mp4 tracked/",
    )
    parser.add_argument(
        "images", metavar="IMAGES", help="folder of images; a video file or folder of them; or a volume file or folder"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where masks, overlays and predictions.json go")
    _add_model_arguments(parser, onnx=True)
    parser.add_argument("--boxes", default=None, help="JSON file of boxes per image (see below)")
    _add_folder_arguments(parser)
    parser.add_argument(
        "--video-outputs",
        default="mask-video,overlay",
        help="videos and volumes: what to write, comma-separated: mask-video, pngs, overlay (default: %(default)s)",
    )
    add_volume_arguments(parser, "predict")
    args = parser.parse_args(argv)
    from .data.video_files import videos_in

    if is_volume_input(args.images):
        image_only = ("--boxes", "--onnx", "--dtype", "--max-image-pixels", "--skip-bad-files")
        rules = volume_rules("predict", lambda a: a.images, image_only)
        refuse_unused_flags(parser, argv, (*_model_rules(), ONNX_RULE, *rules), args)
        run_from_command_line(lambda: predict_volumes(args))
        return
    videos = videos_in(args.images)
    video_rule = Applies(
        ("--onnx", "--dtype", "--max-image-pixels"),
        lambda a: not videos,
        "applies to images only (videos run in PyTorch, in float32)",
    )
    image_rule = Applies(("--video-outputs",), lambda a: bool(videos), "applies to video files and volumes only")
    volume = volume_rules("predict", lambda a: a.images, ())
    refuse_unused_flags(parser, argv, (*_model_rules(), ONNX_RULE, video_rule, image_rule, *volume), args)
    run_from_command_line(lambda: _predict_videos(args, videos) if videos else _predict_folder(args))


def _predict_folder(args: argparse.Namespace) -> None:
    from PIL import Image

    from .data.sources import viewed_size
    from .evaluation.panels import class_overlay, overlay
    from .inference.distributed import is_main_process, run_over_images
    from .inference.predictor import check_boxes
    from .io import atomic_write_json

    boxes = _read_boxes(Path(args.boxes)) if args.boxes else None
    files, names = _image_files(args, PREDICT_OUTPUTS, boxes)
    if boxes is not None:  # every box checked (and clipped) against its image before the model loads
        checked = {}
        for path in files:
            key = path.name if path.name in boxes else path.stem
            width, height = viewed_size(path)  # boxes are in the pixels a viewer shows (EXIF orientation)
            checked[path.name] = check_boxes(boxes[key], (height, width), f"'{args.boxes}', image '{key}'").tolist()
        boxes = checked
    predictor = _load_predictor(args)
    if boxes is None and is_main_process():
        _warn_if_trained_with_prompts(predictor)

    def predict_image(path: Path, image: np.ndarray, staging: Path) -> dict:
        image_boxes = boxes[path.name] if boxes is not None else None
        prediction = predictor.predict(image, boxes=image_boxes)
        if prediction.class_map is not None:  # multi-class PTSAM: the trained class ids, a legend of names
            labels, painted = (
                prediction.class_map,
                class_overlay(image, prediction.class_map, prediction.class_names),
            )
        else:
            labels = np.zeros(image.shape[:2], np.uint16 if len(prediction.masks) > 255 else np.uint8)
            for index, mask in enumerate(prediction.masks, start=1):
                labels[mask] = index
            painted = overlay(image, prediction.masks)
        (staging / "masks").mkdir(exist_ok=True)
        (staging / "overlays").mkdir(exist_ok=True)
        Image.fromarray(labels).save(staging / "masks" / f"{names[path]}.png")
        Image.fromarray(painted).save(staging / "overlays" / f"{names[path]}.png")
        summary = {"scores": prediction.scores.tolist(), "boxes": image_boxes}
        if prediction.class_names is not None:
            summary["classes"] = {str(k): v for k, v in prediction.class_names.items()}
        return summary

    summary = run_over_images(
        files, names, args.out_dir, PREDICT_OUTPUTS, lambda todo: _read_images(todo, "predict", args.skip_bad_files),
        predict_image, lambda records, folder: atomic_write_json(folder / "predictions.json", records), args.resume,
    )  # fmt: skip
    if summary is not None:
        print(f"Wrote masks and overlays of {len(summary)} image(s) to {args.out_dir}")


def _predict_videos(args: argparse.Namespace, videos: list[Path]) -> None:
    """`predict` on video files: each checked (and its boxes) before the model loads, then tracked and written."""
    from .data.video_files import VideoFrames
    from .inference.instance_outputs import output_names
    from .inference.predictor import check_boxes
    from .inference.video_files import load_video_predictor, parse_video_outputs, predict_video_file
    from .io import atomic_write_dir, atomic_write_json, check_output_dir

    outputs = parse_video_outputs(args.video_outputs)
    boxes = _read_boxes(Path(args.boxes)) if args.boxes else {}
    if args.boxes:
        videos = _boxed_files(videos, boxes, args.boxes, args.images, "videos")
    names = output_names(videos)
    written = (*names.values(), "predictions.json")
    check_output_dir(args.out_dir, outputs=written, overwrite=args.overwrite)
    opened = list(_skipping_bad_files(videos, VideoFrames, args.skip_bad_files))
    prompts = {}
    for path, frames in opened:
        key = next((k for k in (path.name, path.stem) if k in boxes), None)
        where = f"'{args.boxes}', video '{key}' (frame 0)"
        prompts[path] = None if key is None else check_boxes(boxes[key], (frames.height, frames.width), where).tolist()
    predictor = load_video_predictor(args)
    summary = {}
    with atomic_write_dir(args.out_dir, replaces=written) as staging:
        for path, frames in opened:
            summary[path.name] = predict_video_file(predictor, frames, staging / names[path], outputs, prompts[path])
        atomic_write_json(staging / "predictions.json", summary)
    print(f"Wrote {', '.join(outputs)} of {len(summary)} video(s) to {args.out_dir}")


def _warn_if_trained_with_prompts(predictor) -> None:
    """One line on stderr when an adapter trained with prompts is about to run prompt-free (poor masks, silently)."""
    from .adapters.files import TRAINING_CONFIG_FILE
    from .adapters.resolve import trained_prompt

    if predictor.adapter is None:
        return
    prompt = trained_prompt(predictor.adapter.directory)
    if prompt not in (None, "none"):
        print(
            f"warning: this adapter was trained with {prompt} prompts ({TRAINING_CONFIG_FILE} of "
            f"'{predictor.adapter.directory}'), but no --boxes were given, so every image gets one prompt-free mask; "
            "pass --boxes boxes.json ({image name: [[x0, y0, x1, y1], ...]} in pixels) for the masks it was trained "
            "to give.",
            file=sys.stderr,
        )


def _read_boxes(path: Path) -> dict[str, list[list[float]]]:
    from .data.sources import DataError

    form = "expected a JSON object {image name: [[x0, y0, x1, y1], ...]}"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"Cannot read the boxes file '{path}': {err}") from err
    except RecursionError as err:
        raise DataError(f"'{path}' is nested too deeply to read: {form}.") from err
    if not isinstance(data, dict):
        raise DataError(f"'{path}': {form}.")
    for name, boxes in data.items():
        if boxes == []:
            raise DataError(
                f"'{path}', image '{name}': no boxes; give at least one [x0, y0, x1, y1] box, or leave the image out "
                "(only the images named in the file are predicted)."
            )
        if not isinstance(boxes, list) or any(
            not isinstance(b, list)
            or len(b) != 4
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in b)
            for b in boxes
        ):
            raise DataError(
                f"'{path}', image '{name}': expected a list of [x0, y0, x1, y1] boxes of numbers, found {boxes!r}."
            )
    return data


def push(argv: list[str]) -> None:
    """`sam2-peft push`: upload a training run's adapter with a model card."""
    parser = _parser(
        "push",
        "Upload the adapter in a training output folder to the Hugging Face Hub, with a generated model card "
        "(metadata, base vs. fine-tuned metrics, size, usage) and one comparison picture. Log in first with "
        "`hf auth login`, or set HF_TOKEN.",
        "example:\n  sam2-peft push outputs/nuclei-lora my-org/sam2-nuclei-lora --private",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="training output folder (holds the adapter files)")
    parser.add_argument("repo_id", metavar="ID", help="Hub repo id, e.g. my-org/sam2-nuclei-lora (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--commit-message", default=None, help="Hub commit message (default: one naming the method)")
    parser.add_argument("--base-model", default=None, help="record this Hub id as the base (if trained on a copy)")
    parser.add_argument("--license", default=None, help="license id for the card, e.g. apache-2.0 (SAM 2's)")
    args = parser.parse_args(argv)

    def run() -> None:
        from .hub.push import push_adapter

        commit = push_adapter(
            args.output_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
            base_model=args.base_model,
            license=args.license,
        )
        print(f"Pushed: {commit.commit_url}")

    run_from_command_line(run)


def merge(argv: list[str]) -> None:
    """`sam2-peft merge`: fold an adapter into its base and save a plain transformers model."""
    parser = _parser(
        "merge",
        "Fold a LoRA adapter (or partial fine-tune) into its base model and save a full model folder that "
        "transformers.Sam2Model.from_pretrained loads without peft, with the same outputs.",
        "example:\n  sam2-peft merge org/sam2-nuclei-lora merged/",
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="training output folder or Hub repo id")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged model and processor")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of the adapter")
    parser.add_argument("--base-model", default=None, help="base to merge into (default: the one it records)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    args = parser.parse_args(argv)

    def run() -> None:
        from .adapters.merge import merge_adapter
        from .io import check_output_dir

        check_output_dir(args.out_dir)
        out = merge_adapter(
            args.adapter, args.out_dir, revision=args.revision, base_model=args.base_model, token=args.token
        )
        print(f"Merged model written to {out}")

    run_from_command_line(run)


def export(argv: list[str]) -> None:
    """`sam2-peft export`: the model with its adapter folded in, as ONNX graphs checked against PyTorch."""
    from .export.onnx_export import MAX_OPSET, MIN_OPSET

    parser = _parser(
        "export",
        "Export a base model, or a base with its adapter folded in (LoRA merged, PTSAM tokens as constants, partial "
        "fine-tunes as trained), to ONNX in the transformers.js / Optimum layout: onnx/vision_encoder.onnx and "
        "onnx/prompt_encoder_mask_decoder.onnx (any number of prompts, points and boxes), plus "
        "onnx/prompt_free_mask_decoder.onnx for PTSAM; config.json, preprocessor_config.json, export.json and a "
        "README. Each graph is checked against PyTorch on a sample image (max logit difference and mask IoU, in "
        'export.json and the README). Needs the export extra: pip install "sam2-peft[export]".',
        "example:\n  sam2-peft export --adapter runs/nuclei-lora exported/ --quantize int8\n"
        "  sam2-peft predict --onnx exported/ --boxes boxes.json images/ predictions/",
    )
    parser.add_argument("out_dir", metavar="OUT", help="folder to write (refused if it holds an export)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="adapter: a training output folder or a Hub repo id (org/name)")
    which.add_argument("--model", help="a base model alone: Hub id, local folder, compact-synthetic, ...")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of the adapter (or of --model)")
    parser.add_argument(
        "--base-model", default=None, help="base to load the adapter into (default: the one it records)"
    )
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET}")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and activations")
    parser.add_argument("--quantize", choices=("int8",), default=None, help="also write int8 dynamic-quantised graphs")
    parser.add_argument(
        "--multimask", action="store_true", help="decoders give SAM 2's three masks per prompt (default: one)"
    )
    parser.add_argument(
        "--mask-input",
        action="store_true",
        help="also write onnx/prompt_encoder_mask_decoder_with_mask.onnx, which takes a previous mask's logits",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in OUT")
    args = parser.parse_args(argv)
    if args.base_model and not args.adapter:
        parser.error("--base-model applies to --adapter only")

    def run() -> None:
        from .export.onnx_export import ExportOptions, export_source

        options = ExportOptions(
            opset=args.opset, dtype=args.dtype, quantize=args.quantize, overwrite=args.overwrite,
            multimask=args.multimask, mask_input=args.mask_input,
        )  # fmt: skip
        record = export_source(
            args.out_dir, options, adapter=args.adapter, model=args.model, revision=args.revision,
            base_model=args.base_model, token=args.token,
        )  # fmt: skip
        for variant, prompts in record["parity"].items():
            checks = ", ".join(
                f"{name} {r['max_abs_logit_diff']:.1e} (mask IoU {r['mask_iou']:.3f})" for name, r in prompts.items()
            )
            print(f"{variant} vs PyTorch, max logit difference: {checks}")
        print(f"Exported {', '.join(record['graphs'][args.dtype].values())} to {args.out_dir}")

    run_from_command_line(run)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def serve_parser():
    """The parser of `sam2-peft serve` (`ServeConfig` and `RayServeConfig` flags)."""
    from .serving.config import ServeConfig
    from .serving.ray_config import RayServeConfig

    return _parser(
        "serve",
        "Serve one SAM 2 base with several adapters chosen per request (JSON over HTTP): each image is encoded once "
        "and its embedding shared by every adapter that leaves the encoder alone. Routes: GET /health, "
        "GET|POST /v1/adapters, DELETE /v1/adapters/NAME, POST /v1/images, POST /v1/segment, GET /metrics; the "
        "OpenAPI docs at /docs. With --engine ray: the same API from Ray Serve replicas, each request routed to a "
        "replica holding its adapter.",
        epilog="examples:\n  sam2-peft serve --model compact-synthetic --adapter nuclei=runs/nuclei/adapter --port 8000"
        "\n  sam2-peft serve --engine ray --model compact-synthetic --adapter nuclei=runs/nuclei/adapter "
        "--max-replicas 4",
        settings=(ServeConfig, RayServeConfig),
    )


def serve(argv: list[str]) -> None:
    """`sam2-peft serve`: one base model with many adapters, chosen per request, over HTTP."""
    from .serving.ray_config import RULES

    config, ray_config = serve_parser().parse(argv, RULES)
    extra = ("serve", ["fastapi", "uvicorn", "multipart", "prometheus_client"])
    if ray_config.engine == "ray":
        extra = ("serve,ray", [*extra[1], "ray.serve"])
    missing = [m for m in extra[1] if not _importable(m)]
    if missing:
        sys.exit(
            f"error: sam2-peft serve{' --engine ray' * (ray_config.engine == 'ray')} needs the {extra[0]} extra "
            f'(missing {", ".join(missing)}): pip install "sam2-peft[{extra[0]}]"'
        )

    def run() -> None:
        from .serving.errors import ServeError

        if ray_config.engine == "ray":
            from .serving.ray_app import run as run_ray

            run_ray(config, ray_config)
            return
        from .serving.app import run as run_server

        try:
            run_server(config)
        except ServeError as err:
            sys.exit(f"error: {err.message}")

    run_from_command_line(run)


COMMANDS = {
    "train": (train, "fine-tune with a recipe (lora, ptsam, partial, video, pretrain)"),
    "eval": (evaluate, "score an adapter or base model on a dataset, write metrics JSON"),
    "predict": (predict, "masks and overlays for a folder of images (boxes JSON or prompt-free)"),
    "segment-all": (segment_all, "every object as an instance, no prompts: label images, COCO JSON, overlays"),
    "push": (push, "upload a trained adapter with a model card to the Hub"),
    "merge": (merge, "fold a LoRA adapter into its base, save a plain transformers model"),
    "export": (export, "ONNX graphs with the adapter inside (transformers.js layout), checked against PyTorch"),
    "serve": (serve, "serve a base with many adapters over HTTP (needs the serve extra)"),
    "convert-meta": (convert_meta, "convert a Meta SAM 2 .pt checkpoint into a transformers folder"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="sam2-peft",
        description="Fine-tune SAM 2 with small adapters, and use them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return
    args = parser.parse_args(argv[:1])
    COMMANDS[args.command][0](argv[1:])


if __name__ == "__main__":
    main()
