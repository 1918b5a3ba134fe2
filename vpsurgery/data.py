"""Dataset specs for the CLI and benchmarks: `digits`, `mnist:DIR`, `cifar10:DIR`, `imagefolder:DIR`.

`load_data(spec)` returns a DataBundle of normalised train/val datasets. Nothing is downloaded
unless download=True; bad specs and unusable directories raise DataError with a one-line fix.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

SPECS = ("digits", "mnist:DIR", "cifar10:DIR", "imagefolder:DIR")
_DIRECTORY_SCHEMES = ("mnist", "cifar10", "imagefolder")

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# Per-channel statistics of the CIFAR-10 training set.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IMAGEFOLDER_DEFAULT_SIZE = 64


class DataError(ValueError):
    """A dataset spec that cannot be loaded; the message says what to change."""


@dataclass(frozen=True)
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one example
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_data(
    spec: str,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    download: bool = False,
    seed: int = 0,
) -> DataBundle:
    """Load the dataset named by `spec`.

    `image_size` resizes to square images (digits and imagefolder; mnist/cifar10 keep their
    native size when it is None). `val_fraction` and `seed` drive the split for datasets
    without an official test split (digits, imagefolder without DIR/val); mnist and cifar10
    validate on their test split.
    """
    scheme, sep, directory = spec.partition(":")
    if scheme not in ("digits", *_DIRECTORY_SCHEMES):
        raise DataError(f"unknown dataset spec {spec!r}; use one of: {', '.join(SPECS)}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    if scheme == "digits":
        if sep:
            raise DataError(f"'digits' is bundled with scikit-learn and takes no directory; drop {':' + directory!r}")
        return _load_digits(image_size, val_fraction, seed)
    if not directory:
        raise DataError(f"{scheme!r} needs a directory: write {scheme}:DIR")
    root = Path(directory).expanduser()
    if scheme == "imagefolder":
        if not root.is_dir():
            raise DataError(f"dataset directory {root} does not exist; point imagefolder: at a folder of class folders")
        return _load_imagefolder(root, image_size, val_fraction, seed)
    if not root.is_dir() and not download:
        raise DataError(f"dataset directory {root} does not exist; pass --download to fetch {scheme} there")
    if scheme == "mnist":
        return _load_mnist(root, image_size, download)
    return _load_cifar10(root, image_size, download)


def _load_digits(image_size: int | None, val_fraction: float, seed: int) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (values 0..16), optionally upsampled, e.g. to 28 for LeNet-5."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    if image_size is not None and image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        images = images.clamp(0.0, 1.0)
    train_idx, val_idx = _stratified_split(digits.target, val_fraction, seed)
    # Normalise with training-split statistics so nothing about val leaks into the inputs.
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    images = (images - mean) / std
    return DataBundle(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        num_classes=10,
        input_shape=tuple(images.shape[1:]),
        name="digits",
        mean=(mean,),
        std=(std,),
    )


def _load_mnist(root: Path, image_size: int | None, download: bool) -> DataBundle:
    size = image_size or 28
    resize = [transforms.Resize(size)] if size != 28 else []
    transform = transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])
    train, val = _official_splits(datasets.MNIST, root, {True: transform, False: transform}, download, _mnist_problem)
    raw = root / "MNIST" / "raw"
    for split, prefix in ((train, "train"), (val, "t10k")):
        _check_labels(split.data, split.targets, 10, raw / f"{prefix}-images-idx3-ubyte",
                      raw / f"{prefix}-labels-idx1-ubyte")
    return DataBundle(
        train=train, val=val, num_classes=10, input_shape=(1, size, size), name="mnist", mean=MNIST_MEAN, std=MNIST_STD
    )


def _mnist_problem(root: Path) -> str:
    raw = root / "MNIST" / "raw"
    missing = [f for f in MNIST_RAW_FILES if not (raw / f).is_file()]
    if missing:
        return (
            f"no MNIST files under {raw} (missing {', '.join(missing)}); pass --download or point to a folder "
            f"containing MNIST/raw/{MNIST_RAW_FILES[0]}"
        )
    return f"MNIST files under {raw} are not valid uncompressed idx files; delete them and pass --download"


def _load_cifar10(root: Path, image_size: int | None, download: bool) -> DataBundle:
    size = image_size or 32
    resize = [transforms.Resize(size)] if size != 32 else []
    # The standard CIFAR augmentation: random crop with 4-pixel padding (at 32x32) and horizontal flip.
    augment = [transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip()]
    normalise = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    transform = {True: transforms.Compose(resize + augment + normalise), False: transforms.Compose(resize + normalise)}
    train, val = _official_splits(datasets.CIFAR10, root, transform, download, _cifar10_problem)
    folder = root / datasets.CIFAR10.base_folder
    for split, files in ((train, "data_batch_1..5"), (val, "test_batch")):
        _check_labels(split.data, split.targets, 10, folder / files, folder / files)
    return DataBundle(
        train=train,
        val=val,
        num_classes=10,
        input_shape=(3, size, size),
        name="cifar10",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )


def _cifar10_problem(root: Path) -> str:
    folder = root / datasets.CIFAR10.base_folder
    names = [name for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list]
    names.append(datasets.CIFAR10.meta["filename"])
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        return (
            f"no CIFAR-10 python batches under {folder} (missing {', '.join(missing)}); pass --download or point "
            f"to a folder containing {datasets.CIFAR10.base_folder}/data_batch_1"
        )
    return f"CIFAR-10 files under {folder} fail torchvision's checksum; delete them and pass --download"


def _official_splits(
    dataset_class: type[datasets.VisionDataset],
    root: Path,
    transform_by_split: dict[bool, Callable],
    download: bool,
    describe_problem: Callable[[Path], str],
) -> tuple[Dataset, Dataset]:
    """(train, test) of a torchvision dataset, with its failures turned into one-line DataErrors.

    torchvision reports missing or corrupted files as RuntimeError and malformed idx files as
    AssertionError/ValueError/TypeError; `describe_problem(root)` inspects the files to say
    which are wrong. Download failures surface as RuntimeError or OSError (URLError).
    """
    try:
        return tuple(
            dataset_class(root=str(root), train=train, transform=transform_by_split[train], download=download)
            for train in (True, False)
        )
    except (RuntimeError, OSError, AssertionError, ValueError, TypeError) as error:
        if download:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(
                f"could not download a usable {dataset_class.__name__} into {root} ({reason}); check network "
                f"access or copy the files there by hand"
            ) from error
        raise DataError(describe_problem(root)) from error


def _check_labels(images, labels, num_classes: int, image_file: Path, label_file: Path) -> None:
    """One label per image, each a class index in [0, num_classes); else a DataError naming the file."""
    labels = torch.as_tensor(labels)
    if len(images) == 0:
        raise DataError(f"{image_file} holds no images; restore the dataset files (or pass --download)")
    if len(labels) != len(images):
        raise DataError(f"{label_file} holds {len(labels)} labels for the {len(images)} images of {image_file}; "
                        "the files must come from the same release (restore them or pass --download)")
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(bad):
        raise DataError(f"{label_file}: label {int(labels[bad[0]])} of image {int(bad[0])} is outside 0..{num_classes - 1} "
                        f"({len(bad)} labels out of range); restore the file (or pass --download)")


def _load_imagefolder(root: Path, image_size: int | None, val_fraction: float, seed: int) -> DataBundle:
    """DIR/train + DIR/val when both exist, otherwise a seeded split of DIR/train or DIR."""
    size = image_size or IMAGEFOLDER_DEFAULT_SIZE
    transform = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_val and not has_train:
        raise DataError(f"found {root / 'val'} but no {root / 'train'}; add the train folder or remove the val folder")
    full = _image_folder(root / "train" if has_train else root, transform)
    if has_val:
        val_folder = _image_folder(root / "val", transform)
        if val_folder.classes != full.classes:
            raise DataError(f"class folders differ between {root / 'train'} and {root / 'val'}; use the same names")
        train, val = full, val_folder
    else:
        train_idx, val_idx = _stratified_split(full.targets, val_fraction, seed)
        train, val = Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist())
    return DataBundle(
        train=train,
        val=val,
        num_classes=len(full.classes),
        input_shape=(3, size, size),
        name="imagefolder",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def _image_folder(root: Path, transform: Callable) -> datasets.ImageFolder:
    _check_class_folders(root)
    try:
        folder = datasets.ImageFolder(str(root), transform=transform, loader=_load_image)
    except FileNotFoundError as error:  # no class subfolders, or none holding an image file
        message = f"no images found under {root}; expected one subfolder per class holding .png/.jpg files"
        raise DataError(message) from error
    for path, _ in folder.samples:
        _check_image(path)
    return folder


def _check_class_folders(root: Path) -> None:
    """At least two class folders, each holding an image (checked as torchvision will read them)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())  # as torchvision's find_classes
    if not classes:
        raise DataError(f"no images found under {root}; expected one subfolder per class holding .png/.jpg files")
    for name in classes:
        if not any(datasets.folder.is_image_file(f) for _, _, files in os.walk(root / name, followlinks=True)
                   for f in files):
            raise DataError(f"class folder {root / name} holds no images ({', '.join(datasets.folder.IMG_EXTENSIONS)}); "
                            "add images to it or remove it")
    if len(classes) < 2:
        raise DataError(f"{root} has one class folder ({classes[0]}); a classifier needs at least 2 classes, "
                        "one subfolder of images per class")


def _check_image(path: str) -> None:
    """Open the file and check its structure (PIL's verify: headers, and chunk checksums for PNG)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise DataError(f"cannot read image {path} ({type(error).__name__}: {error}); replace or remove it") from error


def _load_image(path: str):
    """torchvision's loader, with failures (e.g. a truncated JPEG, which verify cannot see) naming the file."""
    try:
        return datasets.folder.default_loader(path)
    except Exception as error:
        raise DataError(f"cannot read image {path} ({type(error).__name__}: {error}); replace or remove it") from error


def _stratified_split(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val index split, each class spread over both in proportion to its size.

    val gets round(n * val_fraction) items, at least one, and train keeps at least one.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise DataError(f"need at least 2 examples to split off a validation set, found {n}; add more data")
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    # Each example's position within its (shuffled) class as a fraction of the class size;
    # the n_val lowest fractions draw from every class in proportion to its size.
    position = np.empty(n)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    ranked = np.lexsort((rng.random(n), position))  # random tie-break between classes
    return np.sort(ranked[n_val:]), np.sort(ranked[:n_val])
