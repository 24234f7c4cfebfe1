"""The one trainer every recipe uses: Accelerate, AdamW, warm-up + cosine, clipping, accumulation, mixed precision,
evaluation with base-vs-fine-tuned pictures, best-k checkpoints and resume."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from accelerate.utils.other import load as accelerate_load
from peft import PeftModel
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..adapters.methods import TuningMethod
from ..evaluation.panels import CONFUSION_PICTURE, plot_confusion, save_panels
from ..evaluation.runner import EvaluationResult
from ..hub.model_card import EXTREME_PANEL_PREFIXES, write_model_card
from ..io import atomic_write_json
from .checkpoints import (
    STATE_FILE,
    RunFolderError,
    TrainerState,
    check_run_settings,
    claim_output_dir,
    only_trainable_weights,
    prune_checkpoints,
    quiet_accelerate_checkpointing,
    resolve_resume,
    save_checkpoint,
)
from .config import ConfigError, TrainingConfig, check_report_to, default_num_workers, default_prompt_chunk
from .disk import reporting_full_disk
from .losses import LossOutput, sum_parts
from .tasks import Task, spread_indices  # noqa: F401  (spread_indices: re-exported for callers of the trainer)

logger = get_logger(__name__)
"""Accelerate's logger: a line is printed by the main process only unless a call says `main_process_only=False`."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps produced a NaN or infinite loss (a user-facing error: the message says what to
    change)."""


RESUME_SETTINGS = (
    "max_steps", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
    "mixed_precision", "seed",
)  # fmt: skip
"""Training settings a resumed run must share with its checkpoint (they shape the schedule or batches; the task's
and the method's settings are matched too)."""

FLAT_LOSS_CHANGE = 0.02
"""Relative change of the training loss (mean of the first quarter of its logged values against the last quarter's)
below which a run is said not to learn."""
FLAT_LOSS_MIN_LOGS = 4
"""Logged training losses needed to judge it."""


def flat_loss(history: list[dict]) -> tuple[float, float] | None:
    """(first, last) mean training loss when it moved less than `FLAT_LOSS_CHANGE` over the run (at least
    `FLAT_LOSS_MIN_LOGS` logged values, each the mean of `--log-every` steps), else None."""
    losses = [entry["loss"] for entry in history if "loss" in entry and math.isfinite(entry["loss"])]
    if len(losses) < FLAT_LOSS_MIN_LOGS:
        return None
    quarter = len(losses) // 4
    first, last = float(np.mean(losses[:quarter])), float(np.mean(losses[-quarter:]))
    return (first, last) if abs(last - first) <= FLAT_LOSS_CHANGE * abs(first) else None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class Trainer:
    """Fine-tunes a base SAM 2 with a tuning method on a task.

    Args:
        model: the frozen base `Sam2Model` (or `Sam2VideoModel`).
        method: what trains (LoRA, PTSAM, partial fine-tuning, ...).
        task: what it trains on: datasets, loss, evaluation and pictures (`ImageSegmentationTask`, `VideoClipTask`).
        config: optimisation, evaluation, checkpointing and caching knobs.
        base_name: the base model's id or path, recorded in the saved adapter.
        run_info: facts recorded with the results (method, base, data source).
    """

    def __init__(
        self,
        model: nn.Module,
        method: TuningMethod,
        task: Task,
        config: TrainingConfig,
        base_name: str | None = None,
        run_info: dict | None = None,
    ) -> None:
        self.method = method
        self.task = task
        self.processor = task.processor
        self.base_name = base_name
        self.run_info = run_info or {}
        self.output_dir = Path(config.output_dir)
        check_report_to(config.report_to)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            log_with=None if config.report_to == "none" else config.report_to,
            project_dir=str(self.output_dir / "logs"),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            # The scheduler is stepped here once per optimizer step: Accelerate would step it once per process.
            step_scheduler_with_optimizer=False,
        )
        # None leaves the choice to Accelerate (`accelerate launch --mixed_precision`, `accelerate config`); from
        # here on the config says what the Accelerator really uses.
        chosen_by = (
            "--mixed-precision" if config.mixed_precision else "Accelerate's setting: launch flag, config or env"
        )
        self.config = config = replace(config, mixed_precision=self.accelerator.mixed_precision)
        if method.own_learning_rates and config.lr is not None:  # the method sets them; recording lr would mislead
            self.config = config = replace(config, lr=None)
        logger.info("Mixed precision: %s (%s).", config.mixed_precision, chosen_by)
        set_seed(config.seed)
        self.model = method.prepare(model, base_name)
        keep_trainable_fp32(self.model, config.mixed_precision)
        self.segmenter = task.segmenter(self.model)
        self.train_dataset, self.val_dataset = task.train_dataset, task.val_dataset
        self.streamed = isinstance(self.train_dataset, IterableDataset)
        """Training from a stream (`--streaming`): endless batches, so the run is measured in `--max-steps`."""
        cache = task.embedding_cache(self.segmenter, method, config, self.accelerator, base_name, self.num_workers)
        self.cache, self.cache_capacity = cache.cache, cache.capacity
        """The cache of encoder features (None: off), and the entries it holds when full (what the training bar
        counts; None: unknown)."""
        self.run_info["embedding_cache"] = cache.record
        self.train_loader = self._loader(self.train_dataset, shuffle=True)
        self.val_loader = self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else None
        optimizer = torch.optim.AdamW(method.parameter_groups(self.model, config.lr, config.weight_decay))
        self.total_steps = self._total_steps()
        # Built for optimizer steps (the same on every process) and stepped once per optimizer step in `_loop`.
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, math.ceil(config.warmup_ratio * self.total_steps), self.total_steps
        )
        self.accelerator.register_save_state_pre_hook(only_trainable_weights(self.segmenter))
        if self.streamed:  # sharded by the stream itself (Accelerate would read it whole in every process)
            self.wrapped, self.optimizer, self.scheduler = self.accelerator.prepare(
                self.segmenter, optimizer, scheduler
            )
        else:
            prepared = self.accelerator.prepare(self.segmenter, optimizer, self.train_loader, scheduler)
            self.wrapped, self.optimizer, self.train_loader, self.scheduler = prepared
        if self.val_loader is not None:
            self.val_loader = self.accelerator.prepare(self.val_loader)
        self.state = TrainerState()
        self.panel_ids = task.panel_ids(config.num_panels, config.seed)
        self.base_predictions: dict[str, np.ndarray] = {}
        self._postfix: dict[str, str] = {}
        """What the training bar shows after its counter (loss, embedding-cache fill)."""
        self.last_evaluation: tuple[int, EvaluationResult | None] = (-1, None)
        """(step, result) of the newest evaluation, so that the end of training does not repeat it."""
        self.warnings: list[str] = []
        """What the end of the run warned about (logged, and recorded in metrics.json)."""

    def _full_disk(self, what: str):
        """Report a full disk while writing `what` into the output folder as one `DiskFullError` line."""
        return reporting_full_disk(
            self.output_dir, what, "choose another --output-dir (copy the run there and --resume it)"
        )

    def _claim_output_dir(self) -> IO | None:
        """Lock the output folder on the main process (see `claim_output_dir`); every process raises its refusal."""
        lock, refusal = None, None
        if self.accelerator.is_main_process:
            try:
                lock = claim_output_dir(self.output_dir, self.config.resume is not None, self.config.overwrite)
            except RunFolderError as error:
                refusal = str(error)
        if self.accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise RunFolderError(refusal)
        return lock

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """Batches of `dataset`. Workers stay alive between epochs (each item's random draws come from its index and
        the dataset's epoch, which `set_epoch` shares with them), so any number of workers gives the same batches.
        A stream batches itself (for this process's share of it)."""
        workers = self.num_workers
        if isinstance(dataset, IterableDataset):
            accelerator = self.accelerator
            dataset.configure(
                self.config.batch_size, self.task.collate, accelerator.process_index, accelerator.num_processes
            )
            # The generator keeps the loader's own seed draw off the global RNG (a resumed run starts a new loader).
            generator = torch.Generator().manual_seed(self.config.seed)
            return DataLoader(
                dataset,
                batch_size=None,
                collate_fn=_batch_as_is,
                num_workers=workers,
                persistent_workers=workers > 0,
                generator=generator,
            )
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size if shuffle else 1,
            shuffle=shuffle,
            collate_fn=self.task.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    @property
    def num_workers(self) -> int:
        """`--num-workers`, or the default for this machine (`default_num_workers`)."""
        return self.config.num_workers if self.config.num_workers is not None else default_num_workers()

    @property
    def prompt_chunk(self) -> int:
        """`--prompt-chunk`, or the default for the device (`default_prompt_chunk`)."""
        chunk = self.config.prompt_chunk
        return chunk if chunk is not None else default_prompt_chunk(self.accelerator.device.type)

    def _total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        if self.streamed:
            raise ConfigError("Training from a stream (--streaming) needs --max-steps: a stream has no length.")
        batches = math.ceil(len(self.train_dataset) / (self.config.batch_size * self.accelerator.num_processes))
        return self.config.epochs * max(1, math.ceil(batches / self.config.grad_accum))

    # ----------------------------------------------------------------------------------------------- training

    def train(self) -> dict:
        """Run to `max_steps` (or `epochs`), evaluating and checkpointing; returns the final metrics dict.

        The output folder is locked for the run (see `claim_output_dir`), and released when it ends or fails."""
        lock = self._claim_output_dir()
        try:
            return self._train()
        finally:
            if lock is not None:
                lock.close()

    def _train(self) -> dict:
        config, accelerator = self.config, self.accelerator
        trainable, total = count_parameters(self.model)
        logger.info("Trainable parameters: %s of %s (%.4f %%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        if config.report_to != "none":
            accelerator.init_trackers("sam2-peft", config=_flat_scalars({**config.to_dict(), **self.run_info}))
        if config.resume:
            self._resume(resolve_resume(config.resume, self.output_dir / "checkpoints"))
        elif self.val_loader is not None:
            with self._base_model_only():
                base = self.evaluate(keep_ids=set(self.panel_ids))
            self.state.base_metrics = base.metrics
            self.state.base_per_image = base.per_image
            self.base_predictions = base.kept_predictions
            self._save_base_predictions()
            self.accelerator.log({f"val/{k}": v for k, v in base.metrics.items()}, step=0)
            logger.info("Base model validation: %s", _format(base.metrics))
        self._loop()
        return self._finish()

    def _loop(self) -> None:
        config, accelerator, state = self.config, self.accelerator, self.state
        progress = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            disable=not accelerator.is_local_main_process,
            desc="train",
        )
        nonfinite, step_start, running = 0, time.perf_counter(), []
        self.wrapped.train()
        while state.global_step < self.total_steps:
            self.train_dataset.set_epoch(state.epoch)
            if hasattr(self.train_loader, "set_epoch"):  # not a stream's plain DataLoader
                self.train_loader.set_epoch(state.epoch)
            loader = self.train_loader
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
            for batch in loader:
                state.batches_in_epoch += 1
                with accelerator.accumulate(self.wrapped):
                    losses, finite = self._forward_backward(batch)
                    if finite:
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(self.wrapped.parameters(), config.max_grad_norm)
                        self.optimizer.step()
                        if accelerator.sync_gradients and not self.optimizer.step_was_skipped:
                            self.scheduler.step()
                    self.optimizer.zero_grad()
                nonfinite = 0 if finite else nonfinite + 1
                if not finite:
                    logger.warning(
                        "Non-finite loss at step %d (%d in a row): batch skipped.", state.global_step, nonfinite
                    )
                    if nonfinite >= config.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{nonfinite} consecutive non-finite losses at step {state.global_step}: stopping. Lower "
                            "--lr, use bf16 instead of fp16, or check the data for empty or corrupt masks."
                        )
                    continue
                running.append(losses.log_dict())
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                progress.update(1)
                self._show_cache_fill(progress)
                if state.global_step % config.log_every == 0 or state.global_step == self.total_steps:
                    self._log_training(running, time.perf_counter() - step_start, progress)
                    running, step_start = [], time.perf_counter()
                if config.eval_every and state.global_step % config.eval_every == 0:
                    self._evaluate_and_checkpoint()
                if state.global_step >= self.total_steps:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
                if not config.eval_every:
                    self._evaluate_and_checkpoint()
        progress.close()
        if self.cache is not None:
            logger.info("Embedding cache: %s", self.cache.stats)

    def _forward_backward(self, batch) -> tuple[LossOutput, bool]:
        """Forward and backward of a batch, part after part (`Task.loss_parts`: chunks of prompts). Gradients are
        synchronised across processes by the last part's backward only, after all processes agreed that every
        loss is finite; returns the batch's loss and that agreement (False: the batch is skipped, nothing is
        applied; under gradient accumulation, parts already back-propagated keep their finite gradients)."""
        accelerator = self.accelerator
        encode = None if self.cache is None else self.cache.segmenter_inputs
        parts = self.task.loss_parts(self.wrapped, batch, accelerator.device, encode, self.prompt_chunk)
        losses, local_finite = [], True
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.wrapped):
                loss = part(accelerator.autocast)
                part_finite = bool(torch.isfinite(loss.loss.detach()))
                local_finite = local_finite and part_finite
                if last:
                    flag = torch.tensor([local_finite], device=accelerator.device)
                    finite = bool(accelerator.gather(flag).all())
                    if finite:
                        accelerator.backward(loss.loss)
                elif part_finite:
                    accelerator.backward(loss.loss)
            losses.append(loss)
        return sum_parts(losses), finite

    @contextlib.contextmanager
    def _base_model_only(self):
        """Run the base model itself: a peft adapter is switched off (PTSAM's fresh tokens already change the output,
        so evaluating the injected model would not measure the base)."""
        with self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext():
            yield

    def _log_training(self, running: list[dict], seconds: float, progress: tqdm) -> None:
        means = {k: float(np.nanmean([r[k] for r in running])) for k in running[0]} if running else {}
        means["lr"] = self.scheduler.get_last_lr()[0]
        means["seconds_per_step"] = seconds / max(1, self.config.log_every)
        self.state.history.append({"step": self.state.global_step, **means})
        self.accelerator.log({f"train/{k}": v for k, v in means.items()}, step=self.state.global_step)
        self._postfix["loss"] = f"{means.get('loss', float('nan')):.4f}"
        progress.set_postfix(self._postfix)

    def _show_cache_fill(self, progress: tqdm) -> None:
        """While the embedding cache fills (during the first pass over the data), show on the training bar how many
        image views it holds and the memory and disk they take."""
        if self.cache is None or self._postfix.get("cache", "").startswith("full"):
            return
        stats = self.cache.stats
        held = stats.memory_entries + stats.disk_entries
        size = f"{stats.memory_bytes / 2**20:.0f} MiB" + (
            f" + {stats.disk_entries} on disk" if stats.disk_entries else ""
        )
        if self.cache_capacity is None:  # a stream: its length is not known
            self._postfix["cache"] = f"{held} views, {size}"
        else:
            self._postfix["cache"] = (
                f"full, {size}" if held >= self.cache_capacity else f"{held}/{self.cache_capacity} views, {size}"
            )
        progress.set_postfix(self._postfix)

    # --------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, keep_ids: set[str] | None = None, loader: DataLoader | None = None) -> EvaluationResult:
        """Score the current model on the validation set (or on the validation images of `loader`)."""
        return self.task.evaluate(
            self.wrapped,
            self.val_loader if loader is None else loader,
            self.accelerator,
            frozenset(keep_ids or ()),
            None if self.cache is None else self.cache.segmenter_inputs,
        )

    def _evaluate_and_checkpoint(self) -> None:
        if self.val_loader is not None:
            result = self.evaluate(keep_ids=set(self.panel_ids))
            self.last_evaluation = (self.state.global_step, result)
            self.state.metrics = result.metrics
            self.state.note_evaluation(self.task.metric_for_best)
            self.state.history.append(
                {"step": self.state.global_step, **{f"val_{k}": v for k, v in result.metrics.items()}}
            )
            self.accelerator.log({f"val/{k}": v for k, v in result.metrics.items()}, step=self.state.global_step)
            logger.info("Step %d validation: %s", self.state.global_step, _format(result.metrics))
            if self.accelerator.is_main_process:
                with self._full_disk(f"the panels of step {self.state.global_step}"):
                    panels = self._write_panels(
                        result.kept_predictions,
                        self.output_dir / "panels" / f"step-{self.state.global_step}",
                        tuned_scores=result.per_image,
                    )
                self._log_panels(panels, "panels", self.state.global_step)
        root = self.output_dir / "checkpoints"
        path = save_checkpoint(self.accelerator, root, self.state, self._save_adapter, self.run_settings())
        logger.info("Saved checkpoint %s", path)
        if self.accelerator.is_main_process:  # --load-best needs the best one kept
            keep_best = max(self.config.keep_best, 1) if self.config.load_best else self.config.keep_best
            prune_checkpoints(root, self.task.metric_for_best, keep_best)
        self.accelerator.wait_for_everyone()

    def _write_panels(
        self,
        tuned: dict[str, np.ndarray],
        directory: Path,
        names: dict[str, str] | None = None,
        base: dict[str, np.ndarray] | None = None,
        tuned_scores: dict[str, dict[str, float]] | None = None,
    ) -> dict[str, Image.Image]:
        """Draw and save the panels of `names` (file name -> validation id; default the panel ids) that `tuned`
        holds; returns them by file name. `base` defaults to the base predictions kept at the start; `tuned_scores`
        are the per-image metrics of the evaluation drawn."""
        names = {sample_id: sample_id for sample_id in self.panel_ids} if names is None else names
        base = self.base_predictions if base is None else base
        scores = {"base": self.state.base_per_image, "fine-tuned": tuned_scores or {}}
        panels = self.task.draw_panels(tuned, names, base, scores)
        if panels:
            save_panels(panels, directory)
        return panels

    def _log_panels(self, panels: dict[str, Image.Image], prefix: str, step: int) -> None:
        """Send panels to the trackers that take images (TensorBoard, wandb), as `prefix/<name>` at `step`."""
        if not panels or not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                images = {f"{prefix}/{name}": np.asarray(panel)[None] for name, panel in panels.items()}
                tracker.log_images(images, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({f"{prefix}/{name}": [panel] for name, panel in panels.items()}, step=step)

    def _dice_extremes(self, final: EvaluationResult) -> dict[str, str]:
        """The validation images whose Dice the fine-tuning lowered most and raised most (fine-tuned minus base), as
        panel name -> sample id (`dice_extremes`)."""
        return dice_extremes(final.per_image, self.state.base_per_image)

    def _predict_for_panels(self, sample_ids: set[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(base, fine-tuned) predictions of a few validation images, by sample id (every process runs them all)."""
        subset = self.task.validation_subset(sample_ids)
        if subset is None:
            return {}, {}
        loader = DataLoader(subset, batch_size=1, collate_fn=self.task.collate)
        with self._base_model_only():
            base = self.evaluate(keep_ids=sample_ids, loader=loader).kept_predictions
        return base, self.evaluate(keep_ids=sample_ids, loader=loader).kept_predictions

    def _save_base_predictions(self) -> None:
        if self.accelerator.is_main_process and self.base_predictions:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "base_predictions.npz"
            temp = path.with_suffix(".tmp.npz")
            try:
                with self._full_disk("the base model's predictions"):
                    np.savez_compressed(temp, **self.base_predictions)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            temp.replace(path)

    # ---------------------------------------------------------------------------------------- saving/resume

    def _save_adapter(self, directory: Path) -> None:
        self.method.save(self.accelerator.unwrap_model(self.wrapped).sam, directory, self.base_name)

    def run_settings(self) -> dict:
        """What a resumed run must share with its checkpoint: method, base model, data and optimisation."""
        method = {"name": self.method.name, **self.method.settings()}
        data = {"source": self.run_info.get("data"), **self.task.settings()}
        training = {name: getattr(self.config, name) for name in RESUME_SETTINGS}
        training["num_processes"] = self.accelerator.num_processes
        return {"method": method, "base_model": self.base_name, "data": data, "training": training}

    def _resume(self, checkpoint: Path) -> None:
        check_run_settings(checkpoint, self.run_settings())
        self._check_random_states(checkpoint)
        with quiet_accelerate_checkpointing():
            self.accelerator.load_state(str(checkpoint), strict=False)
        self.state = TrainerState.load(checkpoint)
        base_file = self.output_dir / "base_predictions.npz"
        if base_file.exists():
            with np.load(base_file) as saved:
                self.base_predictions = {k: saved[k] for k in saved.files}
        logger.info("Resumed from %s at step %d (epoch %d).", checkpoint, self.state.global_step, self.state.epoch)

    def _check_random_states(self, checkpoint: Path) -> None:
        """Warn when this process's random states cannot be restored: Accelerate's `load_state` skips them with
        only an info line (e.g. a pickle its `weights_only` loader refuses), and the run would silently diverge."""
        path = checkpoint / f"random_states_{self.accelerator.process_index}.pkl"
        try:
            accelerate_load(path)
        except Exception as error:  # anything load_state itself would swallow
            logger.warning(
                "Cannot restore the random states from %s (%s: %s): Python, NumPy and torch random numbers start "
                "afresh, so augmentation and prompt sampling after this resume differ from an uninterrupted run.",
                path,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
                main_process_only=False,  # each process has its own file
            )

    def _finish(self) -> dict:
        accelerator, state = self.accelerator, self.state
        final, kept_step = None, state.global_step
        if self.val_loader is not None:
            step, result = self.last_evaluation
            final = result if step == state.global_step else self.evaluate(keep_ids=set(self.panel_ids))
            if self._load_best(final):
                kept_step = state.best_step
                final = self.evaluate(keep_ids=set(self.panel_ids))
        extremes = self._dice_extremes(final) if final is not None else {}
        extra_base, extra_tuned = self._predict_for_panels(set(extremes.values())) if extremes else ({}, {})
        if accelerator.is_main_process:
            with self._full_disk("the adapter and the run's results"):
                self._save_adapter(self.output_dir)
                if final is not None:
                    names = {**{sample_id: sample_id for sample_id in self.panel_ids}, **extremes}
                    panels = self._write_panels(
                        {**final.kept_predictions, **extra_tuned},
                        self.output_dir / "panels" / "final",
                        names,
                        {**self.base_predictions, **extra_base},
                        tuned_scores=final.per_image,
                    )
                    self._log_panels(panels, "final", state.global_step)
                below_base = self._check_against_base(final)
                loss_flat = self._check_learning()
                trainable, total = count_parameters(self.model)
                summary = {
                    "base": state.base_metrics,
                    "fine_tuned": final.metrics if final else {},
                    "below_base": below_base,
                    "loss_flat": loss_flat,
                    "warnings": self.warnings,
                    "kept_step": kept_step,
                    "metric_for_best": self.task.metric_for_best,
                    "per_image": final.per_image if final else {},
                    "base_per_image": state.base_per_image,
                    "steps": state.global_step,
                    "trainable_parameters": trainable,
                    "total_parameters": total,
                    "adapter_bytes": _adapter_bytes(self.output_dir),
                    "history": state.history,
                    **self.run_info,
                    **(final.details if final else {}),
                }
                atomic_write_json(self.output_dir / "metrics.json", summary)
                if final:
                    plot_confusion(final.details, self.output_dir / CONFUSION_PICTURE)
                method = {"name": self.method.name, **self.method.settings()}
                atomic_write_json(
                    self.output_dir / "training_config.json",
                    {
                        "training": self.config.to_dict(),
                        "method_settings": method,
                        **self.task.settings(),
                        **self.run_info,
                    },
                )
                write_model_card(self.output_dir)
            logger.info("Done. Fine-tuned validation: %s", _format(summary["fine_tuned"]))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return {"base": state.base_metrics, "fine_tuned": final.metrics if final else {}, "kept_step": kept_step}

    def _load_best(self, final: EvaluationResult) -> bool:
        """With `--load-best`, load the best fine-tuned evaluation's checkpoint when it beat the last weights' score
        `final`; returns whether it did (every process loads it)."""
        state, metric = self.state, self.task.metric_for_best
        if not self.config.load_best or state.best_step is None or state.best_step == state.global_step:
            return False
        last = final.metrics.get(metric, float("nan"))
        if last >= state.best_value:  # a NaN is beaten by any score
            return False
        checkpoint = self.output_dir / "checkpoints" / f"step-{state.best_step}"
        if not (checkpoint / STATE_FILE).exists():
            logger.warning(
                "The best evaluation (step %d, %s %.4f) has no checkpoint left in %s: the adapter is the last "
                "weights' (%s %.4f).",
                state.best_step, metric, state.best_value, checkpoint.parent, metric, last,
            )  # fmt: skip
            return False
        with quiet_accelerate_checkpointing():
            self.accelerator.load_state(str(checkpoint), strict=False)
        logger.info(
            "Keeping step %d, the best evaluation (%s %.4f; the last weights, step %d: %.4f); --no-load-best keeps "
            "the last.",
            state.best_step, metric, state.best_value, state.global_step, last,
        )  # fmt: skip
        return True

    def _check_against_base(self, final: EvaluationResult | None) -> bool | None:
        """Warn when the adapter scores below the base model (`metric_for_best` of the step-0 evaluation); returns
        whether it does (None without both scores)."""
        metric = self.task.metric_for_best
        base = self.state.base_metrics.get(metric)
        tuned = final.metrics.get(metric) if final is not None else None
        if base is None or tuned is None:
            return None
        if not tuned < base:
            return False
        evaluations = sum(1 for entry in self.state.history if f"val_{metric}" in entry)
        self._warn(
            f"The fine-tuned adapter scores below the base model on the validation set ({metric} {tuned:.4f} < "
            f"{base:.4f}; none of the {evaluations} fine-tuned evaluations beat it): the base model alone does "
            "better. Try another learning rate (--lr, or --component-lr for partial), more steps or more data."
            if self.state.best_value is None or self.state.best_value < base
            else f"The fine-tuned adapter scores below the base model on the validation set ({metric} {tuned:.4f} < "
            f"{base:.4f}), although step {self.state.best_step} beat it ({self.state.best_value:.4f}): keep the best "
            "evaluation (--load-best) or try another learning rate."
        )
        return True

    def _check_learning(self) -> bool:
        """Warn when the training loss did not move over the run (`flat_loss`); returns whether it did not."""
        flat = flat_loss(self.state.history)
        if flat is None:
            return False
        lr = "the per-component rates (--component-lr)" if self.config.lr is None else f"--lr {self.config.lr:g}"
        self._warn(
            f"The training loss did not move ({flat[0]:.4f} -> {flat[1]:.4f} over {self.state.global_step} steps, "
            f"less than {FLAT_LOSS_CHANGE:.0%}): the method is not learning at {lr}. Try a larger learning rate "
            "(e.g. 10x)."
        )
        return True

    def _warn(self, message: str) -> None:
        """Log a warning about the run's result and record it for metrics.json and the model card."""
        logger.warning(message)
        self.warnings.append(message)


def dice_extremes(tuned: dict[str, dict[str, float]], base: dict[str, dict[str, float]]) -> dict[str, str]:
    """Panel name -> sample id of the image whose Dice went down most from `base` to `tuned` (per-image metrics by
    sample id) and of the one whose Dice went up most. Only a drop makes a worst-change panel and only a rise a
    best-change one: with every image improved (or none) there is no worst (best) panel."""
    change = {
        sample_id: scores["dice"] - base[sample_id]["dice"]
        for sample_id, scores in tuned.items()
        if "dice" in scores and "dice" in base.get(sample_id, {})
    }
    ordered = sorted(change, key=lambda sample_id: (change[sample_id], sample_id))
    worst, best = EXTREME_PANEL_PREFIXES
    extremes = {}
    if ordered and change[ordered[0]] < 0:
        extremes[f"{worst}{ordered[0]}"] = ordered[0]
    if ordered and change[ordered[-1]] > 0:
        extremes[f"{best}{ordered[-1]}"] = ordered[-1]
    return extremes


def _batch_as_is(batch):
    """A stream's batches arrive collated (the default would turn their tuples into lists)."""
    return batch


def keep_trainable_fp32(model: nn.Module, mixed_precision: str) -> None:
    """Cast trainable parameters to float32 (base weights may stay half precision, which needs autocast)."""
    frozen_half = any(not p.requires_grad and p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    if frozen_half and mixed_precision == "no":
        raise ConfigError(
            "The base weights are in half precision (--base-dtype) and mixed_precision is 'no': add "
            "--mixed-precision bf16 or fp16 so that the float32 adapters and the half base meet under autocast, or "
            "load the base in float32."
        )
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _adapter_bytes(directory: Path) -> int:
    names = ("adapter_model.safetensors", "partial_model.safetensors")
    return sum((directory / n).stat().st_size for n in names if (directory / n).exists())


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _flat_scalars(data: dict, prefix: str = "") -> dict:
    """Flatten nested config for trackers, which accept only scalars."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
