"""Training sets larger than memory: samples read, checked and prepared as they are streamed, never listed or
decoded up front.

A `RecordStream` gives the records of one pass over the data in a seeded order, for one process of a multi-process
run: `ListedStream` over the records of a folder, COCO file or synthetic set (listing them reads no file), and
`DatasetsStream` over a `datasets` `IterableDataset` (`load_dataset(..., streaming=True)`, or a saved dataset's
`to_iterable_dataset()`), shuffled in a buffer (`shuffle(buffer_size=)`) and split between processes with
`split_dataset_by_node`. `StreamingSegmentationDataset` turns a stream into training batches, endlessly (pass after
pass, each in a new order), so a run is measured in `--max-steps` and every process steps as often as the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .config import DatasetConfig
from .dataset import SegmentationDataset, collate_segmentation
from .sources import (
    DataError,
    MaskReader,
    SampleRecord,
    _choose_split,
    cell_array,
    image_array,
)
from .validation import check_sample

logger = logging.getLogger(__name__)


class RecordStream:
    """The records of one pass, `records(epoch, rank, world)`, for process `rank` of `world`.

    `stable_ids`: a sample keeps its id from pass to pass (so cached encoder features can be found again);
    `splits_by_worker`: DataLoader workers each read their own part (else every worker walks the whole pass and keeps
    its batches)."""

    stable_ids = True
    splits_by_worker = False
    description = "stream"

    def records(self, epoch: int, rank: int, world: int) -> Iterator[tuple[int, SampleRecord]]:
        """(image number, record) pairs; the number is stable across passes where `stable_ids`."""
        raise NotImplementedError


class ListedStream(RecordStream):
    """Records listed without reading a file (folder, COCO, synthetic), in a new seeded order each pass; each process
    takes every `world`-th, all processes the same number."""

    def __init__(self, records: list[SampleRecord], seed: int = 0, description: str = "") -> None:
        if not records:
            raise DataError(f"No sample in {description or 'the training data'}: add images and masks.")
        self._records = records
        self.seed = seed
        self.description = description

    def records(self, epoch: int, rank: int, world: int) -> Iterator[tuple[int, SampleRecord]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._records))
        share = len(order) // world if len(order) >= world else 1
        for index in order[rank::world][:share]:
            yield int(index), self._records[index]


class DatasetsStream(RecordStream):
    """A `datasets` `IterableDataset` with image and mask columns, shuffled in a buffer of `buffer_size` rows
    (reseeded each pass by `set_epoch`) and split between processes by `split_dataset_by_node`. Rows have no stable
    id (their position in a shuffled stream changes), so the embedding cache is off for them."""

    stable_ids = False
    splits_by_worker = True

    def __init__(
        self,
        dataset,
        name: str,
        split: str,
        image_column: str = "image",
        mask_column: str = "mask",
        mask_type: str = "auto",
        base: Path | None = None,
        seed: int = 0,
        buffer_size: int = 1000,
    ) -> None:
        columns = dataset.column_names
        if columns is not None:
            for column in (image_column, mask_column):
                if column not in columns:
                    raise DataError(
                        f"Dataset '{name}' has no column '{column}' (columns: {columns}); set --image-column / "
                        "--mask-column."
                    )
        self.dataset = dataset
        self.name, self.split, self.base = name, split, base
        self.image_column, self.mask_column = image_column, mask_column
        self.reader = MaskReader(mask_type, f"{name}[{split}]")
        self.seed, self.buffer_size = seed, buffer_size
        self.description = f"{name}[{split}] (streamed)"

    def records(self, epoch: int, rank: int, world: int) -> Iterator[tuple[int, SampleRecord]]:
        from datasets.distributed import split_dataset_by_node

        stream = self.dataset.shuffle(seed=self.seed, buffer_size=self.buffer_size) if self.buffer_size > 1 else None
        stream = stream if stream is not None else self.dataset
        if world > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world)
        stream.set_epoch(epoch)
        worker = get_worker_info()
        part = f"p{rank}w{worker.id if worker else 0}"
        for position, row in enumerate(stream):
            origin = f"{self.name}[{self.split}] streamed row {position} of pass {epoch} ({part})"
            image, labels = row[self.image_column], row[self.mask_column]
            yield (
                position,
                SampleRecord(
                    sample_id=f"{self.split}-pass{epoch}-{part}-{position:06d}",
                    origin=origin,
                    load_image=lambda v=image, o=origin: image_array(cell_array(v, True, self.base), o),
                    load_instances=lambda v=labels, o=origin: self.reader(cell_array(v, False, self.base), o),
                    identity=origin,
                    load_objects=lambda v=labels, o=origin: self.reader.objects(cell_array(v, False, self.base), o),
                ),
            )


def open_datasets_stream(
    name_or_path: str,
    split: str | None = "train",
    *,
    image_column: str = "image",
    mask_column: str = "mask",
    mask_type: str = "auto",
    seed: int = 0,
    buffer_size: int = 1000,
) -> DatasetsStream:
    """A saved `datasets` folder (as `Dataset.to_iterable_dataset`, its rows memory-mapped) or a Hub dataset
    (`load_dataset(..., streaming=True)`, downloaded as read), as a `DatasetsStream`."""
    import datasets

    from .sources import SAVED_DATASET_FILES

    if Path(name_or_path).is_dir() and any(Path(name_or_path, f).exists() for f in SAVED_DATASET_FILES):
        loaded = datasets.load_from_disk(name_or_path)
        if isinstance(loaded, datasets.DatasetDict):
            split = _choose_split(list(loaded), split, name_or_path)
            loaded = loaded[split]
        else:
            split = "train"
        shards = max(1, min(64, len(loaded)))  # shards let workers and processes read parts of it
        stream, base = loaded.to_iterable_dataset(num_shards=shards), Path(name_or_path)
    else:
        if split is None:
            split = _choose_split(datasets.get_dataset_split_names(name_or_path), None, name_or_path)
        stream, base = datasets.load_dataset(name_or_path, split=split, streaming=True), None
    return DatasetsStream(stream, name_or_path, split, image_column, mask_column, mask_type, base, seed, buffer_size)


class StreamingSegmentationDataset(IterableDataset):
    """Training batches from a `RecordStream`, endlessly: each sample is checked as it is read (the up-front check's
    rules: a bad file stops the run naming it, or is skipped with `--skip-bad-files`; samples without a usable object
    are skipped) and prepared as `SegmentationDataset` prepares it, with random draws fixed by the seed, the pass and
    its position in the pass.

    Yields collated batches (a DataLoader with `batch_size=None`): batch `k` holds the usable samples of the `k`-th
    `batch_size` records of the stream, so with a `ListedStream` any number of workers gives the same batches (each
    worker prepares every `workers`-th batch and skips the others' records unread). Call `configure` first.
    """

    def __init__(self, stream: RecordStream, processor, config: DatasetConfig | None = None, seed: int = 0) -> None:
        self.stream = stream
        self.items = SegmentationDataset([], processor, config, train=True, seed=seed)
        self.config = self.items.config
        self.processor = processor
        self.transform = self.items.transform
        self.stable_ids = stream.stable_ids
        self.batch_size, self.collate, self.rank, self.world = 1, collate_segmentation, 0, 1

    def configure(self, batch_size: int, collate: Callable[[list], object], rank: int = 0, world: int = 1) -> None:
        """Batch size, collate function, and which process of how many this is (set by the trainer)."""
        self.batch_size, self.collate, self.rank, self.world = batch_size, collate, rank, world

    def set_augmentation_views(self, views: int | None) -> None:
        self.items.set_augmentation_views(views)

    def set_epoch(self, epoch: int) -> None:
        """Passes are counted by the stream itself (it never ends), so the trainer's epoch changes nothing."""

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (
            (info.id, info.num_workers) if info is not None and not self.stream.splits_by_worker else (0, 1)
        )
        spread = info.num_workers if info is not None and self.stream.splits_by_worker else 1
        offset = info.id if info is not None and self.stream.splits_by_worker else 0
        block_base, epoch = 0, 0  # batches are numbered across passes, so workers keep their turns between passes
        while True:
            batch, count, usable = [], 0, 0
            for position, (image_index, record) in enumerate(self.stream.records(epoch, self.rank, self.world)):
                count = position + 1
                block = block_base + position // self.batch_size
                if block % workers == worker:
                    item = self._item(record, position * spread + offset, epoch, image_index)
                    if item is not None:
                        batch.append(item)
                        usable += 1
                if (position + 1) % self.batch_size == 0:
                    if batch:
                        yield self.collate(batch)
                    batch = []
            if batch:
                yield self.collate(batch)
            if count == 0 and info is not None and self.stream.splits_by_worker:
                return  # more workers than the stream has shards: this one has none
            if count == 0:
                raise DataError(f"The training stream {self.stream.description} gave no sample: check --data.")
            if usable == 0 and workers == 1:
                raise DataError(
                    f"No usable sample in a whole pass over {self.stream.description}: fix the masks, or lower "
                    "--min-object-area if the objects are small."
                )
            block_base += -(-count // self.batch_size)
            epoch += 1

    def _item(self, record: SampleRecord, position: int, epoch: int, image_index: int) -> dict | None:
        if not record.known_valid:
            reason, _, image, objects = check_sample(record, self.config.validation)
            if reason is not None:
                logger.info("Skipping %s: %s", record.origin, reason)
                return None
            record = replace(record, load_image=lambda: image, load_objects=lambda: objects)
        return self.items.build_item(record, position, epoch=epoch, image_index=image_index)
