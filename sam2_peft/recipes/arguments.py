"""The command line of the recipes: `RecipeParser` (transformers' `HfArgumentParser` with "did you mean" for unknown
flags) over the settings dataclasses, and the dataclasses of the flags every recipe shares.

Nothing here imports torch, so `--help` and a mistyped flag answer at once; the recipes import the trainer after
parsing. Each flag is a dataclass field declared once with its help and default (shown by `--help`): the model and
data flags below, the data settings in `data.config`, the training and loss settings in `training.config`, and the
method's knobs (`tuners.options`, or the recipe's own dataclass).
"""

from __future__ import annotations

import difflib
from argparse import Action, ArgumentDefaultsHelpFormatter, Namespace
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, fields

from transformers import HfArgumentParser

from ..data.classes import IGNORE_INDEX
from ..data.config import SAMPLE_DATA, AugmentationConfig, PromptConfig, ValidationConfig
from ..data.sources import DATA_SOURCES, DEFAULT_MAX_IMAGE_PIXELS, MASK_TYPES
from ..flags import Applies, flags_of, given_flags, refuse_unused_flags
from ..models.names import BASE_DTYPES, BUILTIN_ARCHITECTURES, BUILTIN_PRETRAINED, DEFAULT_MODEL, QUANTIZATION_MODES
from ..training.config import LossConfig, TrainingConfig

OTHER_TOOLS_FLAGS = {
    "--learning-rate": "--lr",
    "--num-train-epochs": "--epochs",
    "--num-epochs": "--epochs",
    "--train-batch-size": "--batch-size",
    "--per-device-train-batch-size": "--batch-size",
    "--gradient-accumulation-steps": "--grad-accum",
    "--lora-rank": "--lora-r",
    "--rank": "--lora-r",
}
"""Flags of other trainers (transformers' Trainer, peft examples) that spelling distance alone would not match."""


@dataclass
class ModelArguments:
    """The base model."""

    _argument_group_name = "model"

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": f"Hub id, local folder, Meta .pt checkpoint, a built-in random architecture "
            f"({', '.join(BUILTIN_ARCHITECTURES)}; offline smoke tests only), or the built-in test base pre-trained on "
            f"synthetic scenes ({', '.join(BUILTIN_PRETRAINED)})."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --model."})
    meta_config: str | None = field(
        default=None, metadata={"help": "Meta config name for a .pt checkpoint (e.g. sam2.1_hiera_s)."}
    )
    base_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the frozen base weights (trainable ones stay float32; half needs --mixed-precision).",
            "choices": BASE_DTYPES,
        },
    )
    quantize_encoder: str | None = field(
        default=None,
        metadata={
            "help": "QLoRA: load the image encoder's Linear layers in 4/8-bit with bitsandbytes (extra 'quant').",
            "choices": QUANTIZATION_MODES,
        },
    )


@dataclass
class DataSourceArguments:
    """Which samples a source gives and how they are read: shared by training and `sam2-peft eval`."""

    _argument_group_name = "data"

    data: str | None = field(default=None, metadata={"help": f"The data: {DATA_SOURCES}."})
    split: str = field(default="train", metadata={"help": "Split of a datasets source."})
    image_column: str = field(default="image", metadata={"help": "Image column of a datasets source."})
    mask_column: str = field(default="mask", metadata={"help": "Mask column of a datasets source."})
    mask_type: str = field(
        default="auto",
        metadata={
            "help": "binary: threshold at half the mask's maximum (one object); instance: each non-zero value is an "
            "object; auto: two levels or values near 0 and the maximum (JPEG, anti-aliasing) are binary, labels 1, 2, "
            "3... are instances, anything else stops with an error; semantic: each value is a class id (0 background), "
            "classes named by classes.json beside masks/, a COCO file's categories or --class-names (PTSAM trains one "
            "token set per class; LoRA, partial, full and prompted PTSAM score each class's objects).",
            "choices": MASK_TYPES,
        },
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={"help": "Refuse larger images (decompression-bomb guard; default PIL's); 0 = no limit."},
    )


@dataclass
class DataArguments(DataSourceArguments):
    """The training data, its validation split and the objects drawn per image."""

    data: str | None = field(default=str(SAMPLE_DATA), metadata={"help": f"The data: {DATA_SOURCES}."})
    class_names: str | None = field(
        default=None,
        metadata={"help": "With --mask-type semantic: class names for ids 1, 2, ... (comma-separated), instead of "
                  "classes.json beside masks/ (default: the ids found in the masks)."},
    )  # fmt: skip
    class_weights: str | None = field(
        default=None,
        metadata={"help": "With --mask-type semantic: each class's weight in the per-class mask losses and the "
                  "class-map term, 'auto' (inverse pixel frequency, mean 1) or one number per class, comma-separated "
                  "(default: all 1; auto for a multi-class PTSAM adapter)."},
    )  # fmt: skip
    ignore_index: int = field(
        default=IGNORE_INDEX,
        metadata={
            "help": "With --mask-type semantic: the mask value excluded from loss and metrics (LoRA, partial, "
            "full: its region is no object; -1: none)."
        },
    )
    val_data: str | None = field(
        default=None, metadata={"help": "Separate validation source (else a split of --data)."}
    )
    val_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of a datasets validation source (default: its 'validation', 'valid', 'val' or 'dev' split, "
            "or its only one); without --val-data, validate on this split of --data."
        },
    )
    val_fraction: float = field(default=0.2, metadata={"help": "Validation share when splitting --data."})
    val_split_file: str | None = field(default=None, metadata={"help": "File listing validation ids, one per line."})
    train_images: int | None = field(
        default=None,
        metadata={"help": "Train on the first N usable training images only (checked in order until N pass)."},
    )
    max_objects: int = field(default=16, metadata={"help": "Objects (prompts) per training image per step."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training data instead of listing and checking it up front (sets larger than memory): "
            "a datasets source is read as an IterableDataset (load_dataset(..., streaming=True), or a saved folder's "
            "to_iterable_dataset()), a folder's or COCO file's images as training reaches them; each sample is "
            "checked when read. Needs --max-steps; validation only from --val-data or --val-split (no "
            "--val-fraction); evaluation and checkpoints every --eval-every steps (0: at the end)."
        },
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={"help": "With --streaming and a datasets source: rows shuffled in a buffer of this many (datasets' "
                  "shuffle(buffer_size=)); 1 = stream order. Folders and COCO files are fully shuffled each pass."},
    )  # fmt: skip


@dataclass
class SharingArguments:
    """Uploading the result."""

    _argument_group_name = "sharing"

    push_to_hub: str | None = field(
        default=None, metadata={"help": "Upload the adapter and a model card to this Hub repo id.", "metavar": "ID"}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})


class HelpFormatter(ArgumentDefaultsHelpFormatter):
    """argparse's help with defaults, naming each flag once (its `--kebab-case` spelling)."""

    def _format_action_invocation(self, action: Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        shown = ", ".join(option for option in action.option_strings if "_" not in option)
        if action.nargs == 0:
            return shown
        return f"{shown} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


class RecipeParser(HfArgumentParser):
    """`HfArgumentParser` with "did you mean ...?" for unknown flags (Python 3.11's argparse suggests nothing), and
    settings that a dataclass refuses (`ValueError` in `__post_init__`) reported as usage errors.

    Every flag is accepted as `--kebab-case` and `--snake_case`; help and usage show the first. The fields named in
    `without` get no flag (unknown to the parser and its help) and keep their defaults."""

    def __init__(self, dataclass_types, without: Collection[str] = (), **kwargs) -> None:
        kwargs.setdefault("usage", "%(prog)s [flags]  (--help lists them)")
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        for action in [action for action in self._actions if action.dest in without]:
            self.set_defaults(**{action.dest: action.default})
            # argparse's own removal of an action (conflict_handler="resolve"), applied to every spelling
            self._handle_conflict_resolve(action, [(option, action) for option in list(action.option_strings)])
        for action in self._actions:
            action.option_strings.sort(key=lambda option: "_" in option)

    def error(self, message: str) -> None:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            hints = [self._suggestion(word) for word in message.removeprefix(prefix).split()]
            hints = [hint for hint in hints if hint]
            if hints:
                message = f"{message} ({'; '.join(hints)})"
        super().error(message)

    def _suggestion(self, word: str) -> str | None:
        """'did you mean --lr?' for an unknown flag `word` (also `--flag=value`), else None."""
        if not word.startswith("--"):
            return None
        flag = word.split("=", 1)[0].replace("_", "-")
        known = [option for option in self._option_string_actions if option.startswith("--") and "_" not in option]
        found = difflib.get_close_matches(flag, [*known, *OTHER_TOOLS_FLAGS], n=1)
        match = OTHER_TOOLS_FLAGS.get(found[0], found[0]) if found else None
        if match not in known:
            return None
        return f"{word.split('=', 1)[0]}: did you mean {match}?" if match else None

    def parse(self, argv: Sequence[str] | None = None, rules: Sequence[Applies] = ()) -> tuple:
        """The dataclasses, in the order given to the parser, from `argv` (default `sys.argv[1:]`); a given flag
        that `rules` say does nothing with the others is refused."""
        values = self.parse_args(argv)  # unknown flags end here, with suggestions
        try:
            parsed = self.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        except ValueError as err:
            self.error(str(err))
        refuse_unused_flags(self, argv, rules, values)
        return parsed


def from_namespace(cls: type, namespace: Namespace):
    """An instance of dataclass `cls` from the parsed flags of its fields (for parsers that add flags of their own)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init and hasattr(namespace, f.name)})


@dataclass
class RecipeArguments:
    """Everything a recipe parsed: the shared settings plus its method's own (`method`). `validation` and
    `augmentation` are None for recipes that do not read images one by one (video)."""

    model: ModelArguments
    data: DataArguments
    prompts: PromptConfig
    training: TrainingConfig
    loss: LossConfig
    sharing: SharingArguments
    validation: ValidationConfig | None = None
    augmentation: AugmentationConfig | None = None
    method: object | None = None
    extra: tuple = ()
    given: frozenset[str] = frozenset()
    """The settings the command line gave (by field name), as opposed to those left at their defaults."""


SHARED_ARGUMENTS = {
    "model": ModelArguments,
    "data": DataArguments,
    "validation": ValidationConfig,
    "prompts": PromptConfig,
    "augmentation": AugmentationConfig,
    "training": TrainingConfig,
    "loss": LossConfig,
    "sharing": SharingArguments,
}
"""The flags of the image recipes, by `RecipeArguments` field."""


def parse_recipe_arguments(
    description: str,
    method: type | None = None,
    extra: Sequence[type] = (),
    argv: Sequence[str] | None = None,
    shared: dict[str, type] = SHARED_ARGUMENTS,
    without: Collection[str] = (),
    rules: Sequence[Applies] = (),
    **defaults,
) -> RecipeArguments:
    """Parse a recipe's command line: the `shared` flags (by `RecipeArguments` field; a recipe offers only those it
    uses; the settings named in `without` are not offered and keep their defaults), the method's dataclass and `extra`
    dataclasses, with the recipe's own `defaults` (e.g. `lr=2e-3`; `--help` shows them). A given flag that `rules`
    (e.g. `image_rules()`) say does nothing in this run is refused."""
    classes = [*shared.values(), *([method] if method else []), *extra]
    parser = RecipeParser(classes, without=without, description=description)
    parser.set_defaults(**defaults)
    parsed = parser.parse(argv, rules)
    rest = parsed[len(shared) :]
    method_options = rest[0] if method else None
    return RecipeArguments(
        **dict(zip(shared, parsed)),
        method=method_options,
        extra=tuple(rest[1 if method else 0 :]),
        given=frozenset(given_flags(parser, argv)),
    )


PROMPT_RULES = (
    Applies(
        ("--box-jitter", "--max-box-jitter-px"),
        lambda a: a.prompt in ("box", "mixed"),
        "applies to box prompts only (--prompt box or mixed)",
    ),
    Applies(
        ("--num-positive-points", "--num-negative-points"),
        lambda a: a.prompt in ("point", "mixed"),
        "applies to point prompts only (--prompt point or mixed)",
    ),
)
SHARING_RULES = (
    Applies(("--hub-private", "--hub-revision"), lambda a: a.push_to_hub, "applies with --push-to-hub only"),
)
LORA_RULES = (
    Applies(("--targets",), lambda a: a.target_regex is None, "does nothing with --target-regex, which overrides it"),
)
"""Flags of every recipe that act only with another flag's value."""

CACHE_FLAGS = ("--cache-dir", "--cache-memory-gb", "--cache-views", "--cache-dtype", "--prompt-chunk")
"""The flags of the embedding cache (prompt chunks decode against cached features)."""


def _augments(values: Namespace) -> bool:
    """Whether training images are augmented (`data.augment.build_augmentation` builds a transform)."""
    return values.augment and any(
        getattr(values, f.name) > 0 for f in fields(AugmentationConfig) if f.name != "augment"
    )


def image_rules(encoder_frozen: Callable[[Namespace], bool] = lambda a: True, encoder_trains: str = "") -> tuple:
    """The rules of the image recipes' shared flags. `encoder_frozen(values)` says whether the recipe leaves the image
    encoder frozen; when it trains, the embedding cache is off (`training.embedding_cache.plan_embedding_cache`)
    and `encoder_trains` says why (e.g. 'pre-training trains the image encoder')."""
    cache_only = "applies to the embedding cache only, which"
    return (
        *PROMPT_RULES,
        *SHARING_RULES,
        Applies(CACHE_FLAGS, lambda a: a.cache_embeddings, f"{cache_only} --no-cache-embeddings turns off"),
        Applies(
            CACHE_FLAGS, encoder_frozen, f"{cache_only} is off: {encoder_trains}, whose outputs then change every step"
        ),
        Applies(flags_of(AugmentationConfig, ("augment",)), lambda a: a.augment, "does nothing with --no-augment"),
        Applies(("--cache-views",), _augments, "applies to augmented training only (views are augmented copies)"),
        Applies(("--shuffle-buffer",), lambda a: a.streaming, "applies with --streaming only"),
    )
