"""load_data on tiny datasets written to disk in the exact formats torchvision reads."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image

from vpsurgery.data import DataError, load_data


def write_mnist(root, n_train=6, n_test=4):
    """Uncompressed idx files in MNIST/raw: torchvision 0.29 reads exactly these four
    (checking only that they exist) and never looks at the .gz archives unless downloading."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        # Big-endian headers: magic 2051 = ubyte, 3 dims; 2049 = ubyte, 1 dim.
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())
    return raw


def write_cifar10(root, per_batch=2, n_test=3):
    """The python-pickle batches of cifar-10-python.tar.gz, with the keys torchvision reads."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name, n):
        batch = {
            "batch_label": name,
            "labels": [i % 10 for i in range(n)],
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),  # rows are R, G, B planes
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", n_test)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return folder


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks every CIFAR-10 file against the md5 of the official release, which
    synthetic files cannot match. Rather than weaken the loader, the test alone swaps that
    module's check_integrity for the existence-only check torchvision itself uses when no md5
    is given, so everything else (pickle keys, reshaping, transforms) runs for real."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def write_images(folder, classes, per_class, size=(10, 12)):
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((*size, 3), 20 * c + i, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_digits_defaults():
    data = load_data("digits")
    assert (data.name, data.num_classes, data.input_shape) == ("digits", 10, (1, 8, 8))
    assert (len(data.train), len(data.val)) == (1617, 180)  # 1797 images, round(179.7) held out
    x, y = data.train[0]
    assert x.shape == (1, 8, 8) and y.dtype == torch.long
    train_x, train_y = data.train.tensors
    # Normalised with training statistics: zero mean, unit std; raw [0, 1] maps into this range.
    assert abs(train_x.mean().item()) < 1e-4 and abs(train_x.std().item() - 1) < 1e-4
    low, high = (0 - data.mean[0]) / data.std[0], (1 - data.mean[0]) / data.std[0]
    assert train_x.min() >= low - 1e-5 and train_x.max() <= high + 1e-5
    assert set(train_y.tolist()) == set(range(10))


def test_digits_split_is_stratified_and_seeded():
    data = load_data("digits", val_fraction=0.2, seed=3)
    assert len(data.val) == round(1797 * 0.2)
    assert np.bincount(data.val.tensors[1].numpy(), minlength=10).min() >= 35  # ~36 per class
    same = load_data("digits", val_fraction=0.2, seed=3)
    other = load_data("digits", val_fraction=0.2, seed=4)
    assert torch.equal(data.val.tensors[0], same.val.tensors[0])
    assert not torch.equal(data.val.tensors[0], other.val.tensors[0])
    assert len(data.train) + len(data.val) == 1797


def test_digits_resized_for_lenet5():
    data = load_data("digits", image_size=28)
    assert data.input_shape == (1, 28, 28)
    assert data.train[0][0].shape == (1, 28, 28)


def test_mnist_from_idx_files(tmp_path):
    write_mnist(tmp_path)
    data = load_data(f"mnist:{tmp_path}")
    assert (data.name, data.num_classes, data.input_shape) == ("mnist", 10, (1, 28, 28))
    assert (len(data.train), len(data.val)) == (6, 4)  # val is the t10k split
    x, y = data.val[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3


def test_mnist_resized(tmp_path):
    write_mnist(tmp_path)
    data = load_data(f"mnist:{tmp_path}", image_size=32)
    assert data.input_shape == (1, 32, 32) and data.train[0][0].shape == (1, 32, 32)


def test_cifar10_from_python_batches(tmp_path, skip_cifar_md5):
    write_cifar10(tmp_path)
    data = load_data(f"cifar10:{tmp_path}")
    assert (data.name, data.num_classes, data.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert (len(data.train), len(data.val)) == (10, 3)  # val is test_batch
    x, y = data.val[2]
    assert x.shape == (3, 32, 32) and y == 2
    # Train-time augmentation, none at validation.
    assert len(data.train.transform.transforms) == len(data.val.transform.transforms) + 2


def test_imagefolder_with_train_and_val(tmp_path):
    write_images(tmp_path / "train", ["cat", "dog", "eel"], per_class=2)
    write_images(tmp_path / "val", ["cat", "dog", "eel"], per_class=1)
    data = load_data(f"imagefolder:{tmp_path}", image_size=16)
    assert (data.num_classes, data.input_shape, len(data.train), len(data.val)) == (3, (3, 16, 16), 6, 3)
    x, y = data.val[2]
    assert x.shape == (3, 16, 16) and y == 2


def test_imagefolder_seeded_split(tmp_path):
    write_images(tmp_path, ["a", "b"], per_class=5)
    data = load_data(f"imagefolder:{tmp_path}", val_fraction=0.2)
    assert data.input_shape == (3, 64, 64)
    assert (len(data.train), len(data.val)) == (8, 2)
    assert sorted(data.val[i][1] for i in range(2)) == [0, 1]  # one of each class
    assert data.train[0][0].shape == (3, 64, 64)
    again = load_data(f"imagefolder:{tmp_path}", val_fraction=0.2)
    assert data.val.indices == again.val.indices


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("svhn:/data", {}, "unknown dataset spec 'svhn:/data'; use one of: digits, mnist:DIR"),
        ("mnist", {}, "write mnist:DIR"),
        ("digits:/data", {}, "takes no directory"),
        ("digits", {"val_fraction": 1.0}, "val_fraction"),
        ("digits", {"image_size": 0}, "image_size"),
    ],
)
def test_bad_specs(spec, kwargs, message):
    with pytest.raises(DataError, match=message):
        load_data(spec, **kwargs)


@pytest.mark.parametrize("scheme", ["mnist", "cifar10", "imagefolder"])
def test_missing_directory(tmp_path, scheme):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"{scheme}:{tmp_path / 'nowhere'}")


def test_mnist_directory_without_files(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"")  # archives are not enough
    with pytest.raises(DataError, match=r"no MNIST files under .*MNIST/raw .*pass --download or point to") as info:
        load_data(f"mnist:{tmp_path}")
    assert "train-images-idx3-ubyte" in str(info.value) and "\n" not in str(info.value)


def test_mnist_malformed_idx(tmp_path):
    raw = write_mnist(tmp_path)
    (raw / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="not valid uncompressed idx files"):
        load_data(f"mnist:{tmp_path}")


def test_cifar10_directory_without_batches(tmp_path):
    with pytest.raises(DataError, match=r"no CIFAR-10 python batches .*missing data_batch_1.*pass --download"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar10_checksum_mismatch(tmp_path):
    write_cifar10(tmp_path)  # right layout, but not the official bytes
    with pytest.raises(DataError, match="fail torchvision's checksum"):
        load_data(f"cifar10:{tmp_path}")


def test_empty_imagefolder(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "cat").mkdir()  # a class folder with no images in it
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'cat'} holds no images"):
        load_data(f"imagefolder:{tmp_path}")


def test_imagefolder_val_classes_must_match_train(tmp_path):
    write_images(tmp_path / "train", ["cat", "dog"], per_class=1)
    write_images(tmp_path / "val", ["cat", "emu"], per_class=1)
    with pytest.raises(DataError, match="class folders differ"):
        load_data(f"imagefolder:{tmp_path}")


# ------------------------------------------------------------------ labels and images that cannot be trained on

def _write_labels(raw, prefix, labels):
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, len(labels)) + bytes(labels))


@pytest.mark.parametrize("prefix", ["train", "t10k"])
def test_mnist_label_out_of_range_names_the_file(tmp_path, prefix):
    raw = write_mnist(tmp_path)
    n = 6 if prefix == "train" else 4
    _write_labels(raw, prefix, [1] * (n - 1) + [10])
    with pytest.raises(DataError) as info:
        load_data(f"mnist:{tmp_path}")
    message = str(info.value)
    assert f"{raw / (prefix + '-labels-idx1-ubyte')}: label 10 of image {n - 1} is outside 0..9" in message


def test_mnist_fewer_labels_than_images(tmp_path):
    raw = write_mnist(tmp_path)
    _write_labels(raw, "train", [1, 2, 3])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte holds 3 labels for the 6 images of"):
        load_data(f"mnist:{tmp_path}")


def test_cifar10_label_out_of_range(tmp_path, skip_cifar_md5):
    folder = write_cifar10(tmp_path)
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f)
    batch["labels"][1] = 12
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError, match="test_batch: label 12 of image 1 is outside 0..9"):
        load_data(f"cifar10:{tmp_path}")


def test_imagefolder_with_one_class_is_refused(tmp_path):
    write_images(tmp_path, ["cat"], per_class=4)
    with pytest.raises(DataError, match=r"has one class folder \(cat\); a classifier needs at least 2 classes"):
        load_data(f"imagefolder:{tmp_path}")
    write_images(tmp_path / "train", ["cat"], per_class=2)  # the same for DIR/train
    write_images(tmp_path / "val", ["cat"], per_class=1)
    with pytest.raises(DataError, match="has one class folder"):
        load_data(f"imagefolder:{tmp_path}")


def test_imagefolder_empty_class_folder_is_named(tmp_path):
    write_images(tmp_path, ["cat", "dog"], per_class=2)
    (tmp_path / "emu" / "notes").mkdir(parents=True)
    (tmp_path / "emu" / "notes" / "readme.txt").write_text("not an image")
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'emu'} holds no images"):
        load_data(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"not an image at all"],
                         ids=["truncated", "garbage"])
def test_imagefolder_unreadable_image_is_named_up_front(tmp_path, damage):
    write_images(tmp_path, ["cat", "dog"], per_class=2)
    bad = tmp_path / "dog" / "1.png"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DataError, match=f"cannot read image {bad} .*replace or remove it"):
        load_data(f"imagefolder:{tmp_path}")


def test_imagefolder_truncated_jpeg_is_named_when_loaded(tmp_path):
    """A truncated JPEG passes PIL's verify (it reads no pixel data); the loader names it."""
    write_images(tmp_path, ["cat", "dog"], per_class=2)
    jpeg = tmp_path / "dog" / "2.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    data = load_data(f"imagefolder:{tmp_path}", val_fraction=0.2)
    with pytest.raises(DataError, match=f"cannot read image {jpeg}"):
        for i in range(len(data.train)):
            data.train[i]
        for i in range(len(data.val)):
            data.val[i]
