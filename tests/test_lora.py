"""LoRA adapters on real backbones (taxonomist.models.lora): the offline EfficientNet-Lite0 with its
ImageNet weights and a timm ViT (random init), trained one step on real demo plankton images."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from taxonomist.data import Preprocess, build_transform
from taxonomist.data.images import load_rgb
from taxonomist.errors import ConfigError, MissingExtraError
from taxonomist.models import Backbone, create_backbone
from taxonomist.models.lora import (LoraBackbone, apply_lora, count_parameters, default_target_modules, has_lora,
                                    lora_candidates, lora_parameters, merge_lora)

BACKBONES = {
    # name: (pretrained, number of default target layers, their name suffixes)
    "efficientnet_lite0": (True, 32, {"_expand_conv", "_project_conv", "_conv_head"}),
    "vit_tiny_patch16_224": (False, 48, {"qkv", "proj", "fc1", "fc2"}),
}


def _backbone(name: str) -> Backbone:
    size = 64 if name == "efficientnet_lite0" else None  # 64 px: 4x cheaper on a CPU, same layers
    return create_backbone(name, pretrained=BACKBONES[name][0], trainable=False, image_size=size)


def _images(demo, backbone: Backbone, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The first image of the first ``n`` demo classes, preprocessed for ``backbone``; labels 0..n-1."""
    classes = sorted(p for p in (demo / "train").iterdir() if p.is_dir())[:n]
    tf = build_transform(Preprocess(**backbone.preprocess), train=False)
    x = torch.stack([tf(load_rgb(str(sorted(c.glob("*.jpg"))[0]))) for c in classes])
    return x, torch.arange(n)


def _train_steps(backbone: Backbone, head: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> None:
    params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    backbone.train()
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(backbone(x)), y).backward()
        opt.step()
    backbone.eval()


def test_missing_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    bb = _backbone("efficientnet_lite0")
    with pytest.raises(MissingExtraError, match=r"pip install 'taxonomist\[lora\]'") as err:
        apply_lora(bb)
    assert "peft" in str(err.value) and "LoRA" in str(err.value)
    assert type(bb) is Backbone and not has_lora(bb)  # untouched


# ---------------------------------------------------------------- with peft
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is not installed (pip install 'taxonomist[lora]')")


@pytest.fixture(scope="module", params=list(BACKBONES))
def name(request) -> str:
    return request.param


@needs_peft
def test_only_lora_parameters_train(name):
    bb = _backbone(name)
    base_total = count_parameters(bb)[1]
    lines: list[str] = []
    out = apply_lora(bb, r=4, alpha=8, log=lines.append)
    assert out is bb and isinstance(bb, LoraBackbone) and bb.trainable
    lora = lora_parameters(bb)
    n_lora = sum(p.numel() for p in lora.values())
    trainable, total = count_parameters(bb)
    assert trainable == n_lora == bb.lora.lora_params == bb.lora.trainable_params > 0
    assert total == base_total + n_lora == bb.lora.total_params
    assert all(p.requires_grad == (n in lora) for n, p in bb.named_parameters())
    n_layers, suffixes = BACKBONES[name][1:]
    assert len(bb.lora.target_modules) == n_layers
    assert {t.rsplit(".", 1)[-1] for t in bb.lora.target_modules} == suffixes
    assert lines == [bb.lora.summary()] and f"{trainable:,} trainable of {total:,}" in lines[0]
    assert "-lora-r4-" in bb.cache_key  # never shares a feature cache with the plain backbone


@needs_peft
def test_initial_output_is_the_plain_backbone(name, demo):
    bb = _backbone(name)
    plain = copy.deepcopy(bb)
    apply_lora(bb, r=8, alpha=16, dropout=0.1)
    x, _ = _images(demo, bb)
    bb.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb(x), plain(x), atol=0.0, rtol=0.0)  # B starts at zero


@needs_peft
def test_one_step_changes_only_lora_parameters(name, demo):
    bb = apply_lora(_backbone(name), r=4, alpha=8)
    x, y = _images(demo, bb)
    head = nn.Linear(bb.num_features, len(y))
    before = {k: v.detach().clone() for k, v in bb.state_dict().items()}
    _train_steps(bb, head, x, y)  # two steps: A gets a gradient once B is non-zero
    after = bb.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if "lora_" in k}
    assert changed == lora_keys  # every adapter moved; no base weight or BatchNorm statistic did
    if name == "efficientnet_lite0":
        bb.train()
        assert bb.body.training and not any(m.training for m in bb.modules() if isinstance(m, nn.BatchNorm2d))


@needs_peft
def test_merge_gives_the_same_outputs_and_plain_keys(name, demo):
    bb = apply_lora(_backbone(name), r=4, alpha=8)
    x, y = _images(demo, bb)
    _train_steps(bb, nn.Linear(bb.num_features, len(y)), x, y)
    with torch.no_grad():
        adapted = bb(x)
    assert not torch.allclose(adapted, _backbone(name).eval()(x), atol=1e-3)  # training did something
    merged = merge_lora(bb, inplace=False)
    assert isinstance(bb, LoraBackbone) and has_lora(bb)  # the original keeps training
    assert type(merged) is Backbone and not has_lora(merged) and not lora_parameters(merged)
    assert merged.merged_lora == bb.lora
    assert set(merged.state_dict()) == set(_backbone(name).state_dict())
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-4, rtol=1e-4)
    same = merge_lora(bb)  # in place
    assert same is bb and type(bb) is Backbone and not has_lora(bb)


@needs_peft
def test_merged_model_exports_and_loads_without_peft(demo, tmp_path, monkeypatch):
    """The wiring the training loop uses: a LoRA model is merged (a copy) and exported; the bundle
    then loads with peft unavailable and predicts what the adapted model predicts."""
    from taxonomist.bundle import export_bundle, load_bundle
    from taxonomist.models import create_model
    from taxonomist.taxonomy import Taxonomy
    from taxonomist.train.config import load_config

    bb = apply_lora(_backbone("efficientnet_lite0"), r=4, alpha=8)
    x, y = _images(demo, bb)
    tax = Taxonomy.from_parents([-1, 0, 0, 0, 0], ["root", "a", "b", "c", "d"])
    model = create_model(tax, backbone=bb, neck={"hidden": [], "norm": "none"}, head={"name": "flat"})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images=x)["labels"], y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model.label_log_probs(model(images=x))
    cfg = load_config(base={"data": {"train": str(demo / "train")},
                            "model": {"backbone": {"name": "efficientnet_lite0", "trainable": True},
                                      "neck": {"hidden": [], "norm": "none"}, "head": {"name": "flat"}}})
    export = merge_lora(model, inplace=False)
    export_bundle(tmp_path / "bundle", model=export, backbone=export.backbone, taxonomy=tax,
                  preprocess=Preprocess(**bb.preprocess), config=cfg)
    monkeypatch.setitem(sys.modules, "peft", None)
    bundle = load_bundle(tmp_path / "bundle")
    with torch.no_grad():
        got = bundle.model.label_log_probs(bundle.model(images=x))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- options and errors
@needs_peft
def test_target_modules_by_suffix_and_regex():
    bb = apply_lora(_backbone("efficientnet_lite0"), target_modules=["_conv_head"])
    assert bb.lora.target_modules == ("net._conv_head",)
    vit = apply_lora(_backbone("vit_tiny_patch16_224"), target_modules=r"blocks\.11\.attn\.(qkv|proj)")
    assert vit.lora.target_modules == ("blocks.11.attn.qkv", "blocks.11.attn.proj")


@needs_peft
def test_candidates_and_defaults():
    body = _backbone("efficientnet_lite0").body
    cands = lora_candidates(body)
    assert not any("_depthwise_conv" in c for c in cands)  # depthwise: cannot be merged
    assert "net._conv_stem" not in cands  # a 3x3 "same"-padding conv: peft cannot build its adapter
    assert default_target_modules(body) == cands  # every candidate here is a 1x1 conv
    vit = _backbone("vit_tiny_patch16_224").body
    assert "patch_embed.proj" in lora_candidates(vit)  # a plain 16x16 Conv2d may be targeted explicitly ...
    assert "patch_embed.proj" not in default_target_modules(vit)  # ... but is not a default


@needs_peft
def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"matches no layer.*_expand_conv"):
        apply_lora(_backbone("efficientnet_lite0"), target_modules=["no_such_layer"])
    with pytest.raises(ConfigError, match=r"depthwise"):
        apply_lora(_backbone("efficientnet_lite0"), target_modules=["_depthwise_conv"])
    with pytest.raises(ConfigError, match=r"\['nope'\] match no layer"):
        apply_lora(_backbone("efficientnet_lite0"), target_modules=["_conv_head", "nope"])
    with pytest.raises(ConfigError, match=r"lora.r=0 must be a positive integer"):
        apply_lora(_backbone("efficientnet_lite0"), r=0)
    with pytest.raises(ConfigError, match=r"dropout"):
        apply_lora(_backbone("efficientnet_lite0"), dropout=1.0)
    bb = apply_lora(_backbone("efficientnet_lite0"), target_modules=["_conv_head"])
    with pytest.raises(ConfigError, match=r"already has LoRA adapters"):
        apply_lora(bb)


@needs_peft
def test_train_norm_trains_normalisation_layers():
    bb = apply_lora(_backbone("efficientnet_lite0"), target_modules=["_conv_head"], train_norm=True)
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(p.requires_grad for m in bns for p in m.parameters())
    assert bb.lora.trainable_params == bb.lora.lora_params + sum(p.numel() for m in bns for p in m.parameters())
    bb.train()
    assert all(m.training for m in bns)
    bb.eval()
    assert not any(m.training for m in bns)


@needs_peft
def test_same_seed_same_adapters():
    a = apply_lora(_backbone("efficientnet_lite0"), target_modules=["_conv_head"], seed=3)
    b = apply_lora(_backbone("efficientnet_lite0"), target_modules=["_conv_head"], seed=3)
    c = apply_lora(_backbone("efficientnet_lite0"), target_modules=["_conv_head"], seed=4)
    pa, pb, pc = (lora_parameters(m) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
