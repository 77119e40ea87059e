"""The bundled demo sample: present, real, complete (121 classes), small, and exactly what the script makes."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import pytest

from taxonomist.data import load_samples
from taxonomist.data.demo import demo_root
from taxonomist.taxonomy import Taxonomy

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_demo_sample", REPO / "scripts" / "make_demo_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree(class_paths: Path) -> Taxonomy:
    index = {(): 0}
    parent, names, labels = [-1], ["root"], [False]
    with open(class_paths) as fh:
        for rec in csv.DictReader(fh, delimiter="\t"):
            parts = tuple(p.strip() for p in rec["path"].split(">"))
            for d in range(1, len(parts) + 1):
                if parts[:d] not in index:
                    index[parts[:d]] = len(names)
                    parent.append(index[parts[:d - 1]])
                    names.append(parts[d - 1])
                    labels.append(False)
            labels[index[parts]] = True
    return Taxonomy.from_parents(parent, names, keys=[" > ".join(k) or "root" for k in sorted(index, key=index.get)],
                                 labels=labels)


def test_demo_sample_is_complete_real_and_small(plankton_dir):
    root = demo_root()
    assert (root / "taxonomy.txt").read_bytes() == (plankton_dir / "taxonomy.txt").read_bytes()
    assert (root / "class_paths.tsv").read_bytes() == (plankton_dir / "class_paths.tsv").read_bytes()
    tax = _tree(root / "class_paths.tsv")
    train = load_samples(root / "train", tax, verify_images="decode")
    val = load_samples(root / "val", tax, verify_images="decode")
    assert train.report.ok and val.report.ok
    assert train.df["node"].nunique() == 121 and val.df["node"].nunique() == 121
    per_class = train.df.groupby("label").size()
    assert per_class.max() == 16 and per_class.min() >= 6
    assert val.df.groupby("label").size().max() == 4
    files = [Path(p) for p in train.df["path"]] + [Path(p) for p in val.df["path"]]
    total = sum(f.stat().st_size for f in files)
    assert total < 6e6
    # every image is a byte-identical copy of a shared image of the same class and split
    for f in files[::97]:
        split, cls = f.parts[-3], f.parts[-2]
        assert f.read_bytes() == (plankton_dir / split / cls / f.name).read_bytes()
    # no image appears in both splits
    assert not {f.name for f in files[:len(train)]} & {f.name for f in files[len(train):]}


def test_manifest_matches_files_and_script_is_deterministic(plankton_dir, tmp_path):
    root = demo_root()
    rows = list(csv.DictReader(open(root / "MANIFEST.tsv"), delimiter="\t"))
    assert len(rows) == sum(1 for _ in root.glob("*/*/*.jpg"))
    for r in rows[::50]:
        data = (root / r["split"] / r["class"] / r["file"]).read_bytes()
        assert len(data) == int(r["bytes"]) and hashlib.sha256(data).hexdigest() == r["sha256"]
    mod = _script()
    out = tmp_path / "demo"
    assert mod.main(["--source", str(plankton_dir), "--out", str(out)]) == 0
    assert (out / "MANIFEST.tsv").read_text() == (root / "MANIFEST.tsv").read_text()
    with pytest.raises(SystemExit, match="MB"):
        mod.main(["--source", str(plankton_dir), "--out", str(tmp_path / "big"), "--max-mb", "0.5"])
