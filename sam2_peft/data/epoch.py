"""The epoch of a map-style dataset, shared with DataLoader workers that live across epochs."""

from __future__ import annotations

import torch


class SharedEpoch:
    """A mixin: `epoch` lives in shared memory, so `set_epoch` in the main process reaches persistent workers
    (which hold copies of the dataset made when they started). Subclasses call `_init_epoch()` in `__init__`."""

    def _init_epoch(self) -> None:
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws (augmentation, prompts, object subsets) for a new epoch (also in live workers)."""
        self._epoch.fill_(epoch)
