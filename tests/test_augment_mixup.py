"""Augmentation presets on real plankton images, probability schedules, and taxon-grouped
mixup/cutmix on the real FathomNet 2025 (ranked) and NDSB plankton (unranked) trees."""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from taxonomist.data import Preprocess, build_transform, load_rgb
from taxonomist.data.augment import AUGMENT_PRESETS, AugmentSpec, AugmentTransform, ProbabilitySchedule, build_augment
from taxonomist.data.mixup import HierarchyConsistencyWarning, TaxonMixup, mixture_loss, pair_within_groups
from taxonomist.errors import ConfigError
from taxonomist.taxonomy import Taxonomy, load


@pytest.fixture(scope="module")
def images(plankton_dir: Path) -> list:
    paths = [sorted((plankton_dir / "train" / c).iterdir())[0] for c in ("chaetognath_sagitta", "amphipods")]
    return [load_rgb(str(p)) for p in paths]


@pytest.fixture(scope="module")
def fathomnet(taxonomies_dir: Path) -> Taxonomy:
    return load(taxonomies_dir / "fathomnet2025_lineage.csv")


@pytest.fixture(scope="module")
def plankton(plankton_dir: Path) -> Taxonomy:
    return load(plankton_dir / "class_paths.tsv")


# ----------------------------------------------------------------------------- augmentation
P = Preprocess(image_size=48)


@pytest.mark.parametrize("name", AUGMENT_PRESETS)
def test_presets_shape_dtype_seed_determinism_and_pickle(images, name):
    t = build_augment(P, {"name": name, "erasing": 0.5, "color_jitter": 0.2 if name == "standard" else 0.0})
    for img in images:
        torch.manual_seed(3)
        a = t(img)
        torch.manual_seed(3)
        b = t(img)
        assert a.shape == (3, 48, 48) and a.dtype == torch.float32 and torch.isfinite(a).all()
        assert torch.equal(a, b)
    t2 = pickle.loads(pickle.dumps(t))
    torch.manual_seed(3)
    assert torch.equal(t2(images[0]), (torch.manual_seed(3), t(images[0]))[1])
    if name != "none":  # different seeds give different augmentations (over a few draws)
        outs = []
        for s in range(6):
            torch.manual_seed(s)
            outs.append(t(images[1]))
        assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_none_is_the_eval_transform_and_eval_is_unchanged(images):
    ev = build_transform(P, train=False)
    for img in images:
        assert torch.equal(build_augment(P, "none")(img), ev(img))
        assert torch.equal(build_augment(P, "randaugment", train=False)(img), ev(img))
    with pytest.raises(ConfigError, match="augment="):
        build_augment(P, "heavy", train=False)  # validated even when unused


def test_flips_are_the_eight_symmetries_of_the_eval_output(images):
    ev = build_transform(P, train=False)(images[0])
    sym = [torch.rot90(x, k, dims=(-2, -1)) for x in (ev, ev.flip(-1)) for k in range(4)]
    assert all(not torch.equal(a, b) for i, a in enumerate(sym) for b in sym[i + 1:])  # a non-symmetric image
    t = build_augment(P, "flips")
    seen = set()
    torch.manual_seed(0)
    for _ in range(64):
        out = t(images[0])
        hits = [j for j, s in enumerate(sym) if torch.equal(out, s)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == set(range(8))


def test_random_erasing_writes_the_mean_colour_in_one_box(images):
    ev = build_transform(P, train=False)(images[0])
    t = build_augment(P, {"name": "none", "erasing": 1.0})
    torch.manual_seed(1)
    out = t(images[0])
    changed = (out != ev).any(dim=0)
    assert changed.any()
    ys, xs = torch.nonzero(changed, as_tuple=True)
    box = (slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))
    assert (out[:, box[0], box[1]] == 0).all()  # value 0 on the normalised scale = the mean colour
    outside = torch.ones_like(changed)
    outside[box] = False
    assert torch.equal(out[:, outside], ev[:, outside])


def test_crop_keeps_the_preprocess_resize(images):
    """A full-area crop with the image's own aspect ratio is the identity: output == eval."""
    img = images[0]
    w, h = img.size
    t = build_augment(P, {"name": "standard", "crop_scale": (1.0, 1.0), "crop_ratio": (w / h, w / h),
                          "hflip": False})
    torch.manual_seed(0)
    assert torch.equal(t(img), build_transform(P, train=False)(img))


def test_randaugment_fills_with_the_pad_colour(images):
    t = AugmentTransform(P, AugmentSpec(name="randaugment", num_ops=3, magnitude=15, crop_scale=(1.0, 1.0)))
    assert t.policy.fill == [255.0, 255.0, 255.0]
    torch.manual_seed(0)
    outs = [t(images[1]) for _ in range(8)]
    ev = build_transform(P, train=False)(images[1])
    assert sum(not torch.equal(o, ev) for o in outs) >= 6


def test_spec_validation_and_json():
    s = AugmentSpec.of({"name": "randaugment", "crop_scale": [0.5, 1], "erasing": 0.25})
    assert s.crop_scale == (0.5, 1.0) and AugmentSpec.of(s.to_json()) == s
    assert AugmentSpec("flips").resolved() == {"crop_scale": None, "hflip": True, "rot90": True}
    assert AugmentSpec("standard").resolved()["crop_scale"] == (0.35, 1.0)
    for bad, match in [({"name": "heavy"}, "augment.name"), ({"crop_scale": (0.9, 0.5)}, "crop_scale"),
                       ({"magnitude": 40}, "magnitude"), ({"erasing": 2}, "erasing"), ({"foo": 1}, "unknown key"),
                       ({"policy": "mnist"}, "policy")]:
        with pytest.raises(ConfigError, match=match):
            AugmentSpec.of(bad)


# ----------------------------------------------------------------------------- schedule
def test_probability_schedules():
    c = ProbabilitySchedule(0.3)
    assert c(0) == c(10**6) == 0.3
    lin = ProbabilitySchedule(0.8, 0.2, "linear", 100)
    cos = ProbabilitySchedule(0.8, 0.2, "cosine", 100)
    for step in (0, 10, 25, 50, 90, 100, 250):
        t = min(step / 100, 1.0)
        assert lin(step) == pytest.approx(0.8 - 0.6 * t)
        assert cos(step) == pytest.approx(0.2 + 0.6 * (1 + math.cos(math.pi * t)) / 2)
    assert cos(50) == pytest.approx(0.5) and cos(25) > lin(25)
    assert ProbabilitySchedule.of({"start": 1, "end": 0, "kind": "linear", "total_steps": 4})(2) == 0.5
    with pytest.raises(ConfigError, match="probability"):
        ProbabilitySchedule(1.5)
    with pytest.raises(ConfigError, match="kind"):
        ProbabilitySchedule(0.5, kind="step")


# ----------------------------------------------------------------------------- mixup
def _batch(tax: Taxonomy, n: int, seed: int, unknown: int = 4) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = rng.choice(tax.label_ids[:12], n)  # few labels: most groups have several members
    t[rng.choice(n, unknown, replace=False)] = -1
    return torch.from_numpy(t)


def _lca_slow(tax: Taxonomy, a: int, b: int) -> int:
    anc = set(tax.ancestors(a))
    return next(v for v in reversed(tax.ancestors(b)) if v in anc)


def test_pairing_is_a_derangement_inside_each_group():
    rng = np.random.default_rng(0)
    for _ in range(50):
        g = rng.integers(-1, 6, size=int(rng.integers(1, 40)))
        perm = pair_within_groups(g, rng)
        assert sorted(perm.tolist()) == list(range(len(g)))
        for i, j in enumerate(perm):
            size = int((g == g[i]).sum())
            if g[i] < 0 or size == 1:
                assert j == i
            else:
                assert j != i and g[j] == g[i]


def test_default_grouping_mixes_only_same_label_and_never_unknowns(fathomnet):
    mix = TaxonMixup(fathomnet, mixup_alpha=0.4, seed=0)
    for seed in range(5):
        t = _batch(fathomnet, 48, seed)
        x = torch.randn(48, 3, 6, 6)
        out = mix(x, t)
        assert out.mode == "mixup"
        perm, m = out.perm.numpy(), out.mixed.numpy()
        tn = t.numpy()
        assert (tn[perm] == tn).all()  # partners share the label
        assert not m[tn < 0].any() and (perm[tn < 0] == np.flatnonzero(tn < 0)).all()
        counts = {v: int((tn == v).sum()) for v in tn}
        assert all(m[i] == (tn[i] >= 0 and counts[tn[i]] > 1) for i in range(48))  # singletons unmixed
        assert torch.equal(out.targets, t) and torch.equal(out.targets_b, t)
        lam = out.lam
        assert torch.allclose(out.inputs[m], lam * x[m] + (1 - lam) * x[perm[m]])
        assert torch.equal(out.inputs[~m], x[~m])


def test_group_by_family_keeps_ranks_at_and_above_and_excludes_partials(fathomnet):
    tax = fathomnet
    fam = tax.rank_view(["family"])[:, 0]
    with pytest.warns(HierarchyConsistencyWarning, match="lowest label rank"):
        mix = TaxonMixup(tax, group_rank="family", seed=1)
    rng = np.random.default_rng(1)
    under = tax.label_ids[fam[tax.label_ids] >= 0]
    above = tax.label_ids[fam[tax.label_ids] < 0]  # labels at order rank or higher: partial for 'family'
    assert len(above) > 0
    view = tax.rank_view()
    fam_col = list(tax.rank_order).index("family")
    for _ in range(5):
        t = np.r_[rng.choice(under, 60), above[:4], [-1, -1]]
        out = mix(torch.randn(len(t), 5), torch.from_numpy(t))
        perm, m, tgt = out.perm.numpy(), out.mixed.numpy(), out.targets.numpy()
        assert m.any() and not m[60:].any()
        assert (fam[t[perm[m]]] == fam[t[m]]).all()
        some_differ = False
        for i in np.flatnonzero(m):
            assert tgt[i] == _lca_slow(tax, int(t[i]), int(t[perm[i]]))
            assert (view[tgt[i], : fam_col + 1] == view[t[i], : fam_col + 1]).all()  # ranks <= family unchanged
            some_differ |= bool(t[i] != t[perm[i]])
        assert some_differ
        assert (tgt[~m] == t[~m]).all()


def test_unranked_plankton_grouping_by_depth(plankton):
    tax = plankton
    with pytest.warns(HierarchyConsistencyWarning):
        mix = TaxonMixup(tax, group_rank="level2", seed=2)
    assert mix.group_ranks == ["level2"]
    t = torch.from_numpy(np.random.default_rng(2).choice(tax.label_ids, 64))
    out = mix(torch.randn(64, 3, 4, 4), t)
    g = tax.ancestor_at_depth(t.numpy(), 2)
    perm = out.perm.numpy()
    assert out.mixed.any() and (g[perm] == g).all()
    assert (tax.depth[out.targets.numpy()] >= 2).all()
    with pytest.raises(ConfigError, match="not a rank"):
        TaxonMixup(tax, group_rank="genus")


def test_lambda_statistics_for_mixup_and_cutmix(fathomnet):
    alpha = 0.4
    mix = TaxonMixup(fathomnet, mixup_alpha=alpha, seed=5)
    t = torch.tensor([fathomnet.label_ids[0]] * 2)
    lams = np.array([mix(torch.zeros(2, 3), t).lam for _ in range(3000)])
    assert abs(lams.mean() - 0.5) < 0.02
    assert abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.01  # Var Beta(a, a) = 1 / (4 (2a + 1))
    cut = TaxonMixup(fathomnet, mixup_alpha=0.0, cutmix_alpha=1.0, seed=6)
    x = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 1, 20, 30).clone()
    fracs = []
    for _ in range(200):
        out = cut(x, t)
        assert out.mode == "cutmix"
        from_partner = (out.inputs[0] == 1).float().mean().item()
        assert out.lam == pytest.approx(1 - from_partner)  # lam = area left of the own image
        fracs.append(out.lam)
    assert 0.35 < np.mean(fracs) < 0.75  # clipped boxes push lam above the Beta mean 0.5


def test_schedule_controls_how_often_a_batch_is_mixed(fathomnet):
    sched = ProbabilitySchedule(1.0, 0.0, "linear", 100)
    mix = TaxonMixup(fathomnet, prob=sched, seed=7)
    t = torch.tensor([fathomnet.label_ids[3]] * 4)
    x = torch.randn(4, 2)
    rate = {s: np.mean([mix(x, t, step=s).mode != "none" for _ in range(600)]) for s in (0, 50, 100)}
    assert rate[0] == 1.0 and rate[100] == 0.0 and abs(rate[50] - 0.5) < 0.07
    assert mix.probability(25) == 0.75


def test_consistency_warnings(fathomnet):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TaxonMixup(fathomnet)  # the default warns about nothing
        TaxonMixup(fathomnet, group_rank="species", task_ranks=["family", "genus", "species"])
    with pytest.warns(HierarchyConsistencyWarning, match="higher than the lowest task rank 'species'"):
        TaxonMixup(fathomnet, group_rank="genus", task_ranks=["genus", "species"])
    with pytest.warns(HierarchyConsistencyWarning, match="unknown"):
        TaxonMixup(fathomnet, mix_unknown=True)
    with pytest.warns(HierarchyConsistencyWarning, match="several grouping ranks"):
        mix = TaxonMixup(fathomnet, group_rank=["genus", "species"], task_ranks=["genus"], seed=0)
    used = {mix(torch.randn(4, 2), _batch(fathomnet, 4, 0, unknown=0)).group_rank for _ in range(30)}
    assert used == {"genus", "species"}


def test_mix_unknown_pools_unknowns(fathomnet):
    with pytest.warns(HierarchyConsistencyWarning):
        mix = TaxonMixup(fathomnet, mix_unknown=True, seed=0)
    t = torch.tensor([-1, -1, -1, int(fathomnet.label_ids[0])])
    out = mix(torch.randn(4, 3), t)
    assert out.mixed.numpy().tolist() == [True, True, True, False]
    assert (out.targets.numpy() == -1).sum() == 3


def test_errors_and_mixture_loss(fathomnet):
    mix = TaxonMixup(fathomnet, mixup_alpha=0, cutmix_alpha=1.0, seed=0)
    with pytest.raises(ConfigError, match="cutmix needs images"):
        mix(torch.randn(4, 8), torch.tensor([int(fathomnet.label_ids[0])] * 4))
    with pytest.raises(ConfigError, match="both 0"):
        TaxonMixup(fathomnet, mixup_alpha=0)
    with pytest.raises(ConfigError, match="not a node id"):
        TaxonMixup(fathomnet).group_ids(np.array([fathomnet.n_nodes]))

    def loss(outputs, target):  # per-sample squared error to the target id, averaged: linear in samples
        return {"task": ((outputs - target.float()) ** 2).mean()}

    with pytest.warns(HierarchyConsistencyWarning):
        mix = TaxonMixup(fathomnet, group_rank="family", seed=3)
    t = _batch(fathomnet, 32, 3)
    out = mix(torch.randn(32, 2), t)
    o = torch.randn(32)
    got = mixture_loss(loss, o, out)["task"]
    per = out.lam * (o - out.targets_a.float()) ** 2 + (1 - out.lam) * (o - out.targets_b.float()) ** 2
    assert float(got) == pytest.approx(float(per.mean()), rel=1e-6)


def test_warnings_say_what_the_training_loss_does(fathomnet, plankton):
    """taxonomist train trains on mixture_loss (own and partner's targets weighted by lam); only margin heads
    see MixedBatch.targets (the LCA). The warnings must say so, not that the target becomes the LCA."""
    cases = [dict(taxonomy=fathomnet, group_rank="genus", task_ranks=["genus", "species"]),
             dict(taxonomy=plankton, group_rank="level2"),
             dict(taxonomy=fathomnet, mix_unknown=True)]
    for kw in cases:
        with pytest.warns(HierarchyConsistencyWarning) as rec:
            TaxonMixup(kw.pop("taxonomy"), **kw)
        (msg,) = [str(w.message) for w in rec]
        assert "lam * loss(own" in msg and "(1 - lam) * loss(partner's" in msg and "mixture_loss" in msg, msg
        assert "MixedBatch.targets" in msg and "margin heads" in msg, msg
        assert "target becomes the pair's common ancestor" not in msg and "targets become partial" not in msg
    # and that is what mixture_loss computes with a real loss on the real plankton tree: per-sample CE blended
    from taxonomist.losses import create_loss
    from taxonomist.models import create_head

    with pytest.warns(HierarchyConsistencyWarning):
        mix = TaxonMixup(plankton, group_rank="level2", seed=4)
    head = create_head("flat", plankton, in_features=8)
    loss = create_loss("ce", plankton, head)
    t = torch.from_numpy(np.random.default_rng(4).choice(plankton.label_ids, 48))
    out = mix(torch.randn(48, 8), t)
    assert (out.targets_b != out.targets_a).any() and out.mode == "mixup"
    with torch.no_grad():
        outputs = head(out.inputs)
        got = mixture_loss(loss, outputs, out)
        own, partner = loss(outputs, out.targets_a), loss(outputs, out.targets_b)
    for k in got:
        assert float(got[k]) == pytest.approx(out.lam * float(own[k]) + (1 - out.lam) * float(partner[k]), rel=1e-6)
        with torch.no_grad():
            lca_loss = float(loss(outputs, out.targets)[k])
        assert float(got[k]) != pytest.approx(lca_loss, rel=1e-3)  # not the loss on the LCA
