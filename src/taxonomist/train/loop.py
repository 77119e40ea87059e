"""The training loop. It knows nothing of any specific head or loss: it calls the
model, the loss (a dict of per-task losses), the task weighting and the metrics.

Frozen backbone: features are extracted once through the on-disk feature cache
and every epoch trains only the neck and head on them. Trainable backbone: the
images go through the whole model each step.

Auto-resume: ``checkpoints/last.pt`` is written atomically after every epoch with
the model, optimiser, scheduler and RNG states; running the same command again
continues from it and gives the same result as an uninterrupted run (shuffling
uses a generator seeded per epoch, and every other random draw is seeded by
(seed, epoch, rank) at the start of each epoch, so no sampler state is needed).

DDP (docs/scale.md): rank 0 alone reads and writes the run folder and broadcasts
what it read; frozen-backbone features are extracted by all ranks together.
"""

from __future__ import annotations

import contextlib
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
from ..data.attributes import attribute_accuracy, attribute_targets, attribute_vocab
from ..data.augment import build_augment
from ..data.mixup import mixture_loss
from ..errors import ConfigError
from ..losses import Loss, create_loss, create_weighting, with_attribute_losses
from ..losses.base import check_target_ids
from ..metrics import compute_metrics
from ..models import create_backbone, create_model
from ..utils.io import atomic_torch_save, atomic_write_json, atomic_write_text
from ..utils.runtime import autocast_for, resolve_device, rng_state, seed_everything, set_rng_state
from .config import Config, LossConfig
from .distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_object,
                          convert_sync_batchnorm, gather_rows, init_distributed, on_main, rank_seed, rank_slice,
                          shared_dir_group, shutdown)
from .dynamics import EarlyStopping, WeightEMA
from .logger import MetricLogger
from .tracking import create_trackers
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
    stopped_early: bool = False
    is_main: bool = True  # rank 0 (or a single process): the one that prints and writes


@dataclass
class MicroBatch:
    """One forward/backward: inputs, node targets, the training-table rows, the gradient scale, and
    whether it is the last micro-batch of its optimiser step."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    rows: torch.Tensor
    scale: float
    last: bool


def config_hash(cfg: Config) -> str:
    """Hash of everything that changes the result (not progress bars or device)."""
    d = cfg.model_dump(mode="json")
    d["train"].pop("progress", None)
    d["train"].pop("device", None)
    d["data"].pop("num_workers", None)
    d["train"].pop("tracking", None)  # adding a tracker to a run must not block its resume
    d["train"].pop("tracking_options", None)
    # neither changes the result; raising the timeout must not block resuming the run that timed out
    d["train"].pop("dist_timeout_min", None)
    d["train"].pop("feature_chunk_size", None)
    if not d["loss"].get("attribute_label_smoothing"):  # the default: runs from before the key still resume
        d["loss"].pop("attribute_label_smoothing", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: keys of the loss section that the loop reads itself (the others are options of the registered loss)
LOOP_LOSS_KEYS = ("task_weights", "weighting", "weighting_options", "attribute_label_smoothing")


def build_loss(loss_cfg: LossConfig, taxonomy, head, attributes: dict[str, int] | None = None) -> Loss:
    """The run's loss from the ``loss`` section: the registered loss ``loss.name`` with the section's
    other keys as its options, joined with one cross-entropy task per attribute head
    (``attributes``: ``{name: n_classes}``) smoothed by ``loss.attribute_label_smoothing``."""
    opts = loss_cfg.model_dump()
    for key in LOOP_LOSS_KEYS:
        opts.pop(key)
    loss = create_loss(opts.pop("name"), taxonomy, head, **opts)
    if attributes:
        loss = with_attribute_losses(loss, attributes, loss_cfg.attribute_label_smoothing)
    elif loss_cfg.attribute_label_smoothing:
        raise ConfigError("loss.attribute_label_smoothing is set but the model has no attribute head "
                          "(model.attributes is empty); remove it or add the attributes")
    return loss


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
        self.dist: DistInfo
        self.dist, self.device = init_distributed(resolve_device(cfg.train.device), cfg.train.dist_timeout_min)
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
        if bb.lora is not None:
            from ..models.lora import apply_lora

            if bb.trainable:
                self.log("  note: model.backbone.lora is set: the backbone's own weights stay frozen, only its "
                         "adapters train")
            apply_lora(self.backbone, r=bb.lora.r, alpha=bb.lora.alpha, dropout=bb.lora.dropout,
                       target_modules=bb.lora.target_modules, train_norm=bb.lora.train_norm, seed=cfg.seed,
                       log=lambda m: self.log(f"  {m}"))
        self.preprocess = Preprocess(**self.backbone.preprocess)
        self.frozen = not (bb.trainable or bb.lora is not None)
        self.accumulation_steps = cfg.train.accumulation_steps
        self._prepare_extras()
        self.model = create_model(
            self.tax, backbone=None if self.frozen else self.backbone, in_features=self.backbone.num_features,
            neck=cfg.model.neck.model_dump(), head=cfg.model.head.model_dump(),
            attributes={n: len(v) for n, v in self.attr_vocab.items()} or None,
            attribute_dropout=cfg.model.attribute_dropout, metadata=self.fusion_options).to(self.device)
        self._prepare_loss()
        self._prepare_augmentation()
        if self.frozen:
            if self.dist.enabled:  # the ranks share the extraction; then every rank reads the complete cache
                self._fill_cache()
            self.train_x = self._features(self.data.train, "train")
            self.val_x = self._features(self.data.val, "val") if self.data.val is not None else None
        # computing features draws from torch's global generator (DataLoader seeds) and reading them from
        # the cache does not: re-seed so that a run's result does not depend on whether the cache was warm
        seed_everything(cfg.seed + 1)
        self.train_y = torch.as_tensor(self.data.train.nodes(), dtype=torch.long)
        t = cfg.train
        if t.sync_batchnorm:  # after the batch-size probe: SyncBatchNorm would make each probe a collective
            self.model, _, note = convert_sync_batchnorm(self.model, self.dist, self.device)
            self.log(f"  {note}")
        # tasks whose per-rank loss is a mean over a rank-dependent number of samples (see
        # _global_mean_shares): attributes (-1 = unknown) and, with unlabelled training rows, the others too
        self.count_tasks = self.dist.enabled and (bool(self.train_attr) or bool((self.train_y < 0).any()))
        groups: list[dict[str, Any]] = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        self.weighting_params = [p for p in self.weighting.parameters() if p.requires_grad]
        if self.weighting_params:  # learnable task weights (uncertainty weighting): no weight decay
            groups.append({"params": self.weighting_params, "weight_decay": 0.0})
        if t.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                             nesterov=True)
        self.ema = WeightEMA(self.model, t.ema_decay) if t.ema_decay else None
        self.steps_per_epoch = self._count_steps()
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

    def _prepare_extras(self) -> None:
        """Attribute vocabularies and targets, and the fitted metadata encoder with the encoded metadata."""
        cfg = self.cfg
        self.attr_vocab: dict[str, list[str]] = {}
        self.train_attr: dict[str, torch.Tensor] = {}
        self.val_attr: dict[str, torch.Tensor] = {}
        if cfg.model.attributes:
            self.attr_vocab = attribute_vocab(self.data.train, cfg.model.attributes, where=cfg.data.train)
            self.train_attr, _ = attribute_targets(self.data.train, self.attr_vocab, where="training data")
            if self.data.val is not None:
                self.val_attr, notes = attribute_targets(self.data.val, self.attr_vocab, where="validation data")
                for note in notes:
                    self.log(f"  {note}")
            self.log("  attributes: " + ", ".join(f"{n} ({len(v)} classes)" for n, v in self.attr_vocab.items()))
        self.meta_encoder = None
        self.fusion_options: dict[str, Any] | None = None
        self.train_meta: tuple[torch.Tensor, torch.Tensor] | None = None
        self.val_meta: tuple[torch.Tensor, torch.Tensor] | None = None
        self.masker = None
        mc = cfg.data.metadata
        if mc is not None:
            from ..data.metadata import MetadataEncoder, MetadataMasker

            enc = MetadataEncoder.from_spec(mc.columns, self.data.train, latlon_encoding=mc.latlon_encoding,
                                            log=lambda line: self.log(f"  {line}"))  # kind of each field
            enc.fit(self.data.train)
            self.meta_encoder = enc
            self.train_meta = enc.transform(self.data.train).tensors()
            if self.data.val is not None:
                self.val_meta = enc.transform(self.data.val).tensors()
            self.fusion_options = {"component_index": enc.component_index.tolist(), "hidden": mc.hidden,
                                   "embed_dim": mc.embed_dim, "mode": mc.fusion, "dropout": mc.dropout}
            self.masker = MetadataMasker(mc.mask_prob, mode=mc.mask_mode, seed=cfg.seed)
            present = self.train_meta[1].mean(dim=0).tolist()
            self.log("  metadata: " + ", ".join(f"{n} ({p:.0%} present)"
                                                for n, p in zip(enc.component_names, present)))

    def _prepare_loss(self) -> None:
        cfg = self.cfg
        loss = build_loss(cfg.loss, self.tax, self.model.head, {n: len(v) for n, v in self.attr_vocab.items()})
        self.loss_fn = loss.to(self.device)
        # every training target checked once here, so the losses need not sync the accelerator each step
        check_target_ids(self.tax, self.data.train.nodes(), "training data")
        if self.device.type != "cpu":
            for m in self.loss_fn.modules():
                if isinstance(m, Loss):
                    m.check_on_device = False
        if cfg.train.auto_batch_size:
            self._auto_batch_size()
        w_opts = dict(cfg.loss.weighting_options)
        if cfg.loss.weighting == "static":
            w_opts.setdefault("weights", cfg.loss.task_weights)
        elif cfg.loss.task_weights:
            raise ConfigError(f"loss.task_weights are static weights, but loss.weighting={cfg.loss.weighting!r} "
                              "learns them; remove loss.task_weights (gradnorm takes "
                              "loss.weighting_options.initial_weights)")
        if cfg.loss.weighting == "gradnorm":
            if "accumulation_steps" in w_opts:
                raise ConfigError("loss.weighting_options.accumulation_steps is set by the training loop (from "
                                  "train.accumulation_steps and train.auto_batch_size); remove it")
            w_opts["accumulation_steps"] = self.accumulation_steps
            w_opts.setdefault("update_every", self.accumulation_steps)
        self.weighting = create_weighting(cfg.loss.weighting, tasks=self.loss_fn.tasks, **w_opts).to(self.device)
        # GradNorm measures each task's gradient at the last layer all tasks share; fails early without one
        self.shared_params = (self.model.last_shared_parameters() if self.weighting.needs_shared_parameters
                              else None)
        # a head that refines its task logits top down (refined, conditional) couples the tasks: GradNorm
        # measures them on the head's plain per-level logits (losses/gradnorm.py, measure="unrefined")
        self.head_input: HeadInput | None = None
        if (self.shared_params is not None and getattr(self.weighting, "measure", None) == "unrefined"
                and hasattr(self.model.head, "refine")):
            self.head_input = HeadInput()
            self.model.head.register_forward_pre_hook(self.head_input)
            self.log(f"  gradnorm: task gradients measured on the {self.model.head.registry_name} head's unrefined "
                     "per-level logits (loss.weighting_options.measure=unrefined)")

    def _auto_batch_size(self) -> None:
        """Split each optimiser step into micro-batches that fit the device (train.auto_batch_size)."""
        from .batch_search import search_batch_size

        t, world = self.cfg.train, self.dist.world_size
        per_rank = t.batch_size // world
        path = self.run_dir / "batch_size.json"
        # a resumed run keeps its micro-batch; rank 0 reads the run folder and tells the others
        kept = on_main(lambda: json.loads(path.read_text()) if path.exists() else None, self.dist)
        if kept is not None:
            micro, reason = int(kept["batch_size"]), f"from {path}"
        else:
            autocast, _ = autocast_for(self.device, t.amp)
            s = self.preprocess.image_size
            res = search_batch_size(
                self.model, input_shape=(self.backbone.num_features,) if self.frozen else (3, s, s),
                input_key="features" if self.frozen else "images", loss_fn=self.loss_fn, device=self.device,
                autocast=autocast,
                optimizer_state_factor=(2.0 if t.optimizer == "adamw" else 1.0) + (1.0 if t.ema_decay else 0.0),
                max_batch=per_rank, fallback=per_rank)
            micro, reason = res.batch_size, res.reason
            if self.dist.enabled:  # every rank probes its own device; all use the smallest
                import torch.distributed as tdist

                buf = torch.tensor([micro], device=self.device)
                tdist.all_reduce(buf, op=tdist.ReduceOp.MIN)
                micro = int(buf.item())
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path, {**res.to_json(), "batch_size": micro})
        self.accumulation_steps = max(t.accumulation_steps, math.ceil(per_rank / micro))
        self.log(f"  batch size: micro-batch {micro} ({reason}); {self.accumulation_steps} micro-batch(es) per "
                 f"step of {t.batch_size}")

    def _prepare_augmentation(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if t.early_stopping and (self.data.val is None or len(self.data.val) == 0):
            raise ConfigError("train.early_stopping needs validation data (data.val, or data.split.val > 0) to "
                              "watch checkpoint.best_metric; remove train.early_stopping or give validation data")
        aug = ("flips" if t.augment else "none") if isinstance(t.augment, bool) else t.augment
        if self.frozen and aug != "none":
            raise ConfigError(f"train.augment={t.augment!r} needs a trainable backbone (model.backbone.trainable=true): "
                              "a frozen backbone trains on cached features, which cannot be augmented. "
                              "Set train.augment=false, or use feature mixup (train.mixup={mixup_alpha: 0.2})")
        self.train_transform = build_augment(self.preprocess, aug) if not self.frozen else None
        self.mixup = None
        if t.mixup is not None:
            from ..data.mixup import TaxonMixup

            opts = dict(t.mixup)
            if self.frozen and float(opts.get("cutmix_alpha", 0.0)) > 0:
                raise ConfigError("train.mixup.cutmix_alpha > 0 needs images (model.backbone.trainable=true); with "
                                  "cached features use mixup only (cutmix_alpha: 0)")
            opts.setdefault("seed", cfg.seed)
            self.mixup_seed = int(opts["seed"]) if opts["seed"] is not None else cfg.seed
            import inspect

            known = [n for n in inspect.signature(TaxonMixup).parameters if n != "taxonomy"]
            unknown = sorted(set(opts) - set(known))
            if unknown:
                raise ConfigError(f"train.mixup has no option(s) {unknown}; its options are: {', '.join(known)}")
            self.mixup = TaxonMixup(self.tax, **opts)

    def _features(self, table, split: str) -> torch.Tensor:
        self.log(f"features ({split}): {self.backbone.cache_key[:60]}")
        feats = extract_features(self.backbone, self.backbone.cache_key, table, self.preprocess,
                                 cache_dir=default_cache_dir(self.cfg), batch_size=self.cfg.train.feature_batch_size,
                                 num_workers=self.cfg.data.num_workers, device=self.device,
                                 progress=self.progress, chunk_size=self.cfg.train.feature_chunk_size)
        return torch.as_tensor(np.asarray(feats, dtype=np.float32))

    def _fill_cache(self) -> None:
        """DDP, frozen backbone: every rank computes its share of the missing feature-cache chunks.

        The ranks that see the same cache folder (all of them on a shared file system, those of one
        machine on a local disk: found by probe files) split its chunks between them; chunk ``j`` goes
        to the ``j % n``-th of them, so no file is written twice. Then one barrier (under
        ``train.dist_timeout_min``), after which every rank reads the complete cache.
        """
        from ..data.feature_cache import CacheStats, fill_feature_cache

        cache = default_cache_dir(self.cfg)
        part, n_parts = shared_dir_group(cache, self.dist)
        t = self.cfg.train
        done = []
        for split, table in (("train", self.data.train), ("val", self.data.val)):
            if table is None:
                continue
            st = fill_feature_cache(self.backbone, self.backbone.cache_key, table, self.preprocess, cache,
                                    part=part, n_parts=n_parts, batch_size=t.feature_batch_size,
                                    num_workers=self.cfg.data.num_workers, device=self.device,
                                    progress=self.progress, chunk_size=t.feature_chunk_size, stats=CacheStats())
            done.append((split, st.n_chunks, st.chunks_computed, st.images_computed))
        every = all_gather_objects((n_parts, done), self.dist)  # also waits for every rank's share
        for i, (split, n_chunks, _, _) in enumerate(every[0][1]):
            per_rank = [d[1][i][2] for d in every]
            if sum(per_rank):
                images = sum(d[1][i][3] for d in every)
                self.log(f"  features ({split}): {sum(per_rank)} of {n_chunks} cache chunks ({images} images) computed "
                         f"by {self.dist.world_size} processes: {', '.join(map(str, per_rank))} chunks each")
        groups = sorted({d[0] for d in every})
        self.log(f"  feature cache {cache}: " + ("shared by all processes" if groups == [self.dist.world_size] else
                 f"not shared by all processes (groups of {', '.join(map(str, groups))} share one); each group "
                 "fills its own copy"))

    # ------------------------------------------------------------ batches
    def _epoch_steps(self, epoch: int) -> list[list[tuple[torch.Tensor, float]]]:
        """Every optimiser step of the epoch as its micro-batches: (this rank's row indices, gradient scale).

        The permutation depends only on the seed and the epoch, so any world size sees the same global
        batches. A global batch is split into ``train.accumulation_steps`` micro-batches (fewer for a
        tail too small to give every rank a sample in each). The scale ``world * n_rank / n_global``
        makes the summed, rank-averaged gradient equal the gradient of the global-batch mean even when
        the shares differ.
        """
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        n = len(self.data.train)
        bs = self.cfg.train.batch_size
        world = self.dist.world_size
        perm = torch.randperm(n, generator=g)
        steps = []
        for lo in range(0, n, bs):
            glob = perm[lo:lo + bs]
            if self.dist.enabled and len(glob) < world:
                continue  # a tail smaller than the number of ranks would leave a rank without data
            n_micro = max(1, min(self.accumulation_steps, len(glob) // world))
            micros = []
            for chunk in torch.tensor_split(glob, n_micro):
                idx = rank_slice(chunk, self.dist)
                micros.append((idx, world * len(idx) / len(glob)))
            steps.append(micros)
        return steps

    def _count_steps(self) -> int:
        """Optimiser steps per epoch, by the rule of :meth:`_epoch_steps` (the LR schedule's length):
        under DDP a tail batch smaller than the number of ranks is skipped, so it is not counted."""
        full, tail = divmod(len(self.data.train), self.cfg.train.batch_size)
        return full + int(tail > 0 and (not self.dist.enabled or tail >= self.dist.world_size))

    def _train_batches(self, epoch: int) -> Iterator[MicroBatch]:
        steps = self._epoch_steps(epoch)
        if len(steps) != self.steps_per_epoch:  # the schedule would end early or late
            raise RuntimeError(f"epoch {epoch} has {len(steps)} steps, the LR schedule counts {self.steps_per_epoch}")
        flat = [(idx, scale, j == len(micros) - 1) for micros in steps for j, (idx, scale) in enumerate(micros)]
        if self.frozen:
            for idx, scale, last in flat:
                yield MicroBatch({"features": self.train_x[idx].to(self.device)}, self.train_y[idx].to(self.device),
                                 idx, scale, last)
        else:
            ds = ImageDataset(self.data.train, self.train_transform)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=[idx.tolist() for idx, _, _ in flat],
                                                 num_workers=self.cfg.data.num_workers,
                                                 pin_memory=self.device.type == "cuda")
            for (images, nodes, rows), (_, scale, last) in zip(loader, flat):
                yield MicroBatch({"images": images.to(self.device, non_blocking=True)}, nodes.to(self.device),
                                 rows, scale, last)

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation uses: the EMA average when train.ema_decay is set."""
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def predict_outputs(self, table=None, features: torch.Tensor | None = None,
                        metadata: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(label probabilities [N, n_labels], attribute logits {"attr/<name>": [N, C]}) for a table or
        cached features; ``metadata``: (values, mask) rows aligned with them, or None (no metadata)."""
        model = self.eval_model
        model.eval()
        out: list[torch.Tensor] = []
        attrs: dict[str, list[torch.Tensor]] = {}
        bs = max(self.cfg.train.batch_size, 256)

        def run(lo: int, **inputs: torch.Tensor) -> None:
            if metadata is not None:
                inputs["metadata"] = metadata[0][lo:lo + len(next(iter(inputs.values())))].to(self.device)
                inputs["metadata_mask"] = metadata[1][lo:lo + len(inputs["metadata"])].to(self.device)
            with self.autocast():
                o = model(**inputs)
            out.append(model.label_log_probs(o).float().exp().cpu())
            for k in self.val_attr:
                attrs.setdefault(k, []).append(o[k].float().cpu())

        if features is not None:
            for lo in range(0, len(features), bs):
                run(lo, features=features[lo:lo + bs].to(self.device))
        else:
            ds = ImageDataset(table, build_transform(self.preprocess, train=False))
            loader = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=self.cfg.data.num_workers)
            lo = 0
            for images, _, _ in loader:
                run(lo, images=images.to(self.device))
                lo += len(images)
        probs = torch.cat(out).numpy() if out else np.zeros((0, self.tax.n_labels), dtype=np.float32)
        # every key on every rank, also a rank without validation rows (the gather after this is collective)
        return probs, {k: torch.cat(attrs[k]).numpy() if attrs.get(k) else
                       np.zeros((0, len(self.attr_vocab[k[len("attr/"):]])), dtype=np.float32) for k in self.val_attr}

    def predict_label_probs(self, table=None, features: torch.Tensor | None = None) -> np.ndarray:
        return self.predict_outputs(table, features)[0]

    def _validate(self, use_metadata: bool = True) -> dict[str, Any]:
        """Metrics over the whole validation set: each rank predicts a contiguous block, the blocks are
        gathered on rank 0, which computes the metrics; the other ranks get {} (and take part)."""
        if self.data.val is None or len(self.data.val) == 0:
            return {}
        rows = np.array_split(np.arange(len(self.data.val)), self.dist.world_size)[self.dist.rank]
        trows = torch.as_tensor(rows)
        meta = None
        if self.val_meta is not None and use_metadata:
            meta = (self.val_meta[0][trows], self.val_meta[1][trows])
        if self.frozen:
            local, attrs = self.predict_outputs(features=self.val_x[trows], metadata=meta)
        else:
            local, attrs = self.predict_outputs(self.data.val.select(rows), metadata=meta)
        # to rank 0 only (blocks in rank order = the validation order); rank 0 computes the metrics
        probs = gather_rows(local, self.dist)
        gathered = {k: gather_rows(v, self.dist) for k, v in sorted(attrs.items())}

        def metrics() -> dict[str, Any]:
            m = compute_metrics(self.tax, probs, self.data.val.nodes(), ranks=self.cfg.ranks)
            if self.val_attr:
                m.update(attribute_accuracy({k: torch.as_tensor(v) for k, v in gathered.items()}, self.val_attr))
            return {f"val/{k}": v for k, v in m.items()}

        return on_main(metrics, self.dist, share=False) or {}

    @property
    def has_val(self) -> bool:
        return self.data.val is not None and len(self.data.val) > 0

    # ------------------------------------------------------------ checkpoints
    def _state(self, epoch: int, best: float | None, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "best": best, "history": history, "config_hash": config_hash(self.cfg),
            "taxonomy": self.tax.fingerprint, "weighting": self.weighting.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "best_epoch": self.best_epoch,
            "early_stopping": self.stopper.state_dict() if self.stopper is not None else None,
        }

    def _read_last(self) -> dict[str, Any] | None:
        """``checkpoints/last.pt`` checked against this run, or None (rank 0 only: see _resume)."""
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
        return state

    def _resume(self) -> dict[str, Any] | None:
        """Load the run's last checkpoint, if any. Only rank 0 reads it (the run folder need not be
        visible to the other machines) and broadcasts it entry by entry, so every rank starts from the
        same epoch, weights, optimiser and scheduler state; a mismatch is an error on every rank."""
        state = on_main(self._read_last, self.dist, state=True)
        if state is None:
            return None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.weighting.load_state_dict(state["weighting"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.best_epoch = int(state.get("best_epoch") or 0)
        rng = dict(state["rng"])
        if len(rng.get("cuda", [])) != (torch.cuda.device_count() if torch.cuda.is_available() else 0):
            rng.pop("cuda", None)  # rank 0's machine had another number of GPUs (each epoch re-seeds anyway)
        set_rng_state(rng)
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
        # trackers first: a missing optional package stops the run before feature extraction
        trackers = create_trackers(cfg.train.tracking, cfg.train.tracking_options) if self.dist.is_main else []
        self._prepare()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            from ..taxonomy import save as save_taxonomy

            save_taxonomy(self.tax, self.run_dir / "taxonomy.json")
        barrier(self.dist)
        self.best_epoch = 0
        t = cfg.train
        self.stopper = EarlyStopping(t.early_stopping, t.early_stopping_delta, cfg.checkpoint.best_mode) \
            if t.early_stopping else None
        state = self._resume()
        if state and self.stopper is not None and state.get("early_stopping"):
            self.stopper.best_epoch = int(state["early_stopping"]["best_epoch"])
            self.stopper.best = state["early_stopping"]["best"]
        start = state["epoch"] if state else 0
        best = state["best"] if state else None
        history = list(state["history"]) if state else []
        self.last_epoch = start
        if state:
            self.log(f"resuming from {self.ckpt_dir / 'last.pt'} (epoch {start} of {cfg.train.epochs} done)")
        if history and history[-1].get("stopped_early"):
            self.log(f"this run already stopped early at epoch {start}; exporting its best checkpoint")
            return self._finish(start, best, True)
        # the trackers log the resolved config and the taxonomy fingerprint themselves
        logger = MetricLogger(self.run_dir, history, start_epoch=start, write=self.dist.is_main, trackers=trackers,
                              run_name=cfg.name, config=cfg.model_dump(mode="json"),
                              taxonomy_fingerprint=self.tax.fingerprint)
        try:
            best, stopped = self._run_epochs(logger, start, best)
            result = self._finish(start, best, stopped)
        except BaseException as exc:
            logger.close("killed" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise
        if self.dist.is_main and (self.run_dir / "metrics.json").exists():
            logger.log_artifact(self.run_dir / "metrics.json")
        logger.close()
        return result

    def _run_epochs(self, logger: MetricLogger, start: int, best: float | None) -> tuple[float | None, bool]:
        """Train and validate epoch by epoch from ``start``; (best value, stopped early)."""
        cfg = self.cfg
        mode = cfg.checkpoint.best_mode
        key = f"val/{cfg.checkpoint.best_metric}"
        for epoch in range(start + 1, cfg.train.epochs + 1):
            self.last_epoch = epoch
            t0 = time.time()
            task_sums = self._train_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            row.update({f"train/{k}": v for k, v in task_sums.items()})
            if len(self.loss_fn.tasks) > 1 or cfg.loss.weighting != "static":
                row.update({f"weight/{k}": v for k, v in self.weighting.current_weights().items()})
            row.update(self._validate())
            row["time_s"] = time.time() - t0
            value = row.get(key)
            problem = None
            if value is None and self.has_val and self.dist.is_main:
                problem = (f"checkpoint.best_metric={cfg.checkpoint.best_metric!r} is not a validation metric; "
                           f"choose one of: {', '.join(k[4:] for k in row if k.startswith('val/'))}")
            # only rank 0 has the metrics: it sends the one number that decides best checkpoint and early
            # stopping, so every rank takes the same decisions (and stops at the same epoch)
            value, problem = broadcast_object((value, problem), self.dist)
            if problem:
                raise ConfigError(problem)
            is_best = value is not None and (best is None or (value < best if mode == "min" else value > best))
            if is_best or (value is None and epoch == cfg.train.epochs):
                best = value
                is_best = True
            if is_best:
                self.best_epoch = epoch
            stopped = self.stopper is not None and self.stopper.step(epoch, value)
            if stopped:
                row["stopped_early"] = 1
            logger.log(row)
            self._save_epoch(epoch, best, logger.history, is_best)
            self.log(_epoch_line(row, cfg.train.epochs))
            if stopped:
                assert self.stopper is not None and self.stopper.best is not None
                self.log(f"early stopping: {cfg.checkpoint.best_metric} has not improved by more than "
                         f"{cfg.train.early_stopping_delta} for {cfg.train.early_stopping} epochs (best "
                         f"{self.stopper.best:.4f} at epoch {self.stopper.best_epoch})")
                return best, True
        return best, False

    def _seed_epoch(self, epoch: int) -> None:
        """Seed every random draw of the epoch (dropout, augmentation and DataLoader worker seeds, loss
        masking, mixup, metadata masking) by (seed, epoch, rank): the ranks draw differently from each
        other, as different samples of one process would, and a resumed run repeats its epochs' draws."""
        rank = self.dist.rank
        seed_everything(rank_seed(self.cfg.seed, epoch, rank))
        if self.mixup is not None:
            self.mixup.rng = np.random.default_rng(rank_seed(self.mixup_seed, epoch, rank))
        if self.masker is not None:
            self.masker.generator.manual_seed(rank_seed(self.cfg.seed + 1, epoch, rank))

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        cfg = self.cfg
        sums: dict[str, float] = {}
        count = 0
        self._seed_epoch(epoch)
        micro_step = (epoch - 1) * self.steps_per_epoch * self.accumulation_steps
        batches: Any = self._train_batches(epoch)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=self.steps_per_epoch * self.accumulation_steps,
                           desc=f"epoch {epoch}", leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        for mb in batches:
            targets = mb.targets
            (x_key, x), = mb.inputs.items()
            extra = {k: v[mb.rows].to(self.device) for k, v in self.train_attr.items()} or None
            kwargs: dict[str, torch.Tensor] = {}
            if self.train_meta is not None:
                kwargs["metadata"] = self.train_meta[0][mb.rows].to(self.device)
                kwargs["metadata_mask"] = self.masker(self.train_meta[1][mb.rows], step=epoch - 1).to(self.device)
            mixed = self.mixup(x, targets, step=epoch - 1) if self.mixup is not None else None
            if mixed is not None:
                x = mixed.inputs
                if kwargs and mixed.mode != "none":  # metadata is mixed like the inputs; present only if in both
                    values, mask = kwargs["metadata"], kwargs["metadata_mask"]
                    p = mixed.perm.to(values.device)
                    rows = mixed.mixed.to(values.device)[:, None]
                    kwargs["metadata"] = torch.where(rows, mixed.lam * values + (1 - mixed.lam) * values[p], values)
                    kwargs["metadata_mask"] = torch.where(rows, mask * mask[p], mask)
            self.loss_fn.set_step(micro_step)
            sync = mb.last or not self.dist.enabled
            unrefined = self.head_input is not None and self.weighting.is_update_step(micro_step)
            grad_losses: dict[str, torch.Tensor] | None = None
            with contextlib.nullcontext() if sync else self.step_fn.no_sync():
                with self.autocast():
                    if unrefined:
                        assert self.head_input is not None
                        self.head_input.active = True
                    try:
                        outputs = self.step_fn(**{x_key: x}, targets=mixed.targets if mixed is not None else targets,
                                               **kwargs)
                    finally:
                        if self.head_input is not None:
                            self.head_input.active = False
                    before_loss = _rng_states(self.device) if unrefined else None

                    def task_losses(outs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                        if mixed is None:
                            return self.loss_fn(outs, targets, extra)
                        # soft targets: lam * loss(own target) + (1 - lam) * loss(partner's target)
                        return mixture_loss(self.loss_fn, outs, mixed, extra_targets=extra)

                    losses = task_losses(outputs)
                    if before_loss is not None:
                        grad_losses = self._unrefined_losses(outputs, task_losses, before_loss, micro_step)
                if grad_losses is not None:
                    self.weighting.update(losses, self.shared_params, micro_step, grad_losses=grad_losses)
                else:
                    self.weighting.update(losses, self.shared_params, micro_step)
                if self.count_tasks:  # each rank's share of the global mean over labelled samples
                    losses = self._global_mean_shares(losses, targets, extra)
                total = self.weighting(losses)
                self.scaler.scale(total * mb.scale if mb.scale != 1.0 else total).backward()
            micro_step += 1
            if mb.last:
                if self.dist.enabled and self.weighting_params:  # learnable task weights sit outside DDP
                    for p in self.weighting_params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        p.grad = all_reduce_sum(p.grad, self.dist) / self.dist.world_size
                if cfg.train.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
            n = len(targets)
            count += n
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) * n
            for k, v in losses.items():
                sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + float(v.detach()) * n
        if self.dist.enabled:  # average the logged losses over all ranks' samples
            keys = sorted(sums)
            buf = all_reduce_sum(torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64),
                                 self.dist)
            sums, count = dict(zip(keys, buf[:-1].tolist())), int(buf[-1])
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _unrefined_losses(self, outputs: dict[str, torch.Tensor],
                          task_losses: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                          before_loss: tuple[torch.Tensor, torch.Tensor | None], micro_step: int
                          ) -> dict[str, torch.Tensor]:
        """The training loss evaluated on the head's plain per-level logits (GradNorm's measurement on
        a refined head): the head runs once more on the embedding of this forward (captured by
        :class:`HeadInput`, so the graph reaches the shared layer; nothing before the head runs
        again), with ``head.refine = False`` and its own dropout off; the loss replays the random
        draws of the training loss (null masking), and the run's random stream is left as it was."""
        assert self.head_input is not None
        h, self.head_input.value = self.head_input.value, None
        if h is None:  # the head was not called through a hookable module call (should not happen)
            raise RuntimeError("GradNorm's unrefined measurement did not see the head's input; set "
                               "loss.weighting_options.measure=outputs")
        head = self.model.head
        after_loss = _rng_states(self.device)
        dropout, was_refining = getattr(head, "dropout", None), head.refine
        drop_mode = dropout.training if isinstance(dropout, nn.Module) else None
        try:
            head.refine = False
            if isinstance(dropout, nn.Module):
                dropout.train(False)
            plain = head(h)
            _set_rng_states(before_loss, self.device)
            self.loss_fn.set_step(micro_step)
            return task_losses({**outputs, **plain})
        finally:
            head.refine = was_refining
            if isinstance(dropout, nn.Module) and drop_mode is not None:
                dropout.train(drop_mode)
            _set_rng_states(after_loss, self.device)

    def _global_mean_shares(self, losses: dict[str, torch.Tensor], targets: torch.Tensor,
                            extra: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """DDP: rescale each task's loss so that the rank-averaged gradient is that of the mean over the
        labelled samples of the whole (global) micro-batch, as in one process.

        A loss over a task that not every sample has is a mean over this rank's ``c`` labelled samples
        (of ``n``); DDP averages the ranks, and the loop scales by the rank's share of the batch. With
        ``C`` labelled samples in the ``N`` of all ranks, the multiplier ``N c / (n C)`` turns that into
        this rank's share of the global mean (one all-reduce of T + 1 counts). The count of a task is
        the number of samples with a target: ``attr/<name>`` targets >= 0 (the attribute loss's mean),
        taxonomy tasks targets >= 0 (exact for one-task losses; a per-level loss that also leaves out
        the levels below a partial label keeps the per-rank mean there, docs/scale.md). Pairs of mixup
        are a permutation of the batch, so both terms of the mixture have the same counts.
        """
        names = list(losses)
        valid = [extra[k] >= 0 if extra is not None and k in extra else targets >= 0 for k in names]
        local = torch.stack([v.sum() for v in valid]).double().cpu().tolist() + [float(len(targets))]
        glob = all_reduce_sum(torch.tensor(local, dtype=torch.float64), self.dist)
        n, big_n = float(len(targets)), float(glob[-1])
        out = {}
        for i, k in enumerate(names):
            c, big_c = float(local[i]), float(glob[i])
            out[k] = losses[k] * (big_n * c / (n * big_c)) if big_c > 0 else losses[k]
        return out

    def _read_best(self) -> dict[str, Any]:
        best_path = self.ckpt_dir / "best.pt"
        state = torch.load(best_path if best_path.exists() else self.ckpt_dir / "last.pt", map_location="cpu",
                           weights_only=False)
        return {k: state[k] for k in ("epoch", "model", "ema")}

    def _finish(self, start: int, best: float | None, stopped: bool = False) -> RunResult:
        # rank 0 reads the best checkpoint and sends it: every rank validates the same weights
        state = on_main(self._read_best, self.dist, state=True)
        assert state is not None
        self.model.load_state_dict(state["model"])
        if self.ema is not None:  # the averaged weights are the result
            self.ema.load_state_dict(state["ema"])
            self.model.load_state_dict(self.ema.module.state_dict())
            self.ema = None
        metrics = self._validate()
        metrics = {k[4:]: v for k, v in metrics.items()}
        if self.has_val and self.val_meta is not None:  # the same model when metadata is missing (collective)
            metrics.update({f"no_metadata/{k[4:]}": v for k, v in self._validate(use_metadata=False).items()})
        if metrics:
            metrics["epoch"] = state["epoch"]
        metrics = broadcast_object(metrics, self.dist)  # the same RunResult on every rank
        bundle_dir = self.run_dir / "bundle"
        epochs_run = self.last_epoch - start
        if not self.dist.is_main:
            barrier(self.dist)
            shutdown(self.dist)
            return RunResult(self.run_dir, bundle_dir, metrics, epochs_run, start, stopped, is_main=False)
        if metrics:
            atomic_write_json(self.run_dir / "metrics.json", metrics)
        extra: dict[str, Any] = {"epoch": state["epoch"], "val_metrics": metrics,
                                 "threshold": self.cfg.predict.threshold, "attributes": self.attr_vocab}
        if self.meta_encoder is not None:
            extra["metadata"] = {"encoder": self.meta_encoder.to_json(), "fusion": self.fusion_options}
        export_model, export_bb = self.model, self.backbone
        if self.cfg.model.backbone.lora is not None:  # fold the adapters in: the bundle loads without peft
            from ..models.lora import merge_lora

            export_model = merge_lora(self.model, inplace=False)
            export_bb = export_model.backbone
        bundle_dir = export_bundle(self.run_dir / "bundle", model=export_model, backbone=export_bb,
                                   taxonomy=self.tax, preprocess=self.preprocess, config=self.cfg, extra=extra)
        self.log(f"bundle: {bundle_dir}")
        barrier(self.dist)
        shutdown(self.dist)
        return RunResult(self.run_dir, bundle_dir, metrics, epochs_run, start, stopped)


class HeadInput:
    """Forward pre-hook on the head that keeps its input (the embedding) while ``active``: GradNorm's
    unrefined measurement runs the head on it once more (the loop sets ``active`` around the
    forward of a measurement step only, and takes ``value`` right after)."""

    def __init__(self) -> None:
        self.active = False
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.active and torch.is_grad_enabled() and args:
            self.value = args[0]


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state and, on CUDA, that of the device's generator."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_states(states: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


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
