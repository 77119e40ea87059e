"""WordNet -> tree (needs nltk + shared/data/nltk_data) and the generic DAG -> tree rule.

The DAG rule is checked against brute-force path enumeration on seeded random DAGs;
the WordNet tree against the `longest_path` column of tiny200_wordnet_paths.tsv and
against nltk's own hypernym_paths().
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from taxonomist.taxonomy import MissingDependencyError, TaxonomyError, dag_to_tree, load, read_wordnet


# ------------------------------------------------------------------ DAG -> tree (no nltk needed)
def _all_paths(n: int, parents: dict[int, list[int]], v: int) -> list[list[int]]:
    """Every root-to-v path (brute force)."""
    if not parents.get(v):
        return [[v]]
    return [p + [v] for u in parents[v] for p in _all_paths(n, parents, u)]


def _random_dag(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    child, parent = [], []
    for v in range(1, n):
        k = int(rng.integers(1, min(v, 3) + 1))
        for u in rng.choice(v, size=k, replace=False):
            child.append(v)
            parent.append(int(u))
    perm = rng.permutation(n)  # hide the topological order
    return perm[np.array(child)], perm[np.array(parent)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rule", ["longest", "shortest"])
def test_dag_rule_matches_brute_force(seed: int, rule: str) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    child, parent = _random_dag(rng, n)
    keys = np.array([f"k{rng.integers(10**6):07d}" for _ in range(n)], dtype=object)
    res = dag_to_tree(n, child, parent, keys=keys, rule=rule)
    parents: dict[int, list[int]] = {}
    for c, p in zip(child.tolist(), parent.tolist()):
        parents.setdefault(c, []).append(p)
    pick = max if rule == "longest" else min
    for v in range(n):
        lengths = [len(p) - 1 for p in _all_paths(n, parents, v)]
        assert res.depth[v] == pick(lengths)
        if not parents.get(v):
            assert res.parent[v] == -1
            continue
        # the kept parent is on a best path; ties go to the smallest key
        best = [u for u in parents[v] if res.depth[u] + 1 == res.depth[v]]
        assert res.parent[v] == min(best, key=lambda u: keys[u])
    assert res.n_multi_parent == sum(len(set(ps)) > 1 for ps in parents.values())
    assert res.n_dropped_edges == len(set(zip(child.tolist(), parent.tolist()))) - int((res.parent >= 0).sum())


def test_dag_small_and_ties() -> None:
    # 0 -> 1 -> 2 -> 4 ; 0 -> 3 -> 4 ; 0 -> 4 : node 4 keeps 2 (longest), or 0 (shortest)
    child = [1, 2, 3, 4, 4, 4]
    parent = [0, 1, 0, 2, 3, 0]
    assert dag_to_tree(5, child, parent, rule="longest").parent.tolist() == [-1, 0, 1, 0, 2]
    assert dag_to_tree(5, child, parent, rule="shortest").parent.tolist() == [-1, 0, 1, 0, 0]
    # tie: 3 has parents 1 and 2 at the same depth -> the smaller key wins, whatever the edge order
    for keys, want in ((["r", "b", "a", "x"], 2), (["r", "a", "b", "x"], 1)):
        for c, p in (([1, 2, 3, 3], [0, 0, 1, 2]), ([3, 3, 2, 1], [2, 1, 0, 0])):
            assert dag_to_tree(4, c, p, keys=keys).parent[3] == want


def test_dag_errors() -> None:
    with pytest.raises(TaxonomyError, match=r"cycle.*node 'b' -> node 'c'|cycle.*node 'c' -> node 'b'"):
        dag_to_tree(3, [1, 2, 1], [0, 1, 2], keys=["a", "b", "c"])
    with pytest.raises(TaxonomyError, match="its own parent"):
        dag_to_tree(2, [1, 1], [0, 1])
    with pytest.raises(TaxonomyError, match="unknown DAG rule"):
        dag_to_tree(2, [1], [0], rule="first")


def test_missing_nltk_raises_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'taxonomist\[wordnet\]'") as e:
        read_wordnet(["n01443537"])
    assert isinstance(e.value, ImportError)


# ------------------------------------------------------------------ WordNet (nltk)
nltk = pytest.importorskip("nltk", reason="nltk is not installed (pip install 'taxonomist[wordnet]')")


@pytest.fixture(scope="module")
def nltk_data(shared_data: Path) -> Path:
    return shared_data / "nltk_data"


@pytest.fixture(scope="module")
def tiny_rows(taxonomies_dir: Path) -> list[list[str]]:
    with open(taxonomies_dir / "tiny200_wordnet_paths.tsv", newline="") as fh:
        return list(csv.reader(fh, delimiter="\t"))[1:]


@pytest.fixture(scope="module")
def tiny(taxonomies_dir: Path, nltk_data: Path):
    return read_wordnet(taxonomies_dir / "tiny200_wordnet_paths.tsv", nltk_data=nltk_data, return_report=True)


@pytest.fixture(scope="module")
def wn(tiny, nltk_data: Path):
    from nltk.corpus import wordnet
    return wordnet


@pytest.mark.slow
def test_tiny200_tree_against_longest_path_column(tiny, tiny_rows, wn) -> None:
    tax, report = tiny
    assert tax.n_labels == 200 and str(tax.keys[0]) == "n00001740" and tax.names[0] == "entity"
    assert report.format == "wordnet" and not report.synthetic_root
    assert report.repaired == {"synsets with several hypernyms (kept the one on the longest path)": 23}
    mismatched = {}
    for wnid, name, n_paths, path in tiny_rows:
        v = tax.find(wnid)
        assert tax.is_label[v]
        mine = [str(tax.keys[u]) for u in tax.ancestors(v)]
        ref = [p.strip() for p in path.split(">")]
        # independent reference: nltk's own hypernym paths; the tree path is one of the longest
        paths = wn.synset_from_pos_and_offset("n", int(wnid[1:])).hypernym_paths()
        assert len(paths) == int(n_paths)
        assert len(mine) == max(len(p) for p in paths) == len(ref)
        assert mine in [[f"n{s.offset():08d}" for s in p] for p in paths]
        if mine != ref:
            mismatched[wnid] = (mine, ref)
    # Two classes have two longest paths of equal length; the file picked the other one. The rule breaks
    # ties by the smaller wnid at the node where the paths part: basketball keeps ball (n02778669) rather
    # than basketball equipment (n02802721); mashed potato keeps n07710007 rather than n07710283.
    assert set(mismatched) == {"n02802426", "n07711569"}
    for mine, ref in mismatched.values():
        k = next(i for i, (a, b) in enumerate(zip(mine, ref)) if a != b)
        assert mine[k] < ref[k] and mine[-1] == ref[-1]


@pytest.mark.slow
def test_wnid_sources_agree(tiny, shared_data: Path, nltk_data: Path) -> None:
    tax, _ = tiny
    # labels.tsv (file<TAB>wnid, each class twice) gives the same 200 classes -> the same tree
    t2, report = load(shared_data / "tiny200_mini" / "labels.tsv", nltk_data=nltk_data, return_report=True)
    assert report.format == "wordnet" and report.skipped == {"repeated wnids (merged)": 200}
    assert t2.fingerprint == tax.fingerprint
    t3 = read_wordnet([str(k) for k in tax.keys[tax.label_ids]], nltk_data=nltk_data)
    assert t3.fingerprint == tax.fingerprint


@pytest.mark.slow
def test_shortest_rule_and_names(tiny_rows, nltk_data: Path, wn) -> None:
    wnids = [r[0] for r in tiny_rows[:30]]
    tax = read_wordnet(wnids, rule="shortest", names="synset", nltk_data=nltk_data)
    for w in wnids:
        v = tax.find(w)
        s = wn.synset_from_pos_and_offset("n", int(w[1:]))
        assert tax.names[v] == s.name()
        assert int(tax.depth[v]) == min(len(p) for p in s.hypernym_paths()) - 1


@pytest.mark.slow
def test_bad_wnids(tmp_path: Path, nltk_data: Path) -> None:
    bad = tmp_path / "w.tsv"
    bad.write_text("file\twnid\na.jpg\tn01443537\nb.jpg\tdog\n")
    with pytest.raises(TaxonomyError, match=r"w.tsv line 3: 'dog' is not a WordNet id"):
        read_wordnet(bad, nltk_data=nltk_data)
    with pytest.raises(TaxonomyError, match=r"'n99999999' is not a synset"):
        read_wordnet(["n99999999"], nltk_data=nltk_data)
