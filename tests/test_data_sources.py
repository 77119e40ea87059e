"""Data sources on real NDSB plankton images: image folders, CSV/TSV tables, COCO JSON,
and the bad-input policy (LoadReport, raise vs skip)."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taxonomist.data import DataWarning, SampleTable, load_images, load_samples
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Taxonomy

CLASSES = ("copepod_calanoid", "amphipods", "chaetognath_sagitta")


# ----------------------------------------------------------------- fixtures
def tree_from_paths(rows: list[list[str]], ranks: list[str] | None = None, label_last: bool = True) -> Taxonomy:
    """A Taxonomy from root-first name paths (keys = the joined path; a path's last node is a label)."""
    index = {(): 0}
    parent, names, keys, node_ranks, labels = [-1], ["root"], ["root"], [""], [False]
    for row in rows:
        for d in range(len(row)):
            prefix = tuple(row[:d + 1])
            if prefix not in index:
                index[prefix] = len(names)
                parent.append(index[prefix[:-1]])
                names.append(row[d])
                keys.append(" > ".join(prefix))
                node_ranks.append(ranks[d] if ranks else "")
                labels.append(False)
        if label_last:
            labels[index[tuple(row)]] = True
    return Taxonomy.from_parents(parent, names, keys=keys, ranks=node_ranks, labels=labels,
                                 rank_order=ranks)


@pytest.fixture(scope="module")
def plankton_tax(plankton_dir: Path) -> Taxonomy:
    rows = []
    with open(plankton_dir / "class_paths.tsv") as fh:
        for rec in csv.DictReader(fh, delimiter="\t"):
            rows.append([p.strip() for p in rec["path"].split(">")])
    tax = tree_from_paths(rows)
    assert tax.n_labels == 121
    return tax


@pytest.fixture(scope="module")
def fathomnet_tax(taxonomies_dir: Path) -> Taxonomy:
    ranks = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
    rows = []
    with open(taxonomies_dir / "fathomnet2025_lineage.csv") as fh:
        for rec in csv.DictReader(fh):
            rows.append([rec[r] for r in ranks if rec[r]])
    return tree_from_paths(rows, ranks=ranks)


def copy_images(plankton_dir: Path, dest: Path, classes=CLASSES, per_class: int = 4) -> dict[str, list[Path]]:
    out = {}
    for c in classes:
        (dest / c).mkdir(parents=True, exist_ok=True)
        files = sorted((plankton_dir / "train" / c).iterdir())[:per_class]
        out[c] = [Path(shutil.copy(f, dest / c / f.name)) for f in files]
    return out


# ----------------------------------------------------------------- image folders
def test_folder_loads_labels_as_nodes(plankton_dir, plankton_tax, tmp_path):
    files = copy_images(plankton_dir, tmp_path / "data")
    table, report = load_samples(tmp_path / "data", plankton_tax, return_report=True)
    assert report.ok and report.n_read == report.n_kept == 12
    assert len(table) == 12
    expected_paths = sorted(str(p.resolve()) for fs in files.values() for p in fs)
    assert sorted(table.df["path"]) == expected_paths
    for c in CLASSES:
        rows = table.df[table.df["label"] == c]
        assert len(rows) == 4
        assert set(rows["node"]) == {plankton_tax.find(c)}
    # copepod_calanoid is an internal class in the NDSB tree (a label with children)
    assert not plankton_tax.is_leaf[plankton_tax.find("copepod_calanoid")]
    assert (table.df["split"] == "").all() and table.df["box_x"].isna().all()


def test_folder_named_by_key_and_homonyms(plankton_dir, tmp_path):
    tax = tree_from_paths([["Cnidaria", "Aurelia"], ["Plantae", "Aurelia"], ["Cnidaria", "Obelia"]])
    root = tmp_path / "data"
    src = sorted((plankton_dir / "train" / "amphipods").iterdir())[:2]
    for folder in ("Aurelia", "Plantae > Aurelia", "Obelia"):
        (root / folder).mkdir(parents=True)
        for f in src:
            shutil.copy(f, root / folder / f.name)
    with pytest.raises(DataError) as err:
        load_samples(root, tax)
    msg = str(err.value)
    assert "ambiguous_label: 2 sample(s)" in msg
    assert "'Aurelia' names 2 taxa" in msg and "key 'Cnidaria > Aurelia'" in msg and "use the key" in msg
    with pytest.warns(DataWarning):
        table = load_samples(root, tax, on_error="skip")
    assert len(table) == 4
    assert set(table.df.loc[table.df["label"] == "Plantae > Aurelia", "node"]) == {tax.find("Plantae > Aurelia")}
    assert tax.names[tax.find("Plantae > Aurelia")] == "Aurelia"


def _make_bad_folder(plankton_dir: Path, root: Path) -> dict[str, Path]:
    files = copy_images(plankton_dir, root)
    garbage = files["amphipods"][0]
    garbage.write_bytes(b"this is not a jpeg" * 20)
    truncated = files["amphipods"][1]
    data = truncated.read_bytes()
    truncated.write_bytes(data[:-200])  # header intact, pixel data cut
    (root / "copepod_calanoidd").mkdir()  # typo: not in the taxonomy
    shutil.copy(files["copepod_calanoid"][0], root / "copepod_calanoidd" / "x.jpg")
    (root / "hydromedusae_solmaris").mkdir()  # a real class, but no images
    shutil.copy(files["copepod_calanoid"][1], root / "stray.jpg")  # no label folder
    (root / "notes.txt").write_text("not an image")
    return {"garbage": garbage, "truncated": truncated}


def test_folder_bad_input_raises_with_full_report(plankton_dir, plankton_tax, tmp_path):
    bad = _make_bad_folder(plankton_dir, tmp_path / "data")
    with pytest.raises(DataError) as err:
        load_samples(tmp_path / "data", plankton_tax)
    msg = str(err.value)
    assert "unknown_label: 1 sample(s)" in msg and "copepod_calanoidd/x.jpg" in msg
    assert "Did you mean: 'copepod_calanoid'" in msg
    assert "empty_class: 1 folder(s)" in msg and "hydromedusae_solmaris/" in msg
    assert "stray_file: 1 sample(s)" in msg and "stray.jpg" in msg
    assert "unreadable_image: 1 sample(s)" in msg and f"amphipods/{bad['garbage'].name}" in msg
    assert "notes.txt" in msg  # noted, not an error
    assert "on_error='skip'" in msg


def test_folder_skip_drops_exactly_the_bad_rows(plankton_dir, plankton_tax, tmp_path):
    bad = _make_bad_folder(plankton_dir, tmp_path / "data")
    with pytest.warns(DataWarning) as rec:
        table, report = load_samples(tmp_path / "data", plankton_tax, on_error="skip", return_report=True)
    assert "unknown_label" in str(rec[0].message)
    # 12 copied + 1 typo-folder image + 1 stray = 14 read; garbage, typo and stray dropped
    assert (report.n_read, report.n_kept, len(table)) == (14, 11, 11)
    assert report.counts == {"empty_class": 1, "unknown_label": 1, "stray_file": 1, "unreadable_image": 1}
    assert str(bad["garbage"]) not in set(table.df["path"])
    assert str(bad["truncated"]) in set(table.df["path"])  # header is fine: only a full decode finds it
    assert table.report is report and "14 samples read, 11 kept, 3 dropped" in str(report)
    # full decode also catches the truncated file
    with pytest.warns(DataWarning):
        table2, report2 = load_samples(tmp_path / "data", plankton_tax, on_error="skip", verify_images="decode",
                                       return_report=True)
    assert report2.counts["unreadable_image"] == 2 and len(table2) == 10
    assert "truncated" in str(report2)


def test_unlabelled_folder_and_load_images(plankton_dir, plankton_tax, tmp_path):
    files = copy_images(plankton_dir, tmp_path / "labelled")
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in files["amphipods"]:
        shutil.copy(f, flat / f.name)
    table = load_samples(flat, plankton_tax)
    assert len(table) == 4 and (table.nodes() == -1).all() and (table.df["label"] == "").all()
    # predict inputs: a single file, an unlabelled folder and a labelled folder whose labels are optional truth
    (tmp_path / "labelled" / "not_a_taxon").mkdir()
    shutil.copy(files["amphipods"][0], tmp_path / "labelled" / "not_a_taxon" / "a.jpg")
    shutil.copy(files["amphipods"][1], tmp_path / "labelled" / "stray.jpg")
    (tmp_path / "labelled" / "hydromedusae_solmaris").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is a problem for prediction
        mixed = load_images([files["copepod_calanoid"][0], flat, tmp_path / "labelled"], plankton_tax)
    assert len(mixed) == 1 + 4 + 14
    nodes = mixed.nodes()
    assert nodes[0] == -1 and (nodes[1:5] == -1).all()
    assert (nodes[5:] >= 0).sum() == 12 and (nodes[5:] == -1).sum() == 2
    notes = " | ".join(mixed.report.notes)
    assert "not_a_taxon" in notes and "hydromedusae_solmaris/ has no images" in notes and "unlabelled" in notes
    assert mixed.report.n_read == mixed.report.n_kept == 19


# ----------------------------------------------------------------- CSV / TSV tables
def _write_csv(path: Path, header: list[str], rows: list[list[object]], sep: str = ",") -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_relative_paths_boxes_split_metadata(plankton_dir, plankton_tax, tmp_path):
    files = copy_images(plankton_dir, tmp_path / "img")
    a, b = files["amphipods"][:2]
    c = files["copepod_calanoid"][0]
    w, h = Image.open(b).size
    rows = [[f"img/amphipods/{a.name}", "amphipods", "", "", "", "", "train", "12.5", "night", "x"],
            [f"img/amphipods/{b.name}", "amphipods", 1, 2, w - 1, h - 2, "validation", "3", "day", "y"],
            [str(c), "Plankton > CRUSTACEANS > COPEPODS > copepod_calanoid".replace("Plankton", "PLANKTON"),
             "", "", "", "", "", "", "day", "z"]]
    csv_path = _write_csv(tmp_path / "samples.csv",
                          ["path", "label", "box_x", "box_y", "box_w", "box_h", "split", "depth_m", "attr_time",
                           "comment"], rows)
    table, report = load_samples(csv_path, plankton_tax, metadata_columns=["depth_m"], return_report=True)
    assert report.ok and len(table) == 3
    assert list(table.df["path"]) == [str(a), str(b), str(c)]
    assert list(table.df["split"]) == ["train", "val", ""]
    np.testing.assert_array_equal(table.nodes(), [plankton_tax.find("amphipods")] * 2
                                  + [plankton_tax.find("copepod_calanoid")])
    boxes = table.boxes()
    assert np.isnan(boxes[0]).all() and boxes[1].tolist() == [1, 2, w - 1, h - 2]
    np.testing.assert_array_equal(table.df["meta_depth_m"].to_numpy()[:2], [12.5, 3.0])
    assert np.isnan(table.df["meta_depth_m"].iloc[2])
    assert list(table.df["attr_time"]) == ["night", "day", "day"]
    assert any("comment" in n and "not used" in n for n in report.notes)  # unknown column reported
    assert any("'depth_m': 1 empty cell" in n for n in report.notes)
    # image_root instead of the CSV's folder; TSV with the same content
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    tsv = _write_csv(sub / "s.tsv", ["file", "class"], [[f"amphipods/{a.name}", "amphipods"]], sep="\t")
    t2 = load_samples(tsv, plankton_tax, image_root=tmp_path / "img")
    assert list(t2.df["path"]) == [str(a)]


def test_csv_bad_rows_are_named_by_line(plankton_dir, plankton_tax, tmp_path):
    files = copy_images(plankton_dir, tmp_path / "img")
    a = files["amphipods"][0]
    rows = [[str(a), "amphipods", "1"],                   # line 2 ok
            [str(tmp_path / "img" / "gone.jpg"), "amphipods", "1"],  # line 3 missing file
            [str(files["amphipods"][1]), "amphipodz", "1"],   # line 4 unknown label
            [str(a), "amphipods", "1"],                   # line 5 duplicate of line 2
            [str(files["amphipods"][2]), "", "1"],            # line 6 empty label
            [str(files["amphipods"][3]), "amphipods", "deep"]]  # line 7 not a number
    path = _write_csv(tmp_path / "s.csv", ["path", "label", "depth"], rows)
    with pytest.raises(DataError) as err:
        load_samples(path, plankton_tax, metadata_columns=["depth"])
    msg = str(err.value)
    assert "missing_file: 1 sample(s)" in msg and "s.csv line 3" in msg and "gone.jpg" in msg
    assert "unknown_label: 1 sample(s)" in msg and "s.csv line 4" in msg and "Did you mean: 'amphipods'" in msg
    assert "duplicate: 1 sample(s)" in msg and "s.csv line 5: repeats s.csv line 2" in msg
    assert "missing_label: 1 sample(s)" in msg and "s.csv line 6" in msg
    assert "bad_value: 1 sample(s)" in msg and "s.csv line 7: depth='deep' is not a number" in msg
    with pytest.warns(DataWarning):
        table, report = load_samples(path, plankton_tax, metadata_columns=["depth"], on_error="skip",
                                     return_report=True)
    assert len(table) == 1 and list(table.df["path"]) == [str(a)]
    assert report.n_read == 6 and report.n_dropped == 5


def test_csv_structural_errors(plankton_tax, tmp_path):
    p = _write_csv(tmp_path / "a.csv", ["image_file", "label"], [["x.jpg", "amphipods"]])
    with pytest.raises(DataError, match="no image path column.*path_column"):
        load_samples(p, plankton_tax)
    p = _write_csv(tmp_path / "b.csv", ["path", "label", "box_x", "box_y"], [["x.jpg", "amphipods", 1, 2]])
    with pytest.raises(DataError, match="all four columns"):
        load_samples(p, plankton_tax)
    p = _write_csv(tmp_path / "c.csv", ["path", "label"], [["x.jpg", "amphipods"]])
    with pytest.raises(DataError, match="metadata/attribute column 'depth' is not in the file"):
        load_samples(p, plankton_tax, metadata_columns=["depth"])
    with pytest.raises(ConfigError, match="on_error"):
        load_samples(p, plankton_tax, on_error="ignore")
    with pytest.raises(DataError, match="not found"):
        load_samples(tmp_path / "nope.csv", plankton_tax)


def test_csv_rank_columns_use_the_deepest_and_check_the_lineage(plankton_dir, fathomnet_tax, tmp_path):
    files = copy_images(plankton_dir, tmp_path / "img", per_class=5)
    imgs = [str(p) for fs in files.values() for p in fs]
    header = ["path", "kingdom", "phylum", "class", "order", "family", "genus", "species"]
    rows = [
        [imgs[0], "Animalia", "Echinodermata", "Ophiuroidea", "Euryalida", "Asteronychidae", "Asteronyx",
         "Asteronyx loveni"],                                                                    # species
        [imgs[1], "Animalia", "Echinodermata", "Ophiuroidea", "Euryalida", "Asteronychidae", "Asteronyx", ""],  # genus
        [imgs[2], "Animalia", "Chordata", "", "", "", "", ""],                                   # phylum only
        [imgs[3], "Animalia", "Cnidaria", "Ophiuroidea", "Euryalida", "Asteronychidae", "Asteronyx", ""],  # wrong
        [imgs[4], "Animalia", "Echinodermata", "Ophiuroidea", "Euryalida", "Asteronychidae", "", "Asteronyx"],  # rank
        [imgs[5], "", "", "", "", "", "", ""],                                                   # empty
    ]
    path = _write_csv(tmp_path / "ranks.csv", header, rows)
    with pytest.raises(DataError) as err:
        load_samples(path, fathomnet_tax)
    msg = str(err.value)
    assert "inconsistent_lineage: 2 sample(s)" in msg
    assert "ranks.csv line 5: phylum='Cnidaria', but the taxonomy puts 'Asteronyx' under phylum 'Echinodermata'" in msg
    assert "ranks.csv line 6: species='Asteronyx', but in the taxonomy it is a genus" in msg
    assert "missing_label: 1 sample(s)" in msg and "ranks.csv line 7" in msg
    with pytest.warns(DataWarning):
        table = load_samples(path, fathomnet_tax, on_error="skip")
    nodes = table.nodes()
    assert list(table.df["label"]) == ["Asteronyx loveni", "Asteronyx", "Chordata"]
    assert [fathomnet_tax.ranks[n] for n in nodes] == ["species", "genus", "phylum"]
    assert fathomnet_tax.parent[nodes[0]] == nodes[1]
    assert fathomnet_tax.lineage(int(nodes[0])) == ("Animalia > Echinodermata > Ophiuroidea > Euryalida > "
                                                     "Asteronychidae > Asteronyx > Asteronyx loveni")


def test_rank_columns_disambiguate_homonyms(plankton_dir, tmp_path):
    ranks = ["kingdom", "genus"]
    tax = tree_from_paths([["Animalia", "Morus"], ["Plantae", "Morus"]], ranks=ranks)
    files = copy_images(plankton_dir, tmp_path / "img", classes=("amphipods",), per_class=3)
    imgs = [str(p) for p in files["amphipods"]]
    path = _write_csv(tmp_path / "r.csv", ["path", "kingdom", "genus"],
                      [[imgs[0], "Plantae", "Morus"], [imgs[1], "Animalia", "Morus"], [imgs[2], "", "Morus"]])
    with pytest.raises(DataError, match=r"ambiguous_label: 1 sample\(s\)[\s\S]*r.csv line 4"):
        load_samples(path, tax)
    with pytest.warns(DataWarning):
        table = load_samples(path, tax, on_error="skip")
    assert [tax.lineage(int(n)) for n in table.nodes()] == ["Plantae > Morus", "Animalia > Morus"]


# ----------------------------------------------------------------- COCO
def test_coco_one_sample_per_annotation_with_checked_boxes(plankton_dir, plankton_tax, tmp_path):
    files = copy_images(plankton_dir, tmp_path / "images", per_class=2)
    im_a, im_b = files["amphipods"][0], files["chaetognath_sagitta"][0]
    (wa, ha), (wb, hb) = Image.open(im_a).size, Image.open(im_b).size
    coco = {
        "images": [{"id": 1, "file_name": f"amphipods/{im_a.name}", "width": wa, "height": ha},
                   {"id": 2, "file_name": f"chaetognath_sagitta/{im_b.name}", "width": wb, "height": hb},
                   {"id": 3, "file_name": "unused.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 7, "name": "amphipods"}, {"id": 8, "name": "chaetognath_sagitta"},
                       {"id": 9, "name": "krill"}],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 7, "bbox": [2, 3, 20, 15]},
            {"id": 101, "image_id": 2, "category_id": 8, "bbox": [0, 0, wb, hb]},
            {"id": 102, "image_id": 2, "category_id": 8, "bbox": [wb - 5, hb - 5, 10, 10]},  # clipped
            {"id": 103, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},             # unknown label
            {"id": 104, "image_id": 42, "category_id": 7, "bbox": [1, 1, 5, 5]},            # no such image
            {"id": 105, "image_id": 1, "category_id": 7, "bbox": [wa + 1, 0, 5, 5]},        # outside
            {"id": 106, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 5]},             # empty box
            {"id": 107, "image_id": 1, "category_id": 7, "bbox": [2, 3, 20, 15]},           # duplicate of 100
        ]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError) as err:
        load_samples(path, plankton_tax, image_root=tmp_path / "images")
    msg = str(err.value)
    assert "unknown_label: 1 sample(s)" in msg and "annotations[3] (id 103)" in msg and "'krill'" in msg
    assert "bad_reference: 1 sample(s)" in msg and "image_id 42 is not in images[]" in msg
    assert "bad_box: 2 sample(s)" in msg and "annotations[5] (id 105)" in msg and "annotations[6] (id 106)" in msg
    assert "duplicate: 1 sample(s)" in msg and "annotations[7] (id 107): repeats ann.json annotations[0]" in msg
    with pytest.warns(DataWarning):
        table, report = load_samples(path, plankton_tax, image_root=tmp_path / "images", on_error="skip",
                                     return_report=True)
    assert report.n_read == 8 and len(table) == 3
    np.testing.assert_array_equal(table.boxes(), [[2, 3, 20, 15], [0, 0, wb, hb], [wb - 5, hb - 5, 5, 5]])
    assert list(table.df["label"]) == ["amphipods", "chaetognath_sagitta", "chaetognath_sagitta"]
    assert any("clipped" in n for n in report.notes) and any("unused.jpg" in n for n in report.notes)


def test_coco_structure_errors(plankton_tax, tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="'categories'"):
        load_samples(p, plankton_tax)
    p.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_samples(p, plankton_tax)
    p.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                             "annotations": [], "categories": []}))
    with pytest.raises(DataError, match=r"images\[1\] repeats id 1"):
        load_samples(p, plankton_tax)


# ----------------------------------------------------------------- dispatch and performance
def test_unknown_kind_and_options(plankton_tax, tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"1")
    with pytest.raises(DataError, match="unknown data source kind"):
        load_samples(tmp_path / "x.parquet", plankton_tax)
    (tmp_path / "d" / "amphipods").mkdir(parents=True)
    with pytest.raises(ConfigError, match="apply to CSV/TSV tables"):
        load_samples(tmp_path / "d", plankton_tax, label_column="label")
    with pytest.raises(ConfigError, match="verify_images"):
        load_samples(tmp_path / "d", plankton_tax, verify_images="full")


@pytest.mark.slow
def test_full_plankton_train_folder_loads_in_seconds(plankton_dir, plankton_tax):
    import time

    t0 = time.perf_counter()
    table = load_samples(plankton_dir / "train", plankton_tax)  # header-verifies 21,233 images
    elapsed = time.perf_counter() - t0
    assert len(table) == 21233 and table.report.ok
    assert table.df["node"].nunique() == 121
    assert elapsed < 30, f"loading + header-verifying took {elapsed:.1f}s"
    assert isinstance(table, SampleTable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_samples(plankton_dir / "val", plankton_tax)  # clean data: no warning
