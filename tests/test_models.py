"""Models: heads (flat, per_rank), neck, the model, backbones (offline EfficientNet-Lite0, timm).

Trees are the real plankton tree (121 labels, 18 of them internal nodes) and the
real FathomNet 2025 lineage (7 ranks, labels at mixed ranks). Every check has an
independent slow reference written here (explicit loops over lineages).
"""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from taxonomist.errors import ConfigError
from taxonomist.models import Backbone, create_backbone, create_head, create_model, list_heads
from taxonomist.models.heads import PerRankHead
from taxonomist.models.neck import Neck, create_neck
from taxonomist.models.tree_tensors import Marginalizer
from taxonomist.taxonomy import Taxonomy, load



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is fastest, and `make test` runs one worker per core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
FATHOMNET_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


# ----------------------------------------------------------------- real trees
def plankton_tree(data: Path) -> Taxonomy:
    """NDSB plankton: label nodes = the class column of class_paths.tsv (18 are internal nodes)."""
    return load(data / "plankton" / "class_paths.tsv")


def fathomnet_tree(data: Path) -> Taxonomy:
    """FathomNet 2025: 7 WoRMS ranks, labels at mixed ranks (Tunicata, Caridea, Acanthascinae unranked)."""
    return load(data / "taxonomies" / "fathomnet2025_lineage.csv")


@pytest.fixture(scope="module")
def plankton(shared_data) -> Taxonomy:
    return plankton_tree(shared_data)


@pytest.fixture(scope="module")
def fathomnet(shared_data) -> Taxonomy:
    return fathomnet_tree(shared_data)


def test_real_trees_have_the_documented_shape(plankton, fathomnet):
    assert plankton.n_labels == 121 and int((~plankton.label_is_leaf).sum()) == 18
    assert fathomnet.n_labels == 81 and fathomnet.rank_order == FATHOMNET_RANKS
    assert fathomnet.ranks[fathomnet.find("Asteronyx loveni")] == "species"
    assert fathomnet.ranks[fathomnet.find("Asteronyx")] == "genus"
    assert fathomnet.ranks[fathomnet.find("Tunicata")] == ""  # a label whose lineage skips ranks


# ----------------------------------------------------------------- slow references
def slow_node_probs(tax: Taxonomy, label_probs: np.ndarray) -> np.ndarray:
    """Walk up from every label, adding its probability to each ancestor."""
    out = np.zeros((label_probs.shape[0], tax.n_nodes))
    for i, lab in enumerate(tax.label_ids):
        for a in tax.ancestors(int(lab)):
            out[:, a] += label_probs[:, i]
    return out


def slow_level_classes(tax: Taxonomy, levels: list[str]) -> dict[str, list[int]]:
    """Nodes of each level that have a label in their subtree (by walking up from labels)."""
    out: dict[str, set[int]] = {lv: set() for lv in levels}
    for lab in tax.label_ids:
        for a in tax.ancestors(int(lab)):
            lv = str(tax.ranks[a]) if tax.has_ranks else f"level{tax.depth[a]}"
            if lv in out:
                out[lv].add(a)
    return {lv: sorted(s) for lv, s in out.items()}


def slow_per_rank_label_log_probs(head: PerRankHead, tax: Taxonomy, outputs) -> np.ndarray:
    """Product of experts by explicit lineage walks: score(l) = sum_j log p_j(ancestor of l at j, or none)."""
    classes = slow_level_classes(tax, list(head.levels))
    logp = {lv: torch.log_softmax(outputs[lv].double(), -1).numpy() for lv in head.levels}
    scores = np.zeros((next(iter(logp.values())).shape[0], tax.n_labels))
    for i, lab in enumerate(tax.label_ids):
        lineage = tax.ancestors(int(lab))
        for lv in head.levels:
            at = [a for a in lineage if (str(tax.ranks[a]) if tax.has_ranks else f"level{tax.depth[a]}") == lv]
            if at:
                scores[:, i] += logp[lv][:, classes[lv].index(at[0])]
            elif logp[lv].shape[1] == len(classes[lv]) + 1:  # the level has a none class
                scores[:, i] += logp[lv][:, -1]
    scores -= scores.max(1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(1, keepdims=True))


# ----------------------------------------------------------------- registry
def test_head_registry_names_and_errors(plankton):
    assert {"flat", "per_rank"} <= set(list_heads())
    with pytest.raises(ConfigError, match=r"unknown head 'flatt'.*flat.*per_rank.*Did you mean 'flat'"):
        create_head("flatt", plankton, 8)
    with pytest.raises(ConfigError, match=r"head 'flat' has no option\(s\) 'ranks'.*bias, dropout"):
        create_head("flat", plankton, 8, ranks=["genus"])


# ----------------------------------------------------------------- heads: distributions
@pytest.mark.parametrize("head_name", ["flat", "per_rank"])
@pytest.mark.parametrize("tree", ["plankton", "fathomnet"])
def test_label_and_node_probabilities_are_coherent(head_name, tree, request):
    tax: Taxonomy = request.getfixturevalue(tree)
    torch.manual_seed(0)
    head = create_head(head_name, tax, 16)
    with torch.no_grad():
        for p in head.parameters():  # large weights: peaked distributions, a harder numeric case
            p.normal_(0, 2.0)
        out = head(torch.randn(7, 16))
        lp = head.label_log_probs(out)
        nodes = head.node_probs(out).double().numpy()
    assert lp.shape == (7, tax.n_labels) and lp.dtype == torch.float32
    np.testing.assert_allclose(lp.exp().sum(1).numpy(), 1.0, atol=1e-5)
    probs = lp.exp().double().numpy()
    np.testing.assert_allclose(nodes, slow_node_probs(tax, probs), atol=1e-5)
    np.testing.assert_allclose(nodes, tax.node_probabilities(probs), atol=1e-5)
    np.testing.assert_allclose(nodes[:, 0], 1.0, atol=1e-5)
    # every node = sum of its children + its own label mass; and >= each child
    child_sum = np.zeros_like(nodes)
    for v in range(1, tax.n_nodes):
        child_sum[:, tax.parent[v]] += nodes[:, v]
        assert (nodes[:, tax.parent[v]] >= nodes[:, v] - 1e-6).all()
    own = np.zeros_like(nodes)
    own[:, tax.label_ids] = probs
    np.testing.assert_allclose(nodes, child_sum + own, atol=1e-5)


def test_marginalizer_sparse_path_equals_dense(fathomnet):
    dense = Marginalizer(fathomnet)
    sparse = Marginalizer(fathomnet, dense_max=0)
    assert dense.dense and not sparse.dense
    p = torch.softmax(torch.randn(5, fathomnet.n_labels, dtype=torch.float64), -1)
    torch.testing.assert_close(dense(p), sparse(p))
    torch.testing.assert_close(sparse(p)[:, 0], torch.ones(5, dtype=torch.float64))


def test_flat_head_is_a_softmax_over_labels(plankton):
    head = create_head("flat", plankton, 12)
    out = head(torch.randn(4, 12))
    assert set(out) == {"labels"} and head.tasks == ("labels",)
    torch.testing.assert_close(head.label_log_probs(out), torch.log_softmax(out["labels"], -1))


@pytest.mark.parametrize("tree", ["plankton", "fathomnet"])
def test_per_rank_head_equals_slow_product_of_experts(tree, request):
    tax: Taxonomy = request.getfixturevalue(tree)
    torch.manual_seed(1)
    head = create_head("per_rank", tax, 10)
    out = head(torch.randn(6, 10))
    ref = slow_per_rank_label_log_probs(head, tax, {k: v.detach() for k, v in out.items()})
    np.testing.assert_allclose(head.label_log_probs(out).detach().double().numpy(), ref, atol=1e-5)
    # level classes: the nodes of that level with a label below, plus a none class where needed
    classes = head.level_classes()
    slow = slow_level_classes(tax, list(head.levels))
    for lv in head.levels:
        got = classes[lv].tolist()
        assert got[:len(slow[lv])] == slow[lv]
        assert got[len(slow[lv]):] in ([], [-1])


def test_per_rank_levels_on_ranked_and_unranked_trees(plankton, fathomnet):
    fh = create_head("per_rank", fathomnet, 4)
    assert fh.levels == FATHOMNET_RANKS and set(fh(torch.zeros(1, 4))) == set(FATHOMNET_RANKS)
    # genus-level labels exist (e.g. 'Asteronyx'), so species needs a none class; every label has a kingdom
    sizes = dict(zip(fh.levels, fh.sizes))
    assert fh.level_classes()["species"][-1] == -1 and sizes["kingdom"] == 1
    ph = create_head("per_rank", plankton, 4)
    assert ph.levels == tuple(f"level{d}" for d in range(1, plankton.max_depth + 1))
    assert create_head("per_rank", fathomnet, 4, ranks=["family", "genus"]).levels == ("family", "genus")
    # without none classes a level only has real nodes
    nn_head = create_head("per_rank", fathomnet, 4, none_class=False)
    assert all((c >= 0).all() for c in nn_head.level_classes().values())


def test_per_rank_level_predictions_are_nodes_of_their_level(fathomnet, plankton):
    for tax in (fathomnet, plankton):
        head = create_head("per_rank", tax, 8)
        out = head(torch.randn(20, 8))
        preds = head.level_predictions(out)
        for j, lv in enumerate(head.levels):
            p = preds[lv].numpy()
            assert p.shape == (20,)
            real = p[p >= 0]
            if tax.has_ranks:
                assert (tax.ranks[real] == lv).all()
            else:
                assert (tax.depth[real] == j + 1).all()
            np.testing.assert_array_equal(p, head.level_classes()[lv][out[lv].argmax(1)].numpy())


def _swap_parents(tax: Taxonomy, a: int, b: int) -> Taxonomy:
    parent = tax.parent.copy()
    parent[a], parent[b] = parent[b], parent[a]
    return Taxonomy.from_parents(parent, tax.names, ranks=tax.ranks, keys=tax.keys, labels=tax.is_label)


def test_per_rank_distribution_follows_the_tree_and_flat_does_not(plankton):
    # two leaf labels at the same depth under different parents swap places
    leaves = [int(v) for v in plankton.label_ids if plankton.is_leaf[v] and plankton.depth[v] == 4]
    a = leaves[0]
    b = next(v for v in leaves if plankton.parent[v] != plankton.parent[a])
    moved = _swap_parents(plankton, a, b)
    assert moved.fingerprint != plankton.fingerprint
    # labels of the moved tree in the order of the original tree's labels (by name: all unique here)
    order = np.array([moved.label_index[moved.find(str(plankton.names[v]))] for v in plankton.label_ids])
    x = torch.randn(5, 8)
    for name, should_change in (("per_rank", True), ("flat", False)):
        torch.manual_seed(3)
        h1 = create_head(name, plankton, 8)
        h2 = create_head(name, moved, 8)
        assert [p.shape for p in h1.parameters()] == [p.shape for p in h2.parameters()]
        h2.load_state_dict(h1.state_dict())
        with torch.no_grad():
            p1 = h1.label_log_probs(h1(x)).exp()
            p2 = h2.label_log_probs(h2(x)).exp()[:, order] if name == "per_rank" else \
                h2.label_log_probs(h2(x)).exp()
        diff = (p1 - p2).abs().max().item()
        assert (diff > 1e-3) == should_change, (name, diff)


def test_per_rank_level_targets_match_slow_reference(fathomnet, plankton):
    for tax in (fathomnet, plankton):
        head = create_head("per_rank", tax, 4)
        classes = {lv: c.tolist() for lv, c in head.level_classes().items()}

        def code(label: int, lv: str) -> int:
            for a in tax.ancestors(label):
                if (str(tax.ranks[a]) if tax.has_ranks else f"level{tax.depth[a]}") == lv:
                    return classes[lv].index(a)
            return classes[lv].index(-1) if -1 in classes[lv] else -1

        targets = torch.arange(-1, tax.n_nodes)
        got = head.level_targets(targets)
        for t in range(-1, tax.n_nodes):
            if t < 0:
                under = []
            elif tax.is_label[t]:
                under = [t]
            else:
                under = [int(lab) for lab in tax.label_ids if t in tax.ancestors(int(lab))]
            for lv in head.levels:
                codes = {code(u, lv) for u in under}
                want = codes.pop() if len(codes) == 1 else -1
                assert got[lv][t + 1].item() == want, (t, lv)
    # a concrete case: Asteronyx (a genus label) is the none class at species, Asteronyx at genus
    fh = create_head("per_rank", fathomnet, 4)
    g = fathomnet.find("Asteronyx")
    lt = fh.level_targets(torch.tensor([g]))
    assert fh.level_classes()["species"][lt["species"]].item() == -1
    assert fh.level_classes()["genus"][lt["genus"]].item() == g


# ----------------------------------------------------------------- neck and model
def test_neck_shapes_and_options():
    assert isinstance(create_neck(32, None), Neck) and len(create_neck(32, None).layers) == 0
    n = create_neck(32, {"hidden": [64, 16], "dropout": 0.5, "norm": "batch"})
    assert n.out_features == 16 and isinstance(n.layers[0], torch.nn.BatchNorm1d)
    assert n(torch.randn(4, 32)).shape == (4, 16)
    ln = create_neck(32, {"norm": "layer"})
    assert ln.out_features == 32 and isinstance(ln.layers[0], torch.nn.LayerNorm)
    with pytest.raises(ConfigError, match="norm"):
        create_neck(32, {"norm": "group"})
    with pytest.raises(ConfigError, match="'width'"):
        create_neck(32, {"width": 3})


@pytest.mark.parametrize("head_name,loss_name", [("flat", "ce"), ("per_rank", "per_rank_ce"), ("per_rank", "ce")])
def test_gradient_reaches_every_trainable_parameter(fathomnet, head_name, loss_name):
    from taxonomist.losses import StaticWeighting, create_loss

    model = create_model(fathomnet, None, head={"name": head_name},
                         neck={"hidden": [32], "dropout": 0.1, "norm": "layer"}, in_features=20)
    loss = create_loss(loss_name, fathomnet, model.head)
    targets = torch.as_tensor(np.r_[fathomnet.label_ids[:10], [fathomnet.find("Asteronyx"), -1]])
    total = StaticWeighting()(loss(model(features=torch.randn(len(targets), 20)), targets))
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_model_paths_and_errors(plankton):
    m = create_model(plankton, None, head="flat", in_features=8)
    assert m.backbone is None and m.tasks == ("labels",)
    assert m(features=torch.randn(2, 8))["labels"].shape == (2, 121)
    with pytest.raises(ConfigError, match="no backbone"):
        m(images=torch.randn(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="in_features"):
        create_model(plankton, None, head="flat")
    with pytest.raises(ConfigError, match="has no option"):
        create_model(plankton, {"name": "test_efficientnet", "pretrained": False, "lr": 1}, head="flat")
    bb = create_backbone("test_efficientnet", pretrained=False, trainable=True)
    with pytest.raises(ConfigError, match="gives 256 features"):
        create_model(plankton, bb, in_features=100)
    m2 = create_model(plankton, bb, head={"name": "per_rank"}, neck={"hidden": [16]})
    x = torch.randn(2, 3, 64, 64)
    out = m2(images=x)
    m2.eval()
    torch.testing.assert_close(m2(features=bb(x))["level1"], m2(images=x)["level1"])
    assert set(out) == set(m2.head.levels)
    # a backbone attached after loading a features-only state dict (what the bundle loader does)
    m.load_state_dict(create_model(plankton, None, head="flat", in_features=8).state_dict())
    m.backbone = create_backbone("test_efficientnet", pretrained=False)
    assert "backbone" in dict(m.named_children())


def test_flat_head_with_ce_learns_separable_features(plankton):
    """Convergence sanity: 121 Gaussian clusters in 64-d; 50 AdamW steps cut the loss by > 75 %."""
    from taxonomist.losses import create_loss

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(plankton.n_labels, 64, generator=g) * 3
    y = torch.randint(0, plankton.n_labels, (1024,), generator=g)
    x = centers[y] + torch.randn(1024, 64, generator=g)
    targets = torch.as_tensor(plankton.label_ids)[y]
    torch.manual_seed(0)
    model = create_model(plankton, None, head="flat", neck={"norm": "layer"}, in_features=64)
    loss_fn = create_loss("ce", plankton, model.head)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    losses = []
    for step in range(50):
        idx = torch.randint(0, 1024, (256,), generator=g)
        loss = loss_fn(model(features=x[idx]), targets[idx])["labels"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 0.25 * losses[0], losses[::10]
    model.eval()
    acc = (model.label_log_probs(model(features=x)).argmax(1) == y).float().mean().item()
    assert acc > 0.95


# ----------------------------------------------------------------- backbones
def test_timm_backbone_random_init_is_seeded_and_keyed(tmp_path):
    a = create_backbone("test_efficientnet", pretrained=False, seed=1)
    b = create_backbone("test_efficientnet", pretrained=False, seed=1)
    c = create_backbone("test_efficientnet", pretrained=False, seed=2)
    assert isinstance(a, Backbone) and a.num_features == 256
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.cache_key == b.cache_key != c.cache_key
    assert "random-init-seed1" in a.cache_key and a.cache_key.startswith("test_efficientnet__")
    assert a.preprocess["image_size"] == 160 and a.preprocess["resize"] == "pad"
    assert a.preprocess["mean"] == pytest.approx([0.485, 0.456, 0.406])
    key = a.cache_key
    a.set_image_size(96)
    assert a.preprocess["image_size"] == 96 and a.cache_key != key and a.weights_key == b.weights_key
    assert create_backbone("test_efficientnet", pretrained=False, image_size=96, seed=1).cache_key == a.cache_key


def test_timm_pretrained_true_is_refused_offline():
    with pytest.raises(ConfigError) as e:
        create_backbone("test_efficientnet", pretrained=True)
    msg = str(e.value)
    assert "never uses the network" in msg and "pretrained=false" in msg and "efficientnet_lite0" in msg
    with pytest.raises(ConfigError, match="Similar timm models: .*resnet"):
        create_backbone("resnet_does_not_exist_18")
    with pytest.raises(ConfigError, match="no such weights file"):
        create_backbone("test_efficientnet", pretrained="/nonexistent/w.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_backbone_loads_local_weights(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    def save(sd: dict, path: Path) -> None:
        if suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save({"state_dict": sd}, path)  # a wrapped checkpoint is unwrapped

    src = create_backbone("test_efficientnet", pretrained=False, seed=7)
    full = timm.create_model("test_efficientnet", num_classes=5)  # a file with a classifier, as published
    full.load_state_dict(src.body.state_dict(), strict=False)
    path = tmp_path / f"w{suffix}"
    save(full.state_dict(), path)
    loaded = create_backbone("test_efficientnet", pretrained=str(path))
    for (k, va), vb in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(va, vb), k
    assert "sha256-" in loaded.cache_key and loaded.cache_key != src.cache_key
    # a file of another architecture is a clear error
    other = tmp_path / f"other{suffix}"
    save(torch.nn.Linear(3, 4).state_dict(), other)
    with pytest.raises(ConfigError, match="does not fit the 'test_efficientnet' architecture: .*missing"):
        create_backbone("test_efficientnet", pretrained=str(other))


def test_frozen_backbone_stays_in_eval_mode_and_gets_no_gradient(plankton):
    bb = create_backbone("test_efficientnet", pretrained=False, trainable=False)
    model = create_model(plankton, bb, head="flat", neck={"hidden": [8]})
    model.train()
    assert model.training and model.neck.training and not bb.training
    assert all(not m.training for m in bb.modules())
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    x = torch.randn(4, 3, 64, 64) * 3 + 1
    out = model(images=x)
    out["labels"].sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in bb.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    for k, v in bb.state_dict().items():  # BatchNorm running statistics untouched
        assert torch.equal(v, before[k]), k
    # a trainable one follows the model's mode and learns
    tb = create_backbone("test_efficientnet", pretrained=False, trainable=True)
    tm = create_model(plankton, tb, head="flat").train()
    assert tb.training
    tm(images=x)["labels"].sum().backward()
    assert all(p.grad is not None for p in tb.parameters())


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return create_backbone("efficientnet_lite0", pretrained=True, trainable=False)


def test_offline_default_loads_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a backbone tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    bb = create_backbone()
    assert bb.name == "efficientnet_lite0" and bb.num_features == 1280 and not bb.trainable
    assert bb.preprocess["mean"] == pytest.approx([127 / 255] * 3)
    assert bb.preprocess["std"] == pytest.approx([128 / 255] * 3)
    assert bb.preprocess["image_size"] == 128
    assert bb.cache_key.startswith("efficientnet_lite0__sha256-")


def _tiny_imagenet(data: Path, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n real Tiny-ImageNet images normalised for Lite0, with their ImageNet-1k class index."""
    from PIL import Image

    import timm

    synsets = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    index = {w: i for i, w in enumerate(synsets)}
    with open(data / "tiny200_mini" / "labels.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:n + 1]
    xs = []
    for file, _ in rows:
        img = Image.open(data / "tiny200_mini" / "images" / file).convert("RGB").resize((size, size),
                                                                                       Image.BILINEAR)
        xs.append((torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) - 127.0) / 128.0)
    return torch.stack(xs), torch.tensor([index[w] for _, w in rows])


def test_offline_default_features_are_imagenet_features(lite0, shared_data):
    """The pooled features + the packaged ImageNet classifier recognise real Tiny-ImageNet images
    (measured: top-5 about 50 % at 128 px on these 64 px images, chance 0.5 %); random weights do not."""
    from taxonomist.models.backbones import lite0_weights_path

    sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    x, y = _tiny_imagenet(shared_data, 96, 128)
    with torch.inference_mode():
        feats = lite0(x)
        rand = create_backbone(pretrained=False)(x)
    assert feats.shape == (96, 1280)
    for f, floor in ((feats, 0.30), (rand, None)):
        logits = f @ sd["_fc.weight"].T + sd["_fc.bias"]
        top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
        if floor is not None:
            assert top5 > floor, top5
        else:
            assert top5 < 0.1, top5


def test_offline_default_on_real_plankton_images(lite0, plankton_dir):
    from PIL import Image

    from taxonomist.data.transforms import Preprocess, build_transform

    files = sorted((plankton_dir / "train" / "copepod_cyclopoid_oithona").glob("*.jpg"))[:4] + \
        sorted((plankton_dir / "train" / "diatom_chain_tube").glob("*.jpg"))[:4]
    tf = build_transform(Preprocess(**lite0.preprocess))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    assert x.shape == (8, 3, 128, 128)
    lite0.train()  # frozen: stays in eval mode, so each image's features do not depend on its batch
    with torch.no_grad():
        f = lite0(x)
        f_single = lite0(x[:1])
    assert f.shape == (8, 1280) and torch.isfinite(f).all() and (f >= 0).all()  # pooled ReLU6 activations
    torch.testing.assert_close(f[:1], f_single, atol=1e-4, rtol=1e-4)
    d = torch.cdist(f, f)
    assert d[~torch.eye(8, dtype=bool)].min() > 1e-2  # every image has its own features
    # images of one class lie closer together than images of the two classes
    within = (d[:4, :4].sum() + d[4:, 4:].sum()) / 24
    assert within < d[:4, 4:].mean()


def test_lite0_channels_last_matches_plain_layout(lite0):
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        plain = lite0.body.net.extract_features(x.contiguous()).mean(dim=(2, 3))
        torch.testing.assert_close(lite0(x), plain, atol=1e-4, rtol=1e-4)


def test_lite0_multiscale_adds_stage_features_to_the_same_head(plankton_dir):
    """multiscale = pooled stage outputs + the unchanged 1280-d head, from one forward pass."""
    from PIL import Image

    imgs = sorted((plankton_dir / "train" / "copepod_calanoid").glob("*.jpg"))[:2]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((96, 96)), dtype=np.float32)
                     ).permute(2, 0, 1) / 255.0 for p in imgs])
    x = (x - 127 / 255) / (128 / 255)
    plain = create_backbone("efficientnet_lite0", image_size=96)
    multi = create_backbone("efficientnet_lite0", image_size=96, multiscale=True)
    assert multi.num_features == 1984 and multi.weights_key != plain.weights_key
    with torch.no_grad():
        a, b = plain(x), multi(x)
    assert b.shape == (2, 1984)
    torch.testing.assert_close(b[:, -1280:], a, rtol=1e-4, atol=1e-4)
    assert (b[:, :704].abs().sum(dim=1) > 0).all()
    with pytest.raises(ConfigError, match="multiscale"):
        create_backbone("resnet18", pretrained=False, multiscale=True)
