"""Tree transforms on real trees, each checked against a slow splice-by-hand reference.

The references rebuild the expected tree with plain Python dict walks and compare the
*fingerprint* (structure, names, ranks, labels) and the id maps by node key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_taxonomy_core import (
    FATHOMNET_RANKS,
    NCBI_RANKS,
    Ref,
    _paths_to_rows,
    build,
    fathomnet_rows,
    ncbi_sample_rows,
    plankton_rows,
    read_ncbi,
)

from taxonomist.taxonomy import AmbiguousNameError, Taxonomy, TaxonomyError, UnknownNameError
from taxonomist.taxonomy.transforms import (
    TransformResult,
    collapse_single_child_chains,
    merge,
    prune_unlabelled,
    rename,
    restrict,
    with_other_leaves,
)


def wordnet_rows(taxonomies_dir: Path) -> dict[str, list]:
    """Tiny-ImageNet's 200 classes along their longest WordNet hypernym path (a tree by path prefix)."""
    lines = (taxonomies_dir / "tiny200_wordnet_paths.tsv").read_text().splitlines()[1:]
    paths = []
    for line in lines:
        wnid, _, _, path = line.split("\t")
        parts = path.split(" > ")
        assert parts[-1] == wnid
        paths.append(parts)
    return _paths_to_rows(paths)


@pytest.fixture(scope="module")
def trees(plankton_dir: Path, taxonomies_dir: Path) -> dict[str, Taxonomy]:
    return {
        "plankton": build(plankton_rows(plankton_dir)),
        "fathomnet": build(fathomnet_rows(taxonomies_dir), rank_order=FATHOMNET_RANKS),
        "wordnet": build(wordnet_rows(taxonomies_dir)),
        "ncbi_sample": build(ncbi_sample_rows(read_ncbi(taxonomies_dir), n_species=1500, seed=7),
                             rank_order=NCBI_RANKS),
    }


REAL = ["plankton", "fathomnet", "wordnet", "ncbi_sample"]


# ------------------------------------------------------------------ helpers
def leaf_keys_under(tax: Taxonomy, v: int) -> frozenset[str]:
    ref = Ref(tax)
    return frozenset(tax.keys[u] for u in ref.subtree(v) if not ref.kids[u])


def rows_from(tax: Taxonomy, keep: list[int], parent_of: dict[int, int], labels: set[int],
              names: dict[int, str] | None = None) -> dict[str, list]:
    """Input rows for the kept old nodes of ``tax`` (the reference's own rebuild)."""
    idx = {v: i for i, v in enumerate(keep)}
    return {"parent": [idx[parent_of[v]] if parent_of[v] >= 0 else -1 for v in keep],
            "names": [(names or {}).get(v, tax.names[v]) for v in keep],
            "ranks": [tax.ranks[v] for v in keep], "keys": [tax.keys[v] for v in keep],
            "labels": [v in labels for v in keep]}


def check_maps(old: Taxonomy, res: TransformResult) -> None:
    """Kept nodes map to the node with the same key, and new_to_old is its inverse there."""
    new = res.taxonomy
    assert res.old_to_new.shape == (old.n_nodes,) and res.new_to_old.shape == (new.n_nodes,)
    assert res.old_to_new.dtype == np.int64 and res.new_to_old.dtype == np.int64
    back = res.new_to_old
    has = back >= 0
    assert (old.keys[back[has]] == new.keys[has]).all()
    np.testing.assert_array_equal(res.old_to_new[back[has]], np.flatnonzero(has))
    same = np.flatnonzero(res.old_to_new >= 0)
    same = same[new.keys[res.old_to_new[same]] == old.keys[same]]
    np.testing.assert_array_equal(back[res.old_to_new[same]], same)


def ref_collapse(tax: Taxonomy, keep_labels: bool, keep_ranked: bool) -> tuple[dict[str, list], dict[str, str]]:
    """Splice out removable single-child nodes one by one; returns rows and old key -> new key."""
    ref = Ref(tax)
    ranked = set(tax.rank_order)

    def removable(v: int) -> bool:
        return (v != 0 and len(ref.kids[v]) == 1 and not (keep_labels and tax.is_label[v])
                and not (keep_ranked and tax.ranks[v] in ranked))

    removed = {v for v in range(tax.n_nodes) if removable(v)}
    keep = [v for v in range(tax.n_nodes) if v not in removed]
    parent_of = {}
    for v in keep:
        p = ref.parent[v]
        while p in removed:
            p = ref.parent[p]
        parent_of[v] = p

    def down(v: int) -> int:
        while v in removed:
            v = ref.kids[v][0]
        return v

    labels = {down(v) for v in range(tax.n_nodes) if tax.is_label[v]}
    key_map = {tax.keys[v]: tax.keys[down(v)] for v in range(tax.n_nodes)}
    return rows_from(tax, keep, parent_of, labels), key_map


# ------------------------------------------------------------------ collapse
@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("keep_labels,keep_ranked", [(True, False), (False, False), (True, True)])
def test_collapse_matches_reference(trees, name, keep_labels, keep_ranked):
    tax = trees[name]
    res = collapse_single_child_chains(tax, keep_labels=keep_labels, keep_ranked=keep_ranked)
    new = res.taxonomy
    rows, key_map = ref_collapse(tax, keep_labels, keep_ranked)
    want = build(rows, rank_order=tax.rank_order)
    assert new.fingerprint == want.fingerprint
    assert new.keys.tolist() == want.keys.tolist()
    assert [key_map[k] for k in tax.keys.tolist()] == new.keys[res.old_to_new].tolist()
    check_maps(tax, res)
    assert res.report["removed"] == tax.n_nodes - new.n_nodes
    # no removable node is left
    single = new.n_children == 1
    single[0] = False
    if keep_labels:
        single &= ~new.is_label
    if keep_ranked:
        single &= new.rank_index < 0
    assert not single.any()
    # a removed node maps to a node covering exactly the same leaves
    ref_old = Ref(tax)
    for v in np.flatnonzero(new.keys[res.old_to_new] != tax.keys)[:40].tolist():
        assert len(ref_old.kids[v]) == 1
        assert leaf_keys_under(tax, v) == leaf_keys_under(new, int(res.old_to_new[v]))


@pytest.mark.parametrize("name", REAL)
def test_collapse_keeps_labels_leaf_sets_and_shrinks_distances(trees, name):
    tax = trees[name]
    res = collapse_single_child_chains(tax)
    new = res.taxonomy
    lab_new = res.old_to_new[tax.label_ids]
    assert (new.keys[lab_new] == tax.keys[tax.label_ids]).all()      # every label survives as itself
    assert new.n_labels == tax.n_labels and new.is_label[lab_new].all()
    for v in tax.label_ids[:60].tolist():
        assert leaf_keys_under(tax, v) == leaf_keys_under(new, int(res.old_to_new[v]))
    rng = np.random.default_rng(0)
    a = rng.choice(tax.label_ids, 300)
    b = rng.choice(tax.label_ids, 300)
    d_old = tax.distance(a, b)
    d_new = new.distance(res.old_to_new[a], res.old_to_new[b])
    assert (d_new <= d_old).all()
    # exactly: the removed nodes on the path are gone
    ref = Ref(tax)
    removed = set(np.flatnonzero(new.keys[res.old_to_new] != tax.keys).tolist())
    for x, y, dn in zip(a.tolist(), b.tolist(), d_new.tolist()):
        c = ref.lca(x, y)
        side = ref.path_up(x)[:ref.path_up(x).index(c)] + ref.path_up(y)[:ref.path_up(y).index(c)]
        assert dn == len(side) - sum(1 for u in side if u in removed)


def test_collapse_real_counts(trees):
    plankton = trees["plankton"]
    res = collapse_single_child_chains(plankton)
    # the only unlabelled single-child node of the NDSB tree is the PARTIAL group
    assert res.report == {"n_nodes_before": 151, "n_nodes_after": 150, "removed": 1, "labels_moved": 0}
    part = plankton.find("PARTIAL")
    dark = plankton.find("hydromedusae_partial_dark")
    assert res.old_to_new[part] == res.old_to_new[dark]
    new = res.taxonomy
    assert new.names[new.parent[res.old_to_new[dark]]] == plankton.names[plankton.parent[part]]
    # without keep_labels the 11 label chains (tunicate_doliolid -> tunicate_doliolid_nurse, ...) fold too
    res2 = collapse_single_child_chains(plankton, keep_labels=False)
    assert res2.report["removed"] == 12 and res2.report["labels_moved"] == 11
    assert res2.taxonomy.n_labels == 110
    nurse = res2.old_to_new[plankton.find("tunicate_doliolid_nurse")]
    assert res2.old_to_new[plankton.find("tunicate_doliolid")] == nurse
    # WordNet hypernym paths are mostly dead nodes
    wn = trees["wordnet"]
    res3 = collapse_single_child_chains(wn)
    assert res3.taxonomy.n_nodes < 0.7 * wn.n_nodes
    assert res3.taxonomy.max_depth < wn.max_depth
    assert res3.taxonomy.n_labels == 200 and (res3.taxonomy.n_children[1:] != 1).all()


def test_collapse_chain_and_ranked():
    n = 1001
    chain = Taxonomy.from_parents([-1] + list(range(n - 1)), [f"n{i}" for i in range(n)])
    res = collapse_single_child_chains(chain)
    assert res.taxonomy.n_nodes == 2 and res.taxonomy.names.tolist() == ["n0", "n1000"]
    np.testing.assert_array_equal(res.old_to_new, np.r_[0, np.ones(n - 1, dtype=int)])


# ------------------------------------------------------------------ restrict
@pytest.mark.parametrize("name", REAL)
def test_restrict_matches_reference(trees, name):
    tax = trees[name]
    rng = np.random.default_rng(1)
    picks = rng.choice(tax.n_nodes, max(3, tax.n_nodes // 10), replace=False)
    ref = Ref(tax)
    keep_set = {u for v in picks.tolist() for u in ref.path_up(v)}
    keep = sorted(keep_set)
    for mode in ("keep", "nodes"):
        res = restrict(tax, picks, labels=mode)
        labels = {v for v in keep if tax.is_label[v]} if mode == "keep" else set(picks.tolist())
        want = build(rows_from(tax, keep, {v: ref.parent[v] for v in keep}, labels), rank_order=tax.rank_order)
        assert res.taxonomy.fingerprint == want.fingerprint
        check_maps(tax, res)
        assert ((res.old_to_new >= 0) == np.isin(np.arange(tax.n_nodes), keep)).all()
        assert res.report["dropped"] == tax.n_nodes - len(keep)
        # ancestors are all kept, so distances between kept nodes do not change
        a = rng.choice(picks, 100)
        b = rng.choice(picks, 100)
        np.testing.assert_array_equal(res.taxonomy.distance(res.old_to_new[a], res.old_to_new[b]),
                                      tax.distance(a, b))


def test_restrict_by_name_and_errors(trees):
    tax = trees["plankton"]
    res = restrict(tax, ["copepod_calanoid_eggs", "amphipods"])
    new = res.taxonomy
    assert sorted(new.names.tolist()) == sorted(["root", "PLANKTON", "CRUSTACEANS", "COPEPODS", "copepod_calanoid",
                                                 "copepod_calanoid_eggs", "amphipods"])
    assert new.label_names == ["amphipods", "copepod_calanoid", "copepod_calanoid_eggs"]
    assert res.report["unlabelled_leaves"] == 0 and res.report["labels_dropped"] == 118
    assert res.map_nodes([-1, tax.find("amphipods"), tax.find("chaetognath_sagitta")]).tolist() == \
        [-1, new.find("amphipods"), -1]
    with pytest.raises(UnknownNameError):
        restrict(tax, ["no such plankton"])
    with pytest.raises(TaxonomyError, match="outside"):
        restrict(tax, [tax.n_nodes + 3])
    with pytest.raises(TaxonomyError, match="'keep' or 'nodes'"):
        restrict(tax, [1], labels="all")


# ---------------------------------------------------------- other leaves
@pytest.mark.parametrize("name", ["plankton", "fathomnet", "ncbi_sample"])
def test_with_other_leaves(trees, name):
    tax = trees[name]
    if name == "ncbi_sample":      # make some internal labels: every genus is a label too
        tax = tax.with_labels(np.r_[tax.label_ids, np.flatnonzero(tax.ranks == "genus")])
    internal = tax.label_ids[~tax.label_is_leaf]
    res = with_other_leaves(tax)
    new = res.taxonomy
    assert res.report["other_leaves_added"] == len(internal) > 0
    assert new.n_nodes == tax.n_nodes + len(internal)
    assert new.n_labels == tax.n_labels and new.label_is_leaf.all()
    o2n, n2o = res.old_to_new, res.new_to_old
    assert (n2o >= 0).all()
    np.testing.assert_array_equal(n2o[o2n], np.arange(tax.n_nodes))      # back to the original node
    np.testing.assert_array_equal(np.sort(o2n[tax.label_ids]), new.label_ids)
    for v in internal.tolist():
        leaf = int(o2n[v])
        assert new.names[leaf] == tax.names[v] + " (other)" and new.keys[leaf] == tax.keys[v] + "#other"
        assert new.is_leaf[leaf] and new.is_label[leaf] and new.ranks[leaf] == ""
        copy = int(new.parent[leaf])
        assert new.keys[copy] == tax.keys[v] and not new.is_label[copy] and n2o[copy] == v
    # probabilities: the mass of every old node equals the mass of its copy in the new tree
    rng = np.random.default_rng(2)
    p_old = rng.dirichlet(np.ones(tax.n_labels), size=3)
    p_new = np.zeros((3, new.n_labels))
    p_new[:, new.label_index[o2n[tax.label_ids]]] = p_old
    node_old = tax.node_probabilities(p_old)
    node_new = new.node_probabilities(p_new)
    structural = np.where(np.isin(np.arange(tax.n_nodes), internal), new.parent[o2n], o2n)
    np.testing.assert_allclose(node_new[:, structural], node_old, atol=1e-12)
    if tax.has_ranks:   # an other-leaf sits at its parent's rank columns
        view = new.rank_view()
        for v in internal[:20].tolist():
            np.testing.assert_array_equal(view[o2n[v]], view[new.parent[o2n[v]]])


def test_with_other_leaves_fathomnet_example(trees):
    tax = trees["fathomnet"]
    res = with_other_leaves(tax, suffix=" [other]")
    new = res.taxonomy
    g = tax.find("Asteronyx", rank="genus")
    assert new.names[res.old_to_new[g]] == "Asteronyx [other]"
    assert sorted(new.names[new.children(new.parent[res.old_to_new[g]])].tolist()) == \
        ["Asteronyx [other]", "Asteronyx loveni"]
    with pytest.raises(TaxonomyError, match="suffix"):
        with_other_leaves(tax, suffix="")


# ------------------------------------------------------------ rename, merge
def test_rename(trees):
    tax = trees["plankton"]
    res = rename(tax, {"PLANKTON": "ZOOPLANKTON", "amphipods": "Amphipoda"})
    new = res.taxonomy
    assert res.report == {"renamed": 2}
    assert sorted(res.old_to_new.tolist()) == list(range(tax.n_nodes))      # a permutation
    assert new.names[res.old_to_new[tax.find("PLANKTON")]] == "ZOOPLANKTON"
    assert new.names[1] == "ARTIFACTS" and new.names[2] == "ZOOPLANKTON"
    np.testing.assert_array_equal(new.keys[res.old_to_new], tax.keys)
    check_maps(tax, res)
    names = tax.names.copy()
    names[tax.find("PLANKTON")] = "ZOOPLANKTON"
    names[tax.find("amphipods")] = "Amphipoda"
    want = Taxonomy.from_parents(tax.parent, names, keys=tax.keys, labels=tax.is_label)
    assert new.fingerprint == want.fingerprint
    # by key and by id
    assert rename(tax, {tax.keys[5]: "x5"}).taxonomy.find("x5") >= 0
    assert rename(tax, {5: "y5"}).report == {"renamed": 1}
    with pytest.raises(UnknownNameError):
        rename(tax, {"nope": "x"})
    with pytest.raises(TaxonomyError, match="empty new name"):
        rename(tax, {"PLANKTON": " "})
    with pytest.raises(TaxonomyError, match="renamed twice"):
        rename(tax, {"PLANKTON": "a", tax.keys[tax.find("PLANKTON")]: "b"})


def test_rename_ambiguous():
    tax = Taxonomy.from_parents([-1, 0, 0, 1, 2], ["root", "Moraceae", "Sulidae", "Morus", "Morus"],
                                keys=["1", "3487", "30446", "3497", "37577"])
    with pytest.raises(AmbiguousNameError):
        rename(tax, {"Morus": "Morus (plant)"})
    res = rename(tax, {"3497": "Morus (plant)"})
    assert sorted(res.taxonomy.names.tolist()) == ["Moraceae", "Morus", "Morus (plant)", "Sulidae", "root"]


def test_merge(trees):
    tax = trees["plankton"]
    s, t = tax.find("tunicate_salp"), tax.find("tunicate_doliolid")
    res = merge(tax, "tunicate_salp", "tunicate_doliolid")
    new = res.taxonomy
    assert new.n_nodes == tax.n_nodes - 1
    assert res.old_to_new[s] == res.old_to_new[t]
    assert res.report["children_moved"] == 1 and res.report["target_became_label"] == 0
    kids = sorted(new.names[new.children(res.old_to_new[t])].tolist())
    assert kids == ["tunicate_doliolid_nurse", "tunicate_salp_chains"]
    assert res.new_to_old[res.old_to_new[t]] == t
    assert "tunicate_salp" not in set(new.names.tolist())
    # reference rebuild
    ref = Ref(tax)
    keep = [v for v in range(tax.n_nodes) if v != s]
    parent_of = {v: (t if ref.parent[v] == s else ref.parent[v]) for v in keep}
    want = build(rows_from(tax, keep, parent_of, {v for v in keep if tax.is_label[v]}))
    assert new.fingerprint == want.fingerprint
    # an unlabelled target becomes a label when the source was one
    res2 = merge(tax, "amphipods", "CRUSTACEANS")
    assert res2.report["target_became_label"] == 1
    assert res2.taxonomy.is_label[res2.old_to_new[tax.find("CRUSTACEANS")]]
    with pytest.raises(TaxonomyError, match="own descendant"):
        merge(tax, "CRUSTACEANS", "copepod_calanoid")
    with pytest.raises(TaxonomyError, match="itself"):
        merge(tax, "CRUSTACEANS", "CRUSTACEANS")
    with pytest.raises(TaxonomyError, match="root"):
        merge(tax, 0, 1)


def test_merge_respects_rank_order(trees):
    tax = trees["fathomnet"]
    genus = tax.find("Asteronyx", rank="genus")
    res = merge(tax, genus, "Ophiacanthidae")                   # a species directly under a family: fine
    new = res.taxonomy
    assert new.names[new.parent[new.find("Asteronyx loveni")]] == "Ophiacanthidae"
    assert new.is_label[res.old_to_new[genus]]                  # Asteronyx was a label: its samples go there
    family = next(v for v in np.flatnonzero(tax.ranks == "family").tolist()
                  if "genus" in tax.ranks[tax.children(v)].tolist() and not tax.is_ancestor(v, genus))
    with pytest.raises(TaxonomyError, match="out of rank order"):
        merge(tax, family, genus)                               # its genera would sit under a genus


# ------------------------------------------------------------------- prune
@pytest.mark.parametrize("name", REAL)
def test_prune_unlabelled(trees, name):
    tax = trees[name]
    rng = np.random.default_rng(5)
    tax = tax.with_labels(rng.choice(tax.label_ids, max(2, tax.n_labels // 5), replace=False))
    res = prune_unlabelled(tax)
    ref = Ref(tax)
    keep = sorted({u for v in tax.label_ids.tolist() for u in ref.path_up(v)})
    want = build(rows_from(tax, keep, {v: ref.parent[v] for v in keep}, set(tax.label_ids.tolist())),
                 rank_order=tax.rank_order)
    assert res.taxonomy.fingerprint == want.fingerprint
    assert res.report["dropped"] == tax.n_nodes - len(keep)
    assert (res.taxonomy.is_leaf <= res.taxonomy.is_label).all()     # every leaf is a label now
    check_maps(tax, res)
    assert prune_unlabelled(res.taxonomy).report["dropped"] == 0


def test_transforms_accept_trees_loaded_despite_rank_conflicts():
    # real NCBI case: a forma_specialis (Glossina palpalis gambiense S-endosymbiont) under a forma_specialis
    tax = Taxonomy.from_parents(
        [-1, 0, 1, 2, 3, 3, 0], ["root", "Sodalis", "Sodalis glossinidius", "Glossina palpalis S-endosymbiont",
                                 "G. p. gambiense S-endosymbiont", "G. p. palpalis S-endosymbiont", "Other"],
        ranks=["", "genus", "species", "forma_specialis", "forma_specialis", "forma_specialis", "genus"],
        keys=["1", "84565", "63612", "299863", "299865", "299864", "9"],
        rank_order=["genus", "species", "forma_specialis"], check_rank_order=False)
    with pytest.raises(TaxonomyError, match="out of rank order"):
        tax.check_rank_order()
    res = collapse_single_child_chains(tax)
    assert res.report["removed"] == 2          # Sodalis and its single species fold into the forma
    assert restrict(tax, ["G. p. palpalis S-endosymbiont"]).taxonomy.n_nodes == 5
    assert merge(tax, "Other", "Sodalis").taxonomy.n_nodes == 6
    assert with_other_leaves(tax.with_labels([3])).report["other_leaves_added"] == 1
