"""Benchmark: images/s delivered by the folder loader vs the packed HDF5 loader, in one process.

    .venv/bin/python bench/bench_loaders.py                       # 3,000 NDSB images, 2 workers
    .venv/bin/python bench/bench_loaders.py --n 500 --passes 1    # smoke test

Input: a deterministic subset of the real NDSB plankton training folder
(``../shared/data/plankton/train``; every k-th image of the sorted table, so all
121 classes appear), loaded with ``load_samples``. The same subset is packed
twice (``--encoding jpeg`` and ``raw`` at ``--image-size``) into a temporary
folder; pack time and file size are printed. Then each loader —
``ImageDataset`` over the folder, ``PackedDataset`` over each pack — feeds a
``DataLoader(num_workers=W, batch_size=B, shuffle=True, persistent_workers=True)``
with a transform that only keeps the image size (reading + decoding alone), then
with the evaluation transform (``Preprocess(image_size)``: pad + normalise), then
in the main process (0 workers, reading + decoding alone: the steadiest per-image
cost on a busy machine). The loaders take their passes in turn (folder, jpeg,
raw, folder, ...) so that swings in the machine's load hit each alike; the
images/s of each pass, timed from its first batch, and their median are printed. Before timing,
packed raw images are checked to be identical to the folder loader's.

Caveat: the image files and the packs are both in the OS page cache after the
first pass (the machine has plenty of RAM), so this measures decode + transform
+ per-file overhead, not a cold disk or a network file system, where the few
large packed files gain most.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import PIL
import torch

from taxonomist.data import ImageDataset, Preprocess, build_transform, load_samples
from taxonomist.data.hdf5 import PackedDataset, pack_table
from taxonomist.taxonomy import load

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TAXONOMIST_SHARED", REPO.parent / "shared")) / "data"


class DecodeOnly:
    """A transform that keeps only the image size: isolates reading + decoding from the transform."""

    def __call__(self, img) -> torch.Tensor:
        return torch.tensor(img.size)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.machine()}, {cpu}, nproc={os.cpu_count()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), "
            f"Pillow {PIL.__version__}")


def load_avg() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def one_pass(loader: torch.utils.data.DataLoader) -> float:
    """images/s of one full pass, timed from its first batch (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for x, _, _ in it:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def interleaved(datasets: dict[str, torch.utils.data.Dataset], workers: int, batch: int,
                passes: int) -> dict[str, list[float]]:
    """Passes taken in turn (folder, jpeg, raw, folder, ...) so that load swings hit every loader alike."""
    loaders = {}
    for name, ds in datasets.items():
        g = torch.Generator()
        g.manual_seed(0)
        loaders[name] = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                                    generator=g, persistent_workers=workers > 0)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(passes):
        for name, loader in loaders.items():
            rates[name].append(one_pass(loader))
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="images in the subset (default 3000)")
    ap.add_argument("--image-size", type=int, default=128, help="Preprocess and pack size (default 128)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3, help="passes over the subset per loader (default 3)")
    ap.add_argument("--out-dir", default=None, help="where the packs go (default: a temporary folder)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # the loaders' work is in the workers; keep the main process from competing
    root = SHARED / "plankton"
    print(f"machine: {machine()}")
    print(f"load average at start (1/5/15 min): {load_avg()}")
    tax = load(root / "class_paths.tsv")
    t0 = time.perf_counter()
    full = load_samples(root / "train", tax, verify_images="none")
    step = max(1, len(full) // args.n)
    table = full.select(np.arange(0, len(full), step)[: args.n])
    print(f"input: {len(table)} of {len(full)} NDSB training images (every {step}th), "
          f"{table.df['node'].nunique()} classes; table loaded in {time.perf_counter() - t0:.2f} s")
    pre = Preprocess(image_size=args.image_size)
    tr = build_transform(pre, train=False)
    total_bytes = sum(os.path.getsize(p) for p in table.paths())
    print(f"folder: {total_bytes / 2**20:.1f} MiB in {len(table)} files")

    tmp = tempfile.TemporaryDirectory(dir=args.out_dir)
    packs = {}
    for enc in ("jpeg", "raw"):
        res = pack_table(table, tax, Path(tmp.name) / f"{enc}.h5", image_size=args.image_size, encoding=enc)
        packs[enc] = res.shards[0]
        print(f"pack {enc:>4}: {res.n_bytes / 2**20:7.1f} MiB, {res.seconds:5.1f} s "
              f"({len(table) / res.seconds:,.0f} images/s), {res.n_passthrough} original JPEGs kept as they are")

    def make(transform) -> dict[str, torch.utils.data.Dataset]:
        out = {"folder (ImageDataset)": ImageDataset(table, transform)}
        for enc, path in packs.items():
            out[f"packed {enc} (PackedDataset)"] = PackedDataset(path, transform, taxonomy=tax)
        return out

    datasets = make(tr)
    ref = datasets["folder (ImageDataset)"]
    for i in (0, 1, len(table) - 1):
        if not torch.equal(datasets["packed raw (PackedDataset)"][i][0], ref[i][0]):
            print(f"ERROR: packed raw sample {i} differs from the folder loader", file=sys.stderr)
            return 1

    print(f"\nDataLoader: batch {args.batch_size}, shuffle; images/s of each pass, timed from its first batch")
    results: dict[str, dict[str, float]] = {}
    runs = [(f"{args.workers} workers, read + decode only", args.workers, DecodeOnly()),
            (f"{args.workers} workers, + eval transform (pad to {args.image_size}, normalise)", args.workers, tr),
            ("main process (0 workers), read + decode only", 0, DecodeOnly())]
    for mode, workers, transform in runs:
        print(f"\n{mode}")
        print(f"{'loader':<28}" + "".join(f"{'pass ' + str(p + 1):>10}" for p in range(args.passes))
              + f"{'median':>10}")
        rates = interleaved(make(transform), workers, args.batch_size, args.passes)
        for name, r in rates.items():
            results.setdefault(name, {})[mode] = float(np.median(r))
            print(f"{name:<28}" + "".join(f"{v:>10,.0f}" for v in r) + f"{np.median(r):>10,.0f}")
        print(f"load average after this block (1/5/15 min): {load_avg()}", flush=True)
    print("\nmedian pass relative to the folder loader:")
    for mode in next(iter(results.values())):
        base = results["folder (ImageDataset)"][mode]
        print(f"  {mode}: " + ", ".join(f"{k.split(' (')[0]} {v[mode] / base:.2f}x" for k, v in results.items()))
    print(f"load average at end (1/5/15 min): {load_avg()}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
