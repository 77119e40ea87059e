"""loss.attribute_label_smoothing: validated in the config, kept through the resolved config.yaml,
and used by the loss the training loop builds (the value checked against a hand computation)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from taxonomist.errors import ConfigError
from taxonomist.models import create_model
from taxonomist.taxonomy import load
from taxonomist.train.config import load_config
from taxonomist.train.loop import build_loss, config_hash


def _write(tmp_path, loss: dict, attributes=("shape", "view")):
    cfg = {"data": {"train": "train.csv"}, "model": {"attributes": list(attributes)}, "loss": loss}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_round_trip_overrides_and_errors(tmp_path):
    path = _write(tmp_path, {"name": "ce", "attribute_label_smoothing": {"shape": 0.2, "attr_view": 0}})
    cfg = load_config(path)
    assert cfg.loss.attribute_label_smoothing == {"shape": 0.2, "attr_view": 0.0}
    # the resolved config (config.yaml of a run, the bundle's copy) reads back to the same config
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    back = load_config(again)
    assert back.model_dump() == cfg.model_dump() and config_hash(back) == config_hash(cfg)
    # one number for every attribute, from the command line
    one = load_config(path, ["loss.attribute_label_smoothing=0.1"])
    assert one.loss.attribute_label_smoothing == 0.1 and config_hash(one) != config_hash(cfg)
    # the default is left out of the run's hash, so runs from before the key existed still resume
    plain = load_config(_write(tmp_path, {"name": "ce"}))
    assert plain.loss.attribute_label_smoothing == 0.0

    bad = {
        "1.5": r"loss.attribute_label_smoothing: .*the value must be in \[0, 1\).*\(got 1.5\)",
        "{shape: -0.1}": r"loss.attribute_label_smoothing: .*entry 'shape' \(-0.1\) must be in \[0, 1\)",
        "{shape: high}": r"loss.attribute_label_smoothing: .*entry 'shape' \('high'\) must be a number",
        "[0.1]": r"loss.attribute_label_smoothing: .*one number .* or \{name: value\}",
        "{colour: 0.1}": r"loss.attribute_label_smoothing names \['colour'\], which are not attribute heads",
    }
    for value, pattern in bad.items():
        with pytest.raises(ConfigError, match=pattern):
            load_config(path, [f"loss.attribute_label_smoothing={value}"])
    with pytest.raises(ConfigError, match=r"no attribute head"):
        load_config(_write(tmp_path, {"name": "ce", "attribute_label_smoothing": {"shape": 0.1}}, attributes=()))


def _hand_ce(logits: list[list[float]], targets: list[int], eps: float) -> float:
    """Mean over the samples with a target of (1 - eps) * -log p_y + eps * mean_c -log p_c, in plain Python."""
    total, n = 0.0, 0
    for row, y in zip(logits, targets):
        if y < 0:
            continue
        lse = math.log(sum(math.exp(z) for z in row))
        nll = [lse - z for z in row]
        total += (1 - eps) * nll[y] + eps * sum(nll) / len(row)
        n += 1
    return total / n


def _values(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items()}


def test_the_loop_loss_smooths_each_attribute_as_configured(tmp_path, shared_data):
    tax = load(shared_data / "plankton" / "class_paths.tsv")
    torch.manual_seed(0)
    model = create_model(tax, in_features=8, head="per_rank", neck={"hidden": [8]}, attributes={"shape": 2, "view": 3})
    out = model(features=torch.randn(6, 8))
    y = torch.as_tensor(tax.label_ids[:6])
    extra = {"attr/shape": torch.tensor([0, 1, 1, -1, 0, 1]), "attr/view": torch.tensor([2, 0, -1, 1, 1, 0])}
    attrs = {"shape": 2, "view": 3}
    cfg = load_config(_write(tmp_path, {"name": "per_rank_ce", "attribute_label_smoothing": {"shape": 0.3}}))
    smoothed = _values(build_loss(cfg.loss, tax, model.head, attrs)(out, y, extra))
    unsmoothed = _values(build_loss(load_config(_write(tmp_path, {"name": "per_rank_ce"})).loss, tax, model.head,
                                    attrs)(out, y, extra))
    logits = {k: out[k].detach().tolist() for k in extra}
    targets = {k: v.tolist() for k, v in extra.items()}
    assert (smoothed["attr/shape"]) == pytest.approx(_hand_ce(logits["attr/shape"], targets["attr/shape"], 0.3),
                                                          rel=1e-6)
    assert (unsmoothed["attr/shape"]) == pytest.approx(_hand_ce(logits["attr/shape"], targets["attr/shape"], 0),
                                                            rel=1e-6)
    # the change is eps * (mean_c -log p_c - (-log p_y)) averaged over the labelled samples
    assert (smoothed["attr/shape"] - unsmoothed["attr/shape"]) == pytest.approx(
        0.3 * (_hand_ce(logits["attr/shape"], targets["attr/shape"], 1.0 - 1e-12)
               - _hand_ce(logits["attr/shape"], targets["attr/shape"], 0.0)), rel=1e-5)
    # view is not named: unsmoothed; the taxonomy tasks are untouched
    assert (smoothed["attr/view"]) == pytest.approx(_hand_ce(logits["attr/view"], targets["attr/view"], 0),
                                                         rel=1e-6)
    for level in model.head.levels:
        assert (smoothed[level]) == (unsmoothed[level])
    # one number: every attribute
    every = _values(build_loss(load_config(_write(tmp_path, {"name": "per_rank_ce",
                                                             "attribute_label_smoothing": 0.1})).loss,
                               tax, model.head, attrs)(out, y, extra))
    for k in extra:
        assert (every[k]) == pytest.approx(_hand_ce(logits[k], targets[k], 0.1), rel=1e-6), k


def test_build_loss_refuses_smoothing_it_cannot_apply(tmp_path, shared_data):
    tax = load(shared_data / "plankton" / "class_paths.tsv")
    model = create_model(tax, in_features=8, head="flat", attributes={"shape": 2, "view": 3})
    # a composite loss holds its own attribute options: the config key would be ignored, so it is an error
    cfg = load_config(_write(tmp_path, {"name": "composite", "attributes": ["shape", "view"],
                                        "attribute_label_smoothing": 0.1}))
    with pytest.raises(ConfigError, match="already holds the attribute losses"):
        build_loss(cfg.loss, tax, model.head, {"shape": 2, "view": 3})
    cfg = load_config(_write(tmp_path, {"name": "composite", "attributes": ["shape", "view"]}))
    assert build_loss(cfg.loss, tax, model.head, {"shape": 2, "view": 3}).tasks == ("labels", "attr/shape", "attr/view")
    # no attribute head in the run (e.g. the config's attributes had no column): the key is an error
    cfg = load_config(_write(tmp_path, {"name": "ce", "attribute_label_smoothing": 0.2}))
    with pytest.raises(ConfigError, match="no attribute head"):
        build_loss(cfg.loss, tax, model.head, {})
