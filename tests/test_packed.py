"""Packed HDF5 data on real NDSB plankton images: exact parity with the folder pipeline, the stored
taxonomy guarding node ids, shards, atomic writes, unreadable images, DataLoader workers, the CLI."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from taxonomist.cli.main import main
from taxonomist.data import ImageDataset, Preprocess, SampleTable, build_transform, load_rgb, load_samples
from taxonomist.data.hdf5 import PackedDataset, PackedFile, pack_table, resolve_shards
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Taxonomy, load

CLASSES = ("chaetognath_sagitta", "copepod_calanoid", "amphipods", "protist_other", "trichodesmium_puff",
           "diatom_chain_tube")


@pytest.fixture(scope="module")
def tax(plankton_dir: Path) -> Taxonomy:
    return load(plankton_dir / "class_paths.tsv")


@pytest.fixture(scope="module")
def folder(plankton_dir: Path, tmp_path_factory) -> Path:
    """A labelled folder of 8 real images per class (some larger than 64 px, some smaller)."""
    root = tmp_path_factory.mktemp("plankton_small")
    for cls in CLASSES:
        (root / cls).mkdir()
        for f in sorted((plankton_dir / "train" / cls).iterdir())[:8]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="module")
def table(folder: Path, tax: Taxonomy) -> SampleTable:
    return load_samples(folder, tax)


@pytest.fixture(scope="module")
def packs(table: SampleTable, tax: Taxonomy, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("packs")
    res = {}
    for enc in ("raw", "jpeg"):
        r = pack_table(table, tax, out / f"{enc}.h5", image_size=64, encoding=enc, source="test")
        assert r.n_samples == len(table) and r.n_failed == 0 and r.shards == [out / f"{enc}.h5"]
        res[enc] = out / f"{enc}.h5"
    return res


def test_raw_pack_gives_exactly_the_folder_tensors(packs, table, tax):
    p = Preprocess(image_size=64)
    tr = build_transform(p, train=False)
    ref = ImageDataset(table, tr)
    ds = PackedDataset(packs["raw"], tr, taxonomy=tax)
    assert len(ds) == len(table) == 48
    sizes = np.array([load_rgb(str(path)).size for path in table.paths()])
    assert (sizes.max(axis=1) > 64).any() and (sizes.max(axis=1) <= 64).any()  # both resize paths covered
    for i in range(len(ds)):
        x, node, idx = ds[i]
        rx, rnode, ridx = ref[i]
        assert torch.equal(x, rx), f"sample {i} differs from the folder pipeline"
        assert (node, idx) == (rnode, ridx)


def test_jpeg_pack_passthrough_exact_and_reencoded_close(packs, table, tax):
    tr = build_transform(Preprocess(image_size=64), train=False)
    ref = ImageDataset(table, tr)
    ds = PackedDataset(packs["jpeg"], tr)
    pf = ds.pack
    with h5py.File(packs["jpeg"]) as fh:
        stored = fh["size"][...]
        orig = fh["orig_size"][...]
        off = fh["image_offset"][...]
        first = fh["image_bytes"][off[0]:off[1]].tobytes()
        assert len(off) == 49 and off[-1] == fh["image_bytes"].shape[0]
    untouched = (stored == orig).all(axis=1)
    assert untouched.any() and (~untouched).any()
    assert first == Path(table.paths()[0]).read_bytes() or not untouched[0]
    for i in range(len(ds)):
        diff = (ds[i][0] - ref[i][0]).abs()
        if untouched[i]:
            assert torch.equal(ds[i][0], ref[i][0])  # original JPEG bytes stored as they are
        else:
            assert float(diff.mean()) < 0.05  # re-encoded at quality 95 (normalised units)
    assert stored.max() <= 64
    assert packs["jpeg"].stat().st_size < packs["raw"].stat().st_size
    assert pf.encoding == "jpeg" and pf.image_size == 64 and len(pf) == 48


def test_table_view_round_trip_and_stored_taxonomy(packs, table, tax):
    pf = PackedFile(packs["jpeg"])
    assert pf.table().df.equals(table.df)
    assert pf.taxonomy.fingerprint == tax.fingerprint == pf.fingerprint
    np.testing.assert_array_equal(pf.nodes(), table.nodes())


def test_wrong_taxonomy_is_refused(packs, plankton_dir):
    other = load(plankton_dir / "taxonomy.txt")  # same tree, but leaves as labels: another fingerprint
    with pytest.raises(DataError, match="packed with the taxonomy"):
        PackedDataset(packs["raw"], taxonomy=other)


def test_table_argument_selects_rows_and_nodes(packs, table, tax):
    view = PackedFile(packs["raw"]).table()
    rows = np.array([40, 3, 17, 3])
    sub = view.select(rows)
    new_nodes = np.arange(4) + 100
    ds = PackedDataset(packs["raw"], table=sub.with_nodes(new_nodes))
    full = PackedDataset(packs["raw"])
    for j, r in enumerate(rows):
        x, node, idx = ds[j]
        assert torch.equal(x, full[int(r)][0]) and node == 100 + j and idx == j
    stranger = SampleTable.build([str(Path(table.paths()[0]).with_name("nope.jpg"))], nodes=[1])
    with pytest.raises(DataError, match="not in the pack"):
        PackedDataset(packs["raw"], table=stranger)


def test_shards_match_single_file_and_are_checked(table, tax, packs, tmp_path):
    out = tmp_path / "sharded.h5"
    r = pack_table(table, tax, out, image_size=64, encoding="raw", shard_size=20)
    assert [p.name for p in r.shards] == [f"sharded-0000{i}-of-00003.h5" for i in range(3)]
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))
    single, sharded = PackedDataset(packs["raw"]), PackedDataset(out)
    assert sharded.pack.counts.tolist() == [20, 20, 8]
    for i in (0, 19, 20, 47):
        assert torch.equal(single[i][0], sharded[i][0]) and single[i][1] == sharded[i][1]
    assert PackedFile(list(reversed(r.shards))).shards == r.shards  # ordered by the shard attribute
    # a shard of another pack is detected
    other = pack_table(table, tax, tmp_path / "other.h5", image_size=64, encoding="raw", shard_size=20)
    with pytest.raises(DataError, match="different packs"):
        PackedFile([r.shards[0], other.shards[1], r.shards[2]])
    other.shards[1].unlink()
    with pytest.raises(DataError, match=r"shard\(s\) \[1\] of 3 are missing"):
        resolve_shards(tmp_path / "other.h5")
    # re-packing into one file removes the stale shards that would shadow it
    pack_table(table, tax, out, image_size=64, encoding="jpeg")
    assert out.exists() and not r.shards[0].exists()


def test_unreadable_image_raise_is_atomic_and_skip_reports(table, tax, tmp_path):
    bad = tmp_path / "cut.jpg"
    data = Path(table.paths()[5]).read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # header intact, pixel data cut
    with Image.open(bad) as im:
        im.size  # the header check passes
    t2 = SampleTable.concat([table.select(np.arange(10)), SampleTable.build([str(bad)], nodes=[table.nodes()[5]])])
    out = tmp_path / "p.h5"
    with pytest.raises(DataError, match="cut.jpg"):
        pack_table(t2, tax, out, image_size=64, encoding="jpeg")
    assert not out.exists() and list(tmp_path.glob(".p.h5*")) == []
    r = pack_table(t2, tax, out, image_size=64, encoding="jpeg", on_error="skip")
    assert r.n_samples == 10 and r.failures[0][0] == str(bad) and "truncated" in r.failures[0][1].lower()
    assert len(PackedFile(out)) == 10


def test_pack_validates_options(table, tax, tmp_path):
    with pytest.raises(ConfigError, match="encoding"):
        pack_table(table, tax, tmp_path / "x.h5", encoding="png")
    with pytest.raises(ConfigError, match="shard_size"):
        pack_table(table, tax, tmp_path / "x.h5", shard_size=0)
    small = Taxonomy.from_parents([-1, 0], ["root", "a"])
    with pytest.raises(DataError, match="not in the taxonomy"):
        pack_table(table, small, tmp_path / "x.h5")
    with pytest.raises(DataError, match="not found"):
        PackedFile(tmp_path / "missing.h5")


def test_crop_boxes_and_metadata_from_a_csv(folder, tax, tmp_path):
    imgs = sorted((folder / "amphipods").iterdir())[:3]
    lines = ["path,label,box_x,box_y,box_w,box_h,depth_m,station"]
    lines += [f"{imgs[0]},amphipods,2,3,20,15,12.5,A", f"{imgs[1]},amphipods,,,,,,B", f"{imgs[2]},COPEPODS,,,,,300,"]
    csv = tmp_path / "s.csv"
    csv.write_text("\n".join(lines) + "\n")
    table = load_samples(csv, tax, metadata_columns=["depth_m"], attribute_columns=["station"])
    pack_table(table, tax, tmp_path / "c.h5", image_size=64, encoding="raw")
    pf = PackedFile(tmp_path / "c.h5")
    view = pf.table()
    assert view.df.equals(table.df)
    np.testing.assert_array_equal(view.df["meta_depth_m"].to_numpy(), [12.5, np.nan, 300.0])
    assert view.df["attr_station"].tolist() == ["A", "B", ""]
    crop = load_rgb(str(imgs[0]), table.boxes()[0])
    assert crop.size == (20, 15)
    assert np.array_equal(np.asarray(pf.image(0)), np.asarray(crop))


def test_dataloader_workers_open_their_own_handles(packs, table):
    tr = build_transform(Preprocess(image_size=32), train=False)
    ds = PackedDataset(packs["jpeg"], tr)
    first = ds[0][0]  # opens a handle in this process
    pickle.dumps(ds)  # h5py handles are not picklable: they must not travel
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, shuffle=False)
    xs, nodes, idx = zip(*loader)
    assert torch.equal(torch.cat(xs)[0], first)
    np.testing.assert_array_equal(torch.cat(nodes).numpy(), table.nodes())
    np.testing.assert_array_equal(torch.cat(idx).numpy(), np.arange(len(table)))


def test_cli_pack_and_verify(folder, plankton_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    tree = str(plankton_dir / "class_paths.tsv")
    out = tmp_path / "cli.h5"
    assert main(["pack", str(src), str(out), "--taxonomy", tree, "--image-size", "48", "--encoding", "raw",
                 "--shard-size", "30"]) == 0
    assert "packed 48 images into 2 file(s)" in capsys.readouterr().out
    assert len(PackedFile(out)) == 48 and PackedFile(out).image_size == 48
    victim = sorted((src / "amphipods").iterdir())[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert main(["pack", "--verify", str(src), "--taxonomy", tree]) == 1
    text = capsys.readouterr()
    assert "unreadable_image: 1 sample(s)" in text.out and victim.name in text.out
    assert "1 image(s) missing or unreadable (of 48)" in text.err
    assert main(["pack", str(src), str(tmp_path / "v.h5"), "--verify", "--taxonomy", tree]) == 1
    assert not (tmp_path / "v.h5").exists()
    assert main(["pack", str(src), "--taxonomy", tree]) == 1  # neither OUT nor --verify
    assert "give an output file" in capsys.readouterr().err
