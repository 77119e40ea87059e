"""Taxonomy engine benchmark on the full NCBI taxonomy (2.6 M nodes).

    python bench/bench_taxonomy.py [--quick] [--ncbi PATH]

Every figure is printed next to a naive reference measured in the same process:

1. load + index of the full NCBI table vs a plain ``pandas.read_csv`` of the file,
   with peak memory (tracemalloc) and the bytes the index keeps per node;
2. 10^6 random LCA / path distances vs a Python parent-walk reference (run on a
   sample and *extrapolated*, labelled as such); values compared on the sample;
3. a 10,000-label tree (10,000 NCBI species of the Asteraceae with their ancestors):
   distance matrices (path, lca_height) and the marginalisation matrix vs a Python
   double loop over pairs (run on 300 labels, *extrapolated* to 10^4); values compared.

``--quick`` skips the tracemalloc pass and uses smaller naive samples.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import scipy

from taxonomist.taxonomy import Taxonomy
from taxonomist.taxonomy.transforms import collapse_single_child_chains, restrict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NCBI = Path(os.environ.get("TAXONOMIST_SHARED", REPO.parent / "shared")) / "data" / "taxonomies" / \
    "ncbi_taxonomy_2024-09-07.tsv.gz"
NCBI_RANKS = ["superkingdom", "kingdom", "phylum", "class", "order", "family", "genus", "species"]

ROWS: list[tuple[str, str, str, str]] = []


@dataclass(frozen=True)
class Timing:
    """Wall and CPU seconds of this process (the machine may be shared: CPU time is the steadier figure)."""

    wall: float
    cpu: float

    def __mul__(self, k: float) -> Timing:      # extrapolation
        return Timing(self.wall * k, self.cpu * k)


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[Timing, object]:
    """Best (by wall time) of ``repeat`` runs, and the last result."""
    best, out = Timing(float("inf"), float("inf")), None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        cur = Timing(time.perf_counter() - w, time.process_time() - c)
        best = min(best, cur, key=lambda t: t.wall)
    return best, out


def ratio(a: Timing, b: Timing) -> float:
    """a / b by CPU time."""
    return a.cpu / max(b.cpu, 1e-9)


def peak_mb(fn: Callable[[], object]) -> tuple[float, object]:
    """Peak traced memory (MB) while running ``fn`` (numpy and Python allocations)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 1e6, out


def row(task: str, ours: str, naive: str, note: str = "") -> None:
    ROWS.append((task, ours, naive, note))
    print(f"  {task:<46} {ours:>20} {naive:>30}  {note}", flush=True)


def fmt_s(t: Timing) -> str:
    def one(x: float) -> str:
        return f"{x:.3f}" if x < 100 else f"{x:,.0f}"
    return f"{one(t.wall)} / {one(t.cpu)} s"


# --------------------------------------------------------------- loading
def read_ncbi(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"rank": str, "scientific_name": str}, keep_default_na=False)


def ncbi_from_frame(df: pd.DataFrame) -> Taxonomy:
    """The same tree the NCBI importer builds: ids as keys, root = tax_id 1 (its own parent)."""
    ids = df.tax_id.to_numpy()
    par = df.parent_tax_id.to_numpy()
    srt = np.argsort(ids)
    pos = srt[np.searchsorted(ids, par, sorter=srt)]
    pos[ids == par] = -1
    ranks = df["rank"].to_numpy(dtype=object).copy()
    ranks[~np.isin(ranks, NCBI_RANKS)] = ""
    return Taxonomy.from_parents(pos, df.scientific_name.to_numpy(), ranks, ids, rank_order=NCBI_RANKS)


def load_ours(path: Path) -> tuple[Taxonomy, str]:
    try:
        from taxonomist.taxonomy import load  # the importer, when present
    except ImportError:
        load = None
    if load is not None:
        tax = load(path)
        how = "taxonomist.taxonomy.load"
    else:
        tax = ncbi_from_frame(read_ncbi(path))
        how = "read_csv + Taxonomy.from_parents"
    tax._lift  # noqa: B018 - build the binary-lifting table
    tax.height  # noqa: B018
    tax.preorder  # noqa: B018
    return tax, how


def index_bytes(tax: Taxonomy) -> int:
    arrays = [tax.parent, tax.depth, tax.is_label, tax._lift, tax.height, tax.preorder, tax.subtree_size]
    return int(sum(a.nbytes for a in arrays))


# ---------------------------------------------------------- naive references
def naive_lca_path(parent: list[int], depth: list[int], a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """Python parent walk: collect a's ancestors in a set, climb from b until one is hit."""
    lcas, dists = [], []
    for x, y in zip(a, b):
        up = set()
        v = x
        while v >= 0:
            up.add(v)
            v = parent[v]
        v = y
        while v not in up:
            v = parent[v]
        lcas.append(v)
        dists.append(depth[x] + depth[y] - 2 * depth[v])
    return lcas, dists


def naive_pairwise(parent: list[int], nodes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Python double loop over pairs (as the tools the field notes measured): path and LCA-height."""
    k = len(nodes)
    # heights by a Python walk from every leaf
    kids: dict[int, int] = {}
    for v, p in enumerate(parent):
        if p >= 0:
            kids[p] = kids.get(p, 0) + 1
    height = [0] * len(parent)
    for v in range(len(parent)):
        if v not in kids:
            h, u = 0, v
            while parent[u] >= 0:
                u, h = parent[u], h + 1
                if height[u] < h:
                    height[u] = h
    path = np.zeros((k, k), dtype=np.int64)
    lcah = np.zeros((k, k), dtype=np.int64)
    for i, x in enumerate(nodes):
        for j, y in enumerate(nodes):
            ax = []
            v = x
            while v >= 0:
                ax.append(v)
                v = parent[v]
            pos = {u: n for n, u in enumerate(ax)}
            v, steps = y, 0
            while v not in pos:
                v, steps = parent[v], steps + 1
            path[i, j] = pos[v] + steps
            lcah[i, j] = 0 if x == y else height[v]
    return path, lcah


def naive_marginalization(parent: list[int], labels: list[int], n: int) -> np.ndarray:
    """Dense [labels x nodes] 0/1 matrix filled by a Python walk per label."""
    m = np.zeros((len(labels), n), dtype=np.float32)
    for i, v in enumerate(labels):
        while v >= 0:
            m[i, v] = 1
            v = parent[v]
    return m


# --------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="no memory pass, smaller naive samples")
    ap.add_argument("--ncbi", type=Path, default=DEFAULT_NCBI, help="NCBI taxonomy TSV(.gz)")
    args = ap.parse_args(argv)
    if not args.ncbi.exists():
        print(f"NCBI file not found: {args.ncbi} (pass --ncbi or set TAXONOMIST_SHARED)", file=sys.stderr)
        return 2
    n_pairs_naive = 2_000 if args.quick else 10_000
    n_labels_naive = 100 if args.quick else 300
    print(f"machine: {platform.machine()} {platform.processor() or ''}, nproc={os.cpu_count()}, "
          f"python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}, "
          f"scipy {scipy.__version__}")
    print(f"command: python bench/bench_taxonomy.py{' --quick' if args.quick else ''}")
    print("  times: wall / CPU seconds of this process; ratios by CPU time")
    print(f"  {'task':<46} {'taxonomist':>20} {'naive reference':>30}  note")

    # 1. load + index -------------------------------------------------------
    t_read, frame = timed(partial(read_ncbi, args.ncbi))
    t_core, _ = timed(partial(ncbi_from_frame, frame))
    del frame, _
    t_load, (tax, how) = timed(lambda: load_ours(args.ncbi))
    row(f"NCBI load + index ({tax.n_nodes:,} nodes)", fmt_s(t_load), f"{fmt_s(t_read)} read_csv",
        f"{ratio(t_load, t_read):.1f}x read_csv; {how}; depth {tax.max_depth}")
    row("  of which Taxonomy.from_parents (canonical ids)", fmt_s(t_core), "-",
        f"{ratio(t_core, t_read):.1f}x read_csv, on the read frame: 2.6 M-name sort, level sorts, pointer jumping")
    if not args.quick:
        m_read, _ = peak_mb(lambda: read_ncbi(args.ncbi))
        m_load, _ = peak_mb(lambda: load_ours(args.ncbi))
        row("  peak memory (tracemalloc)", f"{m_load:,.0f} MB", f"{m_read:,.0f} MB read_csv",
            f"{m_load / m_read:.1f}x read_csv")
    per_node = index_bytes(tax) / tax.n_nodes
    row("  index arrays kept (parent, depth, lift, ...)", f"{per_node:.0f} B/node",
        f"{8 * (tax.max_depth + 1)} B/node", "vs an n x depth int64 ancestor table")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  (process max RSS so far: {maxrss:,.0f} MB)")

    # 2. 10^6 LCA / path distances -------------------------------------------
    rng = np.random.default_rng(0)
    n = 1_000_000
    a = rng.integers(0, tax.n_nodes, n)
    b = rng.integers(0, tax.n_nodes, n)
    t_lca, lca = timed(lambda: tax.lca(a, b), repeat=3)
    t_dist, dist = timed(lambda: tax.distance(a, b), repeat=3)
    t_rank, _ = timed(lambda: tax.distance(a, b, metric="rank_steps"), repeat=3)
    parent_l = tax.parent.tolist()
    depth_l = tax.depth.tolist()
    t_naive, (nl, nd) = timed(lambda: naive_lca_path(parent_l, depth_l, a[:n_pairs_naive].tolist(),
                                                     b[:n_pairs_naive].tolist()))
    assert nl == lca[:n_pairs_naive].tolist() and nd == dist[:n_pairs_naive].tolist()
    scale = n / n_pairs_naive
    row("10^6 random LCA (NCBI)", fmt_s(t_lca), f"{fmt_s(t_naive * scale)} (extrap.)",
        f"{ratio(t_naive * scale, t_lca):.0f}x; naive measured on {n_pairs_naive:,} pairs x{scale:.0f}; equal")
    row("10^6 random path distances (NCBI)", fmt_s(t_dist), f"{fmt_s(t_naive * scale)} (extrap.)",
        f"{ratio(t_naive * scale, t_dist):.0f}x; same walk")
    row("10^6 random rank-step distances (NCBI)", fmt_s(t_rank), "-", f"{len(tax.rank_order)} ranks")

    t_col, col = timed(partial(collapse_single_child_chains, tax))
    row("collapse single-child chains (full NCBI)", fmt_s(t_col), "-",
        f"{col.report['removed']:,} nodes removed -> {col.taxonomy.n_nodes:,}")
    del col

    # 3. a 10,000-label tree -------------------------------------------------
    clade = tax.find("Asteraceae")
    species = np.flatnonzero((tax.ranks == "species") & tax.is_ancestor(clade, np.arange(tax.n_nodes)))
    picks = rng.choice(species, 10_000, replace=False)
    t_restrict, res = timed(lambda: restrict(tax, picks, labels="nodes"))
    small = res.taxonomy
    row("restrict NCBI to 10k Asteraceae species", fmt_s(t_restrict), "-",
        f"-> {small.n_nodes:,} nodes, {small.n_labels:,} labels, depth {small.max_depth}")
    t_dp, dpath = timed(lambda: small.distance_matrix(metric="path"))
    t_dh, dheight = timed(lambda: small.distance_matrix(metric="lca_height"))
    t_m, marg = timed(lambda: small.marginalization_matrix())
    sub = np.sort(rng.choice(small.n_labels, n_labels_naive, replace=False))
    sub_nodes = small.label_ids[sub].tolist()
    parent_s = small.parent.tolist()
    t_np, (ref_path, ref_h) = timed(lambda: naive_pairwise(parent_s, sub_nodes))
    np.testing.assert_array_equal(dpath[np.ix_(sub, sub)], ref_path)
    np.testing.assert_array_equal(dheight[np.ix_(sub, sub)], ref_h)
    pair_scale = (small.n_labels / n_labels_naive) ** 2
    row("10k x 10k distance matrix, path", fmt_s(t_dp), f"{fmt_s(t_np * pair_scale)} (extrap.)",
        f"{ratio(t_np * pair_scale, t_dp):.0f}x; naive double loop (path + lca_height) on {n_labels_naive} "
        f"labels x{pair_scale:,.0f}; equal")
    row("10k x 10k distance matrix, lca_height", fmt_s(t_dh), "(same loop)", f"{dheight.nbytes / 1e6:.0f} MB int16")
    t_nm, ref_m = timed(lambda: naive_marginalization(parent_s, sub_nodes, small.n_nodes))
    np.testing.assert_array_equal(marg[sub].toarray(), ref_m)
    lin = small.n_labels / n_labels_naive
    row("marginalisation matrix, 10k labels", fmt_s(t_m), f"{fmt_s(t_nm * lin)} (extrap.)",
        f"{ratio(t_nm * lin, t_m):.0f}x; naive walk on {n_labels_naive} labels x{lin:.0f}; equal; nnz {marg.nnz:,}")
    p = rng.dirichlet(np.ones(small.n_labels), size=256).astype(np.float32)
    t_np2, node_p = timed(lambda: small.node_probabilities(p), repeat=3)
    row("node probabilities, batch 256 x 10k labels", fmt_s(t_np2), "-", f"-> [256, {small.n_nodes:,}]")
    assert np.allclose(node_p[:, 0], 1.0, atol=1e-3)
    print(f"max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
