"""Metadata encoding (periodic encodings, standardisation fitted on train, masks, JSON round trip),
scheduled masking rates, and the fusion module (gradients, fully masked == no metadata)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from taxonomist.data import SampleTable
from taxonomist.data.augment import ProbabilitySchedule
from taxonomist.data.metadata import (EncodedMetadata, MetadataEncoder, MetadataFusion, MetadataMasker, MetaField,
                                      metadata_ablation)
from taxonomist.errors import ConfigError, DataError

NAN = float("nan")


def _table(meta: dict, attrs: dict | None = None) -> SampleTable:
    n = len(next(iter(meta.values()))) if meta else len(next(iter(attrs.values())))
    return SampleTable.build([f"/img/{i}.jpg" for i in range(n)], meta=meta, attrs=attrs)


def _encode(kind: str, values, **kw) -> np.ndarray:
    enc = MetadataEncoder([MetaField(kind, ("x",), **kw)])
    return enc.fit_transform(_table({"x": values})).values


def test_day_of_year_is_periodic():
    v = _encode("day_of_year", [1, 366, 183, 92, 365.25 + 1])
    assert np.linalg.norm(v[0] - v[1]) < 0.01  # 1 January is next to 31 December (leap year)
    assert np.linalg.norm(v[0] - v[2]) > 1.99  # and opposite mid-year
    assert np.allclose(v[0], v[4], atol=1e-6)  # period 365.25 days
    np.testing.assert_allclose(v[3], [math.sin(2 * math.pi * 91 / 365.25), math.cos(2 * math.pi * 91 / 365.25)],
                               rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, rtol=1e-6)


def test_time_of_day_month_and_longitude_wrap():
    t = _encode("time_of_day", [0, 24, 12, 6])
    assert np.allclose(t[0], t[1], atol=1e-6) and np.allclose(t[2], [0, -1], atol=1e-6)
    assert np.allclose(t[3], [1, 0], atol=1e-6)
    m = _encode("cyclic", [0, 12, 6], period=12.0)
    assert np.allclose(m[0], m[1], atol=1e-6) and np.allclose(m[2], [0, -1], atol=1e-6)
    table = _table({"lat": [10.0, 10.0, 90.0, -33.9], "lon": [-180.0, 180.0, 45.0, 18.4]})
    sphere = MetadataEncoder.auto(table).fit_transform(table).values
    assert sphere.shape == (4, 3)
    assert np.allclose(sphere[0], sphere[1], atol=1e-6) and np.allclose(sphere[2], [0, 0, 1], atol=1e-6)
    lat, lon = math.radians(-33.9), math.radians(18.4)
    np.testing.assert_allclose(sphere[3], [math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon),
                                           math.sin(lat)], rtol=1e-6)
    sc = MetadataEncoder.auto(table, latlon_encoding="sincos").fit_transform(table).values
    assert sc.shape == (4, 4) and np.allclose(sc[0], sc[1], atol=1e-6)
    # Mac Aodha et al. 2019: sin/cos of pi*lon/180 and pi*lat/90
    np.testing.assert_allclose(sc[3], [math.sin(math.pi * 18.4 / 180), math.cos(math.pi * 18.4 / 180),
                                       math.sin(math.pi * -33.9 / 90), math.cos(math.pi * -33.9 / 90)], rtol=1e-5)


def test_dates_and_times_as_text():
    table = _table({"depth": [1.0, 2.0, 3.0, 4.0]},
                   attrs={"date": ["2019-01-01", "2020-12-31", "", "2021-07-02T10:00:00"],
                          "time": ["00:00", "18:30", "06:00:30", ""]})
    enc = MetadataEncoder.auto(table)
    assert [(f.kind, f.name) for f in enc.fields] == [("numeric", "depth"), ("day_of_year", "date"),
                                                       ("time_of_day", "time")]
    out = enc.fit_transform(table)
    doy = out.values[:, 1:3]
    ref = _encode("day_of_year", [1, 366, NAN, 183])
    np.testing.assert_allclose(doy, ref, atol=1e-6)
    np.testing.assert_allclose(out.values[1, 3:5], [math.sin(2 * math.pi * 18.5 / 24),
                                                    math.cos(2 * math.pi * 18.5 / 24)], rtol=1e-6)
    assert out.mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0]]
    bad = _table({"depth": [1.0, 2.0]}, attrs={"date": ["2019-01-01", "last tuesday"]})
    with pytest.raises(DataError, match="'attr_date' row 1: 'last tuesday' is not a date"):
        MetadataEncoder.auto(bad).fit(bad)


def test_numeric_standardised_with_train_statistics_and_missing_masked():
    train = _table({"depth_m": [10.0, 20.0, NAN, 30.0, 60.0], "temp": [4.0, 5.0, 6.0, NAN, 7.0]})
    val = _table({"depth_m": [30.0, NAN], "temp": [NAN, 4.0]})
    enc = MetadataEncoder.auto(train).fit(train)
    d = np.array([10.0, 20.0, 30.0, 60.0])
    assert enc.fields[0].mean == pytest.approx(d.mean()) and enc.fields[0].std == pytest.approx(d.std())
    out = enc.transform(val)
    assert out.values.dtype == np.float32 and out.values.shape == (2, 2)
    np.testing.assert_allclose(out.values[0], [(30 - d.mean()) / d.std(), 0.0], rtol=1e-6)
    t = np.array([4.0, 5.0, 6.0, 7.0])
    np.testing.assert_allclose(out.values[1], [0.0, (4 - t.mean()) / t.std()], rtol=1e-6)
    np.testing.assert_array_equal(out.mask, [[1, 0], [0, 1]])
    with pytest.raises(ConfigError, match="before fit"):
        MetadataEncoder.auto(train).transform(val)
    with pytest.raises(DataError, match="no value"):
        MetadataEncoder.auto(train).fit(_table({"depth_m": [NAN, NAN], "temp": [1.0, 2.0]}))
    with pytest.warns(UserWarning, match="constant"):
        MetadataEncoder([MetaField("numeric", ("temp",))]).fit(_table({"temp": [3.0, 3.0]}))


def test_latlon_missing_if_either_is_missing_and_invalid_values_are_errors():
    table = _table({"latitude": [NAN, 12.0, 5.0], "longitude": [3.0, NAN, 5.0]})
    out = MetadataEncoder.auto(table).fit_transform(table)
    assert out.mask[:, 0].tolist() == [0, 0, 1] and (out.values[:2] == 0).all()
    bad = _table({"latitude": [95.0], "longitude": [0.0]})
    with pytest.raises(DataError, match=r"'meta_latitude' row 0: 95.0 is outside -90..90"):
        MetadataEncoder.auto(bad).fit(bad)
    with pytest.raises(DataError, match="without its longitude"):
        MetadataEncoder.auto(["meta_lat", "meta_depth"])
    with pytest.raises(DataError, match="not in the sample table"):
        MetadataEncoder([MetaField("numeric", ("salinity",))]).fit(table)
    with pytest.raises(ConfigError, match="period"):
        MetaField("cyclic", ("month",))


def test_json_round_trip_gives_the_same_encoding():
    train = _table({"lat": [10.0, -5.0, 60.0], "lon": [100.0, -20.0, 5.0], "doy": [1.0, 200.0, NAN],
                    "depth": [5.0, 500.0, 50.0]})
    enc = MetadataEncoder.auto(train).fit(train)
    back = MetadataEncoder.from_json(json.loads(json.dumps(enc.to_json())))
    assert back == enc
    a, b = enc.transform(train), back.transform(train)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert enc.dim == 3 + 2 + 1 and enc.n_components == 3
    assert enc.component_index.tolist() == [0, 0, 0, 1, 1, 2]
    with pytest.raises(ConfigError, match="not a metadata encoder"):
        MetadataEncoder.from_json({"fields": []})


def test_masking_rates_follow_the_schedule():
    sched = ProbabilitySchedule(0.8, 0.2, "linear", 100)
    mask = torch.ones(20000, 3)
    mask[:, 2] = 0  # an already missing component stays missing
    m_all = MetadataMasker(sched, mode="all", seed=0)
    m_comp = MetadataMasker(sched, mode="components", seed=0)
    for step in (0, 50, 100, 400):
        p = sched(step)
        out = m_all(mask, step)
        dropped = out[:, :2].sum(dim=1) == 0
        assert abs(dropped.float().mean().item() - p) < 0.015
        assert ((out[:, 0] == out[:, 1])).all()  # all components of a sample together
        out = m_comp(mask, step)
        rates = 1 - out[:, :2].mean(dim=0)
        assert (rates - p).abs().max().item() < 0.015
        both = ((out[:, 0] == 0) & (out[:, 1] == 0)).float().mean().item()
        assert abs(both - p * p) < 0.015  # independent per component
        assert (out[:, 2] == 0).all()
    with pytest.raises(ConfigError, match="mode"):
        MetadataMasker(0.5, mode="some")


@pytest.mark.parametrize("mode", ["concat", "gate"])
def test_fusion_gradients_and_fully_masked_equals_no_metadata(mode):
    torch.manual_seed(0)
    comp = np.array([0, 0, 0, 1, 1, 2])
    fusion = MetadataFusion(16, comp, hidden=12, embed_dim=8, mode=mode)
    assert fusion.out_features == (24 if mode == "concat" else 16)
    feats = torch.randn(5, 16, requires_grad=True)
    meta = torch.randn(5, 6)
    mask = torch.ones(5, 3)
    out = fusion(feats, meta, mask)
    assert out.shape == (5, fusion.out_features)
    out.pow(2).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    garbage = torch.randn(5, 6) * 100
    with torch.no_grad():
        none = fusion(feats, None)
        assert torch.equal(fusion(feats, garbage, torch.zeros(5, 3)), none)
        part = mask.clone()
        part[:, 1] = 0
        changed = meta.clone()
        changed[:, 3:5] += 7.0  # only the masked component changes: no effect
        assert torch.equal(fusion(feats, meta, part), fusion(feats, changed, part))
        changed[:, 0] += 7.0  # an unmasked component changes: an effect
        assert not torch.equal(fusion(feats, meta, part), fusion(feats, changed, part))
    with pytest.raises(ConfigError, match="expected metadata"):
        fusion(feats, torch.randn(5, 4), mask)


def test_ablation_and_encoder_to_fusion():
    train = _table({"lat": [10.0, -5.0], "lon": [100.0, -20.0], "depth": [5.0, 50.0]})
    enc = MetadataEncoder.auto(train).fit(train)
    encoded: EncodedMetadata = enc.transform(train)
    values, mask = encoded.tensors()
    fusion = MetadataFusion.from_encoder(enc, 4, mode="gate")
    feats = torch.randn(2, 4)
    with torch.no_grad():
        res = metadata_ablation(lambda m: fusion(feats, values, m), mask, enc.component_names)
        assert set(res) == {"with", "without", "without_latlon", "without_depth"}
        assert torch.equal(res["without"], fusion(feats, None))
        assert not torch.equal(res["with"], res["without"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetadataMasker(ProbabilitySchedule.of({"start": 0.5}))


# ----------------------------------------------------------------------------- fields from a spec / the config
def test_inferred_kinds_follow_the_documented_rule_and_are_reported():
    lines: list[str] = []
    enc = MetadataEncoder.from_spec(["depth_m", "Latitude", "eventDate", "hour", "month", "meta_lon"], log=lines.append)
    assert [(f.name, f.kind, f.columns, f.period) for f in enc.fields] == [
        ("depth_m", "numeric", ("depth_m",), 0.0),
        ("latlon", "latlon", ("Latitude", "meta_lon"), 0.0),  # the pair takes the place of its first column
        ("eventDate", "day_of_year", ("eventDate",), 0.0),
        ("hour", "time_of_day", ("hour",), 0.0),
        ("month", "cyclic", ("month",), 12.0)]
    assert lines == [
        "metadata field 'depth_m': numeric, column depth_m (inferred: not a lat/lon, date, time or month name)",
        "metadata field 'latlon': latlon (sphere), columns Latitude, meta_lon (inferred: a latitude and a longitude "
        "name)",
        "metadata field 'eventDate': day_of_year, column eventDate (inferred: 'eventdate' is a date / day-of-year "
        "name)",
        "metadata field 'hour': time_of_day, column hour (inferred: 'hour' is a time name)",
        "metadata field 'month': cyclic (period 12), column month (inferred: 'month' is a month name)"]
    months = _table({"month": [1.0, 12.0, 7.0]})
    v = MetadataEncoder.from_spec(["month"]).fit_transform(months).values
    np.testing.assert_allclose(v[1], [math.sin(2 * math.pi), 1.0], atol=1e-6)  # December next to January's 0/12
    np.testing.assert_allclose(v[2], [math.sin(2 * math.pi * 7 / 12), math.cos(2 * math.pi * 7 / 12)], rtol=1e-6)


def test_day_is_ambiguous_and_needs_a_kind():
    table = _table({"day": [1.0, 15.0, 31.0], "depth": [1.0, 2.0, 3.0]})
    for spec in ("auto", ["day"], [{"name": "day"}]):
        with pytest.raises(ConfigError, match=r"'day' is ambiguous .*kind: day_of_year.*kind: cyclic, period: 31"):
            MetadataEncoder.from_spec(spec, table)
    lines: list[str] = []
    doy = MetadataEncoder.from_spec([{"name": "day", "kind": "day_of_year"}], table, log=lines.append)
    assert lines == ["metadata field 'day': day_of_year, column day (given)"]
    np.testing.assert_allclose(doy.fit_transform(table).values, _encode("day_of_year", [1.0, 15.0, 31.0]))
    dom = MetadataEncoder.from_spec([{"name": "day", "kind": "cyclic", "period": 31}, "depth"], table)
    out = dom.fit_transform(table).values
    np.testing.assert_allclose(out[:, :2], np.stack([np.sin(2 * np.pi * np.array([1, 15, 31]) / 31),
                                                     np.cos(2 * np.pi * np.array([1, 15, 31]) / 31)], axis=1),
                               atol=1e-6)
    assert [f.kind for f in dom.fields] == ["cyclic", "numeric"]
    # 'auto' still finds the other columns of a table without ambiguous names, with their kinds
    assert [f.kind for f in MetadataEncoder.from_spec("auto", _table({"depth": [1.0], "month": [3.0]})).fields] == [
        "numeric", "cyclic"]


def test_mappings_reach_cyclic_periods_and_the_sincos_encoding():
    table = _table({"lat": [10.0, -33.9], "lon": [-180.0, 18.4], "heading": [0.0, 90.0]})
    enc = MetadataEncoder.from_spec([{"kind": "latlon", "columns": ["lat", "lon"], "encoding": "sincos",
                                      "name": "where"}, {"name": "heading", "kind": "cyclic", "period": 360}])
    assert [(f.name, f.kind, f.encoding, f.period) for f in enc.fields] == [
        ("where", "latlon", "sincos", 0.0), ("heading", "cyclic", "sphere", 360.0)]
    v = enc.fit_transform(table).values
    assert v.shape == (2, 6)
    np.testing.assert_allclose(v[1, :4], [math.sin(math.pi * 18.4 / 180), math.cos(math.pi * 18.4 / 180),
                                          math.sin(math.pi * -33.9 / 90), math.cos(math.pi * -33.9 / 90)], rtol=1e-5)
    np.testing.assert_allclose(v[:, 4:], [[0.0, 1.0], [1.0, 0.0]], atol=1e-6)
    # an inferred pair uses latlon_encoding (data.metadata.latlon_encoding)
    assert MetadataEncoder.from_spec(["lat", "lon"], latlon_encoding="sincos").fields[0].encoding == "sincos"
    for bad, match in ((["lat", "latitude", "lon"], "several latitude columns"),
                       (["depth", "meta_depth"], "more than once"),
                       ([{"name": "x", "kind": "circular"}], "choose one of: latlon, day_of_year, time_of_day, cyclic"),
                       ([{"name": "x", "period": 3}], "period needs an explicit kind"),
                       ([{"name": "x", "kind": "numeric", "period": 3}], "period is for kind cyclic only"),
                       ([{"name": "x", "kind": "cyclic"}], "needs a period"),
                       ([{"kind": "latlon", "columns": ["lat"]}], r"columns: \[LATITUDE, LONGITUDE\]"),
                       ([{"name": "x", "kind": "numeric", "colour": 1}], "unknown key")):
        with pytest.raises(ConfigError, match=match):
            MetadataEncoder.from_spec(bad)


def _config(columns, **more):
    from taxonomist.train.config import load_config

    return load_config(base={"data": {"train": "unused", "metadata": {"columns": columns, **more}}})


def test_config_entries_are_validated_by_pydantic_and_build_the_encoder():
    import typing

    from taxonomist.data.metadata import FIELD_KINDS
    from taxonomist.train.config import MetadataColumnConfig

    kinds = typing.get_args(typing.get_args(MetadataColumnConfig.model_fields["kind"].annotation)[0])
    assert kinds == FIELD_KINDS  # the config's choices are the encoder's
    cfg = _config(["area", {"name": "angle", "kind": "cyclic", "period": 180},
                   {"kind": "latlon", "columns": ["lat", "lon"], "encoding": "sincos"}], latlon_encoding="sincos")
    cols = cfg.data.metadata.columns
    assert cols[0] == "area" and isinstance(cols[1], MetadataColumnConfig) and cols[1].period == 180.0
    enc = MetadataEncoder.from_spec(cols, latlon_encoding=cfg.data.metadata.latlon_encoding)
    assert [(f.name, f.kind, f.period, f.encoding) for f in enc.fields] == [
        ("area", "numeric", 0.0, "sphere"), ("angle", "cyclic", 180.0, "sphere"), ("latlon", "latlon", 0.0, "sincos")]
    # the resolved config.yaml loads back to the same columns
    from taxonomist.train.config import load_config

    assert load_config(base=cfg.model_dump(mode="json")).data.metadata == cfg.data.metadata
    for columns, match in (
            ([{"name": "x", "kind": "circular"}],
             r"entry 0: kind: Input should be 'latlon', 'day_of_year', 'time_of_day', 'cyclic' or 'numeric' "
             r"\(got 'circular'\)"),
            ([{"name": "x", "kind": "cyclic"}], "entry 0: kind cyclic needs a period"),
            (["a", {"name": "x", "kind": "cyclic", "period": -2}], r"entry 1: period: Input should be greater than 0"),
            ([{"name": "x", "kind": "time_of_day", "period": 24}], "period is for kind cyclic only"),
            ([{"name": "x", "encoding": "sincos"}], "encoding needs an explicit kind"),
            ([{"kind": "latlon", "name": "x"}], r"kind latlon needs columns: \[LATITUDE, LONGITUDE\] \(got None\)"),
            ([{"kind": "latlon", "columns": ["lat"]}], r"kind latlon needs columns: .* \(got \[.lat.\]\)"),
            ([{"kind": "numeric", "columns": ["a"]}], "columns is for kind latlon only"),
            ([{"name": "x", "knd": "cyclic"}], "entry 0: knd: unknown key; the keys are: name, kind, period, encoding, "
                                               "columns"),
            ("area", r"one column: \[area\]")):
        with pytest.raises(ConfigError, match=match):
            _config(columns)


def test_every_column_mapping_key_is_documented():
    from pathlib import Path

    from taxonomist.train.config import MetadataColumnConfig

    docs = Path(__file__).resolve().parents[1] / "docs"
    config_md, scale_md = (docs / "config.md").read_text(), (docs / "scale.md").read_text()
    for key in MetadataColumnConfig.model_fields:
        assert f"`{key}`" in config_md.split("<!-- keys:end -->")[1], key  # the entry table after the generated ones
        assert f"`{key}`" in scale_md, key
