"""The training loop. It knows nothing of any specific head or loss: it calls the
model, the loss (a dict of per-task losses), the task weighting and the metrics.

Frozen backbone: features are extracted once through the on-disk feature cache
and every epoch trains only the neck and head on them. Trainable backbone: the
images go through the whole model each step.

Auto-resume: ``checkpoints/last.pt`` is written atomically after every epoch with
the model, optimiser, scheduler and RNG states; running the same command again
continues from it and gives the same result as an uninterrupted run (shuffling
uses a generator seeded per epoch, so no sampler state is needed).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bundle import export_bundle
from ..data import ImageDataset, Preprocess, build_transform, extract_features
from ..errors import ConfigError
from ..losses import StaticWeighting, create_loss
from ..metrics import compute_metrics
from ..models import create_backbone, create_model
from ..utils.io import atomic_torch_save, atomic_write_json, atomic_write_text
from ..utils.runtime import autocast_for, resolve_device, rng_state, seed_everything, set_rng_state
from .config import Config
from .distributed import barrier, gather_rows, init_distributed, rank_slice, shutdown
from .logger import MetricLogger
from .schedule import lr_multiplier
from .setup import PreparedData, prepare_data

Log = Callable[[str], None]


@dataclass
class RunResult:
    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    epochs_run: int
    resumed_from: int


def config_hash(cfg: Config) -> str:
    """Hash of everything that changes the result (not progress bars or device)."""
    d = cfg.model_dump(mode="json")
    d["train"].pop("progress", None)
    d["train"].pop("device", None)
    d["data"].pop("num_workers", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir(cfg: Config) -> Path:
    import os

    if cfg.train.cache_dir:
        return Path(cfg.train.cache_dir)
    env = os.environ.get("TAXONOMIST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "taxonomist" / "features"


class Trainer:
    def __init__(self, cfg: Config, log: Log = print) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dist, self.device = init_distributed(resolve_device(cfg.train.device))
        self.log: Log = log if self.dist.is_main else (lambda _msg: None)
        self.progress = cfg.train.progress and self.dist.is_main

    # ------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        t0 = time.time()
        self.data: PreparedData = prepare_data(cfg)
        self.tax = self.data.taxonomy
        for note in self.data.notes:
            self.log(f"  {note}")
        self.log(f"data: {len(self.data.train)} train, {len(self.data.val) if self.data.val is not None else 0} val "
                 f"samples ({time.time() - t0:.1f}s)")
        bb = cfg.model.backbone
        self.backbone = create_backbone(bb.name, pretrained=bb.pretrained, trainable=bb.trainable,
                                        image_size=bb.image_size, multiscale=bb.multiscale)
        self.preprocess = Preprocess(**self.backbone.preprocess)
        self.frozen = not bb.trainable
        self.model = create_model(
            self.tax, backbone=None if self.frozen else self.backbone, in_features=self.backbone.num_features,
            neck=cfg.model.neck.model_dump(), head=cfg.model.head.model_dump()).to(self.device)
        loss_cfg = cfg.loss.model_dump()
        loss_cfg.pop("task_weights")
        self.loss_fn = create_loss(loss_cfg.pop("name"), self.tax, self.model.head, **loss_cfg).to(self.device)
        self.weighting = StaticWeighting(cfg.loss.task_weights)
        if self.frozen:
            # rank 0 fills the on-disk cache first; the other ranks then read it
            if not self.dist.is_main:
                barrier(self.dist)
            self.train_x = self._features(self.data.train, "train")
            self.val_x = self._features(self.data.val, "val") if self.data.val is not None else None
            if self.dist.is_main:
                barrier(self.dist)
        self.train_y = torch.as_tensor(self.data.train.nodes(), dtype=torch.long)
        params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.train
        if t.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                             nesterov=True)
        self.steps_per_epoch = math.ceil(len(self.data.train) / t.batch_size)
        total = self.steps_per_epoch * t.epochs
        warm = int(round(t.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(t.schedule, total, warm))
        self.autocast, self.amp_dtype = autocast_for(self.device, t.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step_fn: nn.Module = self.model
        if self.dist.enabled:
            if t.batch_size % self.dist.world_size:
                raise ConfigError(f"train.batch_size={t.batch_size} is the global batch and must be divisible by the "
                                  f"number of processes ({self.dist.world_size})")
            from torch.nn.parallel import DistributedDataParallel

            # every loss returns a graph-connected zero for a task absent from a batch, so all parameters
            # receive gradients and no "unused parameter" search is needed
            self.step_fn = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            if self.device.type == "cuda":
                self.step_fn = torch.compile(self.step_fn)
            else:
                self.log("  note: train.compile is ignored on CPU (no speed-up there)")

    def _features(self, table, split: str) -> torch.Tensor:
        self.log(f"features ({split}): {self.backbone.cache_key[:60]}")
        feats = extract_features(self.backbone, self.backbone.cache_key, table, self.preprocess,
                                 cache_dir=default_cache_dir(self.cfg), batch_size=self.cfg.train.feature_batch_size,
                                 num_workers=self.cfg.data.num_workers, device=self.device,
                                 progress=self.progress)
        return torch.as_tensor(np.asarray(feats, dtype=np.float32))

    # ------------------------------------------------------------ batches
    def _epoch_batches(self, epoch: int) -> list[tuple[torch.Tensor, int]]:
        """(this rank's row indices, global batch size) for every global batch of the epoch.

        The permutation depends only on the seed and the epoch, so any world size sees the same batches.
        """
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        n = len(self.data.train)
        bs = self.cfg.train.batch_size
        perm = torch.randperm(n, generator=g)
        batches = []
        for lo in range(0, n, bs):
            glob = perm[lo:lo + bs]
            if self.dist.enabled and len(glob) < self.dist.world_size:
                continue  # a tail smaller than the number of ranks would leave a rank without data
            batches.append((rank_slice(glob, self.dist), len(glob)))
        return batches

    def _train_batches(self, epoch: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, float]]:
        """(inputs, targets, gradient scale). Under DDP the scale world * n_rank / n_global makes the
        averaged gradient equal the gradient of the global-batch mean even when the ranks' shares differ."""
        batches = self._epoch_batches(epoch)
        world = self.dist.world_size
        scales = [world * len(idx) / n for idx, n in batches]
        if self.frozen:
            for (idx, _), scale in zip(batches, scales):
                yield {"features": self.train_x[idx].to(self.device)}, self.train_y[idx].to(self.device), scale
        else:
            ds = ImageDataset(self.data.train, build_transform(self.preprocess, train=self.cfg.train.augment))
            loader = torch.utils.data.DataLoader(ds, batch_sampler=[idx.tolist() for idx, _ in batches],
                                                 num_workers=self.cfg.data.num_workers)
            for (images, nodes, _), scale in zip(loader, scales):
                yield {"images": images.to(self.device)}, nodes.to(self.device), scale

    @torch.no_grad()
    def predict_label_probs(self, table=None, features: torch.Tensor | None = None) -> np.ndarray:
        self.model.eval()
        out = []
        bs = max(self.cfg.train.batch_size, 256)
        if features is not None:
            for lo in range(0, len(features), bs):
                with self.autocast():
                    o = self.model(features=features[lo:lo + bs].to(self.device))
                out.append(self.model.label_log_probs(o).float().exp().cpu())
        else:
            ds = ImageDataset(table, build_transform(self.preprocess, train=False))
            loader = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=self.cfg.data.num_workers)
            for images, _, _ in loader:
                with self.autocast():
                    o = self.model(images=images.to(self.device))
                out.append(self.model.label_log_probs(o).float().exp().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.tax.n_labels), dtype=np.float32)

    def _validate(self) -> dict[str, Any]:
        """Metrics over the whole validation set (each rank predicts a contiguous block; blocks are gathered)."""
        if self.data.val is None or len(self.data.val) == 0:
            return {}
        rows = np.array_split(np.arange(len(self.data.val)), self.dist.world_size)[self.dist.rank]
        if self.frozen:
            local = self.predict_label_probs(features=self.val_x[torch.as_tensor(rows)])
        else:
            local = self.predict_label_probs(self.data.val.select(rows))
        probs = gather_rows(local, self.dist)
        m = compute_metrics(self.tax, probs, self.data.val.nodes(), ranks=self.cfg.ranks)
        return {f"val/{k}": v for k, v in m.items()}

    # ------------------------------------------------------------ checkpoints
    def _state(self, epoch: int, best: float | None, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "best": best, "history": history, "config_hash": config_hash(self.cfg),
            "taxonomy": self.tax.fingerprint,
        }

    def _resume(self) -> dict[str, Any] | None:
        last = self.ckpt_dir / "last.pt"
        if not last.exists():
            return None
        state = torch.load(last, map_location="cpu", weights_only=False)
        if state.get("config_hash") != config_hash(self.cfg):
            raise ConfigError(
                f"{self.run_dir} holds a run with a different configuration, so it cannot be resumed. "
                f"Use another name (name=...), or delete {self.run_dir} to start over.")
        if state.get("taxonomy") != self.tax.fingerprint:
            raise ConfigError(f"{self.run_dir} was trained on a different taxonomy or training set "
                              f"({state.get('taxonomy')} vs {self.tax.fingerprint}); use another run name")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return state

    def _save_epoch(self, epoch: int, best: float | None, history: list[dict[str, Any]], is_best: bool) -> None:
        if not self.dist.is_main:
            barrier(self.dist)
            return
        state = self._state(epoch, best, history)
        ck = self.cfg.checkpoint
        if epoch % ck.every == 0:
            atomic_torch_save(self.ckpt_dir / f"epoch_{epoch:04d}.pt", state)
            olds = sorted(self.ckpt_dir.glob("epoch_*.pt"))[:-ck.keep]
            for p in olds:
                p.unlink(missing_ok=True)
        if is_best:
            atomic_torch_save(self.ckpt_dir / "best.pt", state)
        atomic_torch_save(self.ckpt_dir / "last.pt", state)  # last: resume reads this one
        barrier(self.dist)

    # ------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        cfg = self.cfg
        self.log(f"run: {self.run_dir}")
        self._prepare()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            from ..taxonomy import save as save_taxonomy

            save_taxonomy(self.tax, self.run_dir / "taxonomy.json")
        barrier(self.dist)
        state = self._resume()
        start = state["epoch"] if state else 0
        best = state["best"] if state else None
        history = list(state["history"]) if state else []
        if state:
            self.log(f"resuming from {self.ckpt_dir / 'last.pt'} (epoch {start} of {cfg.train.epochs} done)")
        logger = MetricLogger(self.run_dir, history, start_epoch=start, tensorboard=self.dist.is_main,
                              write=self.dist.is_main)
        logger.add_text("config", "```\n" + cfg.to_yaml() + "\n```")
        logger.add_text("taxonomy", self.tax.fingerprint)
        mode = cfg.checkpoint.best_mode
        key = f"val/{cfg.checkpoint.best_metric}"
        for epoch in range(start + 1, cfg.train.epochs + 1):
            t0 = time.time()
            task_sums = self._train_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            row.update({f"train/{k}": v for k, v in task_sums.items()})
            row.update(self._validate())
            row["time_s"] = time.time() - t0
            value = row.get(key)
            if value is None and self.data.val is not None and len(self.data.val):
                raise ConfigError(f"checkpoint.best_metric={cfg.checkpoint.best_metric!r} is not a validation metric; "
                                  f"choose one of: {', '.join(k[4:] for k in row if k.startswith('val/'))}")
            is_best = value is not None and (best is None or (value < best if mode == "min" else value > best))
            if is_best or (value is None and epoch == cfg.train.epochs):
                best = value
                is_best = True
            logger.log(row)
            self._save_epoch(epoch, best, logger.history, is_best)
            self.log(_epoch_line(row, cfg.train.epochs))
        logger.close()
        return self._finish(start, best)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        batches = self._train_batches(epoch)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch}", leave=False)
        for inputs, targets, grad_scale in batches:
            with self.autocast():
                outputs = self.step_fn(**inputs)
                losses = self.loss_fn(outputs, targets)
                total = self.weighting(losses)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total * grad_scale if grad_scale != 1.0 else total).backward()
            if self.cfg.train.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            n = len(targets)
            count += n
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) * n
            for k, v in losses.items():
                sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + float(v.detach()) * n
        if self.dist.enabled:  # average the logged losses over all ranks' samples
            import torch.distributed as tdist

            keys = sorted(sums)
            buf = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
            tdist.all_reduce(buf)
            sums, count = dict(zip(keys, buf[:-1].tolist())), int(buf[-1])
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _finish(self, start: int, best: float | None) -> RunResult:
        best_path = self.ckpt_dir / "best.pt"
        state = torch.load(best_path if best_path.exists() else self.ckpt_dir / "last.pt", map_location="cpu",
                           weights_only=False)
        self.model.load_state_dict(state["model"])
        metrics = self._validate()
        metrics = {k[4:]: v for k, v in metrics.items()}
        bundle_dir = self.run_dir / "bundle"
        if not self.dist.is_main:
            barrier(self.dist)
            shutdown(self.dist)
            return RunResult(self.run_dir, bundle_dir, metrics, self.cfg.train.epochs - start, start)
        if metrics:
            metrics["epoch"] = state["epoch"]
            atomic_write_json(self.run_dir / "metrics.json", metrics)
        bundle_dir = export_bundle(self.run_dir / "bundle", model=self.model, backbone=self.backbone,
                                   taxonomy=self.tax, preprocess=self.preprocess, config=self.cfg,
                                   extra={"epoch": state["epoch"], "val_metrics": metrics,
                                          "threshold": self.cfg.predict.threshold})
        self.log(f"bundle: {bundle_dir}")
        barrier(self.dist)
        shutdown(self.dist)
        return RunResult(self.run_dir, bundle_dir, metrics, self.cfg.train.epochs - start, start)


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row.get('train/loss', float('nan')):.4f}"]
    for k, label in (("val/top1_error", "val top1 err"), ("val/mistake_severity", "severity"),
                     ("val/hdist@1", "hd@1")):
        if row.get(k) is not None:
            parts.append(f"{label} {row[k]:.4f}")
    parts.append(f"{row['time_s']:.1f}s")
    return "  ".join(parts)


def train(cfg: Config, log: Log = print) -> RunResult:
    return Trainer(cfg, log).fit()
