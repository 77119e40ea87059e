"""Taxonomy engine benchmark on the full NCBI taxonomy (2.6 M nodes).

    python bench/bench_taxonomy.py [--quick] [--ncbi PATH]

Every figure is printed next to a naive reference measured in the same process:

1. load + index of the full NCBI table vs two plain ``pandas.read_csv`` reads of the file:
   with pandas' default dtypes (with pyarrow installed, pandas 3 keeps strings in Arrow
   buffers, no Python objects) and with ``dtype=object`` (Python strings, which is what the
   loader has to produce for the core). The load is split into its parts *inside the same
   run* (the reader's ``read_csv`` calls, the rest of the reader, ``Taxonomy.from_parents``,
   the index), so the parts add up to the total. Peak memory is the peak RSS of a fresh
   subprocess per side (tracemalloc cannot see Arrow's buffers), printed as the peak and as
   the growth over the same process after its imports;
2. 10^6 random LCA / path / rank-step distances vs Python parent walks (run on a sample and
   *extrapolated*, labelled as such); values compared on the sample;
3. collapsing single-child chains of the full NCBI vs a plain-Python re-parenting loop over
   all nodes followed by ``Taxonomy.from_parents`` on the result (the same canonical tree:
   fingerprints compared; the loop's own time is printed too);
4. a 10,000-label tree (10,000 NCBI species of the Asteraceae with their ancestors):
   restrict vs Python ancestor walks + ``from_parents`` (fingerprints compared), distance matrices (path, lca_height) and the
   marginalisation matrix vs a Python double loop over pairs (run on 300 labels,
   *extrapolated* to 10^4), node probabilities vs a numpy loop over nodes; values compared.

``--quick`` skips the memory subprocesses and uses smaller naive samples.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import scipy

try:    # pandas' default string dtype imports pyarrow lazily: import it up front, so that neither the
    import pyarrow  # noqa: F401   timings nor the memory baselines of the read_csv side pay for the import
except ImportError:
    pyarrow = None

from taxonomist.taxonomy import Taxonomy, load
from taxonomist.taxonomy.io import edges as edges_io
from taxonomist.taxonomy.transforms import collapse_single_child_chains, restrict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NCBI = Path(os.environ.get("TAXONOMIST_SHARED", REPO.parent / "shared")) / "data" / "taxonomies" / \
    "ncbi_taxonomy_2024-09-07.tsv.gz"

ROWS: list[tuple[str, str, str, str]] = []


@dataclass(frozen=True)
class Timing:
    """Wall and CPU seconds of this process (the machine may be shared: CPU time is the steadier figure)."""

    wall: float
    cpu: float

    def __mul__(self, k: float) -> Timing:      # extrapolation
        return Timing(self.wall * k, self.cpu * k)

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: Timing) -> Timing:
        return Timing(self.wall - other.wall, self.cpu - other.cpu)


ZERO = Timing(0.0, 0.0)


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


@contextmanager
def stopwatch(owner: object, attr: str, spent: list[Timing]) -> Iterator[None]:
    """Time every call of ``owner.attr`` (a function or classmethod) while inside the block."""
    static = inspect.getattr_static(owner, attr)
    bound = getattr(owner, attr)

    def wrapper(*args: object, **kwargs: object) -> object:
        w, c = time.perf_counter(), time.process_time()
        try:
            return bound(*args, **kwargs)
        finally:
            spent.append(Timing(time.perf_counter() - w, time.process_time() - c))

    setattr(owner, attr, classmethod(lambda cls, *a, **k: wrapper(*a, **k)) if isinstance(static, classmethod)
            else wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, static)


def total(spent: list[Timing]) -> Timing:
    out = ZERO
    for t in spent:
        out = out + t
    return out


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's own memory.
    (``getrusage``'s ``ru_maxrss`` is no use for a subprocess: it carries over the parent's peak
    across fork + exec.) Elsewhere ``ru_maxrss`` (macOS reports bytes).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def peak_rss_child(what: str, path: Path) -> dict[str, float]:
    """Run one side in a fresh interpreter; it reports its peak RSS after the imports and at the end."""
    res = subprocess.run([sys.executable, __file__, "--peak-of", what, "--ncbi", str(path)], capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def row(task: str, ours: str, naive: str, note: str = "") -> None:
    ROWS.append((task, ours, naive, note))
    print(f"  {task:<46} {ours:>20} {naive:>30}  {note}", flush=True)


def fmt_s(t: Timing) -> str:
    def one(x: float) -> str:
        return f"{x:.3f}" if x < 100 else f"{x:,.0f}"
    return f"{one(t.wall)} / {one(t.cpu)} s"


# --------------------------------------------------------------- loading
def read_default(path: Path) -> pd.DataFrame:
    """Plain read_csv, pandas' default dtypes (pandas 3 + pyarrow: strings in Arrow buffers)."""
    return pd.read_csv(path, sep="\t")


def read_object(path: Path) -> pd.DataFrame:
    """Plain read_csv into Python-object strings, every cell as written (what the loader needs)."""
    return pd.read_csv(path, sep="\t", dtype=object, keep_default_na=False, na_filter=False)


def build_index(tax: Taxonomy) -> Taxonomy:
    tax._lift  # noqa: B018 - build the binary-lifting table
    tax.height  # noqa: B018
    tax.preorder  # noqa: B018
    return tax


def load_ours(path: Path) -> Taxonomy:
    return build_index(load(path))


def load_in_parts(path: Path) -> tuple[Taxonomy, dict[str, Timing]]:
    """One load + index, with the time of its parts measured inside it (they add up to the total)."""
    reads: list[Timing] = []
    core: list[Timing] = []
    w, c = time.perf_counter(), time.process_time()
    with stopwatch(edges_io, "read_table", reads), stopwatch(Taxonomy, "from_parents", core):
        tax = load(path)
    t_loaded = Timing(time.perf_counter() - w, time.process_time() - c)
    t_index, _ = timed(partial(build_index, tax))
    parts = {"the reader's read_csv calls": total(reads), "Taxonomy.from_parents": total(core),
             "index (lift, height, pre-order)": t_index}
    parts["the rest of the reader"] = t_loaded - parts["the reader's read_csv calls"] - parts["Taxonomy.from_parents"]
    parts["total"] = t_loaded + t_index
    return tax, parts


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


def naive_rank_steps(parent: list[int], ranked: list[bool], a: list[int], b: list[int]) -> list[int]:
    """Python parent walk: ranked nodes from a up to the LCA (excluded) plus from b up to it."""
    out = []
    for x, y in zip(a, b):
        up = set()
        v = x
        while v >= 0:
            up.add(v)
            v = parent[v]
        v, nb = y, 0
        while v not in up:
            nb += ranked[v]
            v = parent[v]
        lca, u, na = v, x, 0
        while u != lca:
            na += ranked[u]
            u = parent[u]
        out.append(na + nb)
    return out


def naive_collapse(parent: list[int], is_label: list[bool]) -> list[int]:
    """Plain-Python collapse: nodes with one child (not the root, not labels) go; every kept node's new
    parent is its nearest kept ancestor (-1 for removed nodes and the root). Structure only."""
    n = len(parent)
    kids = [0] * n
    for p in parent:
        if p >= 0:
            kids[p] += 1
    keep = [kids[v] != 1 or v == 0 or is_label[v] for v in range(n)]
    anc = [-1] * n          # nearest kept strict ancestor; ids are breadth-first, parents come first
    for v in range(1, n):
        p = parent[v]
        anc[v] = p if keep[p] else anc[p]
    return [anc[v] if keep[v] else -1 for v in range(n)]


def rebuild(tax: Taxonomy, new_parent: np.ndarray, kept: np.ndarray, is_label: np.ndarray) -> Taxonomy:
    """The naive side's canonical tree: ``Taxonomy.from_parents`` over the kept old nodes (``new_parent``
    holds old ids), sorting the names afresh (the transforms reuse the old tree's name order)."""
    pos = np.full(tax.n_nodes, -1, dtype=np.int64)
    pos[kept] = np.arange(len(kept))
    par = new_parent[kept]
    return Taxonomy.from_parents(np.where(par >= 0, pos[np.maximum(par, 0)], -1), tax.names[kept], tax.ranks[kept],
                                 tax.keys[kept], labels=is_label[kept], rank_order=tax.rank_order,
                                 check_rank_order=False)


def naive_restrict(parent: list[int], picks: list[int]) -> set[int]:
    """Kept nodes of restrict(): each pick and its ancestors, by walking up until a kept node."""
    kept = {0}
    for v in picks:
        while v not in kept:
            kept.add(v)
            v = parent[v]
    return kept


def naive_node_probabilities(parent: np.ndarray, label_ids: np.ndarray, p: np.ndarray) -> np.ndarray:
    """numpy loop over nodes, bottom-up: each node's column is added to its parent's."""
    out = np.zeros((p.shape[0], len(parent)), dtype=p.dtype)
    out[:, label_ids] = p
    for v in range(len(parent) - 1, 0, -1):
        out[:, parent[v]] += out[:, v]
    return out


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
def peak_of(what: str, path: Path) -> int:
    """Child mode (``--peak-of``): run one side and print its peak RSS as JSON."""
    fns = {"read_default": read_default, "read_object": read_object, "load": load_ours}
    after_imports = max_rss_mb()
    fns[what](path)
    print(json.dumps({"after_imports_mb": after_imports, "peak_mb": max_rss_mb()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="no memory subprocesses, smaller naive samples")
    ap.add_argument("--ncbi", type=Path, default=DEFAULT_NCBI, help="NCBI taxonomy TSV(.gz)")
    ap.add_argument("--peak-of", choices=["read_default", "read_object", "load"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.ncbi.exists():
        print(f"NCBI file not found: {args.ncbi} (pass --ncbi or set TAXONOMIST_SHARED)", file=sys.stderr)
        return 2
    if args.peak_of:
        return peak_of(args.peak_of, args.ncbi)
    n_pairs_naive = 2_000 if args.quick else 10_000
    n_labels_naive = 100 if args.quick else 300
    arrow = f"pyarrow {pyarrow.__version__}" if pyarrow is not None else "no pyarrow"
    started = time.perf_counter()
    print(f"date: {datetime.date.today().isoformat()}; machine: {platform.machine()} {platform.processor() or ''}, "
          f"nproc={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}, "
          f"numpy {np.__version__}, pandas {pd.__version__} ({arrow}), scipy {scipy.__version__}")
    print(f"command: python bench/bench_taxonomy.py{' --quick' if args.quick else ''}")
    print("  times: wall / CPU seconds of this process; ratios by CPU time")
    print(f"  {'task':<46} {'taxonomist':>20} {'naive reference':>30}  note")

    # 1. load + index -------------------------------------------------------
    t_read, _ = timed(partial(read_default, args.ncbi))
    t_obj, _ = timed(partial(read_object, args.ncbi))
    del _
    tax, parts = load_in_parts(args.ncbi)
    t_load = parts["total"]
    row(f"NCBI load + index ({tax.n_nodes:,} nodes)", fmt_s(t_load), f"{fmt_s(t_read)} read_csv",
        f"{ratio(t_load, t_read):.1f}x read_csv (default dtypes{', Arrow strings' if 'no' not in arrow else ''}); "
        f"depth {tax.max_depth}")
    row("", "", f"{fmt_s(t_obj)} read_csv, object",
        f"{ratio(t_load, t_obj):.1f}x read_csv(dtype=object): the Python strings the loader needs")
    for name in ("the reader's read_csv calls", "the rest of the reader", "Taxonomy.from_parents",
                 "index (lift, height, pre-order)"):
        t = parts[name]
        row(f"  of which {name}", fmt_s(t), "-", f"{ratio(t, t_load):.0%} of the load (CPU)")
    if not args.quick:
        mem = {what: peak_rss_child(what, args.ncbi) for what in ("read_default", "read_object", "load")}

        def grow(m: dict[str, float]) -> float:
            return max(m["peak_mb"] - m["after_imports_mb"], 1.0)

        row("  peak RSS (fresh process per side)", f"{mem['load']['peak_mb']:,.0f} MB",
            f"{mem['read_default']['peak_mb']:,.0f} MB read_csv", f"{mem['read_object']['peak_mb']:,.0f} MB "
            f"read_csv(dtype=object); {mem['load']['after_imports_mb']:,.0f} MB after the imports")
        row("  growth over the imports", f"{grow(mem['load']):,.0f} MB", f"{grow(mem['read_default']):,.0f} MB "
            "read_csv", f"{grow(mem['load']) / grow(mem['read_default']):.1f}x read_csv, "
            f"{grow(mem['load']) / grow(mem['read_object']):.1f}x read_csv(dtype=object) "
            f"({grow(mem['read_object']):,.0f} MB)")
    per_node = index_bytes(tax) / tax.n_nodes
    row("  index arrays kept (parent, depth, lift, ...)", f"{per_node:.0f} B/node",
        f"{8 * (tax.max_depth + 1)} B/node", "vs an n x depth int64 ancestor table")
    print(f"  (process max RSS so far: {max_rss_mb():,.0f} MB)")

    # 2. 10^6 LCA / path / rank-step distances --------------------------------
    rng = np.random.default_rng(0)
    n = 1_000_000
    a = rng.integers(0, tax.n_nodes, n)
    b = rng.integers(0, tax.n_nodes, n)
    t_lca, lca = timed(lambda: tax.lca(a, b), repeat=3)
    t_dist, dist = timed(lambda: tax.distance(a, b), repeat=3)
    t_rank, drank = timed(lambda: tax.distance(a, b, metric="rank_steps"), repeat=3)
    parent_l = tax.parent.tolist()
    depth_l = tax.depth.tolist()
    a_s, b_s = a[:n_pairs_naive].tolist(), b[:n_pairs_naive].tolist()
    t_naive, (nl, nd) = timed(lambda: naive_lca_path(parent_l, depth_l, a_s, b_s))
    assert nl == lca[:n_pairs_naive].tolist() and nd == dist[:n_pairs_naive].tolist()
    ranked = (tax.rank_index >= 0)
    ranked[0] = False                   # rank counts leave the root out
    ranked_l = ranked.tolist()
    t_naive_r, nr = timed(lambda: naive_rank_steps(parent_l, ranked_l, a_s, b_s))
    assert nr == drank[:n_pairs_naive].tolist()
    scale = n / n_pairs_naive
    row("10^6 random LCA (NCBI)", fmt_s(t_lca), f"{fmt_s(t_naive * scale)} (extrap.)",
        f"{ratio(t_naive * scale, t_lca):.0f}x; naive measured on {n_pairs_naive:,} pairs x{scale:.0f}; equal")
    row("10^6 random path distances (NCBI)", fmt_s(t_dist), f"{fmt_s(t_naive * scale)} (extrap.)",
        f"{ratio(t_naive * scale, t_dist):.0f}x; same walk")
    row("10^6 random rank-step distances (NCBI)", fmt_s(t_rank), f"{fmt_s(t_naive_r * scale)} (extrap.)",
        f"{ratio(t_naive_r * scale, t_rank):.0f}x; {len(tax.rank_order)} ranks; naive walk counting ranked nodes "
        f"on {n_pairs_naive:,} pairs x{scale:.0f}; equal")

    # 3. collapse single-child chains of the full tree --------------------------
    t_col, col = timed(partial(collapse_single_child_chains, tax))
    label_l = tax.is_label.tolist()
    t_ncol, ref_anc = timed(lambda: naive_collapse(parent_l, label_l))
    ref_anc = np.array(ref_anc)
    kept = np.flatnonzero((ref_anc >= 0) | (np.arange(tax.n_nodes) == 0))
    t_ncol_b, ref_col = timed(lambda: rebuild(tax, ref_anc, kept, tax.is_label))
    assert ref_col.fingerprint == col.taxonomy.fingerprint
    row("collapse single-child chains (full NCBI)", fmt_s(t_col), f"{fmt_s(t_ncol + t_ncol_b)} naive",
        f"{ratio(t_ncol + t_ncol_b, t_col):.1f}x; {col.report['removed']:,} nodes removed -> "
        f"{col.taxonomy.n_nodes:,}; naive = Python re-parenting loop {t_ncol.cpu:.2f} s + from_parents "
        f"{t_ncol_b.cpu:.2f} s CPU; same fingerprint")
    del col, ref_col, ref_anc, kept

    # 4. a 10,000-label tree -------------------------------------------------
    clade = tax.find("Asteraceae")
    species = np.flatnonzero((tax.ranks == "species") & tax.is_ancestor(clade, np.arange(tax.n_nodes)))
    picks = rng.choice(species, 10_000, replace=False)
    t_restrict, res = timed(lambda: restrict(tax, picks, labels="nodes"))
    small = res.taxonomy
    picks_l = picks.tolist()
    t_nres, kept_set = timed(lambda: naive_restrict(parent_l, picks_l))
    kept = np.array(sorted(kept_set))
    pick_mask = np.zeros(tax.n_nodes, dtype=bool)
    pick_mask[picks] = True
    t_nres_b, ref_small = timed(lambda: rebuild(tax, tax.parent, kept, pick_mask))
    assert ref_small.fingerprint == small.fingerprint
    row("restrict NCBI to 10k Asteraceae species", fmt_s(t_restrict), f"{fmt_s(t_nres + t_nres_b)} naive",
        f"{ratio(t_nres + t_nres_b, t_restrict):.1f}x; -> {small.n_nodes:,} nodes, {small.n_labels:,} labels, depth "
        f"{small.max_depth}; naive = Python ancestor walks {t_nres.cpu:.3f} s + from_parents {t_nres_b.cpu:.3f} s "
        "CPU; same fingerprint")
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
    t_nnp, ref_p = timed(lambda: naive_node_probabilities(small.parent, small.label_ids, p))
    np.testing.assert_allclose(node_p, ref_p, rtol=1e-4, atol=1e-5)
    assert np.allclose(node_p[:, 0], 1.0, atol=1e-3)
    row("node probabilities, batch 256 x 10k labels", fmt_s(t_np2), f"{fmt_s(t_nnp)} numpy loop",
        f"{ratio(t_nnp, t_np2):.0f}x; -> [256, {small.n_nodes:,}]; naive: one column add per node, bottom-up; "
        "equal (float32 tolerance)")
    print(f"max RSS: {max_rss_mb():,.0f} MB; load average {os.getloadavg()[0]:.1f}; "
          f"{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
