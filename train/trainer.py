"""The Trainer: the training loop and its step, validation, and the state a checkpoint carries.

What it trains is built by train/build.py (network, optimizer, memory plan, prepare, EMA); how the
model takes its micro-batches under DDP or DeepSpeed is train/engine.py's; collectives are
train/distributed.py's; checkpoint files are the Checkpointer's (train/checkpoint.py).
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from model import restore_image, set_activations
from train.build import build_training
from train.checkpoint import Checkpointer
from train.config import Config
from train.data import stream_settings, train_batches, val_images
from train.distributed import gather_named, reduce_max, reduce_named
from train.launch import Launch
from train.memory_plan import describe
from train.metrics import score, score_names
from train.network import build_network, network_changes, network_record, record_channels
from train.samples import save_grid
from train.schedule import StagePlan, lr_at, resume_step
from train.state import DataPosition, TrainState
from train.step import forward_backward
from train.tracking import LogWindow, MetricsFile, PeakMemory, across_ranks, init_trackers


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Config, launch: Launch, accelerator, checkpointer: Checkpointer, schedule: StagePlan,
                 sources: tuple[str, str | None], resume: str | None = None):
        """schedule: plan_stages for this launch; sources: the training and validation data (resolved);
        resume: None, 'auto' or a checkpoint folder (--resume), which the checkpointer picks and verifies
        before anything is built."""
        self.cfg, self.launch, self.acc, self.checkpointer = cfg, launch, accelerator, checkpointer
        self.train_source, self.val_source = sources
        self.run_dir = cfg.run_dir
        self.recipe_total = sum(cfg.progressive.iters)
        resume_from = checkpointer.resume_point(resume)
        built = build_training(cfg, launch, accelerator, schedule)
        self.model, self.optimizer, self.engine, self.ema = built.model, built.optimizer, built.engine, built.ema
        self.schedule, self.memory_plan = built.schedule, built.memory_plan

        self.state = TrainState(data=DataPosition(cfg.train.seed))  # what a checkpoint carries
        # Not in any checkpoint: this launch's figures.
        self.nonfinite_streak = 0  # non-finite steps in a row: train.max_nonfinite stops the run
        self.bad_samples = 0  # corrupt samples the stream skipped on this rank since the start/resume
        self.peak_memory = PeakMemory(launch.device)
        if resume_from is not None:
            self.load_checkpoint(resume_from)

        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl", accelerator.is_main_process)
        self._stop_signal = 0
        self._stream = None
        self._stream_stage = -1
        self._left_plain: dict[str, str] | None = None  # blocks lean left to autograd, printed when it changes

    def _memory_note(self) -> str:
        """The memory plan's table for the log, also kept in the run folder (memory_plan.txt)."""
        note = describe(self.memory_plan, self.cfg.train.memory_gb)
        if self.memory_plan is not None:
            (self.run_dir / "memory_plan.txt").write_text(note + "\n", encoding="utf-8")
        return note

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict(self.schedule.stage_at(self.state.step).index, self.launch.world_size)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        state = TrainState.from_state_dict(saved)
        state.step = resume_step(self.cfg, state.step, int(saved["world_size"]), self.schedule)
        state.resume_count += 1
        if "position" not in saved.get("data", {}):
            print("note: this checkpoint predates exact data resume; the stream starts again at epoch 0", flush=True)
        elif state.data.seed != self.cfg.train.seed and self.acc.is_main_process:
            print(f"note: train.seed changed from {state.data.seed} to {self.cfg.train.seed}: the rest of the epoch "
                  "follows another order, so some samples of this epoch are seen twice and others not at all", flush=True)
        state.data.seed = self.cfg.train.seed
        self.state = state

    def save_checkpoint(self) -> Path:
        """Every rank takes part (accelerate/DeepSpeed write per-rank state); see train/checkpoint.py."""
        return self.checkpointer.save(self.state.step, self.state_dict(), self.ema.state_dict() if self.ema else None,
                                      self.cfg.to_yaml(), self.state.best_step)

    def load_checkpoint(self, path: Path) -> None:
        saved = self.checkpointer.load(path, lambda file: network_changes(self.cfg, file), with_ema=self.ema is not None)
        if self.ema is not None:
            if saved.ema is not None:
                self.ema.load_state_dict(saved.ema)
            else:
                self.ema.reset(self.network())
        self.load_state_dict(saved.state)
        if self.acc.is_main_process:
            print(f"resumed from {path} at step {self.state.step} (resume #{self.state.resume_count})", flush=True)

    # ------------------------------------------------------------------ training

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _stream_for(self, stage):
        if stage.index != self._stream_stage:
            # The position counts samples, so a new stage just cuts the same sequence into other batches.
            settings = stream_settings(self.cfg, stage, self.launch.rank, self.launch.world_size,
                                       self.state.data.position)
            self._stream = train_batches(self.train_source, settings)
            self._stream_stage = stage.index
        return self._stream

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["input"].to(self.launch.device, non_blocking=True)
        y = batch["target"].to(self.launch.device, non_blocking=True)
        return x, y

    def train_step(self, stage) -> dict[str, float]:
        """One optimizer step: `stage.accum` loaded batches, each in micro-batches of `stage.micro_batch`
        images (the memory plan's), then clip and step. Returns figures for the log."""
        stream = self._stream_for(stage)
        names = ("loss", "l1", "l2")
        summed = torch.zeros(len(names), device=self.launch.device)
        data_wait = 0.0
        # Set before the micro-batches: DeepSpeed steps inside the last backward.
        lr = lr_at(self.cfg.lr, self.cfg.optim.lr, self.recipe_total, self.state.step * self.schedule.step_scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pieces = stage.batch // stage.micro_batch
        share = 1.0 / (stage.accum * pieces)  # every loss is a mean over equal micro-batches
        for batch_index in range(stage.accum):
            t0 = time.perf_counter()
            batch = next(stream)
            x, y = self._to_device(batch)
            data_wait += time.perf_counter() - t0
            self.bad_samples += int(batch["skipped"])
            self.state.data.position, self.state.data.epoch = int(batch["next_position"]), int(batch["epoch"])
            for piece, (x_micro, y_micro) in enumerate(zip(x.split(stage.micro_batch), y.split(stage.micro_batch))):
                last = batch_index == stage.accum - 1 and piece == pieces - 1
                with self.engine.accumulating(last):  # gradients are all-reduced on the last micro-batch only
                    losses = forward_backward(self.model, x_micro, y_micro, self.launch.autocast, self.cfg.loss, share,
                                              backward=lambda loss: self.engine.backward(loss, last))
                # Summed on the device: one host sync per step, not three per micro-batch.
                summed = summed + torch.stack([losses[k].detach() for k in names]) * share
        sums = dict(zip(names, summed.tolist()))

        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip is not None else math.inf
        # Under DeepSpeed this returns the norm its engine measured (and clipped to) in the step.
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        # The norm is taken over all-reduced gradients, so every rank reaches the same verdict (a
        # non-finite loss on any rank makes them non-finite); this rank's loss alone must not decide.
        finite = math.isfinite(grad_norm)
        if finite or self.launch.precision == "fp16":
            # Under fp16 the GradScaler itself skips non-finite steps; under DeepSpeed this is a no-op
            # (its engine stepped already: train/engine.py).
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.nonfinite_streak = 0
            if self.ema is not None:
                self.ema.update(self.network())
        else:
            self.state.nonfinite_total += 1
            self.nonfinite_streak += 1
        self.state.step += 1
        return {**sums, "lr": lr, "grad_norm": grad_norm, "data_wait": data_wait, "finite": finite}

    def train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.acc
        total = min(self.schedule.total_steps, cfg.train.max_steps or self.schedule.total_steps)
        mode = init_trackers(acc, cfg.tracking, cfg.run_name, self.run_dir, self.state.run_id, cfg.to_dict())
        if acc.is_main_process:
            print(self.schedule.note, flush=True)
            print(self._memory_note(), flush=True)
            print(f"W&B: {mode} (run id {self.state.run_id})", flush=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        bar = tqdm(total=total, initial=self.state.step, disable=not acc.is_main_process, dynamic_ncols=True,
                   desc="train")
        window = LogWindow()
        self.peak_memory.read()  # the first window's peak is its steps', not the setup's
        stopped_by = None
        try:
            while self.state.step < total:
                stage = self.schedule.stage_at(self.state.step)
                if stage.index != self._stream_stage:
                    left_plain = set_activations(self.network(), stage.activations)
                    if left_plain and acc.is_main_process and left_plain != self._left_plain:
                        print(f"{stage.activations} activations: these blocks run plain autograd: {left_plain}")
                    self._left_plain = left_plain
                    if acc.is_main_process:
                        self._log({"event": "stage", "step": self.state.step, "stage": stage.index,
                                   "patch": stage.patch, "batch": stage.batch, "accum": stage.accum,
                                   "micro_batch": stage.micro_batch, "activations": stage.activations})
                t0 = time.perf_counter()
                out = self.train_step(stage)
                window.add(out, stage.batch * stage.accum, stage.batch * stage.accum * stage.patch**2,
                           time.perf_counter() - t0)
                giving_up = self.nonfinite_streak >= cfg.train.max_nonfinite
                bar.update(1)
                bar.set_postfix(stage=stage.index, loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}",
                                refresh=False)
                if self.state.step % cfg.train.log_every == 0 or self.state.step == total or giving_up:
                    self._flush_window(window, stage, bar)
                    window = LogWindow()
                if giving_up:
                    raise NonFiniteError(
                        f"{self.nonfinite_streak} optimizer steps in a row had a non-finite loss or "
                        f"gradient (last at step {self.state.step}); stopped. The last good checkpoint is "
                        f"{self.checkpointer.newest()}. Lower optim.lr, use bf16 instead of fp16, or "
                        "check the data for NaN/Inf"
                    )
                validated = False
                if self.val_source is not None and self.state.step % cfg.val.every == 0 and self.state.step < total:
                    validated = self.validate()
                if self.state.step % cfg.train.ckpt_every == 0 or validated:
                    self.save_checkpoint()
                # A signal on any rank stops every rank at the same step, after a checkpoint.
                signum = int(reduce_max(acc, float(self._stop_signal)))
                if signum:
                    stopped_by = signal.Signals(signum).name
                    break
            summary = {"step": self.state.step, "stopped_by": stopped_by, "replicas_in_sync": self.replicas_in_sync()}
            if stopped_by is None and self.val_source is not None:
                self.validate()
                summary.update(self.last_validation)
            path = self.save_checkpoint()
            summary["checkpoint"] = str(path)
            if stopped_by is None:
                summary["export"] = self.export(path)
            if acc.is_main_process:
                self._log({"event": "end", **summary})
            return summary
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    @torch.no_grad()
    def replicas_in_sync(self) -> bool | None:
        """True when every rank holds bit-identical weights (a per-parameter checksum is compared).

        None under ZeRO-3: each rank holds a different slice of the weights by design."""
        if self.launch.zero3:
            return None
        params = list(self.network().parameters())
        sums = torch.stack([p.detach().double().sum() for p in params]).to(self.launch.device)
        gathered = self.acc.gather(sums.unsqueeze(0))
        return bool((gathered == gathered[0]).all().item())

    # ------------------------------------------------------------------ logging

    def _flush_window(self, window: LogWindow, stage, bar) -> None:
        # Every node's figures reach rank 0.
        ranks = gather_named(self.acc, {**window.rates(), "peak_mem_gb": self.peak_memory.window(),
                                    "bad_samples": self.bad_samples})
        if not self.acc.is_main_process:
            return
        record = {"step": self.state.step, "stage": stage.index, "patch": stage.patch, "batch": stage.batch,
                  "accum": stage.accum, **window.means(), "skipped_steps": self.state.nonfinite_total,
                  **across_ranks(ranks)}
        self._log(record)
        bar.set_postfix(stage=stage.index, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        img_s=f"{record['images_per_s']:.1f}")

    def _log(self, record: dict[str, Any]) -> None:
        """Main process only: the local metrics file and the trackers get the same figures."""
        self.metrics.write(record)
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.acc.log(numeric, step=self.state.step)

    # ------------------------------------------------------------------ validation and export

    @torch.no_grad()
    def validate(self) -> bool:
        """Each rank scores its share of the images; sums are reduced. Returns True on a new best."""
        cfg, acc = self.cfg, self.acc
        self.peak_memory.pause()
        # The EMA's weights when there is one; under ZeRO-3 a full copy (train/engine.py).
        record = network_record(cfg.model)
        net = self.engine.full_module(self.ema.module if self.ema is not None else self.network(),
                                      lambda: build_network(record))
        was_training = net.training
        net.eval()
        names = score_names(cfg.val.y_channel, record_channels(record)[1])
        sums = dict.fromkeys(names, 0.0) | {"images": 0.0}
        rows = []
        for item in val_images(cfg, self.val_source, self.launch.rank, self.launch.world_size):
            x, target = self._to_device(item)
            with acc.autocast():
                restored = restore_image(net, x, tile=cfg.val.tile, overlap=cfg.val.tile_overlap).float()
            figures = score(restored, x[:, : target.shape[1]], target, border=cfg.val.border,
                            y_channel=cfg.val.y_channel, bits=item["bits"])
            for name, values in figures.items():
                sums[name] += values.sum().item()
            sums["images"] += target.shape[0]
            if len(rows) < cfg.val.grid_images:
                rows.append((x[0].cpu(), restored[0].cpu(), target[0].cpu()))
        net.train(was_training)
        sums = reduce_named(acc, sums, "sum")
        count = max(sums["images"], 1.0)
        result = {f"val/{name}": sums[name] / count for name in names} | {"val/images": int(sums["images"])}
        result["val/peak_mem_gb_max"] = reduce_max(acc, self.peak_memory.read())
        self.last_validation = result
        # With val.y_channel the paper reports (and the official scripts select on) the Y-channel figure.
        key = f"val/{cfg.train.best_metric}"
        key = f"{key}_y" if f"{key}_y" in result else key
        improved = self.state.best_metric is None or result[key] > self.state.best_metric
        if improved:
            self.state.best_metric, self.state.best_step = result[key], self.state.step
        if acc.is_main_process:
            grid = save_grid(rows, self.run_dir / "samples" / f"step_{self.state.step:08d}.png",
                             cfg.val.grid_crop) if rows else None
            self._log({"event": "val", "step": self.state.step, **result, "best": self.state.best_metric})
            if grid is not None:
                self._log_image(grid)
        return improved

    def _log_image(self, path: Path) -> None:
        for tracker in self.acc.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.log({"val/samples": wandb.Image(str(path), caption="degraded | restored | target")},
                            step=self.state.step)

    def network(self) -> torch.nn.Module:
        """The plain network being trained: no DDP/DeepSpeed wrapper, no torch.compile wrapper
        (its state_dict keys are the network's own, Restormer's the official ones; whole validation
        images of every size would each recompile a compiled module)."""
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    def export(self, checkpoint: Path) -> dict[str, str]:
        """export/: the trained weights (and the EMA's), see train/exporting.py. Under DeepSpeed (any ZeRO
        stage) the trained ones are the fp32 master weights consolidated from `checkpoint`."""
        trained = self.engine.trained_weights(self.network())
        ema = self.ema.state_dict() if self.ema is not None else None
        return self.checkpointer.export(checkpoint, trained, ema, network_record(self.cfg.model))
