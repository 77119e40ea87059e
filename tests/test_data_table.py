"""SampleTable (columns, round trip, describe) and the seeded stratified splitter, on real plankton data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonomist.data import SampleTable, load_samples, split_samples
from taxonomist.data.splits import split_counts
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def flat_tax(plankton_dir: Path) -> Taxonomy:
    classes = sorted(p.name for p in (plankton_dir / "train").iterdir() if p.is_dir())
    return Taxonomy.from_parents([-1] + [0] * len(classes), ["root"] + classes)


@pytest.fixture(scope="module")
def train_table(plankton_dir: Path, flat_tax: Taxonomy) -> SampleTable:
    return load_samples(plankton_dir / "train", flat_tax, verify_images="none")


def small_table() -> SampleTable:
    return SampleTable.build(
        ["/data/a.jpg", "/data/a.jpg", "/data/b.png", "/data/c.jpg"],
        labels=["NA", "NA", "Aurelia", ""], nodes=[3, 3, 5, -1],
        boxes=np.array([[np.nan] * 4, [1.5, 2.25, 10.0, 1e-3], [np.nan] * 4, [0.1, 0.2, 0.3, 0.7]]),
        split=["train", "val", "test", ""], meta={"depth": [1.0, np.nan, 2.5e-7, 1234.5678901234]},
        attrs={"habitat": ["reef", "", "NA", "abyss"]})


def test_columns_and_dtypes():
    t = small_table()
    assert list(t.df.columns) == ["path", "box_x", "box_y", "box_w", "box_h", "label", "node", "split",
                                  "meta_depth", "attr_habitat"]
    assert t.df["node"].dtype == np.int64 and t.df["box_x"].dtype == np.float64
    assert t.nodes().tolist() == [3, 3, 5, -1] and len(t) == 4
    assert t.meta_columns == ["meta_depth"] and t.attr_columns == ["attr_habitat"]
    assert t.metadata().shape == (4, 1) and t.metadata().dtype == np.float32
    assert t.sample_keys()[0] == "/data/a.jpg|" and t.sample_keys()[1] == "/data/a.jpg|1.5,2.25,10.0,0.001"
    assert t.subset("val").df["path"].tolist() == ["/data/a.jpg"]
    assert t.subset(["train", "test"]).nodes().tolist() == [3, 5]
    assert t.with_nodes([0, 1, 2, 3]).nodes().tolist() == [0, 1, 2, 3] and t.nodes().tolist()[0] == 3
    with pytest.raises(DataError, match="unknown split"):
        t.subset("valid")
    with pytest.raises(DataError, match="split 'dev'"):
        SampleTable(pd.DataFrame({"path": ["a"], "split": ["dev"]}))
    with pytest.raises(DataError, match="unknown SampleTable column"):
        SampleTable(pd.DataFrame({"path": ["a"], "depth": [1.0]}))
    with pytest.raises(DataError, match="not an integer >= -1"):
        SampleTable(pd.DataFrame({"path": ["a"], "node": [-2]}))


def test_csv_round_trip_is_exact(tmp_path):
    t = small_table()
    t.to_csv(tmp_path / "t.csv")
    back = SampleTable.from_csv(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(back.df, t.df, check_exact=True)
    assert back.df["label"].tolist() == ["NA", "NA", "Aurelia", ""]  # "NA" is a name, not a missing value
    with pytest.raises(DataError, match="not a SampleTable CSV"):
        (tmp_path / "bad.csv").write_text("path,node\na.jpg,seven\n")
        SampleTable.from_csv(tmp_path / "bad.csv")


def test_describe_counts_match_a_direct_count(train_table, flat_tax, plankton_dir):
    d = train_table.describe(flat_tax)
    assert d["n_samples"] == 21233 and d["n_labels"] == 121 and d["n_labelled"] == 21233
    assert d["per_split"] == {"": 21233} and d["per_depth"] == {1: 21233}
    for cls in ("copepod_calanoid", "heteropod", "trichodesmium_puff"):
        assert d["per_label"][cls] == len(list((plankton_dir / "train" / cls).iterdir()))
    counts = list(d["per_label"].values())
    assert counts == sorted(counts, reverse=True)
    assert "21233 samples" in train_table.summary(flat_tax)


# ----------------------------------------------------------------- splitting
def test_split_counts_rule():
    n_val, n_test = split_counts(np.array([1, 2, 4, 5, 10, 15, 100]), 0.1, 0.2)
    # round half up per class, then at least one sample stays in train (test gives back first)
    assert n_val.tolist() == [0, 0, 0, 1, 1, 2, 10]
    assert n_test.tolist() == [0, 0, 1, 1, 2, 3, 20]
    n_val, n_test = split_counts(np.array([2, 3]), 0.45, 0.45)
    assert (n_val + n_test).tolist() == [1, 2] and n_test.tolist() == [0, 1]


def test_split_is_stratified_and_matches_the_rule(train_table):
    s = split_samples(train_table, val=0.1, test=0.05, seed=3)
    df = s.df
    assert set(df["split"]) == {"train", "val", "test"}
    sizes = df.groupby("node").size()
    n_val, n_test = split_counts(sizes.to_numpy(), 0.1, 0.05)
    got = df.groupby(["node", "split"]).size().unstack(fill_value=0).loc[sizes.index]
    np.testing.assert_array_equal(got["val"].to_numpy(), n_val)
    np.testing.assert_array_equal(got["test"].to_numpy(), n_test)
    assert (got["train"] >= 1).all()
    assert math.isclose(len(s.subset("val")) / len(s), 0.1, abs_tol=0.01)
    # the rows themselves are unchanged
    pd.testing.assert_frame_equal(s.df.drop(columns="split"), train_table.df.drop(columns="split"))


def test_split_ignores_row_order_and_depends_on_seed(train_table):
    a = split_samples(train_table, val=0.2, seed=7)
    perm = np.random.default_rng(0).permutation(len(train_table))
    b = split_samples(train_table.select(perm), val=0.2, seed=7)
    split_a = dict(zip(a.df["path"], a.df["split"]))
    split_b = dict(zip(b.df["path"], b.df["split"]))
    assert split_a == split_b
    c = split_samples(train_table, val=0.2, seed=8)
    changed = (a.df["split"] != c.df["split"]).mean()
    assert 0.1 < changed < 0.5
    # an independent reference: within each class, val = the n_val smallest keyed hashes
    import hashlib

    key = (7).to_bytes(16, "little", signed=True)
    rows = a.df[a.df["label"] == "heteropod"]
    hashes = [int.from_bytes(hashlib.blake2b(f"{p}|".encode(), digest_size=8, key=key).digest(), "little")
              for p in rows["path"]]
    n_val = int(math.floor(len(rows) * 0.2 + 0.5))
    expect_val = set(rows["path"].to_numpy()[np.argsort(hashes)[:n_val]])
    assert set(rows.loc[rows["split"] == "val", "path"]) == expect_val


def test_split_bad_fractions(train_table):
    with pytest.raises(ConfigError, match="split fractions"):
        split_samples(train_table, val=0.6, test=0.5)
