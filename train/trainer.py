"""The Trainer: model, optimizer, data stream and the training state that a checkpoint carries."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from model import ARCH_FIELDS, PRECISIONS, Restormer, build_model, load_weights, restore_image, set_activations
from train.checkpoint import Checkpointer
from train.config import Config, ConfigError, OptimConfig, config_from_dict, read_config_file
from train.data import stream_settings, train_batches, val_images
from train.ema import EMA
from train.losses import compute_losses
from train.memory_plan import agreed_plan, describe
from train.metrics import score, score_names
from train.samples import save_grid
from train.schedule import StagePlan, lr_at, plan_stages, resume_step
from train.state import DataPosition, TrainState
from train.tracking import LogWindow, MetricsFile, PeakMemory, across_ranks, init_trackers



class NonFiniteError(RuntimeError):
    pass


# optim.name -> the optimizer of `params` (the names are OptimConfig.name's choices).
OPTIMIZERS: dict[str, Callable[[OptimConfig, Any], torch.optim.Optimizer]] = {
    # Fused: one kernel for all parameters, ~3x faster than foreach on CPU too (benchmarks/model_speed.py).
    "adamw": lambda o, params: torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                                 fused=True),
    "sgd": lambda o, params: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                             foreach=True),
}


def fill_deepspeed_config(ds: dict[str, Any], cfg: Config, plan: StagePlan, world_size: int) -> None:
    """Fills the DeepSpeed JSON's "auto" values from the run config, the one source of truth.

    The trainer accumulates micro-batches itself (per stage, see train.schedule) and marks the last
    one as DeepSpeed's accumulation boundary, so DeepSpeed sees one micro-batch per step. Its batch
    figures only feed its own logging: later stages' other micro-batch sizes do not upset it.
    """
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else 0.0  # 0: DeepSpeed does not clip
    wanted = {"train_micro_batch_size_per_gpu": plan.stages[0].batch, "gradient_accumulation_steps": 1,
              "train_batch_size": plan.stages[0].batch * world_size, "gradient_clipping": clip}
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(
                f"DeepSpeed config: {key}={ds[key]!r} disagrees with the run config ({value!r}); set it to "
                '"auto" (batch, accumulation and clipping come from progressive.*, train.* and optim.grad_clip)'
            )


class Trainer:
    def __init__(self, cfg: Config, accelerator: Accelerator, checkpointer: Checkpointer, train_source: str,
                 val_source: str | None, resume: str | None = None):
        """resume: None, 'auto' or a checkpoint folder (--resume); the checkpointer picks and verifies it."""
        self.cfg = cfg
        self.acc = accelerator
        self.train_source = train_source
        self.val_source = val_source
        self.run_dir = cfg.run_dir
        self.checkpointer = checkpointer
        self.plan: StagePlan = plan_stages(cfg, accelerator.num_processes)
        self.recipe_total = sum(cfg.progressive.iters)
        resume_from = checkpointer.resume_point(resume)

        arch = cfg.model.shape_overrides()
        self.arch = {"preset": cfg.model.preset, **arch}  # what export/config.yaml records
        self._build_net = lambda: build_model(cfg.model.preset, **arch)
        net = self._build_net()  # the config's check (model.arch_problem) built this shape already
        if cfg.model.init_weights:
            try:
                load_weights(net, cfg.model.init_weights)
            except (OSError, ValueError, KeyError, RuntimeError) as err:  # missing, refused pickle, wrong shapes
                raise ConfigError(f"model.init_weights={cfg.model.init_weights}: {err}") from err
        optimizer = OPTIMIZERS[cfg.optim.name](cfg.optim, net.parameters())
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.zero3 = self.deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
        if self.zero3 and cfg.train.ema_decay:
            raise ConfigError("train.ema_decay is not supported with DeepSpeed ZeRO-3 (each process holds only a "
                              "slice of the weights); use ZeRO-2 or DDP, or set train.ema_decay=null")
        if self.deepspeed:
            fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, self.plan,
                                  accelerator.num_processes)
        zero_stage = accelerator.state.deepspeed_plugin.zero_stage if self.deepspeed else None
        self.memory = agreed_plan(accelerator, cfg, self.plan, zero_stage)
        if self.memory is not None:
            self.plan = self.plan.with_memory(self.memory)
        if cfg.model.compile:
            # Dynamic shapes: one graph serves every progressive-learning patch size. torch 2.13's
            # dynamo fails on dynamic shapes inside activation checkpointing: then one graph per stage.
            checkpointing = any(s.activations == "checkpoint" for s in self.plan.stages)
            net = torch.compile(net, dynamic=not checkpointing)
        # DeepSpeed keeps bf16/fp16 weights (no autocast); the network casts its input to them itself.
        low = PRECISIONS.get(accelerator.mixed_precision)
        self.weight_dtype = low if self.deepspeed and low is not None else torch.float32
        self.model, self.optimizer = accelerator.prepare(net, optimizer)
        self.ema = EMA(self.network(), cfg.train.ema_decay) if cfg.train.ema_decay else None

        self.state = TrainState(data=DataPosition(cfg.train.seed))  # what a checkpoint carries
        # Not in any checkpoint: this launch's figures.
        self.nonfinite_streak = 0  # non-finite steps in a row: train.max_nonfinite stops the run
        self.bad_samples = 0  # corrupt samples the stream skipped on this rank since the start/resume
        self.peak_memory = PeakMemory(accelerator.device)
        if resume_from is not None:
            self.load_checkpoint(resume_from)

        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl", accelerator.is_main_process)
        self._stop_signal = 0
        self._stream = None
        self._stream_stage = -1
        self._left_plain: dict[str, str] | None = None  # blocks lean left to autograd, printed when it changes

    def _memory_note(self) -> str:
        """The memory plan's table for the log, also kept in the run folder (memory_plan.txt)."""
        note = describe(self.memory, self.cfg.train.memory_gb)
        if self.memory is not None:
            (self.run_dir / "memory_plan.txt").write_text(note + "\n", encoding="utf-8")
        return note

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict(self.plan.stage_at(self.state.step).index, self.acc.num_processes)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        state = TrainState.from_state_dict(saved)
        state.step = resume_step(self.cfg, state.step, int(saved["world_size"]), self.acc.num_processes)
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
        loaded = self.checkpointer.load(path, self._network_changes, with_ema=self.ema is not None)
        if self.ema is not None:
            if loaded.ema is not None:
                self.ema.load_state_dict(loaded.ema)
            else:
                self.ema.reset(self.network())
        self.load_state_dict(loaded.state)
        if self.acc.is_main_process:
            print(f"resumed from {path} at step {self.state.step} (resume #{self.state.resume_count})", flush=True)

    def _network_changes(self, config_file: Path) -> list[str]:
        saved = config_from_dict(read_config_file(config_file), str(config_file))
        return [f"model.{k}: checkpoint {getattr(saved.model, k)!r} vs now {getattr(self.cfg.model, k)!r}"
                for k in ARCH_FIELDS if getattr(saved.model, k) != getattr(self.cfg.model, k)]

    # ------------------------------------------------------------------ training

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _stream_for(self, stage):
        if stage.index != self._stream_stage:
            # The position counts samples, so a new stage just cuts the same sequence into other batches.
            settings = stream_settings(self.cfg, stage, self.acc.process_index, self.acc.num_processes,
                                       self.state.data.position)
            self._stream = train_batches(self.train_source, settings)
            self._stream_stage = stage.index
        return self._stream

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["input"].to(self.acc.device, non_blocking=True)
        y = batch["target"].to(self.acc.device, non_blocking=True)
        return x, y

    def train_step(self, stage) -> dict[str, float]:
        """One optimizer step: `stage.accum` loaded batches, each in micro-batches of `stage.micro_batch`
        images (the memory plan's), then clip and step. Returns figures for the log."""
        stream = self._stream_for(stage)
        names = ("loss", "l1", "l2")
        summed = torch.zeros(len(names), device=self.acc.device)
        data_wait = 0.0
        # Set before the micro-batches: DeepSpeed steps inside the last backward.
        lr = lr_at(self.cfg.lr, self.cfg.optim.lr, self.recipe_total, self.state.step * self.plan.step_scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pieces = stage.batch // stage.micro_batch
        share = 1.0 / (stage.accum * pieces)  # every loss is a mean over equal micro-batches
        for loaded in range(stage.accum):
            t0 = time.perf_counter()
            batch = next(stream)
            x, y = self._to_device(batch)
            data_wait += time.perf_counter() - t0
            self.bad_samples += int(batch["skipped"])
            self.state.data.position, self.state.data.epoch = int(batch["next_position"]), int(batch["epoch"])
            for piece, (x_micro, y_micro) in enumerate(zip(x.split(stage.micro_batch), y.split(stage.micro_batch))):
                last = loaded == stage.accum - 1 and piece == pieces - 1
                # Gradients are all-reduced only on the last micro-batch (DDP no_sync; DeepSpeed: boundary).
                sync = contextlib.nullcontext() if last or self.deepspeed else self.acc.no_sync(self.model)
                with sync:
                    out = self.model(x_micro)
                    losses = compute_losses(self.cfg.loss, out, y_micro)
                    self._backward(losses["loss"] * share, last)
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
        if finite or self.acc.mixed_precision == "fp16":
            # Under fp16 the GradScaler itself skips non-finite steps; under DeepSpeed this is a no-op
            # (its engine stepped already, and skips non-finite steps: bf16 needs check_grad_overflow).
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

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if not self.deepspeed:
            self.acc.backward(loss)
            return
        # accelerate's backward would make every micro-batch a DeepSpeed step; only the last is a
        # boundary. engine.step() reduces, clips, steps and zeroes the gradients.
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss)
        if last:
            self.model.step()

    def _reduce_max(self, value: float) -> float:
        return self.acc.reduce(torch.tensor([value], device=self.acc.device, dtype=torch.float64), "max").item()

    def _reduce_named(self, values: dict[str, float], op: str) -> dict[str, float]:
        """Named figures reduced over the ranks in one collective (every rank passes the same names)."""
        reduced = self.acc.reduce(torch.tensor(list(values.values()), device=self.acc.device, dtype=torch.float64), op)
        return dict(zip(values, reduced.tolist()))

    def _gather_named(self, values: dict[str, float]) -> dict[str, torch.Tensor]:
        """Named figures of every rank in one collective: name -> (world_size,) tensor on the CPU."""
        row = torch.tensor([list(values.values())], device=self.acc.device, dtype=torch.float64)
        gathered = self.acc.gather(row).cpu()
        return {name: gathered[:, i] for i, name in enumerate(values)}

    def train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.acc
        total = self.plan.total_steps if cfg.train.max_steps is None else min(cfg.train.max_steps, self.plan.total_steps)
        mode = init_trackers(acc, cfg.tracking, cfg.run_name, self.run_dir, self.state.run_id, cfg.to_dict())
        if acc.is_main_process:
            print(self.plan.note, flush=True)
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
                stage = self.plan.stage_at(self.state.step)
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
                signum = int(self._reduce_max(float(self._stop_signal)))
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
        if self.zero3:
            return None
        params = list(self.network().parameters())
        sums = torch.stack([p.detach().double().sum() for p in params]).to(self.acc.device)
        gathered = self.acc.gather(sums.unsqueeze(0))
        return bool((gathered == gathered[0]).all().item())

    # ------------------------------------------------------------------ logging

    def _flush_window(self, window: LogWindow, stage, bar) -> None:
        # Every node's figures reach rank 0.
        ranks = self._gather_named({**window.rates(), "peak_mem_gb": self.peak_memory.window(),
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
        net = self._full_module()
        was_training = net.training
        net.eval()
        names = score_names(cfg.val.y_channel, net.output.out_channels)
        sums = dict.fromkeys(names, 0.0) | {"images": 0.0}
        rows = []
        for item in val_images(cfg, self.val_source, acc.process_index, acc.num_processes):
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
        sums = self._reduce_named(sums, "sum")
        count = max(sums["images"], 1.0)
        result = {f"val/{name}": sums[name] / count for name in names} | {"val/images": int(sums["images"])}
        result["val/peak_mem_gb_max"] = self._reduce_max(self.peak_memory.read())
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

    def network(self) -> Restormer:
        """The plain Restormer being trained: no DDP/DeepSpeed wrapper, no torch.compile wrapper
        (its state_dict keys are the official ones; whole validation images of every size would
        each recompile a compiled module)."""
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    def _full_module(self) -> torch.nn.Module:
        """The network with all its weights on this rank, for per-rank work (validation).

        Under ZeRO-3 a forward of the sharded module gathers weights collectively, so ranks with
        unequal work would hang: gather once (all ranks) into a plain copy instead."""
        net = self.ema.module if self.ema is not None else self.network()
        if not self.zero3:
            return net
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(net.parameters())):
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        full = self._build_net()
        full.load_state_dict(state)
        return full.to(self.acc.device, self.weight_dtype).train(net.training)

    def export(self, checkpoint: Path) -> dict[str, str]:
        """export/: the trained weights (and the EMA's), see train/exporting.py. Under DeepSpeed (any ZeRO
        stage) the trained ones are the fp32 master weights consolidated from `checkpoint`."""
        trained = None if self.deepspeed else self.acc.get_state_dict(self.network())
        ema = self.ema.state_dict() if self.ema is not None else None
        return self.checkpointer.export(checkpoint, trained, ema, self.arch)
