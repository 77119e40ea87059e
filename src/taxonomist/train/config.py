"""The validated training configuration (pydantic + YAML).

Every key is documented in docs/config.md. Unknown keys and bad values are
errors that name the key and the allowed values. ``key=value`` overrides on the
command line use dotted paths (``train.epochs=5``, ``model.head.name=per_rank``)
and YAML syntax for values (``train.lr=3e-4``, ``model.neck.hidden=[512,256]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from typing_extensions import TypeAliasType

from ..errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaxonomyConfig(_Strict):
    path: str | None = Field(None, description="Tree file (any format `taxonomist taxonomy` reads). "
                                               "None: use the folder names of the training data as a flat tree.")
    format: str | None = Field(None, description="Force the tree file format instead of auto-detection.")
    label_nodes: Literal["observed", "leaves", "file"] = Field(
        "observed", description="Which nodes the model predicts over: every node that has training samples "
                                "('observed', NDSB semantics: an internal class means 'this node, not further "
                                "resolved'), only leaves ('leaves': samples at internal nodes are partial labels), "
                                "or the label nodes the tree file defines ('file').")
    restrict_to_observed: bool = Field(True, description="Drop tree branches with no training sample.")


class SplitConfig(_Strict):
    val: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction held out for validation when data.val is not given.")
    test: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction held out for testing when data.test is not given.")
    seed: int = Field(0, description="Seed of the stratified split.")


METADATA_KINDS = ("latlon", "day_of_year", "time_of_day", "cyclic", "numeric")  # data.metadata FIELD_KINDS


class MetadataColumnConfig(_Strict):
    """One entry of data.metadata.columns given as a mapping: the kind (and its options) set, not inferred."""

    name: str | None = Field(None, description="The column (bare name, or meta_<name> / attr_<name>); for kind "
                             "latlon the field's name (default 'latlon').")
    kind: Literal["latlon", "day_of_year", "time_of_day", "cyclic", "numeric"] | None = Field(
        None, description="How the column is encoded (docs/scale.md, 'Metadata'); None: inferred from the name, as "
                          "for a plain name.")
    period: float | None = Field(None, gt=0, description="kind cyclic only (required there): the period, e.g. 12 "
                                 "for months, 360 for compass degrees.")
    encoding: Literal["sphere", "sincos"] | None = Field(None, description="kind latlon only: 'sphere' (3 values) or "
                                                         "'sincos' (4; Mac Aodha et al. 2019); None: "
                                                         "data.metadata.latlon_encoding.")
    columns: list[str] | None = Field(None, description="kind latlon only (required there): [latitude column, "
                                      "longitude column].")

    @model_validator(mode="after")
    def _check_kind_options(self) -> MetadataColumnConfig:
        kind = self.kind
        if kind is None:
            extra = [k for k in ("period", "encoding", "columns") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} needs an explicit kind (one of: {', '.join(METADATA_KINDS)})")
            if not self.name:
                raise ValueError("give the column as name (and optionally its kind)")
            return self
        if self.period is not None and kind != "cyclic":
            raise ValueError("period is for kind cyclic only")
        if self.encoding is not None and kind != "latlon":
            raise ValueError("encoding is for kind latlon only")
        if kind == "latlon":
            if self.columns is None or len(self.columns) != 2:
                raise ValueError(f"kind latlon needs columns: [LATITUDE, LONGITUDE] (got {self.columns})")
        else:
            if self.columns is not None:
                raise ValueError(f"columns is for kind latlon only; give the {kind} column as name")
            if not self.name:
                raise ValueError(f"kind {kind} needs the column as name")
            if kind == "cyclic" and self.period is None:
                raise ValueError("kind cyclic needs a period (e.g. 12 for months, 360 for degrees)")
        return self


#: An entry of data.metadata.columns: a column name (kind inferred) or a mapping (MetadataColumnConfig).
MetadataColumn = TypeAliasType("MetadataColumn", Union[str, MetadataColumnConfig])


class MetadataConfig(_Strict):
    columns: list[MetadataColumn] | Literal["auto"] = Field(
        "auto", description="Metadata fields. 'auto': every meta_ column plus the date/time-named attr_ columns, kinds "
                            "inferred. Or a list; each entry is a column name (meta_<name> numbers; date/time "
                            "attr_<name> text; bare or full name), its kind inferred from the name, or a mapping "
                            "{name, kind, period, encoding, columns} that gives it: {name: month, kind: cyclic, "
                            "period: 12}, {kind: latlon, columns: [lat, lon], encoding: sincos}. Inference: a lat + "
                            "a lon name -> latlon; doy, day_of_year, date, eventdate -> day_of_year; time, hour, "
                            "time_of_day, eventtime -> time_of_day; month -> cyclic, period 12; 'day' (of the year "
                            "or of the month?) -> an error asking for the kind; else numeric. The training log prints "
                            "the kind each field got; the bundle stores the resolved fields and predict uses them.")
    latlon_encoding: Literal["sphere", "sincos"] = Field(
        "sphere", description="Encoding of a lat/lon pair whose kind is inferred (or given without encoding): "
                              "'sphere' (the point on the unit sphere) or 'sincos' (Mac Aodha et al. 2019).")

    @field_validator("columns", mode="before")
    @classmethod
    def _column_entries(cls, v: Any) -> Any:
        """Validate mapping entries one by one, so an error names the entry and its key (not pydantic's union)."""
        if not isinstance(v, list):
            if isinstance(v, str) and v != "auto":
                raise ValueError(f"give 'auto' or a list of column names / {{name, kind, ...}} mappings "
                                 f"(got {v!r}; one column: [{v}])")
            return v
        out = []
        for i, entry in enumerate(v):
            if isinstance(entry, dict):
                try:
                    entry = MetadataColumnConfig.model_validate(entry)
                except ValidationError as exc:
                    msgs = []
                    for err in exc.errors():
                        key = ".".join(str(p) for p in err["loc"])
                        if err["type"] == "extra_forbidden":
                            msg = f"unknown key; the keys are: {', '.join(MetadataColumnConfig.model_fields)}"
                        else:
                            msg = err["msg"].removeprefix("Value error, ")
                            if err["type"] != "value_error" and "input" in err:
                                msg += f" (got {err['input']!r})"
                        msgs.append(f"{key}: {msg}" if key else msg)
                    raise ValueError(f"entry {i}: " + "; ".join(msgs)) from None
            elif not isinstance(entry, (str, MetadataColumnConfig)):
                raise ValueError(f"entry {i} ({entry!r}) is neither a column name nor a {{name, kind, ...}} mapping")
            out.append(entry)
        return out
    fusion: Literal["concat", "gate"] = Field("concat", description="Join the metadata embedding to the image "
                                                                    "features ('concat') or gate them ('gate').")
    hidden: int = Field(64, ge=1, description="Hidden width of the metadata MLP.")
    embed_dim: int = Field(32, ge=1, description="Size of the metadata embedding.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the metadata embedding.")
    mask_prob: float | dict[str, Any] = Field(
        0.3, description="Probability of hiding a sample's metadata during training (a number, or a schedule "
                         "{start, end, kind (constant, linear or cosine), total_steps} counted in epochs), so the model "
                         "still works when metadata is missing.")
    mask_mode: Literal["all", "components"] = Field("all", description="Hide all of a sample's metadata at once, "
                                                                       "or each field independently.")


class DataConfig(_Strict):
    train: str = Field(..., description="Training data: image folder (root/<label>/*.jpg), CSV/TSV table or COCO JSON.")
    val: str | None = Field(None, description="Validation data (same kinds). None: split from train (data.split).")
    test: str | None = Field(None, description="Test data (same kinds); None: split from train when data.split.test > 0.")
    image_root: str | None = Field(None, description="Folder that relative image paths in a CSV/COCO file start from.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad rows/images: stop with a report, or skip "
                                                                     "them and print the report.")
    verify_images: Literal["header", "decode", "none"] = Field(
        "header", description="Check images before training: open headers (fast), fully decode, or not at all.")
    split: SplitConfig = SplitConfig()
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    metadata: MetadataConfig | None = Field(None, description="Per-sample metadata fused with the image features "
                                                              "(docs/scale.md, 'Metadata'); None: no metadata.")


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, description="Rank of each low-rank update (4-16 is usual).")
    alpha: float = Field(16.0, gt=0, description="Scale: the update is multiplied by alpha / r (2 r is usual).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on each adapter's input during training.")
    target_modules: list[str] | str | None = Field(
        None, description="Layers to adapt: null = every Linear and 1x1 Conv2d (docs/scale.md, 'LoRA adapters'); "
                          "a list of layer names or name suffixes; or one regular expression.")
    train_norm: bool = Field(False, description="Also train normalisation layers (BatchNorm then updates its "
                                                "statistics).")


class BackboneConfig(_Strict):
    name: str = Field("efficientnet_lite0", description="'efficientnet_lite0' (offline ImageNet weights) or any timm model name.")
    pretrained: bool | str = Field(True, description="True: packaged weights (efficientnet_lite0 only); a path: local "
                                                     "weights file; False: random init.")
    trainable: bool = Field(False, description="Fine-tune the backbone. False: frozen, features cached on disk.")
    image_size: int | None = Field(None, ge=16, description="Input size in pixels; None: the backbone's default.")
    multiscale: bool = Field(False, description="efficientnet_lite0 only: concatenate pooled mid-level stage outputs "
                                                "with the head (1984 features; better transfer to plankton, same cost).")
    lora: LoraConfig | None = Field(None, description="LoRA adapters (needs peft: pip install 'taxonomist[lora]'): the "
                                    "backbone trains through them only and gets images, not cached features. None: off.")


class NeckConfig(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [512], description="Widths of the embedding MLP ([] = none).")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    norm: Literal["none", "layer", "batch"] = Field("layer", description="Normalisation of the input features.")


class HeadConfig(_Strict):
    model_config = ConfigDict(extra="allow")
    name: str = Field("flat", description="A registered head (`taxonomist list heads`).")


class ModelConfig(_Strict):
    backbone: BackboneConfig = BackboneConfig()
    neck: NeckConfig = NeckConfig()
    head: HeadConfig = HeadConfig()
    attributes: list[str] = Field(default_factory=list, description="Extra categorical targets, one classifier each "
                                  "beside the taxonomic head: names of attr_<name> table columns (empty cells = "
                                  "unknown). Each becomes a task attr/<name> of the loss.")
    attribute_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the attribute classifiers.")


class LossConfig(_Strict):
    model_config = ConfigDict(extra="allow")
    name: str = Field("ce", description="A registered loss (`taxonomist list losses`).")
    task_weights: dict[str, float] = Field(default_factory=dict, description="Static weight per task name (default 1; "
                                           "loss.weighting=static only).")
    weighting: str = Field("static", description="Task weighting: 'static' (loss.task_weights), 'gradnorm' (Chen "
                                                 "et al. 2018) or 'uncertainty' (Kendall et al. 2018).")
    weighting_options: dict[str, Any] = Field(default_factory=dict, description="Options of the task weighting, "
                                              "e.g. {alpha: 1.5, lr: 0.025} for gradnorm; gradnorm's measure: "
                                              "unrefined (default: refined/conditional heads are measured on "
                                              "their plain per-level logits) or outputs (docs/models.md).")
    attribute_label_smoothing: float | dict[str, float] = Field(
        0.0, description="Label smoothing of the attribute heads' cross-entropy (model.attributes), each in [0, 1): "
                         "one number for every attribute, or {name: value} per attribute (attributes not named: 0). "
                         "Each attribute's static weight: loss.task_weights['attr/<name>'].")

    @field_validator("attribute_label_smoothing", mode="before")
    @classmethod
    def _check_attribute_smoothing(cls, v: Any) -> Any:
        """A number in [0, 1), or a mapping of attribute names to such numbers; errors name the entry."""
        def check(value: Any, name: str | None) -> float:
            where = f"entry {name!r} ({value!r})" if name is not None else "the value"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where} must be a number in [0, 1)")
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{where} must be in [0, 1) (the probability mass moved off the true class)")
            return float(value)

        if isinstance(v, dict):
            out = {}
            for name, value in v.items():
                if not isinstance(name, str) or not name:
                    raise ValueError(f"attribute names must be non-empty strings, got {name!r}")
                out[name] = check(value, name)
            return out
        if v is None:
            return 0.0
        if isinstance(v, (list, tuple, str)) or not isinstance(v, (int, float)):
            raise ValueError("give one number in [0, 1) for every attribute, or {name: value} per attribute")
        return check(v, None)


class TrainConfig(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with Nesterov momentum "
                                                                  "(train.momentum); both use train.weight_decay.")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR multiplier per optimiser step after "
                                                    "the warm-up: cosine from 1 down to 0 at the last step, or 1.")
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warm-up of the LR from lr/(w+1) to lr over this many "
                                 "epochs (w steps); cut to leave at least one step after it.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="Mixed precision: 'auto' uses bf16 on "
                                                                           "CUDA devices that support it, off on CPU.")
    compile: bool = Field(False, description="torch.compile the trainable part (CUDA only; ignored on CPU with a note).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    augment: bool | str | dict[str, Any] = Field(
        False, description="Training augmentation (trainable backbone only: cached features cannot be augmented): "
                           "false/'none', true/'flips', 'standard', 'randaugment', 'autoaugment', or a mapping "
                           "{name: ..., erasing: 0.25, ...} (docs/scale.md, 'Augmentation').")
    mixup: dict[str, Any] | None = Field(
        None, description="Taxon-grouped mixup/cutmix options, e.g. {mixup_alpha: 0.2, cutmix_alpha: 1.0, prob: 0.5, "
                          "group_rank: genus}; with a frozen backbone only feature mixup (cutmix_alpha 0). "
                          "None: off (docs/scale.md, 'Mixup').")
    accumulation_steps: int = Field(1, ge=1, description="Split each batch into this many micro-batches whose "
                                                          "gradients are summed before one optimiser step.")
    auto_batch_size: bool = Field(False, description="Find the largest micro-batch that fits in GPU memory (CUDA/MPS); "
                                  "train.batch_size stays the optimiser-step batch, split into micro-batches when it "
                                  "does not fit (the choice is kept in the run folder for resume). CPU: no search, a note.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an exponential moving average of the weights "
                                    "(e.g. 0.999); validation, the best checkpoint and the bundle use it.")
    early_stopping: int | None = Field(None, ge=1, description="Stop when checkpoint.best_metric has not improved "
                                       "for this many epochs (by more than early_stopping_delta); None: never.")
    early_stopping_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")
    feature_batch_size: int = Field(64, ge=1, description="Batch size for feature extraction.")
    feature_chunk_size: int = Field(512, ge=1, description="Images per file of the feature cache, on average (the "
                                    "unit that is written atomically, resumed, and split between DDP processes); "
                                    "512 is what taxonomist evaluate/predict use, another value computes new files.")
    dist_timeout_min: float | None = Field(60.0, gt=0, description="DDP: minutes any collective may wait (e.g. for "
                                           "the other processes to finish their share of feature extraction) before "
                                           "the job fails; None: torch's default (10 min with NCCL).")
    sync_batchnorm: bool = Field(False, description="DDP on GPUs: convert the model's BatchNorm layers (trainable "
                                 "backbone, neck norm=batch) to SyncBatchNorm, so batch statistics are those of the "
                                 "global batch; ignored with a note in one process and on CPU.")
    cache_dir: str | None = Field(None, description="Feature cache folder; None: $TAXONOMIST_CACHE or ~/.cache/taxonomist.")
    progress: bool = True
    tracking: list[str] = Field(default_factory=lambda: ["tensorboard"], description="Experiment trackers that receive "
                                "the config, the taxonomy fingerprint and every epoch's metrics: tensorboard, wandb, "
                                "mlflow (docs/tracking.md); []: metrics.csv only.")
    tracking_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Options by tracker, e.g. {wandb: {project: p, entity: e, mode: offline}, "
                                          "mlflow: {tracking_uri: 'http://host:5000', experiment: plankton}}.")

    @model_validator(mode="after")
    def _check_tracking(self) -> TrainConfig:
        from .tracking import check_tracking_config

        try:
            check_tracking_config(self.tracking, self.tracking_options)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


#: Direction of a metric by the last part of its name (``<level>/top1`` -> ``top1``): checkpoint.best_mode=auto.
LOWER_IS_BETTER = ("top<k>_error", "hdist@<k>", "mistake_severity", "mean_path_distance", "mean_rank_distance",
                   "ece", "haurc", "rank_violation_rate")
HIGHER_IS_BETTER = ("top<k>", "hp", "hr", "hf", "hp_macro", "hr_macro", "hf_macro", "accuracy", "coverage",
                    "balanced_accuracy", "macro_f1")


def metric_direction(name: str) -> Literal["min", "max"] | None:
    """'min' or 'max' for a metrics.json key (``top1_error``, ``genus/top1``, ``attr/sex/top1`` ...); None if
    the name is not one of LOWER_IS_BETTER / HIGHER_IS_BETTER."""
    import re

    last = re.sub(r"\d+", "<k>", name.rsplit("/", 1)[-1])
    if last in LOWER_IS_BETTER:
        return "min"
    if last in HIGHER_IS_BETTER:
        return "max"
    return None


class CheckpointConfig(_Strict):
    keep: int = Field(2, ge=1, description="How many epoch checkpoints to keep besides last and best.")
    best_metric: str = Field("top1_error", description="Validation metric that picks the best checkpoint: a "
                             "metrics.json key such as top1_error, hf, hdist@1, <rank>/top1 (e.g. genus/top1; "
                             "level2/top1 for an unranked tree) or attr/<name>/top1; checked against the run's "
                             "metric suite before training starts.")
    best_mode: Literal["auto", "min", "max"] = Field(
        "auto", validate_default=True,
        description="Whether lower ('min') or higher ('max') best_metric is better; 'auto': from the metric's name "
                    "(min for *_error, hdist@k, mistake_severity, mean_*_distance, ece, haurc, rank_violation_rate; "
                    "max for top<k>, hp/hr/hf (and _macro), accuracy, coverage, balanced_accuracy, macro_f1). The "
                    "resolved config.yaml records the direction chosen.")

    @field_validator("best_mode")
    @classmethod
    def _resolve_best_mode(cls, v: str, info: ValidationInfo) -> str:
        if v != "auto":
            return v
        metric = info.data.get("best_metric")
        if metric is None:  # best_metric itself is invalid: that error is reported
            return v
        direction = metric_direction(metric)
        if direction is None:
            raise ValueError(f"'auto' cannot tell whether lower or higher checkpoint.best_metric={metric!r} is "
                             f"better (it knows: lower {', '.join(LOWER_IS_BETTER)}; higher "
                             f"{', '.join(HIGHER_IS_BETTER)}); check the metric name or set best_mode to min or max")
        return direction
    every: int = Field(1, ge=1, description="Save an epoch checkpoint every N epochs (last.pt is written every epoch).")


class PredictConfig(_Strict):
    threshold: float = Field(0.8, gt=0, le=1, description="Back-off threshold used by the demo and as the bundle default.")
    top_k: int = Field(5, ge=1)


class Config(_Strict):
    name: str = Field("run", description="Run name (folder under output_dir).")
    output_dir: str = Field("runs", description="Where run folders are created.")
    seed: int = Field(0, description="Seeds Python, numpy and torch; shuffling uses seed and epoch.")
    taxonomy: TaxonomyConfig = TaxonomyConfig()
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    predict: PredictConfig = PredictConfig()
    ranks: list[str] | None = Field(None, description="Ranks for per-rank metrics and rank-step distance; None: "
                                                       "every rank of the tree (or depth levels when unranked).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v

    @model_validator(mode="after")
    def _check_attribute_loss_names(self) -> Config:
        """loss.attribute_label_smoothing may name only attributes the model has (model.attributes)."""
        smoothing = self.loss.attribute_label_smoothing
        attrs = [_bare_attribute(a) for a in self.model.attributes]
        if isinstance(smoothing, dict):
            unknown = [n for n in smoothing if _bare_attribute(n) not in attrs]
            if unknown:
                raise ValueError(f"loss.attribute_label_smoothing names {unknown}, which are not attribute heads; "
                                 f"model.attributes is {self.model.attributes or '[] (no attribute head)'}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _bare_attribute(name: str) -> str:
    """An attribute's name without its table-column (``attr_``) or task (``attr/``) prefix."""
    for prefix in ("attr_", "attr/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


# ------------------------------------------------------------------ loading
def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error" and not key:  # a check across sections: its message names the keys
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        if err["type"] == "extra_forbidden":
            parent_loc = err["loc"][:-1]
            allowed = _allowed_keys(parent_loc)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    lines.append("See docs/config.md for every key and its allowed values.")
    return "\n".join(lines)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class of a field annotation: ``X``, ``X | None``, ``Optional[X]`` -> ``X``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    sections = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return sections[0] if len(sections) == 1 else None


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        section = _section_model(field.annotation) if field is not None else None
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate.

    Relative data/taxonomy paths in the file are resolved against the file's folder.
    """
    data: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data.update(_resolve_paths(loaded, path.parent))
        source = str(path)
    data = apply_overrides(data, list(overrides or []))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


_PATH_KEYS = {("taxonomy", "path"), ("data", "train"), ("data", "val"), ("data", "test"), ("data", "image_root")}


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    for section, key in _PATH_KEYS:
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            p = Path(sec[key]).expanduser()
            if not p.is_absolute() and not sec[key].startswith("package:"):
                sec[key] = str((base / p).resolve())
    return data
