"""A trained model as one self-describing folder: weights, config, taxonomy, preprocessing.

``evaluate`` and ``predict`` load a bundle without the original config file::

    bundle/
      bundle.json      format version, backbone spec + weights key, head/neck config,
                       taxonomy fingerprint, label names, decision defaults, calibration
      model.pt         state dict (neck + head; the backbone too when it was trained)
      taxonomy.json    the training taxonomy (taxonomist's JSON format)
      preprocess.json  image size, resize mode, normalisation
      config.yaml      the resolved training config (for the record)

A frozen packaged backbone (the offline default EfficientNet-Lite0 with its
installed ImageNet weights) is not copied into the bundle; its weights key is
stored and checked when the bundle is loaded, so a bundle never silently runs on
other weights. Every other frozen backbone (a timm model, random init or from a
local weights file; Lite0 random or from a file) has its weights saved in
``model.pt`` under ``backbone.`` (``backbone.weights_in_bundle`` in bundle.json),
so the bundle does not depend on that file or on how a random init is drawn; it
keeps the training run's weights key, so the feature cache still serves it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import Preprocess
from .errors import DataError
from .utils.io import atomic_torch_save, atomic_write_json, atomic_write_text

BUNDLE_FORMAT = "taxonomist-bundle"
BUNDLE_VERSION = 1
BACKBONE_PREFIX = "backbone."
"""Prefix of a frozen backbone's weights in model.pt (``backbone.weights_in_bundle``)."""


def is_packaged_backbone(name: str, pretrained: bool | str) -> bool:
    """True for the weights installed with taxonomist (the offline EfficientNet-Lite0 ImageNet weights),
    which a bundle references by weights key instead of copying."""
    from .models.backbones import OFFLINE_DEFAULT

    if isinstance(pretrained, str):
        pretrained = {"true": True, "yes": True}.get(pretrained.strip().lower(), pretrained)
    return name == OFFLINE_DEFAULT and pretrained is True


def export_bundle(out_dir: str | Path, *, model: nn.Module, backbone: nn.Module, taxonomy, preprocess: Preprocess,
                  config, extra: dict[str, Any] | None = None) -> Path:
    """Write a bundle folder (each file atomically; bundle.json last, so a bundle is complete when it exists)."""
    from .taxonomy import save as save_taxonomy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bb = config.model.backbone
    state = model.state_dict()
    includes_backbone = getattr(model, "backbone", None) is not None
    weights_in_bundle = not includes_backbone and not is_packaged_backbone(bb.name, bb.pretrained)
    if weights_in_bundle:  # a frozen backbone that is not installed with taxonomist: its weights travel along
        state = {**state, **{f"{BACKBONE_PREFIX}{k}": v for k, v in backbone.state_dict().items()}}
    atomic_torch_save(out / "model.pt", state)
    save_taxonomy(taxonomy, out / "taxonomy.json")
    atomic_write_json(out / "preprocess.json", preprocess.to_json())
    atomic_write_text(out / "config.yaml", config.to_yaml())
    meta = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
        "backbone": {"name": bb.name, "pretrained": bb.pretrained,
                     "trainable": bb.trainable or getattr(bb, "lora", None) is not None,
                     "lora": bb.lora.model_dump() if getattr(bb, "lora", None) is not None else None,
                     "multiscale": bb.multiscale,
                     "weights_key": backbone.weights_key, "weights_id": backbone.weights_id,
                     "num_features": backbone.num_features,
                     "in_model_state": includes_backbone, "weights_in_bundle": weights_in_bundle},
        "neck": config.model.neck.model_dump(), "head": config.model.head.model_dump(),
        "taxonomy_fingerprint": taxonomy.fingerprint, "labels": taxonomy.label_names,
        "ranks": config.ranks, "calibration": {}, **(extra or {}),
    }
    atomic_write_json(out / "bundle.json", meta)
    return out


@dataclass
class Bundle:
    path: Path
    model: nn.Module
    taxonomy: Any
    preprocess: Preprocess
    meta: dict[str, Any]
    device: torch.device
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def ranks(self) -> list[str] | None:
        return self.meta.get("ranks")

    @property
    def temperature(self) -> float:
        """The calibrated softmax temperature (1.0 when the bundle is not calibrated)."""
        return float(self.calibration.get("temperature") or 1.0)

    @property
    def attributes(self) -> dict[str, list[str]]:
        """``{name: class values}`` of the attribute heads (empty without any)."""
        return dict(self.meta.get("attributes") or {})

    def label_probs(self, table, *, cache_dir: Path | None = None, batch_size: int = 64, num_workers: int = 0,
                    progress: bool = True, calibrated: bool = True) -> np.ndarray:
        """Probabilities over label nodes for every row of a SampleTable (see :meth:`predict`)."""
        return self.predict(table, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                            progress=progress, calibrated=calibrated)[0]

    @torch.no_grad()
    def predict(self, table, *, cache_dir: Path | None = None, batch_size: int = 64, num_workers: int = 0,
                progress: bool = True, calibrated: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(probabilities over label nodes, ``{attribute name: class probabilities}``) for every row.

        A frozen backbone goes through the feature cache (so evaluating the
        training run's validation set costs nothing). Each image's result is
        independent of the rest of its batch (eval mode, frozen statistics).
        ``calibrated``: apply the calibrated temperature (``taxonomist calibrate``);
        ``False`` gives the model's raw probabilities (what calibration is fitted on).
        """
        from .data import ImageDataset, build_transform, extract_features

        self.model.eval()
        temperature = self.temperature if calibrated else 1.0
        meta = self.encode_metadata(table)
        outs = []
        attrs: dict[str, list[np.ndarray]] = {name: [] for name in self.attributes}

        def collect(o: dict[str, torch.Tensor]) -> None:
            outs.append(self._probs(o, temperature))
            for name in attrs:
                attrs[name].append(torch.softmax(o[f"attr/{name}"].float(), dim=-1).cpu().numpy())

        def kwargs(lo: int, n: int) -> dict[str, torch.Tensor]:
            if meta is None:
                return {}
            return {"metadata": meta[0][lo:lo + n].to(self.device), "metadata_mask": meta[1][lo:lo + n].to(self.device)}

        # the feature cache only serves a packaged frozen backbone (a trained one's features are its own)
        if not (self.meta["backbone"]["trainable"] or self.meta["backbone"]["in_model_state"]) \
                and cache_dir is not None:
            feats = extract_features(self.model.backbone, self.model.backbone.cache_key, table, self.preprocess,
                                     cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                                     device=self.device, progress=progress)
            feats = torch.as_tensor(np.asarray(feats, dtype=np.float32))
            for lo in range(0, len(feats), 1024):
                chunk = feats[lo:lo + 1024]
                collect(self.model(features=chunk.to(self.device), **kwargs(lo, len(chunk))))
        else:
            ds = ImageDataset(table, build_transform(self.preprocess, train=False))
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
            lo = 0
            for images, _, _ in loader:
                collect(self.model(images=images.to(self.device), **kwargs(lo, len(images))))
                lo += len(images)
        if not outs:
            return (np.zeros((0, self.taxonomy.n_labels), dtype=np.float64),
                    {n: np.zeros((0, len(c))) for n, c in self.attributes.items()})
        return (np.concatenate(outs).astype(np.float64),
                {name: np.concatenate(parts).astype(np.float64) for name, parts in attrs.items()})

    @property
    def metadata_encoder(self):
        """The fitted MetadataEncoder of a model trained with metadata (None otherwise)."""
        info = self.meta.get("metadata")
        if not info:
            return None
        from .data.metadata import MetadataEncoder

        return MetadataEncoder.from_json(info["encoder"])

    def encode_metadata(self, table) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values, mask) for a model trained with metadata, or None.

        A table with none of the metadata columns is predicted without metadata (the model was
        trained with metadata masking for this), with a warning; a table with some but not all of
        them is an error (rename or add the missing columns).
        """
        enc = self.metadata_encoder
        if enc is None:
            return None
        cols = [c for f in enc.fields for c in f.columns]
        have = set(table.df.columns)
        present = [c for c in cols if {c, "meta_" + c, "attr_" + c} & have]
        if not present:
            import warnings

            warnings.warn(f"the model was trained with metadata ({', '.join(cols)}) but the input has none of these "
                          "columns; predicting without metadata", stacklevel=2)
            return None
        if len(present) < len(cols):
            raise DataError(f"the input has metadata columns {present} but lacks {sorted(set(cols) - set(present))}; "
                            "give all of them (empty cells are fine) or none")
        return enc.transform(table).tensors()

    def _probs(self, outputs: dict[str, torch.Tensor], temperature: float) -> np.ndarray:
        logp = self.model.label_log_probs(outputs).float()
        if temperature != 1.0:
            logp = torch.log_softmax(logp / temperature, dim=-1)
        return logp.exp().cpu().numpy()

    def save_calibration(self, calibration: dict[str, Any]) -> None:
        """Store the calibration in bundle.json (atomically) and use it from now on.

        Keys read back: ``temperature`` (applied by :meth:`label_probs`),
        ``thresholds`` (a float or ``{rank: float | None}``, the default of the
        threshold decision in ``taxonomist predict``) and ``darts_lambda`` (the
        default of ``--decision darts``); the rest is provenance (target accuracy,
        number of samples, ECE before/after). ``{}`` removes the calibration.
        """
        temperature = calibration.get("temperature")
        if temperature is not None and not (isinstance(temperature, (int, float)) and 0 < float(temperature) < 1e6):
            raise DataError(f"calibration temperature must be a positive number, got {temperature!r}")
        self.calibration = dict(calibration)
        self.meta["calibration"] = self.calibration
        atomic_write_json(self.path / "bundle.json", self.meta)


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    from .models import create_backbone, create_model
    from .taxonomy import load as load_taxonomy

    path = Path(path)
    meta_path = path / "bundle.json"
    if not meta_path.exists():
        hint = " (a run folder? its bundle is in the 'bundle' sub-folder)" if (path / "bundle").is_dir() else ""
        raise DataError(f"{path} is not a taxonomist bundle: {meta_path.name} is missing{hint}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != BUNDLE_FORMAT or meta.get("version", 0) > BUNDLE_VERSION:
        raise DataError(f"{meta_path}: unsupported bundle format {meta.get('format')!r} v{meta.get('version')}; "
                        f"this taxonomist reads {BUNDLE_FORMAT} v{BUNDLE_VERSION}")
    taxonomy = load_taxonomy(path / "taxonomy.json")
    if taxonomy.fingerprint != meta["taxonomy_fingerprint"]:
        raise DataError(f"{path}: taxonomy.json does not match the bundle (fingerprint "
                        f"{taxonomy.fingerprint} vs {meta['taxonomy_fingerprint']}); the bundle was modified")
    preprocess = Preprocess.from_json(json.loads((path / "preprocess.json").read_text()))
    bb = meta["backbone"]
    in_bundle = bool(bb.get("weights_in_bundle"))
    backbone = create_backbone(bb["name"], pretrained=bb["pretrained"] if not (bb["in_model_state"] or in_bundle)
                               else False, trainable=False, image_size=preprocess.image_size,
                               multiscale=bool(bb.get("multiscale", False)))
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    if in_bundle:  # the frozen backbone's own weights, saved with the model: the same function as in training
        bb_state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
        try:
            backbone.load_state_dict(bb_state, strict=True)
        except RuntimeError as exc:
            raise DataError(f"{path}: the backbone weights in model.pt do not fit {bb['name']!r} as built here "
                            f"({str(exc).splitlines()[0]}); was the bundle made with another timm version?") from None
        backbone.weights_id = bb["weights_id"]  # the identity of the trained-with weights (feature cache key)
    extras: dict[str, Any] = {
        "attributes": {n: len(v) for n, v in (meta.get("attributes") or {}).items()} or None,
        "metadata": (meta.get("metadata") or {}).get("fusion")}
    if bb["in_model_state"]:
        model = create_model(taxonomy, backbone=backbone, in_features=bb["num_features"], neck=meta["neck"],
                             head=meta["head"], **extras)
        model.load_state_dict(state)
    else:
        if backbone.weights_key != bb["weights_key"]:
            raise DataError(f"{path}: the backbone weights installed here ({backbone.weights_key}) differ from the "
                            f"ones the bundle was trained with ({bb['weights_key']}); install the same weights package")
        model = create_model(taxonomy, backbone=None, in_features=bb["num_features"], neck=meta["neck"],
                             head=meta["head"], **extras)
        model.load_state_dict(state)
        model.backbone = backbone
    dev = torch.device(device)
    model.to(dev).eval()
    return Bundle(path, model, taxonomy, preprocess, meta, dev, dict(meta.get("calibration") or {}))
