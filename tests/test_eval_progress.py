"""Evaluation shows one per-image progress bar, on the main process only (`sam2-peft eval` and the trainer's loop)."""

from __future__ import annotations

from accelerate import Accelerator
from torch.utils.data import DataLoader

from sam2_peft.cli import main
from sam2_peft.data.dataset import DatasetConfig, SegmentationDataset, collate_segmentation
from sam2_peft.data.sources import open_records
from sam2_peft.evaluation import runner
from sam2_peft.models.loading import load_base_model
from sam2_peft.models.segmenter import Sam2Segmenter


def test_eval_command_shows_a_bar_over_the_images(saved_tiny_model, folder_dataset, capsys):
    main(["eval", "--model", str(saved_tiny_model), "--data", str(folder_dataset), "--max-images", "3"])
    err = capsys.readouterr().err
    assert "evaluate:" in err and "0/3 [" in err


class RecordingBar(runner.tqdm):
    """The real bar, remembering how it was made and how far it got."""

    made: list[RecordingBar] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.options = kwargs
        RecordingBar.made.append(self)


class NotMainAccelerator(Accelerator):
    is_main_process = False


def test_runner_bar_counts_images_and_is_off_on_other_processes(saved_tiny_model, folder_dataset, monkeypatch):
    monkeypatch.setattr(runner, "tqdm", RecordingBar)
    model, processor = load_base_model(str(saved_tiny_model))
    dataset = SegmentationDataset(open_records(str(folder_dataset)), processor, DatasetConfig(), train=False)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_segmentation)
    segmenter = Sam2Segmenter(model)
    for accelerator, disabled in ((Accelerator(cpu=True), False), (NotMainAccelerator(cpu=True), True)):
        runner.evaluate_segmenter(segmenter, loader, processor, accelerator, description="base model")
        bar = RecordingBar.made[-1]
        assert bar.options["leave"] is False and bar.options["desc"] == "base model"
        assert bar.options["disable"] is disabled and bar.total == len(dataset) == 6
        if not disabled:
            assert bar.n == 6 and bar.options["unit"] == "image"
    assert len(RecordingBar.made) == 2  # one bar per evaluation, not one per batch
