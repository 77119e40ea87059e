#!/usr/bin/env python
"""Build the bundled demo sample from the shared NDSB PlanktonSet 1.0 copy.

Writes ``src/taxonomist/demo_data/plankton/``:

* ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``: up to ``--train-per-class``
  / ``--val-per-class`` real images of every one of the 121 classes, taken from
  the shared ``train/`` and ``val/`` folders (a class with fewer images gives
  all it has);
* ``taxonomy.txt`` and ``class_paths.tsv``: the official hierarchy, copied as is;
* ``MANIFEST.tsv``: ``split<TAB>class<TAB>file<TAB>bytes<TAB>sha256`` of every image;
* ``README.md``: where the data comes from and how it was made.

Selection is seeded and independent of directory listing order: within each
class the files are ranked by SHA-256 of ``"<seed>:<split>/<class>/<file>"``
and the first ones are taken. The same seed always gives the same sample.

Usage::

    python scripts/make_demo_sample.py [--source ../shared/data/plankton] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = Path(os.environ.get("TAXONOMIST_SHARED", REPO.parent / "shared")) / "data" / "plankton"
DEFAULT_OUT = REPO / "src" / "taxonomist" / "demo_data" / "plankton"
TREE_FILES = ("taxonomy.txt", "class_paths.tsv")

README = """# Demo sample: NDSB plankton (real images)

A small, seeded subset of **NOAA/NCEI PlanktonSet 1.0** (the labelled training
set of the 2015 National Data Science Bowl; NCEI accession 0127422; US
government public data), used by `taxonomist demo`.

* `train/<class>/*.jpg`: up to {train_k} images per class; `val/<class>/*.jpg`:
  up to {val_k} images per class (fewer where the source split has fewer);
  all 121 classes; {n_train} + {n_val} images, {mb:.2f} MB.
* `taxonomy.txt` (indented tree) and `class_paths.tsv` (one path per class):
  the official NDSB hierarchy, unchanged (18 of the 121 classes are internal nodes).
* `MANIFEST.tsv`: split, class, file, size and SHA-256 of every image.

Built by `scripts/make_demo_sample.py --seed {seed}` from the project's shared
copy of the data set (itself a seeded stratified train/val split of the 121
classes). Do not edit by hand: re-run the script.
"""


def rank_key(seed: int, split: str, cls: str, name: str) -> str:
    return hashlib.sha256(f"{seed}:{split}/{cls}/{name}".encode()).hexdigest()


def select(source: Path, split: str, per_class: int, seed: int) -> dict[str, list[str]]:
    """Class -> chosen file names (seeded, independent of listing order)."""
    folder = source / split
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} not found; pass --source pointing at shared/data/plankton")
    chosen: dict[str, list[str]] = {}
    for cls in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        files = [p.name for p in (folder / cls).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
        files.sort(key=lambda n: rank_key(seed, split, cls, n))
        chosen[cls] = sorted(files[:per_class])
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="shared/data/plankton folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (replaced)")
    ap.add_argument("--train-per-class", type=int, default=16)
    ap.add_argument("--val-per-class", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-mb", type=float, default=6.0, help="fail if the sample is larger than this")
    args = ap.parse_args(argv)

    source = args.source.resolve()
    picks = {"train": select(source, "train", args.train_per_class, args.seed),
             "val": select(source, "val", args.val_per_class, args.seed)}
    classes = sorted(picks["train"])
    if sorted(picks["val"]) != classes:
        missing = sorted(set(classes) ^ set(picks["val"]))
        print(f"note: classes not in both splits: {missing}", file=sys.stderr)
    total = sum((source / s / c / f).stat().st_size for s in picks for c in picks[s] for f in picks[s][c])
    if total > args.max_mb * 1e6:
        raise SystemExit(f"error: the sample would be {total / 1e6:.2f} MB > --max-mb {args.max_mb}; "
                         "take fewer images per class")

    out = args.out.resolve()
    if out.exists():
        if not (out / "MANIFEST.tsv").exists() and any(out.iterdir()):
            raise SystemExit(f"error: {out} exists and was not made by this script (no MANIFEST.tsv); not replacing it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = ["split\tclass\tfile\tbytes\tsha256"]
    for split in ("train", "val"):
        for cls, files in picks[split].items():
            if not files:
                continue
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for name in files:
                src = source / split / cls / name
                data = src.read_bytes()
                (out / split / cls / name).write_bytes(data)
                manifest.append(f"{split}\t{cls}\t{name}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}")
    for name in TREE_FILES:
        shutil.copyfile(source / name, out / name)
    (out / "MANIFEST.tsv").write_text("\n".join(manifest) + "\n")
    n_train = sum(len(v) for v in picks["train"].values())
    n_val = sum(len(v) for v in picks["val"].values())
    (out / "README.md").write_text(README.format(train_k=args.train_per_class, val_k=args.val_per_class,
                                                 n_train=n_train, n_val=n_val, mb=total / 1e6, seed=args.seed))
    print(f"wrote {out}: {len(classes)} classes, {n_train} train + {n_val} val images, {total / 1e6:.2f} MB of images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
