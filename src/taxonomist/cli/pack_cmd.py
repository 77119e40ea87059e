"""`taxonomist pack SOURCE OUT.h5 --taxonomy TREE [...]` and `taxonomist pack --verify SOURCE --taxonomy TREE`.

Packs an image folder, CSV/TSV table or COCO JSON into HDF5 shards for fast
loading (see docs/scale.md), or, with ``--verify`` and no output, decodes every
image of the source and reports the unreadable ones before a long run.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack images + labels into HDF5 shards for fast loading, or --verify a source",
                       description="Convert an image folder, CSV/TSV sample table or COCO JSON into HDF5 shards "
                                   "(resized images as JPEG bytes or raw pixels, node ids, the taxonomy and its "
                                   "fingerprint, original paths, boxes and metadata). With --verify and no OUT, "
                                   "decode every image and report the unreadable ones.")
    p.add_argument("source", help="image folder, .csv/.tsv sample table or COCO .json")
    p.add_argument("out", nargs="?", default=None, help="output .h5 file (shards: OUT-00000-of-0000N.h5)")
    p.add_argument("--taxonomy", required=True, help="taxonomy file (any supported format)")
    p.add_argument("--taxonomy-format", default=None, help="taxonomy format instead of auto-detection")
    p.add_argument("--image-size", type=int, default=256,
                   help="longest stored side in pixels; larger images are scaled down, none up (default 256). "
                        "Pack at the training image size to get exactly the folder pipeline's tensors")
    p.add_argument("--encoding", choices=["jpeg", "raw"], default="jpeg",
                   help="jpeg: compact, decoded per read (default); raw: uint8 pixels, fastest to read, largest")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest", "lanczos"], default="bilinear",
                   help="resize filter (default bilinear, the Preprocess default)")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard file (default: one file)")
    p.add_argument("--verify", action="store_true",
                   help="decode every image first and report unreadable ones; without OUT, only verify")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="raise (default): stop on bad rows/images; skip: leave them out and report them")
    p.add_argument("--kind", default="auto", help="source kind: auto, folder, images, table, coco (default auto)")
    p.add_argument("--image-root", default=None, help="where relative image paths of a table/COCO file start")
    p.add_argument("--metadata-columns", default="", help="comma-separated numeric table columns to keep (meta_*)")
    p.add_argument("--attribute-columns", default="", help="comma-separated text table columns to keep (attr_*)")
    p.add_argument("--workers", type=int, default=None, help="threads that decode and encode images")
    p.set_defaults(func=run)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _load_options(args: argparse.Namespace) -> dict:
    opts: dict = {"kind": args.kind, "image_root": args.image_root}
    if _split(args.metadata_columns):
        opts["metadata_columns"] = _split(args.metadata_columns)
    if _split(args.attribute_columns):
        opts["attribute_columns"] = _split(args.attribute_columns)
    return opts


def verify(args: argparse.Namespace, tax) -> int:
    """Decode every image of the source; print the report; 0 when clean, 1 otherwise."""
    import warnings

    from ..data import DataWarning, load_samples

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the report is printed below
        _, report = load_samples(args.source, tax, on_error="skip", verify_images="decode", return_report=True,
                                 **_load_options(args))
    bad = report.counts.get("unreadable_image", 0) + report.counts.get("missing_file", 0)
    print(report)
    if report.ok:
        print(f"verify: all {report.n_read} images decode")
        return 0
    print(f"verify: {report.n_problems} problem(s); {bad} image(s) missing or unreadable "
          f"(of {report.n_read}); {report.n_kept} usable", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..data import DataWarning
    from ..data.hdf5 import pack_source
    from ..errors import ConfigError
    from ..taxonomy import load as load_taxonomy

    tax = load_taxonomy(args.taxonomy, format=args.taxonomy_format)
    if args.out is None:
        if not args.verify:
            raise ConfigError("pack: give an output file (taxonomist pack SOURCE OUT.h5 --taxonomy TREE), or "
                              "--verify to only check the images")
        return verify(args, tax)
    if args.verify:
        code = verify(args, tax)
        if code and args.on_error == "raise":
            print("pack: not packing because of the problems above (use --on-error skip to pack the rest)",
                  file=sys.stderr)
            return code
    last = [-1]

    def progress(done: int, total: int) -> None:
        pct = 100 * done // total
        if pct // 10 != last[0] // 10 or done == total:
            last[0] = pct
            print(f"\r  packing {done}/{total} ({pct}%)", end="" if done < total else "\n", file=sys.stderr,
                  flush=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        result, table = pack_source(
            args.source, tax, args.out, on_error=args.on_error,
            verify_images="header", load_options=_load_options(args),
            image_size=args.image_size, encoding=args.encoding, quality=args.quality,
            interpolation=args.interpolation, shard_size=args.shard_size, workers=args.workers, progress=progress)
    if table.report is not None and not table.report.ok:
        print(table.report, file=sys.stderr)
    for w in caught:
        if not issubclass(w.category, DataWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(result)
    print(f"taxonomy {tax.fingerprint} ({tax.n_nodes} nodes, {tax.n_labels} labels) stored in the file")
    return 0
