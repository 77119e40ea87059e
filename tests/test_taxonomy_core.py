"""Taxonomy core: every vectorised function against a slow, obviously-correct reference.

Trees are REAL (plankton NDSB, FathomNet 2025 lineage, CIFAR-100 5-level, a seeded
sample of NCBI, and the full NCBI in a slow test) plus numpy-seeded random shapes
(random recursive trees, a 1000-deep chain, a 100k star). The references walk
parent pointers with plain while loops over Python dicts/lists.
"""

from __future__ import annotations

import csv
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonomist.taxonomy import AmbiguousNameError, Taxonomy, TaxonomyError, UnknownNameError

FATHOMNET_RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
NCBI_RANKS = ["superkingdom", "kingdom", "phylum", "class", "order", "family", "genus", "species"]


# ------------------------------------------------------------------ builders
# Tiny stand-alone importers (the real ones live in taxonomist.taxonomy.io); each returns the
# raw input (parent, names, ranks, keys, labels) so tests can shuffle rows and rebuild.

def _paths_to_rows(paths: list[list[str]], ranks_of: list[list[str]] | None = None,
                   root: str = "root") -> dict[str, list]:
    """Lineages (root excluded) -> parent/name/rank/key rows; a lineage's last node is a label."""
    index = {"": 0}
    rows = {"parent": [-1], "names": [root], "ranks": [""], "keys": [""], "labels": [False]}
    for li, path in enumerate(paths):
        key = ""
        for d, name in enumerate(path):
            pkey, key = key, key + " > " + name
            if key not in index:
                index[key] = len(rows["parent"])
                rows["parent"].append(index[pkey])
                rows["names"].append(name)
                rows["ranks"].append(ranks_of[li][d] if ranks_of else "")
                rows["keys"].append(key)
                rows["labels"].append(False)
        rows["labels"][index[key]] = True
    return rows


def plankton_rows(plankton_dir: Path) -> dict[str, list]:
    lines = (plankton_dir / "class_paths.tsv").read_text().splitlines()[1:]
    paths = []
    for line in lines:
        cls, path = line.split("\t")
        parts = path.split(" > ")
        assert parts[-1] == cls
        paths.append(parts)
    return _paths_to_rows(paths)


def fathomnet_rows(taxonomies_dir: Path) -> dict[str, list]:
    with open(taxonomies_dir / "fathomnet2025_lineage.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    paths, ranks = [], []
    for r in rows:
        lineage = [(rk, r[rk]) for rk in FATHOMNET_RANKS if r[rk]]
        paths.append([v for _, v in lineage])
        ranks.append([rk for rk, _ in lineage])
    return _paths_to_rows(paths, ranks)


def cifar_rows(taxonomies_dir: Path) -> dict[str, list]:
    df = pd.read_csv(taxonomies_dir / "cifar100_5level.csv")
    paths = [[f"L1_{r.level1_id}", f"L2_{r.level2_id}", f"L3_{r.level3_id}", r.coarse_name, r.fine_name]
             for r in df.itertuples()]
    return _paths_to_rows(paths)


def read_ncbi(taxonomies_dir: Path) -> pd.DataFrame:
    return pd.read_csv(taxonomies_dir / "ncbi_taxonomy_2024-09-07.tsv.gz", sep="\t",
                       dtype={"rank": str, "scientific_name": str}, keep_default_na=False)


def ncbi_parent_index(df: pd.DataFrame) -> np.ndarray:
    ids = df.tax_id.to_numpy()
    par = df.parent_tax_id.to_numpy()
    srt = np.argsort(ids)
    pos = srt[np.searchsorted(ids, par, sorter=srt)]
    assert (ids[pos] == par).all()
    pos[ids == par] = -1
    return pos


def ncbi_ranks(df: pd.DataFrame) -> np.ndarray:
    r = df["rank"].to_numpy(dtype=object).copy()
    r[~np.isin(r, NCBI_RANKS)] = ""
    return r


def ncbi_sample_rows(df: pd.DataFrame, n_species: int = 3000, seed: int = 0) -> dict[str, list]:
    """A seeded sample of NCBI species (+ some internal nodes) with all their ancestors."""
    rng = np.random.default_rng(seed)
    pos = ncbi_parent_index(df)
    species = np.flatnonzero(df["rank"].to_numpy() == "species")
    start = np.r_[rng.choice(species, n_species, replace=False), rng.choice(len(df), 200, replace=False)]
    keep = np.zeros(len(df), dtype=bool)
    cur = start
    while len(cur):
        keep[cur] = True
        cur = pos[cur]
        cur = cur[(cur >= 0) & ~keep[np.maximum(cur, 0)]]
    idx = np.flatnonzero(keep)
    remap = np.full(len(df), -1)
    remap[idx] = np.arange(len(idx))
    par = np.where(pos[idx] >= 0, remap[np.maximum(pos[idx], 0)], -1)
    sub = df.iloc[idx]
    return {"parent": par.tolist(), "names": sub.scientific_name.tolist(), "ranks": ncbi_ranks(sub).tolist(),
            "keys": sub.tax_id.astype(str).tolist(), "labels": None}


def build(rows: dict[str, list], rank_order=None, **kw) -> Taxonomy:
    labels = "leaves" if rows.get("labels") is None else rows["labels"]
    return Taxonomy.from_parents(rows["parent"], rows["names"], rows["ranks"], rows["keys"], labels=labels,
                                 rank_order=rank_order, **kw)


def shuffled(rows: dict[str, list], seed: int) -> dict[str, list]:
    """The same tree with its rows in a random order (parent indices rewritten)."""
    n = len(rows["parent"])
    perm = np.random.default_rng(seed).permutation(n)   # new row i holds old row perm[i]
    where_now = np.empty(n, dtype=np.int64)
    where_now[perm] = np.arange(n)
    par = np.asarray(rows["parent"])[perm]
    out = {"parent": np.where(par >= 0, where_now[np.maximum(par, 0)], -1).tolist()}
    for k in ("names", "ranks", "keys", "labels"):
        out[k] = None if rows.get(k) is None else [rows[k][i] for i in perm]
    return out


@pytest.fixture(scope="module")
def ncbi_df(taxonomies_dir: Path) -> pd.DataFrame:
    return read_ncbi(taxonomies_dir)


@pytest.fixture(scope="module")
def raw(plankton_dir: Path, taxonomies_dir: Path, ncbi_df: pd.DataFrame) -> dict[str, tuple[dict, object]]:
    return {
        "plankton": (plankton_rows(plankton_dir), None),
        "fathomnet": (fathomnet_rows(taxonomies_dir), FATHOMNET_RANKS),
        "cifar": (cifar_rows(taxonomies_dir), None),
        "ncbi_sample": (ncbi_sample_rows(ncbi_df), NCBI_RANKS),
    }


@pytest.fixture(scope="module")
def trees(raw) -> dict[str, Taxonomy]:
    return {name: build(rows, rank_order=ro) for name, (rows, ro) in raw.items()}


REAL = ["plankton", "fathomnet", "cifar", "ncbi_sample"]


# ---------------------------------------------------------------- references
class Ref:
    """Slow references over plain Python lists."""

    def __init__(self, tax: Taxonomy) -> None:
        self.tax = tax
        self.parent = tax.parent.tolist()
        self.n = len(self.parent)
        self.kids: dict[int, list[int]] = {v: [] for v in range(self.n)}
        for v in range(1, self.n):
            self.kids[self.parent[v]].append(v)

    def path_up(self, v: int) -> list[int]:
        out = [v]
        while self.parent[out[-1]] >= 0:
            out.append(self.parent[out[-1]])
        return out  # v first, root last

    def depth(self, v: int) -> int:
        d = 0
        while self.parent[v] >= 0:
            v = self.parent[v]
            d += 1
        return d

    def lca(self, a: int, b: int) -> int:
        up = set(self.path_up(a))
        while b not in up:
            b = self.parent[b]
        return b

    def height(self, v: int) -> int:
        best, stack = 0, [(v, 0)]
        while stack:
            u, h = stack.pop()
            best = max(best, h)
            stack.extend((c, h + 1) for c in self.kids[u])
        return best

    def subtree(self, v: int) -> list[int]:
        out, stack = [], [v]
        while stack:
            u = stack.pop()
            out.append(u)
            stack.extend(self.kids[u])
        return out

    def distance(self, a: int, b: int, metric: str, ranks=None) -> int:
        c = self.lca(a, b)
        pa = self.path_up(a)
        pb = self.path_up(b)
        side = pa[:pa.index(c)] + pb[:pb.index(c)]   # nodes strictly below the LCA on both sides
        if metric == "path":
            return len(side)
        if metric == "lca_height":
            return 0 if a == b else self.height(c)
        ranks = list(self.tax.rank_order if ranks is None else ranks)
        return sum(1 for v in side if self.tax.ranks[v] in ranks)


def ref_canonical_keys(rows: dict[str, list]) -> list[str]:
    """BFS from the root with a queue; children sorted by (name, key). Returns keys in visit order."""
    parent = rows["parent"]
    kids: dict[int, list[int]] = {}
    root = parent.index(-1)
    for i, p in enumerate(parent):
        if p >= 0:
            kids.setdefault(p, []).append(i)
    out, queue = [], deque([root])
    while queue:
        v = queue.popleft()
        out.append(rows["keys"][v])
        queue.extend(sorted(kids.get(v, []), key=lambda i: (rows["names"][i], rows["keys"][i])))
    return out


def _pairs(tax: Taxonomy, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random pairs, plus equal pairs and (ancestor, descendant) pairs."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, tax.n_nodes, n)
    b = rng.integers(0, tax.n_nodes, n)
    b[: n // 10] = a[: n // 10]
    anc = a[n // 10: n // 5]
    b[n // 10: n // 5] = tax.parent[np.maximum(anc, 1)]
    return a, b


# --------------------------------------------------------------- canonical ids
@pytest.mark.parametrize("name", REAL)
def test_canonical_bfs_order_matches_queue_reference(raw, trees, name):
    rows, _ = raw[name]
    tax = trees[name]
    assert tax.keys.tolist() == ref_canonical_keys(rows)
    assert tax.parent[0] == -1
    assert (tax.parent[1:] < np.arange(1, tax.n_nodes)).all()
    assert (np.diff(tax.parent[1:]) >= 0).all()        # children of a node are one contiguous range
    assert (np.diff(tax.depth) >= 0).all()


@pytest.mark.parametrize("name", REAL)
def test_shuffled_rows_give_same_ids_and_fingerprint(raw, trees, name):
    rows, ro = raw[name]
    tax = trees[name]
    for seed in (1, 2):
        other, order = build(shuffled(rows, seed), rank_order=ro, return_order=True)
        assert other.fingerprint == tax.fingerprint
        np.testing.assert_array_equal(other.parent, tax.parent)
        assert other.keys.tolist() == tax.keys.tolist()
        assert other.names.tolist() == tax.names.tolist()
        np.testing.assert_array_equal(other.is_label, tax.is_label)
        assert other == tax
    # the order maps new ids to input rows
    _, order = build(rows, rank_order=ro, return_order=True)
    assert [rows["keys"][i] for i in order] == tax.keys.tolist()


def test_fingerprint_changes_with_content(trees):
    tax = trees["plankton"]
    assert tax.with_labels(tax.leaves).fingerprint != tax.fingerprint
    assert tax.fingerprint.startswith("sha256:")


def test_depth_by_pointer_jumping_matches_walk(trees):
    for name in REAL:
        tax = trees[name]
        ref = Ref(tax)
        assert tax.depth.tolist() == [ref.depth(v) for v in range(tax.n_nodes)], name


def test_plankton_facts(trees):
    tax = trees["plankton"]
    s = tax.summary()
    assert s["n_labels"] == 121 and s["n_internal_labels"] == 18
    assert tax.names[0] == "root"
    assert sorted(tax.names[tax.children(0)].tolist()) == ["ARTIFACTS", "PLANKTON"]
    assert s["n_single_child"] == int(sum(1 for v in range(tax.n_nodes) if len(tax.children(v)) == 1))
    assert s["depth_max"] == max(Ref(tax).depth(v) for v in range(tax.n_nodes))
    assert s["fingerprint"] == tax.fingerprint
    # ids: the two top groups sorted by name
    assert tax.names[1] == "ARTIFACTS" and tax.names[2] == "PLANKTON"


def test_cifar_facts(trees):
    tax = trees["cifar"]
    assert tax.n_labels == 100 and tax.label_is_leaf.all()
    assert (tax.depth[tax.label_ids] == 5).all()
    assert [len(np.flatnonzero(tax.depth == d)) for d in range(6)] == [1, 2, 4, 8, 20, 100]


def test_importer_agrees_with_reference_builders(plankton_dir, taxonomies_dir, trees):
    """The real importers (taxonomy/io) build the same canonical trees as the tiny builders here."""
    import taxonomist.taxonomy as taxonomy_pkg
    load = getattr(taxonomy_pkg, "load", None)
    if load is None:
        pytest.skip("taxonomist.taxonomy.load is not available")
    assert load(plankton_dir / "class_paths.tsv").fingerprint == trees["plankton"].fingerprint
    fn = load(taxonomies_dir / "fathomnet2025_lineage.csv")
    loveni = fn.find("Asteronyx loveni")
    assert int(fn.distance(fn.find("Asteronyx", rank="genus"), loveni, metric="rank_steps")) == 1
    assert int(fn.distance(fn.find("Ophiacanthidae"), loveni, metric="rank_steps")) == 6


# ------------------------------------------------------------------ bad input
def _chain_rows(n: int) -> dict[str, list]:
    return {"parent": [-1] + list(range(n - 1)), "names": [f"n{i}" for i in range(n)],
            "ranks": None, "keys": None, "labels": None}


def test_cycle_is_reported_with_its_nodes(raw):
    rows, _ = raw["plankton"]
    parent = list(rows["parent"])
    a = rows["keys"].index(" > PLANKTON > CRUSTACEANS")
    b = rows["keys"].index(" > PLANKTON > CRUSTACEANS > COPEPODS > copepod_calanoid")
    parent[a] = b                           # CRUSTACEANS under one of its own descendants
    with pytest.raises(TaxonomyError, match="cycle") as exc:
        Taxonomy.from_parents(parent, rows["names"], keys=rows["keys"])
    assert "CRUSTACEANS" in str(exc.value) and "copepod_calanoid" in str(exc.value)
    parent = list(rows["parent"])
    parent[a] = a                           # self loop
    with pytest.raises(TaxonomyError, match="cycle of 1 node"):
        Taxonomy.from_parents(parent, rows["names"], keys=rows["keys"])


def test_structural_errors_name_the_rows():
    with pytest.raises(TaxonomyError, match="exactly one root, found 2.*'b'"):
        Taxonomy.from_parents([-1, -1, 0], ["a", "b", "c"])
    with pytest.raises(TaxonomyError, match="every node has a parent"):
        Taxonomy.from_parents([1, 0], ["a", "b"])
    with pytest.raises(TaxonomyError, match="'c'.*does not exist"):
        Taxonomy.from_parents([-1, 0, 7], ["a", "b", "c"])
    with pytest.raises(TaxonomyError, match="empty name.*line 2"):
        Taxonomy.from_parents([-1, 0, 0], ["a", None, "c"], keys=["1", "2", "3"], where=lambda i: f"line {i + 1}")
    with pytest.raises(TaxonomyError, match="empty name"):
        Taxonomy.from_parents([-1, 0], ["a", float("nan")], keys=["1", "2"])
    with pytest.raises(TaxonomyError, match="duplicate node id.*'x'.*pass keys="):
        Taxonomy.from_parents([-1, 0, 0], ["r", "x", "x"])
    with pytest.raises(TaxonomyError, match="expected 3 names"):
        Taxonomy.from_parents([-1, 0, 0], ["r", "x"])
    with pytest.raises(TaxonomyError, match="at least one node"):
        Taxonomy.from_parents([], [])
    with pytest.raises(TaxonomyError, match="integer"):
        Taxonomy.from_parents([-1.0, 0.5], ["a", "b"])
    with pytest.raises(TypeError):
        Taxonomy(np.array([-1]), np.array(["r"], dtype=object), np.array([""], dtype=object),
                 np.array(["r"], dtype=object), np.array([True]))


def test_missing_text_values():
    tax = Taxonomy.from_parents([-1, 0, 0, 0, 0], ["root", "None", "nan", "a", "b"],
                                ranks=["", np.nan, None, pd.NA, "genus"], keys=[1, 2, 3, 4, 5])
    assert tax.names.tolist() == ["root", "None", "a", "b", "nan"]     # literal text stays text
    assert tax.ranks.tolist() == ["", "", "", "genus", ""]               # missing values are unranked
    assert tax.keys.tolist() == ["1", "2", "4", "5", "3"]                # integer keys become strings
    assert tax.rank_order == ("genus",)
    np_names = Taxonomy.from_parents(np.array([-1, 0]), np.array(["r", "x"]))   # numpy '<U' input
    assert np_names.names.dtype == object and np_names.names.tolist() == ["r", "x"]


def test_homonym_siblings_are_ordered_by_key():
    rows = {"parent": [-1, 0, 0, 0], "names": ["r", "x", "x", "a"], "ranks": None, "keys": ["0", "k2", "k1", "k3"],
            "labels": None}
    tax = build(rows)
    assert tax.names.tolist() == ["r", "a", "x", "x"]
    assert tax.keys.tolist() == ["0", "k3", "k1", "k2"]
    assert build(shuffled(rows, 3)).keys.tolist() == tax.keys.tolist()


# ------------------------------------------------------------ ancestors & LCA
@pytest.mark.parametrize("name", REAL)
def test_lca_and_distances_match_reference(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    a, b = _pairs(tax, 400, seed=5)
    lca = tax.lca(a, b)
    assert lca.tolist() == [ref.lca(x, y) for x, y in zip(a.tolist(), b.tolist())]
    metrics = ["path", "lca_height"] + (["rank_steps"] if tax.has_ranks else [])
    for metric in metrics:
        got = tax.distance(a, b, metric=metric)
        want = [ref.distance(x, y, metric) for x, y in zip(a.tolist(), b.tolist())]
        assert got.tolist() == want, metric
    # broadcasting and scalars
    assert tax.lca(a[:5, None], b[None, :7]).shape == (5, 7)
    assert int(tax.lca(int(a[0]), int(b[0]))) == ref.lca(int(a[0]), int(b[0]))


@pytest.mark.parametrize("name", ["plankton", "fathomnet"])
def test_lca_and_distance_reject_invalid_ids(trees, name):
    """-1 used to wrap to the last node and floats were truncated: both are errors now, for either argument."""
    tax = trees[name]
    ref = Ref(tax)
    last = tax.n_nodes - 1
    good = np.array([1, 2, last])
    for fn in (tax.lca, lambda x, y: tax.distance(x, y), lambda x, y: tax.distance(x, y, metric="lca_height")):
        with pytest.raises(TaxonomyError, match=rf"1 id\(s\) outside 0\.\.{last}, e\.g\. -1 at position \[1\]; "
                                                r"-1 \(an unknown sample\) is not a node"):
            fn(good, np.array([3, -1, 4]))
        with pytest.raises(TaxonomyError, match=rf"outside 0\.\.{last}, e\.g\. {last + 1}$"):
            fn(last + 1, 0)
        with pytest.raises(TaxonomyError, match=r"must be integer node ids, got dtype float64 \(e\.g\. 2\.7\)"):
            fn(np.array([2.7, 1.0]), good[:2])
        with pytest.raises(TaxonomyError, match=r"got dtype bool"):
            fn(np.array([True, False]), good[:2])
    # valid ids (the last node included) still give the reference values
    assert tax.lca(good, last).tolist() == [ref.lca(int(x), last) for x in good]
    assert tax.distance([1, 2], [last, last]).tolist() == [ref.distance(1, last, "path"),
                                                           ref.distance(2, last, "path")]
    assert tax.lca([], []).shape == (0,) and tax.distance(np.zeros(0, dtype=np.int32), 0).shape == (0,)


def test_rank_steps_fathomnet_worked_examples(trees):
    tax = trees["fathomnet"]
    a = tax.find("Asteronyx", rank="genus")
    b = tax.find("Asteronyx loveni")
    o = tax.find("Ophiacanthidae")
    assert int(tax.distance(a, b, metric="rank_steps")) == 1
    assert int(tax.distance(o, b, metric="rank_steps")) == 6
    species = np.flatnonzero(tax.ranks == "species")
    d = tax.distance_matrix(species, metric="rank_steps")
    assert d.max() == 12                        # two species whose LCA is the kingdom
    i, j = np.unravel_index(np.argmax(d), d.shape)
    assert tax.ranks[tax.lca(species[i], species[j])] == "kingdom"
    # only some ranks: genus and species -> Asteronyx vs A. loveni still 1, Ophiacanthidae vs it 2
    assert int(tax.distance(o, b, metric="rank_steps", ranks=["genus", "species"])) == 2
    with pytest.raises(TaxonomyError, match="unknown rank"):
        tax.distance(o, b, metric="rank_steps", ranks=["tribe"])
    with pytest.raises(TaxonomyError, match="unknown distance metric"):
        tax.distance(o, b, metric="euclid")


def test_rank_steps_needs_ranks(trees):
    with pytest.raises(TaxonomyError, match="no ranks"):
        trees["plankton"].distance(1, 2, metric="rank_steps")


@pytest.mark.parametrize("name", REAL)
def test_ancestor_at_depth_and_matrix(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    rng = np.random.default_rng(1)
    nodes = rng.integers(0, tax.n_nodes, 300)
    d = rng.integers(-1, tax.max_depth + 2, 300)
    got = tax.ancestor_at_depth(nodes, d)
    for v, dd, g in zip(nodes.tolist(), d.tolist(), got.tolist()):
        path = ref.path_up(v)[::-1]             # root first: path[k] is at depth k
        assert g == (path[dd] if 0 <= dd < len(path) else -1)
    anc = tax.ancestor_matrix(nodes[:50])
    for row, v in zip(anc, nodes[:50].tolist()):
        path = ref.path_up(v)[::-1]
        assert row.tolist() == path + [-1] * (tax.max_depth + 1 - len(path))
    assert tax.ancestor_at_depth(nodes[:4, None], np.arange(3)[None, :]).shape == (4, 3)
    assert tax.ancestors(int(nodes[0])) == ref.path_up(int(nodes[0]))[::-1]
    assert tax.ancestors(int(nodes[0]), include_self=False) == ref.path_up(int(nodes[0]))[::-1][:-1]


@pytest.mark.parametrize("name", REAL)
def test_subtree_aggregates(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    rng = np.random.default_rng(2)
    probe = rng.choice(tax.n_nodes, min(tax.n_nodes, 200), replace=False)
    vals = rng.random((3, tax.n_nodes))
    ints = rng.integers(0, 5, tax.n_nodes)
    s2 = tax.subtree_sum(vals)
    s1 = tax.subtree_sum(ints)
    sb = tax.subtree_sum(tax.is_leaf)
    assert s1.dtype == ints.dtype and sb.dtype == np.int64 and s2.shape == (3, tax.n_nodes)
    for v in probe.tolist():
        sub = ref.subtree(v)
        assert tax.height[v] == ref.height(v)
        assert tax.n_leaves_under[v] == sum(1 for u in sub if not ref.kids[u])
        assert tax.subtree_size[v] == len(sub)
        assert s1[v] == ints[sub].sum()
        np.testing.assert_allclose(s2[:, v], vals[:, sub].sum(axis=1))
        assert sb[v] == tax.n_leaves_under[v]
        mask = tax.descendants_mask(v)
        assert set(np.flatnonzero(mask).tolist()) == set(sub)
        assert not tax.descendants_mask(v, include_self=False)[v]
    with pytest.raises(TaxonomyError, match="shape"):
        tax.subtree_sum(np.ones(tax.n_nodes + 1))


@pytest.mark.parametrize("name", REAL)
def test_preorder_and_is_ancestor(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    # reference DFS pre-order (children in id order)
    order, stack = [], [0]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(sorted(ref.kids[v], reverse=True))
    want = np.empty(tax.n_nodes, dtype=np.int64)
    want[order] = np.arange(tax.n_nodes)
    np.testing.assert_array_equal(tax.preorder, want)
    a, b = _pairs(tax, 300, seed=8)
    got = tax.is_ancestor(a, b)
    assert got.tolist() == [x in ref.path_up(y) for x, y in zip(a.tolist(), b.tolist())]


@pytest.mark.parametrize("name", REAL)
def test_children_child_start_sibling_groups(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    gid, gparent = tax.sibling_groups
    assert gparent.tolist() == [v for v in range(tax.n_nodes) if ref.kids[v]]
    assert gid[0] == -1
    for v in range(tax.n_nodes):
        assert tax.children(v).tolist() == ref.kids[v]
        assert tax.n_children[v] == len(ref.kids[v])
        if ref.kids[v]:
            assert tax.child_start[v] == ref.kids[v][0]
            assert set(gid[ref.kids[v]].tolist()) == {gparent.tolist().index(v)}
        else:
            assert tax.child_start[v] == tax.n_nodes
    assert tax.leaves.tolist() == [v for v in range(tax.n_nodes) if not ref.kids[v]]
    assert tax.internal_nodes.tolist() == gparent.tolist()


# ------------------------------------------------------------------ ranks
def _ref_rank_view(tax: Taxonomy, ref: Ref, ranks: list[str]) -> np.ndarray:
    out = np.full((tax.n_nodes, len(ranks)), -1, dtype=np.int64)
    for v in range(tax.n_nodes):
        for u in ref.path_up(v):
            if tax.ranks[u] in ranks:
                out[v, ranks.index(tax.ranks[u])] = u
    return out


@pytest.mark.parametrize("name", ["fathomnet", "ncbi_sample"])
def test_rank_view_and_rank_count_ranked(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    ranks = list(tax.rank_order)
    np.testing.assert_array_equal(tax.rank_view(), _ref_rank_view(tax, ref, ranks))
    sub = ranks[::2]
    np.testing.assert_array_equal(tax.rank_view(sub), _ref_rank_view(tax, ref, sub))
    assert tax.level_names() == ranks and tax.level_names(sub) == sub
    rc = tax.rank_count(sub)
    assert rc.tolist() == [sum(1 for u in ref.path_up(v)[:-1] if tax.ranks[u] in sub) for v in range(tax.n_nodes)]
    ri = tax.rank_index
    assert ri.tolist() == [ranks.index(r) if r in ranks else -1 for r in tax.ranks.tolist()]


def test_rank_view_fathomnet_mixed_rank_labels(trees):
    tax = trees["fathomnet"]
    view = tax.rank_view()
    g = tax.find("Asteronyx", rank="genus")
    assert view[g].tolist()[:6] == [tax.ancestor_at_depth(g, d).item() for d in range(1, 7)]
    assert view[g, 6] == -1                     # label stops at genus: species column empty
    # Acanthascinae (a subfamily) keeps only the standard ranks: its label is the family Rossellidae
    fam = tax.find("Rossellidae")
    assert tax.is_label[fam] and tax.ranks[fam] == "family"
    assert view[fam, 4] == fam and (view[fam, 5:] == -1).all()
    assert (view[0] == -1).all()


def test_rank_view_unranked_uses_depth_levels(trees):
    tax = trees["plankton"]
    ref = Ref(tax)
    view = tax.rank_view()
    assert view.shape == (tax.n_nodes, tax.max_depth)
    assert tax.level_names() == [f"level{d}" for d in range(1, tax.max_depth + 1)]
    for v in range(tax.n_nodes):
        path = ref.path_up(v)[::-1]
        assert view[v].tolist() == path[1:] + [-1] * (tax.max_depth + 1 - len(path))
    with pytest.raises(TaxonomyError, match="unknown rank"):
        tax.rank_view(["genus"])


def test_check_rank_order(raw, trees):
    rows, _ = raw["fathomnet"]
    trees["fathomnet"].check_rank_order()
    with pytest.raises(TaxonomyError, match="out of rank order") as exc:
        build(rows, rank_order=FATHOMNET_RANKS[::-1])
    assert "Animalia" in str(exc.value) or "lies under" in str(exc.value)
    # default rank order (by mean depth) of a clean lineage file is the real one
    assert build(rows).rank_order == tuple(FATHOMNET_RANKS)
    with pytest.raises(TaxonomyError, match="distinct"):
        build(rows, rank_order=["kingdom", "kingdom"])


# ------------------------------------------------------------ matrices
@pytest.mark.parametrize("name", REAL)
def test_distance_matrix_matches_pairwise(trees, name):
    tax = trees[name]
    rng = np.random.default_rng(3)
    nodes = tax.label_ids if tax.n_labels <= 150 else rng.choice(tax.label_ids, 150, replace=False)
    extra = rng.integers(0, tax.n_nodes, 30)           # internal nodes and repeats too
    nodes = np.r_[nodes, extra, nodes[:3]]
    metrics = ["path", "lca_height"] + (["rank_steps"] if tax.has_ranks else [])
    for metric in metrics:
        want = tax.distance(nodes[:, None], nodes[None, :], metric=metric)
        for chunk in (10**9, 1000, 1):               # one block, several, one row per block
            got = tax.distance_matrix(nodes, metric=metric, chunk_elems=chunk)
            np.testing.assert_array_equal(got, want)
    ref = Ref(tax)
    few = nodes[:25].tolist()
    for metric in metrics:
        got = tax.distance_matrix(np.array(few), metric=metric)
        assert got.tolist() == [[ref.distance(x, y, metric) for y in few] for x in few]
    assert tax.distance_matrix().shape == (tax.n_labels, tax.n_labels)
    assert tax.distance_matrix([]).shape == (0, 0)


@pytest.mark.parametrize("name", REAL)
def test_marginalization_and_node_probabilities(trees, name):
    tax = trees[name]
    ref = Ref(tax)
    m = tax.marginalization_matrix()
    assert m.shape == (tax.n_labels, tax.n_nodes)
    dense = np.zeros((tax.n_labels, tax.n_nodes))
    for i, lab in enumerate(tax.label_ids.tolist()):
        dense[i, ref.path_up(lab)] = 1
    np.testing.assert_array_equal(m.toarray(), dense)
    sub = tax.label_ids[::3]
    np.testing.assert_array_equal(tax.marginalization_matrix(sub).toarray(), dense[::3])
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(tax.n_labels), size=4)
    node_p = tax.node_probabilities(p)
    want = np.zeros((4, tax.n_nodes))
    for i, lab in enumerate(tax.label_ids.tolist()):
        for u in ref.path_up(lab):
            want[:, u] += p[:, i]
    np.testing.assert_allclose(node_p, want, atol=1e-12)
    np.testing.assert_allclose(node_p[:, 0], 1.0)
    assert tax.node_probabilities(p[0].astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(tax.node_probabilities(p[0]), want[0], atol=1e-12)
    with pytest.raises(TaxonomyError, match="shape"):
        tax.node_probabilities(p[:, :-1])


# -------------------------------------------------------------------- names
def test_find_and_homonyms(trees):
    tax = trees["ncbi_sample"]
    by_name: dict[str, list[int]] = {}
    for v, nm in enumerate(tax.names.tolist()):
        by_name.setdefault(nm, []).append(v)
    rng = np.random.default_rng(6)
    for v in rng.choice(tax.n_nodes, 200, replace=False).tolist():
        nm = tax.names[v]
        assert tax.find_all(nm) == by_name[nm]
        if len(by_name[nm]) == 1:
            assert tax.find(nm) == v
        assert tax.find(tax.keys[v]) == v                            # NCBI tax id as a key
    assert tax.find_all("no such taxon") == []
    np.testing.assert_array_equal(tax.find_many([tax.names[5], tax.keys[7], tax.names[5]]), [5, 7, 5])
    assert tax.find(int(tax.keys[9])) == 9                            # an integer id works too
    homonyms = [nm for nm, ids in by_name.items() if len(ids) > 1]
    for nm in homonyms[:5]:
        with pytest.raises(AmbiguousNameError):
            tax.find(nm)


def test_find_ambiguous_and_unknown():
    # a real homonym: the NCBI name "Morus" is a plant genus (mulberries) and a bird genus (gannets)
    rows = {"parent": [-1, 0, 0, 1, 2, 3, 4], "names": ["root", "Moraceae", "Sulidae", "Morus", "Morus",
                                                         "Morus alba", "Morus bassanus"],
            "ranks": ["", "family", "family", "genus", "genus", "species", "species"],
            "keys": ["1", "3487", "30446", "3497", "37577", "3498", "37578"], "labels": None}
    tax = build(rows)
    with pytest.raises(AmbiguousNameError) as exc:
        tax.find("Morus")
    assert len(exc.value.candidates) == 2
    assert "Moraceae > Morus" in str(exc.value) and "Sulidae > Morus" in str(exc.value)
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, TaxonomyError)
    plant = tax.find("Morus", under="Moraceae")
    assert tax.keys[plant] == "3497"
    assert tax.keys[tax.find("Morus", under=tax.find("Sulidae"))] == "37577"
    assert tax.keys[tax.find("37577")] == "37577"
    assert sorted(tax.keys[tax.find_all("Morus")].tolist()) == ["3497", "37577"]
    with pytest.raises(UnknownNameError, match="Did you mean.*Morus alba") as exc2:
        tax.find("Morus albus")
    assert "Morus alba" in exc2.value.suggestions
    with pytest.raises(UnknownNameError):
        tax.find("Morus", rank="species")


def test_replace_and_with_labels(trees):
    tax = trees["plankton"]
    t2 = tax.with_labels(tax.leaves)
    np.testing.assert_array_equal(t2.label_ids, tax.leaves)
    assert t2.n_labels == len(tax.leaves) and tax.n_labels == 121
    with pytest.raises(TaxonomyError, match="outside"):
        tax.with_labels([tax.n_nodes])
    prefixed = tax.replace(names=["x_" + n for n in tax.names.tolist()])    # same sibling order
    assert prefixed.names[5] == "x_" + tax.names[5]
    np.testing.assert_array_equal(prefixed.parent, tax.parent)
    with pytest.raises(TaxonomyError, match="rename"):
        tax.replace(names=["root"] + [f"z{tax.n_nodes - i:05d}" for i in range(1, tax.n_nodes)])
    with pytest.raises(TaxonomyError, match="shape"):
        tax.replace(is_label=np.ones(3, dtype=bool))


# ------------------------------------------------------------- random shapes
def _random_tree(n: int, seed: int, shape: str) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    if shape == "recursive":          # each node attaches to a uniformly random earlier node
        par = np.r_[-1, [rng.integers(0, i) for i in range(1, n)]]
    elif shape == "bushy":            # attach near the end: deep, caterpillar-like
        par = np.r_[-1, [max(0, i - 1 - rng.integers(0, 3)) for i in range(1, n)]]
    else:                             # shallow: attach to one of the first few nodes
        par = np.r_[-1, [rng.integers(0, min(i, 8)) for i in range(1, n)]]
    perm = rng.permutation(n)         # scramble the input rows
    where_now = np.empty(n, dtype=np.int64)
    where_now[perm] = np.arange(n)
    p = par[perm]
    names = [f"t{rng.integers(0, n // 3)}" for _ in range(n)]      # many repeated names
    return {"parent": np.where(p >= 0, where_now[np.maximum(p, 0)], -1).tolist(), "names": names,
            "ranks": None, "keys": [f"k{i}" for i in perm], "labels": None}


@pytest.mark.parametrize("shape", ["recursive", "bushy", "shallow"])
def test_random_trees_against_reference(shape):
    rows = _random_tree(1500, seed=len(shape), shape=shape)
    tax = build(rows)
    assert tax.keys.tolist() == ref_canonical_keys(rows)
    assert build(shuffled(rows, 9)).fingerprint == tax.fingerprint
    ref = Ref(tax)
    assert tax.depth.tolist() == [ref.depth(v) for v in range(tax.n_nodes)]
    a, b = _pairs(tax, 500, seed=11)
    assert tax.lca(a, b).tolist() == [ref.lca(x, y) for x, y in zip(a.tolist(), b.tolist())]
    for metric in ("path", "lca_height"):
        assert tax.distance(a, b, metric=metric).tolist() == [ref.distance(x, y, metric)
                                                              for x, y in zip(a.tolist(), b.tolist())]
    assert tax.height.tolist() == [ref.height(v) for v in range(tax.n_nodes)]
    nodes = np.random.default_rng(1).choice(tax.n_nodes, 120, replace=False)
    np.testing.assert_array_equal(tax.distance_matrix(nodes, chunk_elems=500),
                                  tax.distance(nodes[:, None], nodes[None, :]))


def test_chain_depth_1000():
    n = 1001
    tax = build(_chain_rows(n))
    assert tax.max_depth == 1000 and tax.depth.tolist() == list(range(n))
    assert tax.names.tolist() == [f"n{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    a = rng.integers(0, n, 2000)
    b = rng.integers(0, n, 2000)
    np.testing.assert_array_equal(tax.lca(a, b), np.minimum(a, b))
    np.testing.assert_array_equal(tax.distance(a, b), np.abs(a - b))
    np.testing.assert_array_equal(tax.distance(a, b, metric="lca_height"),
                                  np.where(a == b, 0, 1000 - np.minimum(a, b)))
    np.testing.assert_array_equal(tax.height, 1000 - np.arange(n))
    np.testing.assert_array_equal(tax.ancestor_at_depth(a, 17), np.where(a >= 17, 17, -1))
    np.testing.assert_array_equal(tax.subtree_size, n - np.arange(n))
    nodes = rng.choice(n, 200, replace=False)
    np.testing.assert_array_equal(tax.distance_matrix(nodes), np.abs(nodes[:, None] - nodes[None, :]))
    assert tax.marginalization_matrix().nnz == n
    assert tax.summary()["n_single_child"] == 1000
    rot = _chain_rows(n)
    rot["parent"][0] = n - 1         # n0 hangs below n1000 ...
    rot["parent"][500] = -1          # ... and n500 is the root: n500 > ... > n1000 > n0 > ... > n499
    tax2 = build(rot)
    assert tax2.max_depth == 1000 and tax2.names[0] == "n500" and tax2.names[-1] == "n499"
    rot["parent"][500] = 499         # close the ring: nothing is a root
    with pytest.raises(TaxonomyError, match="exactly one root"):
        build(rot)


def test_star_100k_children():
    n = 100_001
    rows = {"parent": [-1] + [0] * (n - 1), "names": ["root"] + [f"s{i:06d}" for i in range(n - 1, 0, -1)],
            "ranks": None, "keys": None, "labels": None}
    tax = build(rows)
    assert tax.max_depth == 1 and tax.n_labels == n - 1
    assert tax.names[1] == "s000001" and tax.names[-1] == f"s{n - 1:06d}"    # siblings sorted by name
    assert tax.n_children[0] == n - 1 and tax.child_start[0] == 1
    rng = np.random.default_rng(0)
    a = rng.integers(1, n, 1000)
    b = rng.integers(1, n, 1000)
    np.testing.assert_array_equal(tax.distance(a, b), np.where(a == b, 0, 2))
    np.testing.assert_array_equal(tax.lca(a, b), np.where(a == b, a, 0))
    assert tax.height[0] == 1 and tax.n_leaves_under[0] == n - 1
    gid, gp = tax.sibling_groups
    assert gp.tolist() == [0] and (gid[1:] == 0).all()
    nodes = rng.choice(np.arange(1, n), 300, replace=False)
    d = tax.distance_matrix(nodes, metric="lca_height")
    np.testing.assert_array_equal(d, 1 - np.eye(300, dtype=int))
    assert tax.find("s054321") == tax.find_all("s054321")[0]


def test_single_node_tree():
    tax = Taxonomy.from_parents([-1], ["root"])
    assert tax.n_nodes == 1 and tax.n_labels == 1 and tax.max_depth == 0
    assert tax.lca([0], [0]).tolist() == [0]
    assert tax.distance_matrix().tolist() == [[0]]
    assert tax.height.tolist() == [0] and tax.preorder.tolist() == [0]


# ----------------------------------------------------------------- full NCBI
@pytest.mark.slow
def test_full_ncbi_lca_and_distances(ncbi_df):
    pos = ncbi_parent_index(ncbi_df)
    tax = Taxonomy.from_parents(pos, ncbi_df.scientific_name.to_numpy(), ncbi_ranks(ncbi_df),
                                ncbi_df.tax_id.to_numpy(), rank_order=NCBI_RANKS)
    assert tax.n_nodes == 2_609_295 and tax.names[0] == "root" and tax.keys[0] == "1"
    # slow reference: a dict of tax_id -> parent tax_id, walked with while loops
    par_of = dict(zip(ncbi_df.tax_id.tolist(), ncbi_df.parent_tax_id.tolist()))
    rank_of = dict(zip(ncbi_df.tax_id.tolist(), ncbi_df["rank"].tolist()))

    def up(t: int) -> list[int]:
        out = [t]
        while par_of[out[-1]] != out[-1]:
            out.append(par_of[out[-1]])
        return out

    key_ids = tax.keys.astype(np.int64)
    rng = np.random.default_rng(2024)
    a = rng.integers(0, tax.n_nodes, 2000)
    b = rng.integers(0, tax.n_nodes, 2000)
    b[:200] = tax.parent[np.maximum(a[:200], 1)]
    lca = tax.lca(a, b)
    dpath = tax.distance(a, b)
    drank = tax.distance(a, b, metric="rank_steps")
    for x, y, c, dp, dr in zip(key_ids[a].tolist(), key_ids[b].tolist(), key_ids[lca].tolist(),
                               dpath.tolist(), drank.tolist()):
        ux, uy = up(x), up(y)
        common = set(ux) & set(uy)
        want = next(t for t in ux if t in common)
        assert c == want
        side = ux[:ux.index(want)] + uy[:uy.index(want)]
        assert dp == len(side)
        assert dr == sum(1 for t in side if rank_of[t] in NCBI_RANKS)
    assert tax.depth[a].tolist() == [len(up(int(t))) - 1 for t in key_ids[a].tolist()]
    homo = tax.find("Homo sapiens")
    assert tax.keys[homo] == "9606"
    assert tax.lineage(homo, sep=None)[-3:] == ["Homininae", "Homo", "Homo sapiens"]
