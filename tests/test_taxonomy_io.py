"""Importers, exporters and format detection, on the real trees in shared/data.

References are written inside the tests: lineage lists built with the csv module,
rank-step distances counted by hand over those lists, hand-checked small files.
Bad input is written to tmp_path; every error must name the file and the line.
"""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonomist.taxonomy import (LoadReport, Taxonomy, TaxonomyError, load, read_edge_table, read_lineage_table,
                                 read_nested_json, read_newick, read_outline, read_path_strings, read_taxonomy_json,
                                 save)
from taxonomist.taxonomy.io import FORMATS, AmbiguousFormatError, detect_format, rank_violations, validate_taxonomy
from taxonomist.taxonomy.io.ranks import CANONICAL_RANKS, STANDARD_RANKS, infer_rank_order, normalize_rank

# the labels of the FathomNet lineage CSV that are not the deepest filled entry of their row
FATHOMNET_EXTRA = {"Tunicata": "Chordata", "Caridea": "Decapoda", "Acanthascinae": "Rossellidae"}


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def fathom_csv(taxonomies_dir: Path) -> Path:
    return taxonomies_dir / "fathomnet2025_lineage.csv"


@pytest.fixture(scope="module")
def fathom(fathom_csv: Path) -> Taxonomy:
    return read_lineage_table(fathom_csv)


@pytest.fixture(scope="module")
def fathom_rows(fathom_csv: Path) -> list[dict[str, str]]:
    with open(fathom_csv, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------ lineage tables
def test_fathomnet_lineage_structure(fathom: Taxonomy, fathom_rows) -> None:
    assert fathom.n_labels == 81 == len(fathom_rows)
    assert list(fathom.rank_order) == list(STANDARD_RANKS) == ["kingdom", "phylum", "class", "order", "family", "genus",
                                                         "species"]
    assert fathom.names[0] == "Animalia" and fathom.ranks[0] == "kingdom"  # one top-level node: no synthetic root
    # reference: every distinct (rank, name) of the file is one node, plus the 3 unranked extra labels
    distinct = {(r, row[r]) for row in fathom_rows for r in STANDARD_RANKS if row[r]}
    assert fathom.n_nodes == len(distinct) + len(FATHOMNET_EXTRA) == 195
    for row in fathom_rows:
        v = fathom.find(row["name"]) if row["name"] not in ("Asteronyx",) else fathom.find("Asteronyx", rank="genus")
        assert fathom.is_label[v]
        ranked = [row[r] for r in STANDARD_RANKS if row[r]]
        lineage = fathom.lineage(v, sep=None, include_root=True)
        if row["name"] in FATHOMNET_EXTRA:
            assert lineage == ranked + [row["name"]]
            assert fathom.ranks[v] == "" and fathom.names[fathom.parent[v]] == FATHOMNET_EXTRA[row["name"]]
        else:
            assert lineage == ranked
            assert fathom.ranks[v] == [r for r in STANDARD_RANKS if row[r]][-1]


def test_fathomnet_worked_examples(fathom: Taxonomy) -> None:
    """The competition's worked examples (docs/taxonomy.md): 1 and 6 rank steps."""
    loveni = fathom.find("Asteronyx loveni")
    assert int(fathom.distance(fathom.find("Asteronyx", rank="genus"), loveni, "rank_steps")) == 1
    assert int(fathom.distance(fathom.find("Ophiacanthidae"), loveni, "rank_steps")) == 6
    # Tunicata sits "at" phylum: 0 steps to Chordata, like the competition's scorer (lineage = Animalia, Chordata)
    assert int(fathom.distance(fathom.find("Tunicata"), fathom.find("Chordata"), "rank_steps")) == 0


def test_fathomnet_rank_steps_match_reference(fathom: Taxonomy, fathom_rows) -> None:
    """All label pairs: rank steps equal a count over the CSV rows themselves (the competition's definition)."""
    lineages = {row["name"]: [row[r] for r in STANDARD_RANKS] for row in fathom_rows}
    names = list(lineages)

    def ref(a: str, b: str) -> int:
        la, lb = lineages[a], lineages[b]
        shared = 0
        for x, y in zip(la, lb):
            if x and x == y:
                shared += 1
            elif x or y:
                break
        return sum(bool(x) for x in la) + sum(bool(y) for y in lb) - 2 * shared

    ids = np.array([fathom.find(n) if n != "Asteronyx" else fathom.find(n, rank="genus") for n in names])
    got = fathom.distance(ids[:, None], ids[None, :], "rank_steps")
    want = np.array([[ref(a, b) for b in names] for a in names])
    np.testing.assert_array_equal(got, want)
    assert got.max() == 12


def test_cifar100_five_levels(taxonomies_dir: Path) -> None:
    path = taxonomies_dir / "cifar100_5level.csv"
    tax, report = read_lineage_table(path, return_report=True)
    assert list(tax.rank_order) == ["level1", "level2", "level3", "coarse", "fine"]  # leaf-first file, root first
    assert report.synthetic_root and tax.names[0] == "root"
    assert tax.n_nodes == 1 + 2 + 4 + 8 + 20 + 100
    assert tax.n_labels == 100 and tax.label_is_leaf.all()
    assert set(tax.ranks[tax.label_ids]) == {"fine"}
    rows = list(csv.DictReader(open(path, newline="")))
    for row in rows:
        v = tax.find(row["fine_name"])
        assert tax.lineage(v, sep=None) == [f"level1_{row['level1_id']}", f"level2_{row['level2_id']}",
                                          f"level3_{row['level3_id']}", row["coarse_name"], row["fine_name"]]
    assert str(tax.keys[tax.find("apple")]) == "fine:0"


def test_lineage_blanks_skip_and_stop(tmp_path: Path) -> None:
    p = write(tmp_path, "t.csv", "name,kingdom,phylum,class,order\n"
                                 "A1,K,P,,O1\n"      # class skipped: O1 hangs from P
                                 "P,K,P,,\n"         # trailing blanks: label at phylum
                                 "B1,K,P,C,O2\n\n")  # a blank line is counted, not an error
    tax, report = read_lineage_table(p, return_report=True)
    o1, pp, o2 = tax.find("O1"), tax.find("P"), tax.find("O2")
    assert tax.parent[o1] == pp and tax.ranks[o1] == "order"
    assert tax.is_label[pp] and not tax.is_leaf[pp]
    assert tax.lineage(o2) == "P > C > O2"
    assert report.skipped == {"blank rows": 1}


def test_lineage_contradiction_names_both_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.csv", "kingdom,phylum,genus\nK,P1,G\nK,P1,H\nK,P2,G\n")
    with pytest.raises(TaxonomyError) as e:
        read_lineage_table(p)
    msg = str(e.value)
    assert "bad.csv line 2" in msg and "bad.csv line 4" in msg and "'P1'" in msg and "'P2'" in msg
    assert "'G'" in msg and "on_conflict='split'" in msg
    tax, report = read_lineage_table(p, on_conflict="split", return_report=True)
    gs = tax.find_all("G")
    assert len(gs) == 2 and {tax.lineage(g) for g in gs} == {"P1 > G", "P2 > G"}
    assert report.repaired == {"homonyms kept apart as separate nodes (on_conflict='split')": 2}
    assert len(set(tax.keys[gs])) == 2


def test_lineage_unknown_column_beside_ranks(tmp_path: Path, fathom_csv: Path, fathom: Taxonomy,
                                            fathom_rows) -> None:
    """The real FathomNet table with genus before family and a 'notes' column: an error naming the file and
    the column (it used to become a rank, genus landed above family, and notes became nodes); with the
    column ignored it is the same tree as the real file."""
    cols = ["name", "kingdom", "phylum", "class", "order", "genus", "family", "species", "notes"]
    lines = [",".join(cols)]
    for k, row in enumerate(fathom_rows):
        cells = [row[c] for c in cols[:-1]] + [f"checked {k % 3}"]
        lines.append(",".join(f'"{c}"' if "," in c else c for c in cells))
    p = write(tmp_path, "notes.csv", "\n".join(lines) + "\n")
    with pytest.raises(TaxonomyError) as e:
        read_lineage_table(p)
    msg = str(e.value)
    assert msg.startswith("notes.csv line 1: the column(s) ['notes'] are not rank names")
    assert "ignore_columns=['notes'] (CLI: -O ignore_columns=notes)" in msg and "rank_columns=[" in msg
    for opt in ({"ignore_columns": ["notes"]}, {"ignore_columns": "notes"}):
        tax, report = read_lineage_table(p, return_report=True, **opt)
        assert tax.fingerprint == fathom.fingerprint
        assert list(tax.rank_order) == list(STANDARD_RANKS)
        assert "columns ignored (ignore_columns): notes" in report.notes
        assert not set(tax.names.tolist()) & {"checked 0", "checked 1", "checked 2"}
    # the same through load() and Taxonomy.load (the CLI's -O ignore_columns=notes is tested in test_cli_taxonomy)
    assert Taxonomy.load(p, ignore_columns=["notes"]).fingerprint == fathom.fingerprint
    with pytest.raises(TaxonomyError, match=r"notes.csv: rank_columns .* puts 'genus' above 'family'; known ranks "
                                            r"keep the standard order"):
        read_lineage_table(p, rank_columns=cols[1:])
    with pytest.raises(TaxonomyError, match=r"it leaves out \['notes'\] \(pass ignore_columns=\['notes'\]"):
        read_lineage_table(p, rank_columns=list(STANDARD_RANKS))
    with pytest.raises(TaxonomyError, match=r"notes.csv line 1: ignore_columns \['note'\] are not columns"):
        read_lineage_table(p, ignore_columns=["note"])
    # without the extra column, a shuffled column order is no problem: known ranks keep the standard order
    shuffled = write(tmp_path, "shuffled.csv", "\n".join(ln.rsplit(",", 1)[0] for ln in lines) + "\n")
    assert read_lineage_table(shuffled).fingerprint == fathom.fingerprint
    # a real extra rank is declared with rank_columns (rank or column names, root first)
    custom = write(tmp_path, "custom.csv", "name,Kingdom,phylum,megaclass,genus\nA a,K,P,M1,A\nB b,K,P,M2,B\n")
    with pytest.raises(TaxonomyError, match=r"custom.csv line 1: the column\(s\) \['megaclass'\] are not rank names"):
        read_lineage_table(custom)
    tax = read_lineage_table(custom, rank_columns=["Kingdom", "phylum", "megaclass", "genus"])
    assert list(tax.rank_order) == ["kingdom", "phylum", "megaclass", "genus"]
    assert tax.lineage(tax.find("B b"), include_root=True) == "K > P > M2 > B > B b"


def test_lineage_paired_id_name_conflict(tmp_path: Path) -> None:
    p = write(tmp_path, "ids.csv", "fine_id,fine_name,coarse_id,coarse_name\n0,a,0,x\n1,b,0,y\n")
    with pytest.raises(TaxonomyError, match=r"ids.csv line 2.*'x'.*ids.csv line 3.*'y'"):
        read_lineage_table(p)


# ------------------------------------------------------------------ edge tables
NCBI_SAMPLE = ("tax_id\tparent_tax_id\trank\tscientific_name\n"
               "1\t1\tno_rank\troot\n"
               "2\t131567\tsuperkingdom\tBacteria\n"
               "131567\t1\tclade\tcellular organisms\n"
               "1224\t2\tphylum\tPseudomonadota\n"
               "561\t1224\tgenus\tEscherichia\n"
               "562\t561\tspecies\tEscherichia coli\n"
               "10239\t1\tsuperkingdom\tViruses\n")


def test_ncbi_like_table(tmp_path: Path) -> None:
    p = tmp_path / "nodes.tsv.gz"
    p.write_bytes(gzip.compress(NCBI_SAMPLE.encode()))
    tax, report = load(p, return_report=True)
    assert report.format == "edges" and report.rows_read == 7 and not report.synthetic_root
    assert tax.names[0] == "root" and str(tax.keys[0]) == "1"
    assert list(tax.rank_order) == ["superkingdom", "phylum", "genus", "species"]
    coli = tax.find("562")  # keys are the ids
    assert tax.lineage(coli) == "cellular organisms > Bacteria > Pseudomonadota > Escherichia > Escherichia coli"
    assert tax.ranks[tax.find("cellular organisms")] == ""  # clade / no_rank = unranked
    assert report.rank_violations == 0
    assert any("no rank" in n for n in report.notes)


def test_inaturalist_and_generic_tables(tmp_path: Path) -> None:
    inat = write(tmp_path, "taxa.csv", "taxon_id,parent_taxon_id,rank_level,name\n48460,,100,Life\n"
                                       "1,48460,70,Animalia\n2,1,60,Chordata\n3,2,50,Aves\n7,3,10,Corvus corax\n")
    tax = load(inat)
    assert list(tax.rank_order) == ["rank_level_100", "kingdom", "phylum", "class", "species"]
    assert tax.ranks[tax.find("Aves")] == "class"
    plain = write(tmp_path, "t.csv", "id,parent_id,rank,name\na,,kingdom,Plantae\nb,a,Family,Rosaceae\nc,b,,Rosa\n")
    t2 = load(plain)
    assert list(t2.rank_order) == ["kingdom", "family"] and t2.ranks[t2.find("Rosa")] == ""


def test_darwin_core_synonyms_counted(tmp_path: Path) -> None:
    p = write(tmp_path, "Taxon.tsv",
              "taxonID\tparentNameUsageID\tacceptedNameUsageID\ttaxonRank\tscientificName\ttaxonomicStatus\n"
              "1\t\t\tkingdom\tAnimalia\taccepted\n"
              "2\t1\t\tphylum\tChordata\taccepted\n"
              "3\t1\t2\tphylum\tVertebrata\tsynonym\n"
              "4\t2\t\tclass\tMammalia\tACCEPTED\n"
              "5\t2\t4\tclass\tMammalia Linnaeus\theterotypic synonym\n")
    tax, report = load(p, return_report=True)
    assert tax.n_nodes == 3 and report.rows_read == 5
    assert sum(report.skipped.values()) == 2
    assert any("acceptedNameUsageID" in n and "taxonomicStatus" not in n for n in report.notes)
    assert tax.lineage(tax.find("Mammalia"), include_root=True) == "Animalia > Chordata > Mammalia"


def test_edge_table_orphans(tmp_path: Path) -> None:
    p = write(tmp_path, "o.tsv", "id\tparent\tname\n1\t\tR\n2\t1\tA\n3\t99\tB\n4\t98\tC\n")
    with pytest.raises(TaxonomyError, match=r"2 row\(s\).*o.tsv line 4: parent '99'.*orphans='attach_to_root'"):
        read_edge_table(p)
    tax, report = read_edge_table(p, orphans="attach_to_root", return_report=True)
    assert set(tax.names[tax.children(0)]) == {"A", "B", "C"}
    assert report.repaired == {"orphan rows (parent id not in the table) attached to the root": 2}


def test_edge_table_unknown_columns(tmp_path: Path) -> None:
    p = write(tmp_path, "u.tsv", "id\tparent\tname\tcolour\tsize\n1\t\tR\tred\t3\n2\t1\tA\tblue\t4\n")
    with pytest.raises(TaxonomyError, match=r"u.tsv line 1: unknown column\(s\) \['colour', 'size'\].*"
                                            r"ignore_columns=\['colour', 'size'\]"):
        load(p)
    assert load(p, ignore_columns=["colour", "size"]).n_nodes == 2


def test_edge_table_several_roots_and_flags(tmp_path: Path) -> None:
    p = write(tmp_path, "f.tsv", "id\tparent_id\tname\tis_label\nA\t\tA\t0\nB\t\tB\t1\nC\tA\tC\t1\nD\tA\tD\t0\n")
    tax, report = load(p, return_report=True)
    assert report.synthetic_root and tax.names[0] == "root"
    assert sorted(tax.label_names) == ["B", "C"]


def test_edge_table_dag_option(tmp_path: Path) -> None:
    p = write(tmp_path, "dag.tsv", "id\tparent\tname\n1\t\tR\n2\t1\tA\n3\t2\tB\n4\t1\tC\n4\t3\tC\n")
    with pytest.raises(TaxonomyError, match=r"several parents.*dag.tsv line 5 \(parent '1'\); dag.tsv line 6 "
                                            r"\(parent '3'\).*multiple_parents='longest'"):
        load(p)
    tax, report = load(p, multiple_parents="longest", return_report=True)
    assert tax.lineage(tax.find("C")) == "A > B > C"
    tax2 = load(p, multiple_parents="shortest")
    assert tax2.lineage(tax2.find("C")) == "C"


# ------------------------------------------------------------------ the full NCBI
@pytest.mark.slow
def test_full_ncbi_taxonomy(taxonomies_dir: Path) -> None:
    path = taxonomies_dir / "ncbi_taxonomy_2024-09-07.tsv.gz"

    def cpu_seconds(fn):
        t0 = time.process_time()
        out = fn()
        return time.process_time() - t0, out

    # Reference: a plain read_csv giving the columns as Python strings, every cell as written (the loader
    # has to produce those for the core). CPU time of this process, so that other jobs on a shared 2-core
    # machine do not skew the ratio; the reference is the faster of two reads. (pandas 3's default
    # Arrow-string read is ~3x faster still, because it creates no Python string objects at all.)
    plain = min(cpu_seconds(lambda: pd.read_csv(path, sep="\t", dtype=object, keep_default_na=False,
                                                na_filter=False))[0] for _ in range(2))
    took, (tax, report) = cpu_seconds(lambda: load(path, return_report=True))
    print(f"NCBI: pandas.read_csv(dtype=object) {plain:.1f} s CPU, load {took:.1f} s CPU ({took / plain:.1f}x)")
    assert report.rows_read == tax.n_nodes == 2_609_295
    assert not report.synthetic_root and str(tax.keys[0]) == "1"
    human = tax.find("9606")
    lineage = tax.lineage(human, sep=None)
    assert tax.names[human] == "Homo sapiens" and tax.ranks[human] == "species"
    for name in ("Eukaryota", "Metazoa", "Chordata", "Mammalia", "Primates", "Hominidae", "Homo"):
        assert name in lineage
    assert tax.ranks[tax.find("Mammalia", rank="class")] == "class"
    # decision documented in docs/taxonomy.md: the canonical order holds for all but 3 forma_specialis nodes
    bad = rank_violations(tax)
    assert report.rank_violations == len(bad) == 3
    assert set(tax.ranks[bad]) == {"forma_specialis"}
    with pytest.raises(TaxonomyError, match="out of rank order"):
        tax.check_rank_order()
    # about 2.5x measured (docs/benchmarks.md); a per-row Python loop in the reader or the core would
    # blow far past 6x
    assert took < 6 * plain


# ------------------------------------------------------------------ path strings and outlines
def test_class_paths_internal_labels(plankton_dir: Path) -> None:
    tax, report = load(plankton_dir / "class_paths.tsv", return_report=True)
    assert report.format == "paths" and report.synthetic_root
    assert tax.n_labels == 121
    assert int((~tax.label_is_leaf).sum()) == 18
    assert tax.is_label[tax.find("copepod_calanoid")] and not tax.is_leaf[tax.find("copepod_calanoid")]
    with open(plankton_dir / "class_paths.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for row in rows:
        assert tax.lineage(tax.find(row["class"])) == row["path"]


def test_outline_with_labels_equals_class_paths(plankton_dir: Path) -> None:
    paths = read_path_strings(plankton_dir / "class_paths.tsv")
    with open(plankton_dir / "class_paths.tsv") as fh:
        classes = [r["class"] for r in csv.DictReader(fh, delimiter="\t")]
    outline = read_outline(plankton_dir / "taxonomy.txt", labels=classes)
    assert outline.fingerprint == paths.fingerprint
    default = read_outline(plankton_dir / "taxonomy.txt")
    assert default.n_labels == 103 and default.label_is_leaf.all()
    assert default.fingerprint != paths.fingerprint


def test_class_name_at_two_paths(tmp_path: Path, plankton_dir: Path) -> None:
    """The real NDSB class paths plus one line giving copepod_calanoid a second path: an error naming both
    lines (it used to load as two labels called copepod_calanoid); on_conflict='split' keeps both."""
    real = (plankton_dir / "class_paths.tsv").read_text(encoding="utf-8")
    lines = real.splitlines()
    first = 1 + next(i for i, ln in enumerate(lines) if ln.split("\t")[0] == "copepod_calanoid")
    p = write(tmp_path, "cp2.tsv", real + "copepod_calanoid\tPLANKTON > PARTIAL > copepod_calanoid\n")
    added = len(lines) + 1
    with pytest.raises(TaxonomyError) as e:
        read_path_strings(p)
    msg = str(e.value)
    assert msg.startswith(f"the class 'copepod_calanoid' ends two different paths: cp2.tsv line {first} "
                          f"('PLANKTON > CRUSTACEANS > COPEPODS > copepod_calanoid'); cp2.tsv line {added} "
                          "('PLANKTON > PARTIAL > copepod_calanoid')")
    assert "on_conflict='split'" in msg
    with pytest.raises(TaxonomyError, match="ends two different paths"):
        load(p)   # detected as path strings: the same check
    tax, report = load(p, on_conflict="split", return_report=True)
    assert tax.n_labels == 122 and len(tax.find_all("copepod_calanoid")) == 2
    assert report.repaired == {"class names ending several paths kept as separate labels (on_conflict='split')": 2}
    assert set(tax.keys[tax.find_all("copepod_calanoid")].tolist()) == {
        "PLANKTON > CRUSTACEANS > COPEPODS > copepod_calanoid", "PLANKTON > PARTIAL > copepod_calanoid"}
    # a repeated line with the same path is merged and counted, as before
    same = write(tmp_path, "cp3.tsv", real + lines[first - 1] + "\n")
    tax, report = read_path_strings(same, return_report=True)
    assert tax.n_labels == 121 and report.skipped == {"lines repeating an earlier path (merged)": 1}


def test_class_path_mismatch(tmp_path: Path) -> None:
    p = write(tmp_path, "cp.tsv", "class\tpath\na\tX > a\nb\tX > c\n")
    with pytest.raises(TaxonomyError, match=r"cp.tsv line 3: the class 'b' differs from the last element.*'c'"):
        read_path_strings(p)


@pytest.mark.parametrize("text, pattern", [
    ("A\n    B\n      C\n", r"o.txt line 3: indentation of 6 is not a multiple of the indent unit \(4 space"),
    ("A\n  B\n      C\n", r"o.txt line 3: 'C' is indented 3 level"),
    ("A\n\tB\n    C\n", r"mixes tabs \(line 2\) and spaces \(line 3\)"),
])
def test_outline_bad_indentation(tmp_path: Path, text: str, pattern: str) -> None:
    p = write(tmp_path, "o.txt", text)
    with pytest.raises(TaxonomyError, match=pattern):
        read_outline(p)


def test_outline_tabs_and_duplicates(tmp_path: Path) -> None:
    tax = read_outline(write(tmp_path, "t.txt", "A\n\tB\n\t\tC\n\tD\n"))
    assert tax.lineage(tax.find("C"), include_root=True) == "A > B > C" and tax.n_nodes == 4
    with pytest.raises(TaxonomyError, match=r"dup.txt line 2.*dup.txt line 3"):
        read_outline(write(tmp_path, "dup.txt", "A\n  B\n  B\n"))


# ------------------------------------------------------------------ Newick
def test_fathomnet_newick(taxonomies_dir: Path) -> None:
    tax, report = read_newick(taxonomies_dir / "fathomnet2025.nwk", return_report=True)
    assert tax.names[0] == "root" and tax.names[tax.children(0)].tolist() == ["Biota"]
    assert tax.n_nodes == 273 and tax.n_labels == len(tax.leaves) == 64
    assert tax.lineage(tax.find("Pyrosoma atlanticum")) == ("Biota > Animalia > Chordata > Tunicata > Thaliacea > "
                                                          "Pyrosomatida > Pyrosomatidae > Pyrosomatinae > Pyrosoma > "
                                                          "Pyrosoma atlanticum")
    assert "the unnamed root was named 'root'" in report.notes


def test_newick_lengths_as_ranks_vs_lineage(taxonomies_dir: Path, fathom: Taxonomy) -> None:
    """Rank steps from the Newick (length >= 1 = ranked) against the lineage CSV, for every label pair.

    They agree except on paths through the four nodes the Newick marks with length 1 although they
    are not one of the 7 standard ranks: Tunicata (subphylum), Caridea (infraorder), Teleostei
    (infraclass) and Acanthascinae (subfamily). Each such node on the a-LCA-b path adds exactly one
    step. (Asteronyx and Asteronyx loveni are not in the Newick file.)
    """
    labels = [n for n in fathom.label_names if not n.startswith("Asteronyx")]
    nw = read_newick(taxonomies_dir / "fathomnet2025.nwk", lengths_as_ranks=True, labels=labels)
    ranked = set(nw.names[nw.ranks == "ranked"].tolist())
    extra = {"Tunicata", "Caridea", "Teleostei", "Acanthascinae"}
    assert ranked - set(fathom.names[fathom.ranks != ""].tolist()) == extra
    ic, iw = fathom.find_many(labels), nw.find_many(labels)
    dc = fathom.distance(ic[:, None], ic[None, :], "rank_steps")
    dw = nw.distance(iw[:, None], iw[None, :], "rank_steps", ranks=["ranked"])
    # reference: count the extra nodes on each path with plain parent walks
    extra_ids = {nw.find(n) for n in extra}

    def up(v: int) -> list[int]:
        out = []
        while v >= 0:
            out.append(v)
            v = int(nw.parent[v])
        return out

    chains = {v: up(int(v)) for v in iw}
    want = np.zeros_like(dc)
    for i, a in enumerate(iw):
        for j, b in enumerate(iw):
            ca, cb = chains[a], chains[b]
            common = set(ca) & set(cb)
            path = [u for u in ca + cb if u not in common]
            want[i, j] = sum(u in extra_ids for u in path)
    np.testing.assert_array_equal(dw - dc, want)
    affected = {labels[k] for k in range(len(labels)) if want[k].any() and
                any(x in extra_ids for x in chains[iw[k]])}
    assert affected == {"Tunicata", "Pyrosoma atlanticum", "Caridea", "Heterocarpus", "Pandalus amplus",
                        "Pandalus platyceros", "Sebastes", "Sebastes diploproa", "Sebastolobus",
                        "Merluccius productus", "Microstomus pacificus", "Acanthascinae"}
    keep = [k for k, n in enumerate(labels) if n not in affected]
    np.testing.assert_array_equal(dw[np.ix_(keep, keep)], dc[np.ix_(keep, keep)])


# recorded with the reader that keyed nodes by name (before path keys): keys are not part of the
# fingerprint, and path keys only differ from names where names repeat, so the real file is unchanged
FATHOMNET_NWK_FINGERPRINT = "sha256:e00303ef45311c1b9570"
FATHOMNET_NWK_RANKED_FINGERPRINT = "sha256:525edd89eeed4ac12b15"   # lengths_as_ranks=True, the CSV's labels


def test_newick_homonyms_keyed_by_path(tmp_path: Path, taxonomies_dir: Path, fathom: Taxonomy) -> None:
    """Morus is a plant genus (mulberries) and a bird genus (gannets): the same name under two parents.
    Nodes are keyed by their path of names, so both load; names stay the display names."""
    p = write(tmp_path, "morus.nwk", "(((('Morus alba')Morus)Moraceae)Plantae,"
                                     "(((('Morus bassanus')Morus)Sulidae)Aves)Animalia)Eukaryota;")
    tax = read_newick(p)
    both = tax.find_all("Morus")
    assert len(both) == 2 and tax.n_nodes == 10
    assert sorted(tax.keys[both].tolist()) == ["Eukaryota > Animalia > Aves > Sulidae > Morus",
                                                "Eukaryota > Plantae > Moraceae > Morus"]
    assert {tax.names[tax.parent[v]] for v in both} == {"Moraceae", "Sulidae"}
    assert tax.lineage(tax.find("Morus bassanus")) == "Animalia > Aves > Sulidae > Morus > Morus bassanus"
    assert tax.find("Eukaryota > Plantae > Moraceae > Morus") == tax.parent[tax.find("Morus alba")]
    assert int(tax.distance(both[0], both[1])) == 7
    with pytest.raises(TaxonomyError, match="the name 'Morus' is ambiguous"):
        tax.find("Morus")
    # the writer writes names only; reading back rebuilds the same keys and the same tree
    back = read_newick(save(tax, tmp_path / "back.nwk"))
    assert back.fingerprint == tax.fingerprint and back.keys.tolist() == tax.keys.tolist()
    # the same name twice among siblings is still an error, naming both places
    with pytest.raises(TaxonomyError, match=r"1 name\(s\) repeated among siblings, e.g. 'Morus' \('R > Morus'\) at "
                                            r"sib.nwk line 1, column 2 .* and sib.nwk line 1, column 11"):
        read_newick(write(tmp_path, "sib.nwk", "((A)Morus,(B)Morus)R;"))
    # the real FathomNet Newick loads as before (fingerprints recorded with the name-keyed reader)
    nwk = read_newick(taxonomies_dir / "fathomnet2025.nwk")
    assert nwk.fingerprint == FATHOMNET_NWK_FINGERPRINT
    pyro = nwk.find("Pyrosoma atlanticum")
    assert nwk.keys[pyro] == "root > " + nwk.lineage(pyro)
    labels = [n for n in fathom.label_names if not n.startswith("Asteronyx")]
    ranked = read_newick(taxonomies_dir / "fathomnet2025.nwk", lengths_as_ranks=True, labels=labels)
    assert ranked.fingerprint == FATHOMNET_NWK_RANKED_FINGERPRINT


def test_newick_quoting_and_nhx(tmp_path: Path) -> None:
    p = write(tmp_path, "q.nwk", "(('Homo sapiens':1,'O''Brien'[&&NHX:rank=species])"
                                 "Hominidae[&&NHX:rank=family:label=1]:0.5,B_c)R[&&NHX:rank_order=family|species];")
    tax = read_newick(p)
    assert set(tax.names.tolist()) == {"R", "Hominidae", "Homo sapiens", "O'Brien", "B_c"}
    assert tax.ranks[tax.find("O'Brien")] == "species" and list(tax.rank_order) == ["family", "species"]
    assert tax.is_label[tax.find("Hominidae")]
    assert read_newick(p, underscores=True).find("B c") > 0


@pytest.mark.parametrize("text, pattern", [
    ("((A,B),C;", r"m.nwk line 1, column 1 \(character 1\): unbalanced '\('"),
    ("(A,B),C);", r"m.nwk line 1, column 6 \(character 6\): ',' outside any parentheses"),
    ("(A,B));", r"m.nwk line 1, column 6 \(character 6\): unbalanced '\)'"),
    ("(A,B)\n(C,D);", r"m.nwk line 2, column 1 .*'\(' after a node"),
    ("(A:x,B)C;", r"column 4 .*malformed branch length 'x'"),
    ("(A,B)C", r"does not end with ';'"),
    ("((A,B),C)R;", r"1 unnamed node\(s\), first at m.nwk line 1, column 2.*unnamed='auto'"),
])
def test_malformed_newick(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(TaxonomyError, match=pattern):
        read_newick(write(tmp_path, "m.nwk", text))


# ------------------------------------------------------------------ JSON
def test_nested_json_shapes(tmp_path: Path) -> None:
    nodes = {"name": "Life", "children": [
        {"name": "Animalia", "rank": "Kingdom", "children": [{"name": "Chordata", "rank": "phylum"}]},
        {"name": "Plantae", "rank": "kingdom", "label": True, "children": [{"name": "Rosa", "rank": "genus"}]}]}
    t1 = read_nested_json(write(tmp_path, "n.json", json.dumps(nodes)))
    assert t1.ranks[t1.find("Animalia")] == "kingdom" and list(t1.rank_order) == ["kingdom", "phylum", "genus"]
    assert sorted(t1.label_names) == ["Chordata", "Plantae", "Rosa"]
    dod = {"Animalia": {"Chordata": {"Aves": {}, "Mammalia": None}}, "Plantae": ["Rosa", "Quercus"]}
    t2, report = load(write(tmp_path, "d.json", json.dumps(dod)), return_report=True)
    assert report.format == "nested-json" and report.synthetic_root
    assert t2.lineage(t2.find("Quercus")) == "Plantae > Quercus" and t2.n_labels == 4
    with pytest.raises(TaxonomyError, match=r"b.json \$\.children\[1\]: 'name' must be a string"):
        read_nested_json(write(tmp_path, "b.json", json.dumps({"name": "R", "children": [{"name": "A"}, {"x": 1}]})))


def test_own_json_round_trip_and_fingerprint_check(tmp_path: Path, fathom: Taxonomy) -> None:
    out = save(fathom, tmp_path / "t.json")
    back, report = load(out, return_report=True)
    assert report.format == "taxonomist-json" and back.fingerprint == fathom.fingerprint
    assert np.array_equal(back.keys, fathom.keys) and np.array_equal(back.parent, fathom.parent)
    data = json.loads(out.read_text())
    data["names"][5] = data["names"][5] + "x"
    bad = write(tmp_path, "edited.json", json.dumps(data))
    with pytest.raises(TaxonomyError, match=r"edited.json: the stored fingerprint sha256:\w+ does not match"):
        load(bad)
    assert read_taxonomy_json(bad, verify=False).names[5].endswith("x")


# ------------------------------------------------------------------ round trips
REAL = {"fathomnet_csv": ("taxonomies", "fathomnet2025_lineage.csv"),
        "cifar_csv": ("taxonomies", "cifar100_5level.csv"),
        "fathomnet_nwk": ("taxonomies", "fathomnet2025.nwk"),
        "class_paths": ("plankton", "class_paths.tsv"),
        "outline": ("plankton", "taxonomy.txt")}
WRITERS = {"taxonomist-json": "t.json", "nested-json": "t.nested.json", "newick": "t.nwk", "edges": "t.tsv",
           "lineage": "t.lineage.csv", "paths": "t.paths.tsv", "outline": "t.txt"}
# (source, format) pairs that cannot carry the tree, and why (asserted below)
LOSSY = {("fathomnet_csv", "paths"): "ranks", ("fathomnet_csv", "outline"): "ranks",
         ("cifar_csv", "paths"): "ranks", ("cifar_csv", "outline"): "ranks",
         ("class_paths", "outline"): "internal labels"}
UNWRITABLE = {("fathomnet_nwk", "lineage"), ("class_paths", "lineage"), ("outline", "lineage")}


@pytest.mark.parametrize("source", list(REAL))
@pytest.mark.parametrize("fmt", list(WRITERS))
def test_round_trip(tmp_path: Path, shared_data: Path, source: str, fmt: str) -> None:
    folder, name = REAL[source]
    tax = load(shared_data / folder / name)
    out = tmp_path / WRITERS[fmt]
    if (source, fmt) in UNWRITABLE:  # unranked trees
        with pytest.raises(TaxonomyError, match="has no ranks|cannot write a lineage table"):
            save(tax, out, format=fmt)
        return
    save(tax, out, format=fmt)
    back = load(out, format=fmt)
    if (source, fmt) in LOSSY:
        assert back.fingerprint != tax.fingerprint
        assert back.n_nodes == tax.n_nodes and np.array_equal(back.parent, tax.parent)
        if LOSSY[(source, fmt)] == "ranks":
            assert not back.has_ranks
        else:  # the outline keeps the structure; labels given back by name restore the tree
            assert load(out, format=fmt, labels=tax.label_names).fingerprint == tax.fingerprint
    else:
        assert back.fingerprint == tax.fingerprint, f"{source} -> {fmt}"
        assert back.label_names == tax.label_names


def test_save_by_extension_and_gzip(tmp_path: Path, fathom: Taxonomy) -> None:
    for name, fmt in [("a.json", "taxonomist-json"), ("a.nwk", "newick"), ("a.tsv", "edges"), ("a.csv", "edges"),
                      ("a.json.gz", "taxonomist-json"), ("a.tsv.gz", "edges")]:
        out = save(fathom, tmp_path / name)
        assert detect_format(out) == fmt
        assert load(out).fingerprint == fathom.fingerprint
    with pytest.raises(TaxonomyError, match=r"extension '.xyz'.*format="):
        save(fathom, tmp_path / "a.xyz")
    # Taxonomy.load / Taxonomy.save delegate to the same functions
    fathom.save(tmp_path / "b.json")
    assert Taxonomy.load(tmp_path / "b.json") == fathom


# ------------------------------------------------------------------ detection and options
def test_detect_real_files(shared_data: Path) -> None:
    expected = {"taxonomies/fathomnet2025_lineage.csv": "lineage", "taxonomies/cifar100_5level.csv": "lineage",
                "taxonomies/fathomnet2025.nwk": "newick", "taxonomies/ncbi_taxonomy_2024-09-07.tsv.gz": "edges",
                "taxonomies/tiny200_wordnet_paths.tsv": "wordnet", "tiny200_mini/labels.tsv": "wordnet",
                "plankton/class_paths.tsv": "paths", "plankton/taxonomy.txt": "outline"}
    for rel, fmt in expected.items():
        assert detect_format(shared_data / rel) == fmt, rel


def test_detect_content_and_ambiguity(tmp_path: Path) -> None:
    assert detect_format(write(tmp_path, "x.txt", "(A,B)C;\n")) == "newick"
    assert detect_format(write(tmp_path, "p.txt", "A > B\nA > C\n")) == "paths"
    assert detect_format(write(tmp_path, "o", "A\n  B\n")) == "outline"
    with pytest.raises(AmbiguousFormatError) as e:
        load(write(tmp_path, "one.csv", "species\nA\nB\n"))
    msg = str(e.value)
    assert "one.csv" in msg and "format=" in msg and all(f in msg for f in FORMATS)
    with pytest.raises(TaxonomyError, match=r"the lineage reader has no option\(s\) \['orphans'\]"):
        load(write(tmp_path, "l.csv", "kingdom,phylum\nK,P\n"), orphans="attach_to_root")
    with pytest.raises(TaxonomyError, match="unknown taxonomy format 'nexus'"):
        load(tmp_path / "l.csv", format="nexus")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.csv")


def test_load_report_type(fathom_csv: Path) -> None:
    tax = load(fathom_csv)
    assert isinstance(tax, Taxonomy)
    tax2, report = load(fathom_csv, return_report=True)
    assert isinstance(report, LoadReport) and report.rows_read == 81 and report.n_nodes == 195
    assert report.to_dict()["format"] == "lineage" and "81 rows" in str(report)


# ------------------------------------------------------------------ ranks helpers
def test_rank_helpers() -> None:
    assert normalize_rank("Species group") == "species_group" and normalize_rank("no rank") == ""
    assert normalize_rank("clade") == "" and normalize_rank("Fine") == "Fine"
    assert CANONICAL_RANKS.index("superkingdom") < CANONICAL_RANKS.index("kingdom") < CANONICAL_RANKS.index("phylum")
    ranks = np.array(["genus", "kingdom", "X", "species", "", "X"], dtype=object)
    depth = np.array([3, 1, 2, 4, 0, 2])
    assert infer_rank_order(ranks, depth) == ["kingdom", "X", "genus", "species"]


# ------------------------------------------------------------------ bad input: one clear error each
def _edges(tmp_path: Path, name: str, body: str, header: str = "id\tparent\trank\tname\n") -> Path:
    return write(tmp_path, name, header + body)


def test_error_cycle(tmp_path: Path) -> None:
    p = _edges(tmp_path, "cyc.tsv", "1\t\t\tR\n2\t3\t\tA\n3\t2\t\tB\n")
    with pytest.raises(TaxonomyError, match=r"cycle.*cyc.tsv line [34].*cyc.tsv line [34]"):
        load(p)
    p2 = _edges(tmp_path, "cyc2.tsv", "1\t2\t\tA\n2\t1\t\tB\n")
    with pytest.raises(TaxonomyError, match=r"no top-level node.*cycle.*cyc2.tsv line 2 -> cyc2.tsv line 3"):
        load(p2)


def test_error_duplicate_ids_and_empty_names(tmp_path: Path) -> None:
    p = _edges(tmp_path, "dup.tsv", "1\t\t\tR\n2\t1\t\tA\n2\t1\t\tA again\n")
    with pytest.raises(TaxonomyError, match=r"duplicate id '2'.*dup.tsv line 3.*dup.tsv line 4"):
        load(p)
    p2 = _edges(tmp_path, "empty.tsv", "1\t\t\tR\n2\t1\t\t\n")
    with pytest.raises(TaxonomyError, match=r"empty name.*empty.tsv line 3"):
        load(p2)


def test_error_rank_order_strict(tmp_path: Path) -> None:
    p = _edges(tmp_path, "ranks.tsv", "1\t\tkingdom\tK\n2\t1\tgenus\tG\n3\t2\tfamily\tF\n")
    tax, report = load(p, return_report=True)
    assert report.rank_violations == 1  # loaded, but counted
    assert validate_taxonomy(tax).problems
    with pytest.raises(TaxonomyError, match=r"ranks.tsv line 4.*'F' has rank 'family' but lies under a 'genus'"):
        load(p, strict_ranks=True)


def test_unknown_ranks_slot_in_by_depth(tmp_path: Path) -> None:
    """Ranks outside the canonical list are placed by mean depth among the known ones; not enforced."""
    p = _edges(tmp_path, "u.tsv", "1\t\tkingdom\tK\n2\t1\tbranch\tB\n3\t2\tgenus\tG\n4\t3\tspecies\tS\n"
                                  "5\t2\tgenus\tG2\n6\t5\tbranch\tB2\n7\t1\tbranch\tB3\n")
    tax, report = load(p, return_report=True)
    # mean depths: branch (1 + 3 + 1) / 3 = 1.67, genus 2, species 3
    assert list(tax.rank_order) == ["kingdom", "branch", "genus", "species"]
    assert report.rank_violations == 1  # B2 (branch) under genus G2
    with pytest.raises(TaxonomyError, match=r"u.tsv line 7.*'B2' has rank 'branch'"):
        load(p, strict_ranks=True)


def test_labels_by_name_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "o.txt", "A\n    X\nB\n    X\n    Y\n")
    with pytest.raises(TaxonomyError,
                       match=r"1 label name\(s\) match several nodes: 'X' at o.txt line 2, o.txt line 4"):
        read_outline(p, labels=["X"])
    with pytest.raises(TaxonomyError, match=r"1 label name\(s\) are not in the tree: 'Z'"):
        read_outline(p, labels=["Y", "Z"])
    assert read_outline(p, labels=["Y", "A"]).label_names == ["A", "Y"]
