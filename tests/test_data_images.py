"""Preprocess, transforms and ImageDataset on real plankton images (crop boxes, grayscale,
augmentation, DataLoader workers, errors naming the file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taxonomist.data import ImageDataset, Preprocess, SampleTable, build_transform, load_rgb
from taxonomist.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def images(plankton_dir: Path) -> list[Path]:
    out = []
    for cls in ("chaetognath_sagitta", "copepod_calanoid", "amphipods", "protist_other"):
        out.extend(sorted((plankton_dir / "train" / cls).iterdir())[:4])
    return out


def test_preprocess_json_round_trip_and_validation():
    p = Preprocess(image_size=96, resize="center_crop", pad_fill=0, mean=[0.5, 0.5, 0.5], std=(0.25, 0.5, 1),
                   interpolation="bicubic")
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.25, 0.5, 1.0)
    assert Preprocess.from_json(p.to_json()) == p
    assert Preprocess.from_json(p.cache_token()) == p
    assert Preprocess().pad_fill == 255 and Preprocess().resize == "pad"
    assert p.cache_token() != Preprocess(image_size=97, resize="center_crop", pad_fill=0, mean=[0.5] * 3,
                                         std=(0.25, 0.5, 1), interpolation="bicubic").cache_token()
    with pytest.raises(ConfigError, match="preprocess.resize"):
        Preprocess(resize="stretch")
    with pytest.raises(ConfigError, match="preprocess.std"):
        Preprocess(std=(0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="preprocess.mean"):
        Preprocess(mean=(0.5, 0.5))
    with pytest.raises(ConfigError, match="pad_fill"):
        Preprocess(pad_fill=300)
    with pytest.raises(ConfigError, match="unknown key"):
        Preprocess.from_json({"image_size": 64, "crop": 1})


def _denorm(x: torch.Tensor, p: Preprocess) -> np.ndarray:
    mean = torch.tensor(p.mean).view(3, 1, 1)
    std = torch.tensor(p.std).view(3, 1, 1)
    return np.rint(((x * std + mean) * 255).numpy()).astype(np.int64)


def test_pad_keeps_aspect_on_white(images):
    path = images[0]
    img = Image.open(path).convert("RGB")
    w, h = img.size
    assert w != h
    p = Preprocess(image_size=64)
    x = build_transform(p, train=False)(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    pix = _denorm(x, p)
    scale = 64 / max(w, h)
    nw, nh = round(w * scale), round(h * scale)
    left, top = (64 - nw) // 2, (64 - nh) // 2
    ref = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(pix[:, top:top + nh, left:left + nw], ref)
    border = np.ones((64, 64), dtype=bool)
    border[top:top + nh, left:left + nw] = False
    assert border.any() and (pix[:, border] == 255).all()
    # squash fills the square; center_crop cuts it
    for mode in ("squash", "center_crop"):
        q = Preprocess(image_size=48, resize=mode, mean=(0, 0, 0), std=(1, 1, 1))
        y = build_transform(q)(img)
        assert y.shape == (3, 48, 48)
    q = Preprocess(image_size=48, resize="squash", mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_allclose(build_transform(q)(img).numpy() * 255,
                               np.asarray(img.resize((48, 48), Image.Resampling.BILINEAR)).transpose(2, 0, 1),
                               atol=1e-3)


def test_grayscale_and_alpha_become_rgb(images, tmp_path):
    gray = Image.open(images[1]).convert("L")
    gray.save(tmp_path / "g.png")
    rgb = load_rgb(str(tmp_path / "g.png"))
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    np.testing.assert_array_equal(arr[..., 0], np.asarray(gray))
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "a.png")
    out = np.asarray(load_rgb(str(tmp_path / "a.png")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[2, 3].tolist() == [255, 255, 255]
    deep = Image.fromarray(np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    deep.save(tmp_path / "d.png")
    out = np.asarray(load_rgb(str(tmp_path / "d.png")))
    assert out[2, 3, 0] == round(11 * 5000 / 257)


def test_train_augmentation_is_a_square_symmetry(images):
    p = Preprocess(image_size=32)
    img = Image.open(images[2]).convert("RGB")
    ref = build_transform(p, train=False)(img)
    symmetries = [torch.rot90(t, k, dims=(-2, -1)) for t in (ref, ref.flip(-1)) for k in range(4)]
    aug = build_transform(p, train=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(64):
        y = aug(img)
        match = [i for i, s in enumerate(symmetries) if torch.equal(s, y)]
        assert match, "augmented image is not a flip/rot90 of the evaluation image"
        seen.add(match[0])
    assert len(seen) >= 6
    assert build_transform(p, train=True, augment="none")(img).equal(ref)
    with pytest.raises(ConfigError, match="augment"):
        build_transform(p, train=True, augment="randaugment")
    with pytest.raises(ConfigError, match="only applies to training"):
        build_transform(p, train=False, augment="flip_rot90")


def _table(images: list[Path]) -> SampleTable:
    boxes = np.full((len(images), 4), np.nan)
    boxes[1] = [3, 4, 20, 10]
    boxes[2] = [-5.5, 1.2, 30, 500]  # sticks out: clipped on read
    return SampleTable.build([str(p) for p in images], nodes=np.arange(len(images)) % 5, boxes=boxes)


def test_dataset_reads_crops(images):
    ds = ImageDataset(_table(images))
    x, node, idx = ds[1]
    full = np.asarray(Image.open(images[1]).convert("RGB")).transpose(2, 0, 1)
    assert x.shape == (3, 10, 20) and node == 1 and idx == 1
    np.testing.assert_array_equal(np.rint(x.numpy() * 255).astype(np.uint8), full[:, 4:14, 3:23])
    x2, _, _ = ds[2]
    full2 = np.asarray(Image.open(images[2]).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(np.rint(x2.numpy() * 255).astype(np.uint8), full2[:, 1:, 0:25])
    x0, _, _ = ds[0]
    assert x0.shape[1:] == Image.open(images[0]).size[::-1]


def test_dataloader_with_workers_matches_single_process(images):
    table = _table(images)
    ds = ImageDataset(table, build_transform(Preprocess(image_size=40), train=False))
    single = list(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=0))
    multi = list(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2))
    assert len(single) == len(multi) == 4
    for (xa, na, ia), (xb, nb, ib) in zip(single, multi):
        assert torch.equal(xa, xb) and torch.equal(na, nb) and torch.equal(ia, ib)
        assert na.dtype == torch.int64 and xa.shape[1:] == (3, 40, 40)
    assert torch.cat([b[1] for b in single]).tolist() == table.nodes().tolist()


def test_unreadable_image_error_names_the_file(images, tmp_path):
    bad = tmp_path / "broken.jpg"
    data = images[0].read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    good = tmp_path / "ok.jpg"
    shutil.copy(images[1], good)
    table = SampleTable.build([str(good), str(bad)], nodes=[0, 1])
    ds = ImageDataset(table, build_transform(Preprocess(image_size=16)))
    with pytest.raises(DataError, match=r"broken\.jpg.*cannot read the image.*verify_images='decode'"):
        ds[1]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(DataError, match=r"broken\.jpg"):
        list(loader)
    gone = SampleTable.build([str(tmp_path / "gone.jpg")])
    with pytest.raises(DataError, match=r"gone\.jpg: image file not found"):
        ImageDataset(gone)[0]
