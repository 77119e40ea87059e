"""`taxonomist taxonomy ...`: every verb through the real dispatcher (main([...])) plus one subprocess run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from taxonomist.cli.main import main
from taxonomist.taxonomy import load

REPO = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main(["taxonomy", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def fathom(taxonomies_dir: Path) -> Path:
    return taxonomies_dir / "fathomnet2025_lineage.csv"


def test_info_text_and_json(capsys, fathom: Path) -> None:
    tax = load(fathom)
    rc, out, _ = run(capsys, "info", fathom)
    assert rc == 0
    assert "(lineage)" in out and "n_nodes            195" in out and tax.fingerprint in out
    assert "kingdom, phylum, class, order, family, genus, species" in out
    assert "3 label(s) below the deepest filled rank became unranked nodes" in out
    rc, out, _ = run(capsys, "info", fathom, "--json")
    data = json.loads(out)
    assert rc == 0 and data["summary"]["n_labels"] == 81 and data["summary"]["n_internal_labels"] == 14
    assert data["summary"]["fingerprint"] == tax.fingerprint and data["load_report"]["rows_read"] == 81


def test_show(capsys, plankton_dir: Path, fathom: Path) -> None:
    rc, out, _ = run(capsys, "show", plankton_dir / "taxonomy.txt", "--max-lines", 5)
    lines = out.splitlines()
    assert rc == 0 and lines[:3] == ["root", "├── ARTIFACTS", "│   ├── artifacts *"]
    assert lines[-1] == "... 146 more node(s) not shown (use --max-depth or --max-lines)"
    rc, out, _ = run(capsys, "show", fathom, "--max-depth", 1)
    lines = out.splitlines()
    assert lines[0] == "Animalia [kingdom]" and len(lines) == 8
    assert "└── Porifera [phylum] *  (+" in lines[-1]


def test_distance(capsys, fathom: Path, tmp_path: Path) -> None:
    rc, out, _ = run(capsys, "distance", fathom, "Ophiacanthidae", "Asteronyx loveni")
    assert rc == 0 and "rank_steps: 6 (ranks: kingdom, phylum" in out and "path: 6" in out
    assert "lowest common ancestor: Ophiuroidea [class] (key class:Ophiuroidea): Animalia > Echinodermata > " \
           "Ophiuroidea" in out
    rc, out, _ = run(capsys, "distance", fathom, "genus:Asteronyx", "Asteronyx loveni", "--metric", "rank_steps",
                     "--ranks", "genus,species")
    assert rc == 0 and out.strip().endswith("rank_steps: 1 (ranks: genus, species)")
    # a homonym: the error lists the candidate lineages, without a traceback
    homonyms = tmp_path / "h.csv"
    homonyms.write_text("kingdom,phylum,genus\nAnimalia,Chordata,Morus\nPlantae,Tracheophyta,Morus\n")
    rc, out, err = run(capsys, "distance", homonyms, "Morus", "Chordata", "--option", "on_conflict=split")
    assert rc == 1 and "the name 'Morus' is ambiguous: 2 taxa carry it" in err and "Traceback" not in err
    assert "Animalia > Chordata > Morus" in err and "Plantae > Tracheophyta > Morus" in err
    rc, out, _ = run(capsys, "distance", homonyms, "genus:Animalia > Chordata > Morus", "Tracheophyta",
                     "-O", "on_conflict=split", "--metric", "path")
    assert rc == 0 and out.strip().endswith("path: 5")  # Morus-Chordata-Animalia-root-Plantae-Tracheophyta
    rc, _, err = run(capsys, "distance", homonyms, "Morus", "Chordata")  # without split: the contradiction
    assert rc == 1 and "h.csv line 2 (column 'genus')" in err and "h.csv line 3 (column 'genus')" in err


def test_convert_and_check(capsys, fathom: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "fathom.nwk"
    rc, out, _ = run(capsys, "convert", fathom, out_file, "--check")
    assert rc == 0 and "read back" in out and "(identical)" in out
    assert load(out_file).fingerprint == load(fathom).fingerprint
    rc, out, _ = run(capsys, "convert", fathom, tmp_path / "f.txt", "--check")
    assert rc == 1 and "DIFFERENT" in out  # the outline loses ranks
    rc, _, err = run(capsys, "convert", tmp_path / "f.txt", tmp_path / "f.csv", "--to", "lineage")
    assert rc == 1 and "has no ranks" in err


def test_validate(capsys, plankton_dir: Path, tmp_path: Path) -> None:
    rc, out, _ = run(capsys, "validate", plankton_dir / "class_paths.tsv")
    assert rc == 0 and out.splitlines()[-1].startswith("OK: ") and "121 labels (18 internal)" in out
    bad = tmp_path / "ranks.tsv"
    bad.write_text("id\tparent\trank\tname\n1\t\tkingdom\tK\n2\t1\tgenus\tG\n3\t2\tfamily\tF\n")
    rc, out, _ = run(capsys, "validate", bad)
    assert rc == 1 and "problem: 1 node(s) out of rank order" in out and "family under genus (1)" in out
    assert out.splitlines()[-1].startswith("INVALID")
    broken = tmp_path / "broken.nwk"
    broken.write_text("((A,B),C;")
    rc, out, err = run(capsys, "validate", broken)
    assert rc == 1 and "broken.nwk line 1, column 1" in err and "Traceback" not in err


def test_labels_from_and_options(capsys, plankton_dir: Path, tmp_path: Path) -> None:
    rc, out, _ = run(capsys, "info", plankton_dir / "taxonomy.txt", "--labels-from", plankton_dir / "class_paths.tsv",
                     "--json")
    assert rc == 0
    assert json.loads(out)["summary"]["fingerprint"] == load(plankton_dir / "class_paths.tsv").fingerprint
    rc, _, err = run(capsys, "info", plankton_dir / "taxonomy.txt", "--option", "nonsense")
    assert rc == 1 and "KEY=VALUE" in err
    rc, _, err = run(capsys, "info", plankton_dir / "taxonomy.txt", "--option", "orphans=attach_to_root")
    assert rc == 1 and "the outline reader has no option(s) ['orphans']" in err


def test_labels_from_counts_agree(capsys, plankton_dir: Path) -> None:
    """The outline alone has 103 labels (its leaves); --labels-from the class paths makes them 121, and the
    load report says 121 too (it used to keep the file's 103)."""
    outline, classes = plankton_dir / "taxonomy.txt", plankton_dir / "class_paths.tsv"
    rc, out, _ = run(capsys, "info", outline, "--labels-from", classes, "--json")
    data = json.loads(out)
    assert rc == 0 and data["summary"]["n_labels"] == data["load_report"]["n_labels"] == 121
    assert data["load_report"]["n_nodes"] == data["summary"]["n_nodes"] == 151
    assert f"label nodes set from {classes}: 121 node(s) (the file alone gives 103)" in data["load_report"]["notes"]
    rc, out, _ = run(capsys, "info", outline, "--labels-from", classes)
    assert rc == 0 and "n_labels           121" in out and "-> 151 nodes, 121 label nodes" in out
    rc, out, _ = run(capsys, "validate", outline, "--labels-from", classes)
    assert rc == 0 and "121 labels (18 internal)" in out.splitlines()[-1]
    rc, out, _ = run(capsys, "info", outline, "--json")   # without the option: the file's own 103
    data = json.loads(out)
    assert data["summary"]["n_labels"] == data["load_report"]["n_labels"] == 103


def test_lineage_extra_column_needs_an_option(capsys, fathom: Path, tmp_path: Path) -> None:
    """A lineage table with rank columns and a 'notes' column: validate fails with the fix in the message
    (it used to say OK with 'notes' as a rank); -O ignore_columns=notes loads the real tree."""
    rows = fathom.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "with_notes.csv"
    bad.write_text("\n".join([rows[0] + ",notes"] + [r + ",seen" for r in rows[1:]]) + "\n", encoding="utf-8")
    rc, out, err = run(capsys, "validate", bad)
    assert rc == 1 and "OK" not in out and "Traceback" not in err
    assert "with_notes.csv line 1: the column(s) ['notes'] are not rank names" in err
    assert "-O ignore_columns=notes" in err
    rc, out, _ = run(capsys, "validate", bad, "-O", "ignore_columns=notes")
    assert rc == 0 and out.splitlines()[-1].startswith("OK: ")
    rc, out, _ = run(capsys, "info", bad, "-O", "ignore_columns=notes", "--json")
    assert json.loads(out)["summary"]["fingerprint"] == load(fathom).fingerprint


def test_missing_nltk_is_a_clean_error(capsys, monkeypatch: pytest.MonkeyPatch, shared_data: Path) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)
    rc, _, err = run(capsys, "info", shared_data / "tiny200_mini" / "labels.tsv")
    assert rc == 1 and "pip install 'taxonomist[wordnet]'" in err and "Traceback" not in err


def test_no_verb_prints_help(capsys) -> None:
    rc, out, _ = run(capsys)
    assert rc == 2 and "info" in out and "convert" in out


def test_console_script(fathom: Path) -> None:
    exe = REPO / ".venv" / "bin" / "taxonomist"
    if not exe.exists():
        pytest.skip(f"{exe} not installed")
    res = subprocess.run([str(exe), "taxonomy", "info", str(fathom)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "n_labels           81" in res.stdout


def test_list_command_shows_registered_components(capsys):
    import json as _json

    from taxonomist.cli.main import main as _cli

    assert _cli(["list", "heads", "--json"]) == 0
    heads = _json.loads(capsys.readouterr().out)
    for name in ("flat", "per_rank", "hsoftmax", "conditional", "arcface", "multilabel"):
        assert name in heads
    assert _cli(["list", "weightings", "--json"]) == 0
    w = _json.loads(capsys.readouterr().out)
    assert w["gradnorm"]["alpha"] == 1.5 and set(w) >= {"static", "gradnorm", "uncertainty"}
    assert _cli(["list", "losses"]) == 0
    out = capsys.readouterr().out
    assert "hxe" in out and "label_smoothing=" in out
    assert _cli(["list", "augment", "--json"]) == 0
    aug = _json.loads(capsys.readouterr().out)
    assert set(aug) >= {"none", "flips", "standard", "randaugment", "autoaugment"}
    assert _cli(["list", "decisions", "--json"]) == 0
    assert "threshold" in _json.loads(capsys.readouterr().out)
