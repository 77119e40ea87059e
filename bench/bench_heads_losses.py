"""Heads x losses benchmark: (a) step cost vs flat softmax + CE on NCBI trees, (b) accuracy on plankton.

    python bench/bench_heads_losses.py speed    [--sizes 1000 10000] [--rounds 7] [--ncbi PATH] [--dense-max N]
    python bench/bench_heads_losses.py plankton [--cache-dir DIR] [--epochs 8] [--seeds 0 1 2]
                                                [--heads ...] [--losses ...] [--out results.jsonl]

(a) ``speed``: forward + backward CPU time (one torch thread, ``time.process_time``: steady on a
    shared machine) of every registered head with every loss it supports, from random 512-d
    features (batch 256; 10 % of the targets partial, i.e. a non-label node), relative to the flat
    head + ``ce`` measured in the same rounds (baseline and combination alternate; the ratio is the
    median over rounds), and relative to a plain ``F.cross_entropy`` on the flat head's logits (every
    row a label target: the partial rows get a random label) as a baseline outside the project's
    code. Trees: the NCBI
    taxonomy restricted to 1,000 / 10,000 random species of the Asteraceae with all their
    ancestors (``taxonomy.transforms.restrict``; depth 26, 8 NCBI ranks). Loss construction time
    (the label distance matrix etc.) is printed separately: it is paid once.

(b) ``plankton``: every head x loss on the NDSB plankton train/val split with frozen
    ImageNet ``efficientnet_lite0`` features at 128 px (the data layer's feature cache:
    ``taxonomist.data.extract_features``; first run extracts, later runs read the cache), the
    same neck (LayerNorm, Linear 512, ReLU, dropout 0.3), the same budget (AdamW lr 2e-3,
    weight decay 1e-4, batch 256, one-cycle schedule (``OneCycleLR``: 10 % warm-up, cosine
    annealing), ``--epochs``) and several seeds. Validation:
    leaf top-1 error, mistake severity, hd@5, mean path distance
    (``taxonomist.metrics.compute_metrics``) and the training CPU time (one torch thread by default:
    on a shared 2-core machine two threads spin-wait, ~10x slower per step). Every result is appended to
    ``--out`` (JSON lines) as soon as it is done; the table is printed at the end (and can be
    re-made from the file with ``table --out FILE``). ``--shard K/N`` runs only the K-th of N
    interleaved slices of the (head, loss) list, so N processes (each with its own ``--out``) split
    the run; ``table --out A B`` reads several files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from taxonomist.losses import create_loss, list_losses, loss_options
from taxonomist.models import create_model
from taxonomist.models.heads import create_head, list_heads
from taxonomist.taxonomy import Taxonomy, load

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TAXONOMIST_SHARED", REPO.parent / "shared")) / "data"
NCBI = SHARED / "taxonomies" / "ncbi_taxonomy_2024-09-07.tsv.gz"
LABEL_LOSSES = ["ce", "taxonomy_smoothing", "soft_labels", "hxe", "expected_distance"]
MULTIHOT_LOSSES = ["hier_bce", "focal", "asymmetric"]
LOSS_VARIANTS: dict[str, tuple[str, dict]] = {"hier_bce_mcm": ("hier_bce", {"constraint": "mcm"})}
"""Benchmarked loss settings other than a registered loss's defaults: name -> (loss, options)."""


def make_loss(name: str, tax: Taxonomy, head, **opts):
    """``create_loss`` for a registered loss name or a :data:`LOSS_VARIANTS` entry."""
    base, extra = LOSS_VARIANTS.get(name, (name, {}))
    return create_loss(base, tax, head, **extra, **opts)


def compatible_losses(head) -> list[str]:
    """Losses that can train ``head``: the label-distribution losses always; ``per_rank_ce`` for
    per-level heads; the multi-hot losses for heads with a ``nodes`` output."""
    names = [n for n in LABEL_LOSSES if n in list_losses()]
    if hasattr(head, "level_targets") and hasattr(head, "levels"):
        names.append("per_rank_ce")
    if "nodes" in head.tasks:
        names += [n for n in MULTIHOT_LOSSES if n in list_losses()]
        names += [v for v, (base, _) in LOSS_VARIANTS.items() if base in names]
    return names


def head_forward(head, h: torch.Tensor, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return head(h, targets=targets) if getattr(head, "uses_targets", False) else head(h)


def mixed_targets(tax: Taxonomy, n: int, rng: np.random.Generator, partial_frac: float = 0.1) -> torch.Tensor:
    """Label targets with ``partial_frac`` of them replaced by a non-label node that has labels below."""
    t = tax.label_ids[rng.integers(0, tax.n_labels, n)]
    covered = tax.subtree_sum(tax.is_label.astype(np.int64)) > 0
    partial = np.flatnonzero(covered & ~tax.is_label)
    if len(partial):
        k = int(round(partial_frac * n))
        t[:k] = rng.choice(partial, k)
    return torch.as_tensor(t, dtype=torch.long)


# ------------------------------------------------------------------------ (a) speed
def ncbi_subtrees(sizes: list[int], path: Path, seed: int = 0) -> dict[int, Taxonomy]:
    from taxonomist.taxonomy.transforms import restrict

    t0 = time.perf_counter()
    tax = load(path)
    print(f"# NCBI loaded in {time.perf_counter() - t0:.1f} s: {tax.n_nodes:,} nodes", flush=True)
    clade = tax.find("Asteraceae")
    species = np.flatnonzero((tax.ranks == "species") & tax.is_ancestor(clade, np.arange(tax.n_nodes)))
    rng = np.random.default_rng(seed)
    out = {}
    for k in sizes:
        out[k] = restrict(tax, rng.choice(species, k, replace=False), labels="nodes").taxonomy
    return out


def time_step(head, loss, h: torch.Tensor, targets: torch.Tensor) -> float:
    """CPU seconds of one forward + backward (this process only: steadier than wall time on a shared machine)."""
    t0 = time.process_time()
    out = head_forward(head, h, targets)
    total = sum(loss(out, targets).values())
    total.backward()
    head.zero_grad(set_to_none=True)
    return time.process_time() - t0


def time_plain_ce(head, h: torch.Tensor, label_targets: torch.Tensor) -> float:
    """CPU seconds of one forward + backward of the flat head with ``F.cross_entropy`` (label indices)."""
    t0 = time.process_time()
    F.cross_entropy(head(h)["labels"], label_targets).backward()
    head.zero_grad(set_to_none=True)
    return time.process_time() - t0


def run_speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.speed_threads)
    trees = ncbi_subtrees(args.sizes, args.ncbi)
    rows = []
    for k, tax in trees.items():
        print(f"\n## {tax.n_labels:,} labels ({tax.n_nodes:,} nodes, depth {tax.max_depth}, "
              f"ranks {len(tax.rank_order)}), batch {args.batch}, features {args.features}", flush=True)
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        h = torch.randn(args.batch, args.features)
        targets = mixed_targets(tax, args.batch, rng)
        base_head = create_head("flat", tax, args.features)
        base_loss = create_loss("ce", tax, base_head)
        li = torch.as_tensor(tax.label_index)[targets]
        label_targets = torch.where(li >= 0, li, torch.as_tensor(rng.integers(0, tax.n_labels, len(li))))
        for _ in range(2):
            time_step(base_head, base_loss, h, targets)
            time_plain_ce(base_head, h, label_targets)
        for head_name in args.heads or list_heads():
            head = create_head(head_name, tax, args.features)
            for loss_name in compatible_losses(head):
                if args.losses and loss_name not in args.losses:
                    continue
                opts = {"dense_max": args.dense_max} if (args.dense_max is not None
                                                         and "dense_max" in loss_options(LOSS_VARIANTS.get(loss_name, (loss_name,))[0])) else {}
                t0 = time.perf_counter()
                loss = make_loss(loss_name, tax, head, **opts)
                build = time.perf_counter() - t0
                for _ in range(2):
                    time_step(head, loss, h, targets)
                ratios, plain_ratios, times, bases, plains = [], [], [], [], []
                for _ in range(args.rounds):
                    b = time_step(base_head, base_loss, h, targets)
                    f = time_plain_ce(base_head, h, label_targets)
                    c = time_step(head, loss, h, targets)
                    ratios.append(c / b)
                    plain_ratios.append(c / f)
                    times.append(c)
                    bases.append(b)
                    plains.append(f)
                row = {"labels": tax.n_labels, "head": head_name, "loss": loss_name,
                       "ms": 1000 * statistics.median(times), "flat_ce_ms": 1000 * statistics.median(bases),
                       "plain_ce_ms": 1000 * statistics.median(plains), "ratio": statistics.median(ratios),
                       "ratio_plain": statistics.median(plain_ratios), "build_s": build}
                rows.append(row)
                print(f"| {tax.n_labels:,} | {head_name} | {loss_name} | {row['ms']:.1f} | {row['ratio']:.2f}x | "
                      f"{row['ratio_plain']:.2f}x | {build:.2f} s |", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({"part": "speed", **r}) + "\n")


# ------------------------------------------------------------------------ (b) plankton
def plankton_features(cache_dir: Path, batch_size: int) -> tuple[Taxonomy, np.ndarray, np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    from taxonomist.data import Preprocess, extract_features, load_samples
    from taxonomist.models import create_backbone

    tax = load(SHARED / "plankton" / "class_paths.tsv")
    backbone = create_backbone("efficientnet_lite0", pretrained=True, trainable=False, image_size=128)
    pre = Preprocess(**backbone.preprocess)
    out = []
    for split in ("train", "val"):
        table = load_samples(SHARED / "plankton" / split, tax, verify_images="none")
        t0 = time.perf_counter()
        x = extract_features(backbone, backbone.cache_key, table, pre, cache_dir=cache_dir, batch_size=batch_size,
                             progress=False)
        print(f"# {split}: {len(table):,} images, features {x.shape} in {time.perf_counter() - t0:.1f} s "
              f"(cache {cache_dir})", flush=True)
        out += [x, table.nodes()]
    return tax, out[0], out[1], out[2], out[3]


def train_one(tax: Taxonomy, head_name: str, loss_name: str, seed: int, data, args) -> dict:
    from taxonomist.metrics import compute_metrics

    xtr, ytr, xva, yva = data
    torch.manual_seed(seed)
    model = create_model(tax, in_features=xtr.shape[1], head=head_name,
                         neck={"hidden": [512], "dropout": 0.3, "norm": "layer"})
    loss = make_loss(loss_name, tax, model.head)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    n = len(xtr)
    steps = args.epochs * ((n + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1,
                                                anneal_strategy="cos")
    gen = torch.Generator().manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, args.batch):
            idx = perm[i:i + args.batch]
            y = ytr[idx]
            out = model(features=xtr[idx], targets=y)
            total = sum(loss(out, y).values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model.label_probs(model(features=xva[i:i + 1024])) for i in range(0, len(xva), 1024)])
    m = compute_metrics(tax, probs.double().numpy(), yva.numpy())
    return {"part": "plankton", "head": head_name, "loss": loss_name, "seed": seed, "epochs": args.epochs,
            "top1_error": m["top1_error"], "mistake_severity": m["mistake_severity"], "hd@5": m["hdist@5"],
            "mean_path_distance": m["mean_path_distance"], "train_s": train_s,
            "train_cpu_s": train_cpu_s, "threads": torch.get_num_threads()}


def run_plankton(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)   # 1 by default: on a shared machine more threads spin and wait
    tax, xtr, ytr, xva, yva = plankton_features(args.cache_dir, args.feature_batch)
    data = (torch.from_numpy(xtr), torch.as_tensor(ytr, dtype=torch.long), torch.from_numpy(xva),
            torch.as_tensor(yva, dtype=torch.long))
    done = set()
    if args.out and Path(args.out).exists():
        for line in Path(args.out).read_text().splitlines():
            r = json.loads(line)
            if r.get("part") == "plankton" and r.get("epochs") == args.epochs:
                done.add((r["head"], r["loss"], r["seed"]))
    k, n_shards = (int(x) for x in args.shard.split("/"))
    jobs = []
    for head_name in args.heads or list_heads():
        head = create_model(tax, in_features=xtr.shape[1], head=head_name).head
        jobs += [(head_name, ln) for ln in compatible_losses(head) if not args.losses or ln in args.losses]
    for head_name, loss_name in jobs[k - 1::n_shards]:
        for seed in args.seeds:
            if (head_name, loss_name, seed) in done:
                continue
            r = train_one(tax, head_name, loss_name, seed, data, args)
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if args.out:
        print_table(args.out, args.epochs)


def print_table(paths: str | Path | list, epochs: int | None = None) -> None:
    paths = paths if isinstance(paths, list) else [paths]
    rows = [json.loads(x) for p in paths for x in Path(p).read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("part") == "plankton" and (epochs is None or r["epochs"] == epochs)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["head"], r["loss"]), []).append(r)
    keys = ["top1_error", "mistake_severity", "hd@5", "mean_path_distance", "train_cpu_s"]
    print("\n| head | loss | seeds | top-1 error % | mistake severity | hd@5 | mean path distance | train CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for (head, loss), rs in sorted(groups.items(), key=lambda kv: np.mean([r["top1_error"] for r in kv[1]])):
        cells = []
        for k in keys:
            v = np.array([r[k] for r in rs], dtype=float)
            scale = 100.0 if k == "top1_error" else 1.0
            sd = v.std(ddof=1) * scale if len(v) > 1 else 0.0
            prec = 1 if k in ("top1_error", "train_cpu_s") else 3
            cells.append(f"{v.mean() * scale:.{prec}f} ± {sd:.{prec}f}")
        print(f"| {head} | {loss} | {len(rs)} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["speed", "plankton", "table"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the plankton part")
    ap.add_argument("--heads", nargs="*", default=None)
    ap.add_argument("--losses", nargs="*", default=None)
    ap.add_argument("--out", nargs="+", default=None, help="append results as JSON lines (table: one or more "
                    "files to read)")
    ap.add_argument("--shard", default="1/1", help="plankton: run the K-th of N interleaved slices of the "
                    "(head, loss) list, as K/N (to split the run over N processes, each with its own --out)")
    ap.add_argument("--sizes", nargs="*", type=int, default=[1000, 10000])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--speed-threads", type=int, default=1, help="torch threads for the speed part (CPU time "
                    "is measured, so one thread keeps it comparable)")
    ap.add_argument("--dense-max", type=int, default=None, help="speed: the losses' dense_max (0 = distances "
                    "computed per batch, as for trees above 10^4 labels)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--ncbi", type=Path, default=NCBI)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "taxonomist" / "features")
    ap.add_argument("--feature-batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    args = ap.parse_args(argv)
    if args.out and args.part != "table":
        if len(args.out) > 1:
            ap.error("--out takes one file for speed/plankton (several only for table)")
        args.out = args.out[0]
    k, _, n = args.shard.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        ap.error(f"--shard {args.shard!r} must be K/N with 1 <= K <= N")
    print(f"# {platform.platform()}, python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"threads {args.threads}, cpus {os.cpu_count()}", flush=True)
    if args.part == "speed":
        print("| labels | head | loss | fwd+bwd CPU ms | vs flat+ce | vs F.cross_entropy | loss build |\n"
              "|---|---|---|---|---|---|---|")
        run_speed(args)
    elif args.part == "plankton":
        run_plankton(args)
    else:
        if not args.out:
            ap.error("table needs --out FILE")
        print_table(args.out, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
