"""Tasks: what the trainer trains on. A task owns its datasets and knows how a batch becomes a loss, how the model
is scored and how its predictions are drawn; the trainer owns the loop, optimisation, checkpoints and logging.

`ImageSegmentationTask` (images with box/point/no prompts) is here; `training.video.VideoClipTask` trains on clips.
"""

from __future__ import annotations

import functools
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, IterableDataset, Subset
from transformers import Sam2Processor

from ..adapters.methods import TuningMethod
from ..data.classes import ClassList
from ..data.dataset import SegmentationDataset, collate_segmentation, model_inputs, view_key
from ..data.prompts import mask_prompts, mask_to_boxes
from ..data.streaming import StreamingSegmentationDataset
from ..evaluation.panels import comparison_panel
from ..evaluation.runner import EvaluationResult, evaluate_segmenter
from ..models.segmenter import Sam2Segmenter, wants_multimask
from .config import LossConfig, TrainingConfig
from .embedding_cache import EmbeddingCache, encoder_fingerprint, plan_embedding_cache
from .losses import LossOutput, combine_rounds, sam2_loss

logger = get_logger(__name__)

PER_PROMPT_INPUTS = frozenset({"object_image_index", "points", "point_labels", "mask_inputs", "ignore_mask"})
"""Segmenter inputs with one row per prompt (the others are per image)."""

Encode = Callable[..., dict[str, list[torch.Tensor]]]
"""`encode(keys, pixel_values, sources=None)`: a batch's encoded images as segmenter inputs (`{"image_embeddings":
[...]}` or `{"vision_features": [...]}`), e.g. `EmbeddingCache.segmenter_inputs`; `sources` (the items'
`view_source`) lets it use entries whose pixels the dataset did not build."""

Autocast = Callable[[], AbstractContextManager]
"""A factory of mixed-precision contexts (e.g. `Accelerator.autocast`): each forward enters a fresh one, as a
context made by a `contextlib.contextmanager` can be entered only once."""

LossPart = Callable[[Autocast], LossOutput]
"""A part of a batch's loss, computed (forward) when called with an autocast factory."""


IGNORED_LOGIT = -20.0
"""The logit given to ignored pixels: a confident "not this class", which their all-zero targets agree with, so
they add (almost) nothing to the mask losses and no gradient."""


def without_ignored(logits: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
    """`(N, M, h, w)` logits with every decoder cell that holds an ignored pixel of `ignore` `(N, S, S)` set to
    `IGNORED_LOGIT` (detached): the ignore value is left out of the loss at the decoder's resolution."""
    if ignore is None or not ignore.any():
        return logits
    cells = F.adaptive_max_pool2d(ignore[:, None].float(), logits.shape[-2:]) > 0
    return torch.where(cells, torch.full_like(logits, IGNORED_LOGIT), logits)


@dataclass(frozen=True)
class CacheSetup:
    """A run's embedding cache (None: off), what the run records of it (`run_info["embedding_cache"]`), and how
    many entries it holds when full (what the training bar counts; None: unknown)."""

    cache: EmbeddingCache | None
    record: dict = field(default_factory=lambda: {"enabled": False, "views": 0})
    capacity: int | None = None


CLASS_MAP_WEIGHT = 1.0
"""Weight of a multi-class adapter's `class_map_loss` beside the per-class mask losses: 1 scored best of 1 and 20 (the
mask term's weight) on a development set of synthetic class maps (seed 1, not the one the guide reports)."""


def class_map_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: torch.Tensor | None,
    classes: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the class map that evaluation resolves, at the decoder's resolution: each cell's scores are
    background at logit 0 (probability 0.5, `BACKGROUND_THRESHOLD`) and every class's mask logit, its target the
    share of its pixels each class and background hold. Trains what the per-class mask losses cannot: which class
    wins a pixel two classes claim. `logits` `(N, 1, h, w)` and `targets`/`ignore` `(N, S, S)` hold each image's
    classes in consecutive rows; cells holding an ignored pixel count nowhere. `weights` `(classes,)` weighs each
    class's share of the targets (background 1) and each cell by its target's weight, as a weighted cross-entropy does:
    where the classes look alike, the unweighted loss gives their pixels to the most frequent class."""
    scores = logits[:, 0].unflatten(0, (-1, classes))
    scores = torch.cat([torch.zeros_like(scores[:, :1]), scores], dim=1)
    shares = F.adaptive_avg_pool2d(targets.unflatten(0, (-1, classes)).float(), scores.shape[-2:])
    shares = torch.cat([(1 - shares.sum(dim=1, keepdim=True)).clamp(min=0), shares], dim=1)
    shares = shares / shares.sum(dim=1, keepdim=True)
    if weights is not None:
        shares = shares * torch.cat([weights.new_ones(1), weights]).to(shares)[None, :, None, None]
    per_cell = -(shares * scores.float().log_softmax(dim=1)).sum(dim=1)
    cell_weight = shares.sum(dim=1)
    if ignore is not None:
        cell_weight = cell_weight * (
            F.adaptive_max_pool2d(ignore[::classes, None].float(), scores.shape[-2:])[:, 0] == 0
        )
    return (per_cell * cell_weight).sum() / cell_weight.sum().clamp(min=1e-6)


class Task(ABC):
    """The interface the trainer uses. Attributes: `train_dataset` (with `set_epoch(epoch)`, called before each pass),
    `val_dataset` (or None), `processor`,
    and `metric_for_best` (validation metric, higher is better, that ranks checkpoints)."""

    train_dataset: Dataset
    val_dataset: Dataset | None
    processor: Sam2Processor
    metric_for_best: str = "dice"

    @abstractmethod
    def segmenter(self, model: nn.Module) -> nn.Module:
        """The module that runs the (adapted) model on this task's batches; the trainer wraps and steps it."""

    @abstractmethod
    def collate(self, items: list) -> object:
        """A batch from dataset items."""

    @abstractmethod
    def loss(
        self, segmenter: nn.Module, batch, device: torch.device, autocast: Autocast, encode: Encode | None
    ) -> LossOutput:
        """Run a training batch through `segmenter` (each forward under a fresh `autocast()`) and return its loss."""

    def loss_parts(
        self, segmenter: nn.Module, batch, device: torch.device, encode: Encode | None, prompt_chunk: int
    ) -> list[LossPart]:
        """The batch's loss as parts whose losses add up to `loss`'s, in chunks of at most `prompt_chunk` prompts
        where the task can (0: all at once); the trainer back-propagates each part before computing the next. This
        default: one part, `loss`."""
        return [lambda autocast: self.loss(segmenter, batch, device, autocast, encode)]

    @abstractmethod
    def evaluate(
        self,
        segmenter: nn.Module,
        loader: Iterator,
        accelerator: Accelerator,
        keep_ids: frozenset[str],
        encode: Encode | None,
    ) -> EvaluationResult:
        """Score `segmenter` on the validation batches of `loader`, keeping the predictions of `keep_ids`."""

    @abstractmethod
    def panel_ids(self, count: int, seed: int) -> list[str]:
        """`count` validation ids spread over the set, whose predictions are drawn at each evaluation."""

    @abstractmethod
    def draw_panels(
        self,
        tuned: dict[str, np.ndarray],
        names: dict[str, str],
        base: dict[str, np.ndarray],
        scores: dict[str, dict[str, dict[str, float]]],
    ) -> dict[str, Image.Image]:
        """Pictures by file name of the validation ids in `names` (file name -> id) that `tuned` holds, beside the
        base's predictions; `scores` maps "base" / "fine-tuned" to per-id metrics."""

    def embedding_cache(
        self,
        segmenter: nn.Module,
        method: TuningMethod,
        config: TrainingConfig,
        accelerator: Accelerator,
        base_name: str | None,
        workers: int,
    ) -> CacheSetup:
        """The run's cache of encoder features, whose `segmenter_inputs` the trainer passes to `loss_parts` and
        `evaluate` as `encode` (decided and logged here). This default: none, the inputs are encoded every step."""
        logger.info("Embedding cache off: this task encodes its inputs on every step.")
        return CacheSetup(None)

    def validation_subset(self, ids: set[str]) -> Dataset | None:
        """The validation samples `ids`, to predict a few images again (None: the task cannot)."""
        return None

    def settings(self) -> dict:
        """The task's settings, saved in `training_config.json` (and matched on resume)."""
        return {}


def spread_indices(count: int, wanted: int, seed: int) -> list[int]:
    """`wanted` of `range(count)` spread over the whole range: one drawn (seeded) from each of `wanted` equal
    stretches, so that panels do not show neighbours (consecutive frames of one video, one class of a sorted set)."""
    if wanted >= count:
        return list(range(count))
    rng = random.Random(seed)
    return [rng.randrange(i * count // wanted, (i + 1) * count // wanted) for i in range(wanted)]


class ImageSegmentationTask(Task):
    """Images with one prompt per object (boxes, points, or none for prompt-free adapters) and per-object targets.

    Args:
        train_dataset / val_dataset: `SegmentationDataset`s (validation built with `train=False`).
        loss: the loss terms' forms and weights.
        classes: the classes the datasets' `class_ids` name: a multi-class PTSAM task's (one target per class, scored
            per pixel by class), or the classes of per-object targets (each object's scores grouped by its class).

    The prompts come from the datasets (`data.prompts`); a training step may add the objects' ground-truth masks as
    dense prompts (`prompts.mask_prompt_probability`) and run interactive correction rounds
    (`prompts.correction_rounds`). Evaluation never gets mask prompts.
    """

    def __init__(
        self,
        train_dataset: SegmentationDataset,
        val_dataset: SegmentationDataset | None = None,
        loss: LossConfig | None = None,
        classes: ClassList | None = None,
    ) -> None:
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.classes = classes
        self.class_targets = classes is not None and train_dataset.config.class_targets
        """One target per class (multi-class PTSAM): an image's classes decode together, with the class-map loss."""
        self.processor = train_dataset.processor
        self.loss_config = loss or LossConfig()
        self.prompts = train_dataset.config.prompts

    def segmenter(self, model: nn.Module) -> Sam2Segmenter:
        return Sam2Segmenter(model)

    def collate(self, items: list[dict]) -> dict:
        return collate_segmentation(items)

    @staticmethod
    def cache_keys(batch: dict, split: str) -> list[str]:
        """Embedding-cache keys of a batch's images (`train/<id>/view-<k>`, one per fixed augmented view)."""
        if split == "eval":
            return [f"eval/{sample_id}" for sample_id in batch["sample_ids"]]
        return [view_key(sample_id, view) for sample_id, view in zip(batch["sample_ids"], batch["views"])]

    def embedding_cache(
        self,
        segmenter: Sam2Segmenter,
        method: TuningMethod,
        config: TrainingConfig,
        accelerator: Accelerator,
        base_name: str | None,
        workers: int,
    ) -> CacheSetup:
        """Cache the images' encoder features while the method leaves the encoder frozen (`plan_embedding_cache`):
        each training image in `plan.views` fixed augmented views, and each validation image, keyed by
        `cache_keys`; the decoder's inputs when its projections are frozen too, else the encoder's maps."""
        train, val = self.train_dataset, self.val_dataset
        plan = plan_embedding_cache(
            config.cache_embeddings, method.trains_image_encoder(segmenter.sam), train.transform is not None,
            config.cache_views,
        )  # fmt: skip
        logger.info("Embedding cache %s.", plan.reason)
        if not plan.enabled:
            return CacheSetup(None, {"enabled": False, "views": plan.views})
        if isinstance(train, StreamingSegmentationDataset) and not train.stable_ids:
            logger.info("Embedding cache off: the streamed samples have no stable id to find cached features by.")
            return CacheSetup(None)
        train.set_augmentation_views(plan.views)
        processes = accelerator.num_processes
        capacity = (
            None
            if isinstance(train, IterableDataset)
            else math.ceil(len(train) / processes) * plan.views + math.ceil(len(val or ()) / processes)
        )  # this process's share of the training images, each in every view, and of the validation images
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        stage = "image_embeddings" if segmenter.decoder_inputs_frozen() else "vision_features"
        storage_dtype = torch.bfloat16 if config.cache_dtype == "bfloat16" else None

        def encode(pixel_values: torch.Tensor) -> list[torch.Tensor]:
            with accelerator.autocast():
                features = segmenter.vision_features(pixel_values)
                return segmenter.image_embeddings(features) if stage == "image_embeddings" else features

        cache = EmbeddingCache(
            encode,
            encoder_fingerprint(
                segmenter.sam, self.processor, base_name, dtype=autocast_dtype, stage=stage, storage_dtype=storage_dtype
            ),
            memory_budget_bytes=int(config.cache_memory_gb * 1e9),
            directory=config.cache_dir,
            stage=stage,
            storage_dtype=storage_dtype,
            output_dtype=segmenter.base.mask_decoder.conv_s0.weight.dtype,
            expected_entries=capacity,
        )
        if workers == 0 and isinstance(train, SegmentationDataset):
            # In this process the dataset can ask the cache: views it holds are not decoded again. (Workers would
            # ask a copy of it, frozen when they started.)
            train.skip_cached_images(cache.holds)
        return CacheSetup(cache, {"enabled": True, "views": plan.views, "stage": stage}, capacity)

    def loss(
        self,
        segmenter: nn.Module,
        batch: dict,
        device: torch.device,
        autocast: Autocast,
        encode: Encode | None,
    ) -> LossOutput:
        return self.loss_parts(segmenter, batch, device, encode, prompt_chunk=0)[0](autocast)

    def loss_parts(
        self, segmenter: nn.Module, batch: dict, device: torch.device, encode: Encode | None, prompt_chunk: int
    ) -> list[LossPart]:
        """With cached image features (nothing to back-propagate into the encoder), chunks of `prompt_chunk`
        prompts: each decodes against the batch's features once encoded, and back-propagating it frees its
        activations before the next chunk runs (same gradients, a working set that does not grow with the prompts).
        Without the cache, one part (the encoder runs inside the segmenter's forward)."""
        inputs = model_inputs(batch, device)
        if encode is not None:
            keys, pixels = self.cache_keys(batch, "train"), inputs.pop("pixel_values")
            inputs.update(encode(keys, pixels, batch.get("view_sources")))
        targets = batch["target_masks"].to(device)
        if self.prompts.mask_prompt_probability and random.random() < self.prompts.mask_prompt_probability:
            inputs["mask_inputs"] = mask_prompts(targets, targets.shape[-1] // 4)
        multimask = wants_multimask(inputs["point_labels"])
        if "ignore_mask" in batch:  # multi-class targets: one row per class, absent classes trained to be empty
            inputs["ignore_mask"] = batch["ignore_mask"].to(device)
        count = len(targets)
        size = prompt_chunk if encode is not None and 0 < prompt_chunk < count else count
        if self.class_targets:  # an image's classes decode together: chunks hold whole images
            per_image = len(self.classes.ids)
            size = max(per_image, size // per_image * per_image)
        present = count if "ignore_mask" in batch else int(targets.flatten(1).any(dim=1).sum())
        counts = (present, count) if size < count else None

        def part(chunk: slice, autocast: Autocast) -> LossOutput:
            chunk_inputs = {
                key: value[chunk] if key in PER_PROMPT_INPUTS and value is not None else value
                for key, value in inputs.items()
            }
            return self._prompt_loss(segmenter, chunk_inputs, targets[chunk], multimask, autocast, counts)

        return [functools.partial(part, slice(start, start + size)) for start in range(0, count, size)]

    def _prompt_loss(
        self,
        segmenter: nn.Module,
        inputs: dict,
        targets: torch.Tensor,
        multimask: bool,
        autocast: Autocast,
        batch_counts: tuple[int, int] | None,
    ) -> LossOutput:
        rounds = self.prompts.correction_rounds
        ignore = inputs.pop("ignore_mask", None)
        with autocast():
            output = segmenter(
                **inputs,
                multimask_output=multimask,
                correction_rounds=rounds,
                target_masks=targets if rounds else None,
            )
        losses = [
            sam2_loss(
                without_ignored(o.mask_logits, ignore),
                o.iou_scores,
                o.object_score_logits,
                targets,
                self.loss_config,
                batch_counts,
                train_absent=ignore is not None,
                weights=self._class_weights(len(targets)),
            )
            for o in (output, *output.corrections)
        ]
        if self.class_targets:  # this chunk's share of the batch's mean over images
            share = len(targets) / batch_counts[1] if batch_counts else 1.0
            for loss, o in zip(losses, (output, *output.corrections)):
                term = class_map_loss(
                    o.mask_logits, targets, ignore, len(self.classes.ids), self._class_weights(len(self.classes.ids))
                )
                loss.loss = loss.loss + CLASS_MAP_WEIGHT * share * term
        return combine_rounds(losses)

    def _class_weights(self, rows: int) -> torch.Tensor | None:
        """The `(rows,)` loss weights of a chunk of whole images' class rows (None without class weights)."""
        if not self.class_targets or self.classes.weights is None:
            return None
        return torch.tensor(self.classes.weights).repeat(rows // len(self.classes.ids))

    def evaluate(
        self,
        segmenter: nn.Module,
        loader: Iterator,
        accelerator: Accelerator,
        keep_ids: frozenset[str],
        encode: Encode | None,
    ) -> EvaluationResult:
        return evaluate_segmenter(
            segmenter, loader, self.processor, accelerator, keep_ids=keep_ids, encode=encode, classes=self.classes
        )

    def panel_ids(self, count: int, seed: int) -> list[str]:
        if self.val_dataset is None:
            return []
        records = self.val_dataset.records
        return [records[i].sample_id for i in spread_indices(len(records), count, seed)]

    def draw_panels(
        self,
        tuned: dict[str, np.ndarray],
        names: dict[str, str],
        base: dict[str, np.ndarray],
        scores: dict[str, dict[str, dict[str, float]]],
    ) -> dict[str, Image.Image]:
        """Image | ground truth | base | fine-tuned, with the evaluation's box prompts (tight boxes; none for point or
        prompt-free evaluation) and each model's per-image Dice."""
        draws_boxes = self.val_dataset.config.prompts.prompt in ("box", "mixed")
        panels = {}
        for name, sample_id in names.items():
            if sample_id not in tuned:
                continue
            image, truth = self.val_dataset.original(sample_id)
            tiles = {"ground truth": truth, "base": base.get(sample_id), "fine-tuned": tuned[sample_id]}
            dice = {
                tile: per_image[sample_id]["dice"]
                for tile, per_image in scores.items()
                if "dice" in per_image.get(sample_id, {})
            }
            panels[name] = comparison_panel(
                image,
                {k: v for k, v in tiles.items() if v is not None},
                sample_id,
                boxes=mask_to_boxes(torch.from_numpy(truth)).numpy() if draws_boxes and len(truth) else None,
                dice=dice or None,
            )
        return panels

    def validation_subset(self, ids: set[str]) -> Dataset:
        return Subset(self.val_dataset, [i for i, r in enumerate(self.val_dataset.records) if r.sample_id in ids])

    def settings(self) -> dict:
        return {"dataset": asdict(self.train_dataset.config), "loss": asdict(self.loss_config)}
