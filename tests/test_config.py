"""The training config: validation errors name the key and the allowed values; overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest

from taxonomist.errors import ConfigError
from taxonomist.train.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_minimal_config_and_relative_paths(tmp_path):
    p = _write(tmp_path, "data: {train: imgs/train}\ntaxonomy: {path: tree.txt}\n")
    cfg = load_config(p)
    assert cfg.data.train == str((tmp_path / "imgs/train").resolve())
    assert cfg.taxonomy.path == str((tmp_path / "tree.txt").resolve())
    assert cfg.model.backbone.name == "efficientnet_lite0" and cfg.train.optimizer == "adamw"


def test_unknown_key_names_key_and_allowed(tmp_path):
    p = _write(tmp_path, "data: {train: x}\ntrain: {epochz: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.epochz" in msg and "unknown key" in msg and "epochs" in msg and "batch_size" in msg


@pytest.mark.parametrize("override, key, allowed", [
    ("data.split.bogus=1", "data.split.bogus", ["val", "test", "seed"]),                      # nested section
    ("model.neck.widths=[3]", "model.neck.widths", ["hidden", "dropout", "norm"]),            # two levels down
    ("data.metadata.bogus=1", "data.metadata.bogus", ["columns", "fusion", "mask_prob"]),     # X | None section
    ("model.backbone.lora.rr=1", "model.backbone.lora.rr", ["r", "alpha", "target_modules"]),  # optional, 3 deep
])
def test_unknown_key_in_nested_and_optional_sections_lists_allowed(tmp_path, override, key, allowed):
    p = _write(tmp_path, "data: {train: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    line = next(x for x in str(e.value).splitlines() if x.strip().startswith(key + ":"))
    listed = line.split("allowed keys here:", 1)[1].split(", ")
    assert [k.strip() for k in listed] and all(a in [k.strip() for k in listed] for a in allowed), line


def test_bad_value_names_allowed_values(tmp_path):
    p = _write(tmp_path, "data: {train: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.optimizer=adam"])
    msg = str(e.value)
    assert "train.optimizer" in msg and "'adamw'" in msg and "'sgd'" in msg and "'adam'" in msg


def test_missing_required_key(tmp_path):
    p = _write(tmp_path, "train: {epochs: 2}\n")
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config(p)


def test_overrides_are_yaml_typed(tmp_path):
    p = _write(tmp_path, "data: {train: x}\n")
    cfg = load_config(p, ["train.epochs=7", "train.lr=3e-4", "model.neck.hidden=[64,32]", "model.head.name=per_rank",
                          "loss.label_smoothing=0.1", "ranks=[genus,species]"])
    assert cfg.train.epochs == 7 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.neck.hidden == [64, 32] and cfg.model.head.name == "per_rank"
    assert cfg.loss.model_dump()["label_smoothing"] == 0.1 and cfg.ranks == ["genus", "species"]
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(p, ["train.epochs=0"])


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config)


def test_every_config_key_is_documented():
    doc = (REPO / "docs" / "config.md").read_text()

    import typing

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            section = [a for a in typing.get_args(ann) if hasattr(a, "model_fields")]  # X | None sections
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from keys(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"
                if section:
                    yield from keys(section[0], f"{prefix}{name}.")

    missing = [k for k in keys(Config) if f"`{k}`" not in doc]
    assert not missing, f"undocumented config keys: {missing}"
