"""The training/evaluation dataset: decode, augment, sample prompts, preprocess with `Sam2Processor`; and the collator."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2
from transformers import Sam2Processor

from .augment import augment, build_augmentation
from .classes import class_masks, ignored_pixels
from .config import DatasetConfig, PromptConfig
from .epoch import SharedEpoch
from .prompts import PADDING, sample_prompts, to_model_coordinates
from .sources import Objects, SampleRecord
from .validation import build_masks, kept_objects


class SegmentationDataset(SharedEpoch, Dataset):
    """Samples ready for SAM 2.

    Each item is a dict:
        `pixel_values` `(3, S, S)` float, preprocessed by the processor (S = the model's image size);
        `points` `(N, P, 2)` float in model-input coordinates and `point_labels` `(N, P)` long (see `prompts`);
        `target_masks` `(N, S, S)` bool, the objects at model-input resolution;
        `original_size` `(H, W)`; `sample_id`; `view` (which fixed augmentation, see `set_augmentation_views`);
        with `config.class_ids`, `target_masks` holds one row per class (empty rows included) and `ignore_mask`
        `(S, S)` bool the pixels of `config.ignore_index` (and, for evaluation, `original_ignore` `(H, W)`);
        `view_source` (what the view's pixels are made of, `_view_source`; None for images without a file); and, for
        evaluation, `original_masks` `(N, H, W)` bool, and with `config.class_ids` and per-object targets
        `object_classes` `(N,)` long, each object's class id (where the data names one).
    """

    def __init__(
        self,
        records: list[SampleRecord],
        processor: Sam2Processor,
        config: DatasetConfig | None = None,
        *,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.records = records
        self.processor = processor
        self.config = config or DatasetConfig()
        self.train = train
        self.seed = seed
        self._init_epoch()
        self.augmentation_views: int | None = None
        self.image_size = int(processor.image_processor.size["height"])
        self.transform = build_augmentation(self.config.augmentation) if train else None
        self._index = {record.sample_id: i for i, record in enumerate(records)}
        self.is_cached: Callable[[str, str], bool] | None = None

    def set_augmentation_views(self, views: int | None) -> None:
        """Draw each item's augmentation from `views` fixed ones per image (cached encoder features), or afresh."""
        self.augmentation_views = views

    def __len__(self) -> int:
        return len(self.records)

    def _sample_seed(self, index: int, epoch: int | None = None) -> int:
        epoch = self.epoch if epoch is None else epoch
        mixed = np.random.SeedSequence([self.seed, epoch if self.train else 0, index])
        return int(mixed.generate_state(1)[0])

    def __getitem__(self, index: int) -> dict:
        return self.build_item(self.records[index], index)

    def build_item(
        self, record: SampleRecord, index: int, epoch: int | None = None, image_index: int | None = None
    ) -> dict:
        """The item of `record` at position `index` (which, with the seed and the epoch, default the dataset's, fixes
        its random draws); `image_index` (default `index`) numbers the image itself, and fixes its augmented views."""
        seed = self._sample_seed(index, epoch)
        generator = torch.Generator().manual_seed(seed)
        objects = record.objects()
        chosen = self._chosen(objects, generator)
        masks = torch.from_numpy(self._chosen_masks(objects, chosen))
        by_class = self.config.class_targets
        if by_class:  # the ignored pixels ride along as a last row, augmented and resized with the classes
            masks = torch.cat([masks, torch.from_numpy(ignored_pixels(objects, self.config.ignore_index))[None]])
        view, augment_seed = self._augmentation_view(index if image_index is None else image_index, seed)
        source = self._view_source(record, augment_seed)
        skip_image = source is not None and self._is_cached(view_key(record.sample_id, view), source)
        image = None if skip_image else torch.from_numpy(np.array(record.load_image())).permute(2, 0, 1)
        size = [self.image_size, self.image_size]
        if self.train and list(masks.shape[1:]) != size:
            # Resize to the model's input first: augmenting a 4-megapixel image costs far more than the step.
            if image is not None:
                image = v2.functional.resize(image, size, antialias=True)
            masks = v2.functional.resize(masks.to(torch.uint8), size, InterpolationMode.NEAREST_EXACT).bool()
        if self.transform is not None:
            augmented_image, augmented_masks = augment(self.transform, image, masks, augment_seed)
            visible = augmented_masks.flatten(1).any(1)
            if by_class:  # every class keeps its row, present or not
                image, masks = augmented_image, augmented_masks
            elif visible.any():  # objects pushed out of the frame are dropped; if all were, keep the unaugmented view
                image, masks = augmented_image, augmented_masks[visible]
        original_size = tuple(masks.shape[1:])
        ignore = None
        if by_class:
            masks, ignore = masks[:-1], masks[-1]
        elif self.config.target_mode == "semantic":
            masks = masks.any(dim=0, keepdim=True)
        points, labels = sample_prompts(masks, self._prompt_config(masks), generator)
        at_size = list(original_size) == size  # then the processor's resize and the targets' would change nothing
        if image is None:  # its features are cached: the encoder will not see these pixels
            pixel_values = torch.zeros(3, *size)
        else:
            pixel_values = self.processor.image_processor(
                images=image, return_tensors="pt", **({"do_resize": False} if at_size else {})
            )["pixel_values"][0]
        targets = masks if at_size else F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].bool()
        item = {
            "sample_id": record.sample_id,
            "view": view,
            "view_source": source,
            "pixel_values": pixel_values,
            "points": to_model_coordinates(points, original_size, self.image_size),
            "point_labels": labels,
            "target_masks": targets,
            "original_size": original_size,
        }
        if not self.train:
            item["original_masks"] = masks
            classes = objects.classes()
            if self.config.class_ids is not None and not by_class and classes is not None:
                item["object_classes"] = torch.from_numpy(classes[chosen].astype(np.int64))
        if ignore is not None:
            item["ignore_mask"] = ignore if at_size else F.interpolate(ignore[None, None].float(), size=size)[0, 0] > 0
            if not self.train:
                item["original_ignore"] = ignore
        return item

    def skip_cached_images(self, is_cached: Callable[[str, str], bool] | None) -> None:
        """Training items whose view `is_cached(key, source)` (the embedding cache of this process holds the
        features of `view_key` computed from `source`, the view's `view_source`) skip decoding, augmenting and
        normalising their image: their `pixel_values` are zeros, their masks and prompts what they would be."""
        self.is_cached = is_cached

    def _is_cached(self, key: str, source: str) -> bool:
        return self.train and self.is_cached is not None and self.is_cached(key, source)

    def _view_source(self, record: SampleRecord, augment_seed: int) -> str | None:
        """What a view's pixels are made of, without decoding them: the image file's fingerprint, the augmentation
        and its seed, the model's input size (None: an image without a file)."""
        fingerprint = record.image_fingerprint()
        if fingerprint is None:
            return None
        augmentation = f"{self.config.augmentation}|{augment_seed}" if self.transform is not None else "none"
        recipe = f"{fingerprint}|{augmentation}|{self.image_size}|{self.train}"
        return xxhash.xxh3_128_hexdigest(recipe.encode("utf-8", "surrogateescape"))  # file names need not be UTF-8

    def _augmentation_view(self, index: int, seed: int) -> tuple[int, int]:
        """(view, augmentation seed): one of `augmentation_views` fixed views per image, or the item's own seed."""
        if self.transform is None or not self.augmentation_views:
            return 0, seed
        view = int(np.random.default_rng(seed).integers(self.augmentation_views))
        return view, int(np.random.SeedSequence([self.seed, index, view, 1]).generate_state(1)[0])

    def original(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        """A validation image `(H, W, 3)` uint8 and its evaluated target masks `(N, H, W)` bool, unaugmented."""
        return self.records[self._index[sample_id]].load_image(), self.evaluated_masks(sample_id)

    def evaluated_masks(self, sample_id: str) -> np.ndarray:
        """The target masks `(N, H, W)` bool that evaluation scores for a sample, at its original size."""
        objects = self.records[self._index[sample_id]].objects()
        masks = self._chosen_masks(objects, self._chosen(objects, torch.Generator()))
        if self.config.target_mode == "semantic" and self.config.class_ids is None:
            masks = masks.any(axis=0, keepdims=True)
        return masks

    def _prompt_config(self, masks: torch.Tensor) -> PromptConfig:
        config = self.config.prompts
        if not self.train and config.prompt != "none":
            # Evaluation uses tight boxes (or fixed points) so that numbers are comparable between runs.
            kind = "box" if config.prompt in ("box", "mixed") else "point"
            return PromptConfig(prompt=kind, box_jitter=0.0, num_positive_points=config.num_positive_points)
        return config

    def _chosen(self, objects: Objects, generator: torch.Generator) -> np.ndarray | None:
        """The indices of the objects this item uses (None: one target per class).

        Training draws `max_objects_per_image` of the objects that cleaning keeps (a seeded random subset, in their
        order), evaluation takes the first `max_eval_objects`, semantic targets take all.
        """
        if self.config.class_targets:
            return None
        kept = kept_objects(objects, self.config.validation)
        if self.config.target_mode != "semantic":
            if not self.train:
                kept = kept[: self.config.max_eval_objects]
            elif len(kept) > self.config.max_objects_per_image:
                keep = torch.randperm(len(kept), generator=generator)[: self.config.max_objects_per_image]
                kept = kept[keep.sort().values.numpy()]
        return kept

    def _chosen_masks(self, objects: Objects, chosen: np.ndarray | None) -> np.ndarray:
        """The cleaned masks `(n, H, W)` bool of the `chosen` objects, built for those objects only; with class
        targets, one mask per class, uncleaned (a class's pixels are its target, however small)."""
        if chosen is None:
            return class_masks(objects, self.config.class_ids)
        return build_masks(objects, chosen, self.config.validation)


def view_key(sample_id: str, view: int) -> str:
    """The embedding-cache key of a training view: `train/<id>/view-<k>` (one per fixed augmented view)."""
    return f"train/{sample_id}/view-{view}"


def collate_segmentation(items: list[dict]) -> dict:
    """Batch images, and concatenate their objects into one flat prompt batch.

    Returns `pixel_values` `(B, 3, S, S)`, `object_image_index` `(N_total,)` mapping each object to its image, and
    the per-object tensors concatenated over images (points padded with label -10 to the longest prompt).
    """
    counts = [len(item["target_masks"]) for item in items]
    max_points = max(item["points"].shape[1] for item in items)
    points, labels = [], []
    for item in items:
        pad = max_points - item["points"].shape[1]
        points.append(F.pad(item["points"], (0, 0, 0, pad)))
        labels.append(F.pad(item["point_labels"], (0, pad), value=PADDING))
    batch = {
        "sample_ids": [item["sample_id"] for item in items],
        "views": [item["view"] for item in items],
        "view_sources": [item.get("view_source") for item in items],
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "object_image_index": torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts)),
        "points": torch.cat(points) if max_points else None,
        "point_labels": torch.cat(labels) if max_points else None,
        "target_masks": torch.cat([item["target_masks"] for item in items]),
        "original_sizes": [item["original_size"] for item in items],
    }
    if "original_masks" in items[0]:
        batch["original_masks"] = [item["original_masks"] for item in items]
    if "ignore_mask" in items[0]:
        batch["ignore_mask"] = torch.repeat_interleave(
            torch.stack([item["ignore_mask"] for item in items]), torch.tensor(counts), dim=0
        )
    if "original_ignore" in items[0]:
        batch["original_ignore"] = [item["original_ignore"] for item in items]
    if all("object_classes" in item for item in items):
        batch["object_classes"] = [item["object_classes"] for item in items]
    return batch


MODEL_INPUT_KEYS = ("pixel_values", "object_image_index", "points", "point_labels")


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The segmenter's keyword arguments from a collated batch, moved to `device` (absent prompts stay None)."""
    return {key: batch[key].to(device) if batch.get(key) is not None else None for key in MODEL_INPUT_KEYS}
