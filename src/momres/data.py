"""Image-classification data sets for ``momres train``, ``momres demo`` and the experiments.

``load_dataset(name, data_dir)`` returns an :class:`ImageData`: train and test sets of
``(image, label)`` pairs (normalised float tensors, augmented for training) and the facts a model
needs (classes, channels, image size).

=================  ==========================================================================
``digits``         scikit-learn's ``load_digits`` (ships with scikit-learn, no files needed):
                   1,797 8x8 grey digits, a fixed stratified split of 1,437 / 360, upsampled
                   to 16x16.
``fashion-mnist``  the four idx files (``train-images-idx3-ubyte`` ..., plain or ``.gz``) from
                   ``DATA_DIR/FashionMNIST/raw`` (torchvision's layout), ``DATA_DIR`` itself, or
                   ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
``cifar10``        torchvision's pickle batches in ``DATA_DIR/cifar-10-batches-py``.
``cifar100``       torchvision's pickle files in ``DATA_DIR/cifar-100-python``.
``imagenet``       ``ImageFolder`` over ``DATA_DIR/train`` and ``DATA_DIR/val`` (one folder per
                   class in each, as torchvision's reference scripts expect).
``synthetic``      random 3x16x16 images and labels (128 / 64), for smoke tests.
=================  ==========================================================================

``download=True`` fetches Fashion-MNIST and CIFAR with torchvision's downloaders (needs internet).
The in-memory data sets (all but ImageNet) are read into one uint8 tensor and augmented on
tensors: much faster than torchvision's dataset classes, which make a PIL image per sample.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")

#: Where Debian's ``dataset-fashion-mnist`` package puts the idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: Per-channel mean and standard deviation of the training images (scaled to [0, 1]).
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.2887, 0.2887, 0.2887)),  # uniform on [0, 1]
}


@dataclass
class ImageData:
    """A train/test pair of image-classification data sets and what a model needs to know."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int  # side of the square images the model sees
    small_images: bool  # CIFAR-sized: ImageNet-family models should use the CIFAR stem


class TensorImages(Dataset):
    """Images held in memory as one uint8 ``(N, C, H, W)`` tensor, normalised on access."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
        std: tuple[float, ...], augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("momres: TensorImages needs uint8 images (N, C, H, W) and N labels.")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return (image.float() / 255 - self.mean) / self.std, int(self.labels[index])


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = False,
    augment: bool = True,
) -> ImageData:
    """The data set ``name`` (one of :data:`DATASETS`), read from ``data_dir``.

    ``augment=False`` turns off the training augmentation (random crops and flips).
    """
    if name not in DATASETS:
        raise ValueError(f"momres: unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    needs_dir = name in ("cifar10", "cifar100", "imagenet") or (name, download) == (
        "fashion-mnist", True)
    if needs_dir and data_dir is None:
        later = " (or will, with --download)" if name != "imagenet" else ""
        raise ValueError(f"momres: the {name} data set needs --data-dir DIR, the folder that "
                         f"holds its files{later}.")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if name == "digits":
        return _digits(augment)
    if name == "fashion-mnist":
        return _fashion_mnist(root, download, augment)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, download, augment)
    if name == "imagenet":
        return _imagenet(root, augment)
    return _synthetic(augment)


def _crop_flip(size: int, padding: int, flip: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random crop after zero padding (a random shift), and a random horizontal flip."""
    steps = [v2.RandomCrop(size, padding=padding)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def _digits(augment: bool) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 8x8 values in 0..16, upsampled to 16x16 so that three stride-2 stages still leave 4x4.
    images = torch.from_numpy(digits.images).float().unsqueeze(1) * (255 / 16)
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=360, random_state=0,
                                   stratify=digits.target)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    scaled = images[train].float() / 255
    stats = ((scaled.mean().item(),), (scaled.std().item(),))
    shift = _crop_flip(16, 1, flip=False) if augment else None  # a flipped digit is not a digit
    return ImageData(
        "digits", TensorImages(images[train], labels[train], *stats, shift),
        TensorImages(images[test], labels[test], *stats), num_classes=10, in_channels=1,
        image_size=16, small_images=True,
    )


def read_idx(path: Path) -> torch.Tensor:
    """A uint8 array from an idx file (the MNIST format), plain or gzip-compressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"momres: {path} is not an idx file of unsigned bytes (bad header).")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"momres: {path} is truncated: its header announces shape {shape}.")
    return torch.from_numpy(data.reshape(shape).copy())


def _fashion_mnist(root: Path | None, download: bool, augment: bool) -> ImageData:
    if download:
        datasets.FashionMNIST(root, download=True)  # into root/FashionMNIST/raw
    folders = [root / "FashionMNIST" / "raw", root] if root is not None else []
    folders.append(DEBIAN_FASHION_MNIST)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    for folder in folders:
        for suffix in ("", ".gz"):
            paths = [folder / (n + suffix) for n in names]
            if all(p.is_file() for p in paths):
                train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
                stats = STATS["fashion-mnist"]
                flip = _crop_flip(28, 2, flip=True) if augment else None
                return ImageData(
                    "fashion-mnist", TensorImages(train_x.unsqueeze(1), train_y, *stats, flip),
                    TensorImages(test_x.unsqueeze(1), test_y, *stats), num_classes=10,
                    in_channels=1, image_size=28, small_images=True,
                )
    raise FileNotFoundError(
        "momres: Fashion-MNIST not found. Looked for " + ", ".join(names) + " (plain or .gz) in "
        + ", ".join(str(f) for f in folders) + ". Get them with --download --data-dir DIR "
        "(online), or `apt-get install dataset-fashion-mnist` (Debian), or copy the four files "
        "into --data-dir."
    )


def _cifar(name: str, root: Path | None, download: bool, augment: bool) -> ImageData:
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    if download:
        cls(root, train=True, download=True)  # downloads and extracts both splits
    folder = root / cls.base_folder

    def read(files: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for file, _md5 in files:
            path = folder / file
            if not path.is_file():
                raise FileNotFoundError(
                    f"momres: {name} not found: {path} is missing. Put the extracted "
                    f"'{cls.base_folder}' folder of {cls.url} in --data-dir {root}, or add "
                    "--download (online)."
                )
            with path.open("rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8))
            labels.extend(entry["labels" if name == "cifar10" else "fine_labels"])
        data = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32))
        return data, torch.tensor(labels)

    train_x, train_y = read(cls.train_list)
    test_x, test_y = read(cls.test_list)
    stats = STATS[name]
    flip = _crop_flip(32, 4, flip=True) if augment else None
    return ImageData(
        name, TensorImages(train_x, train_y, *stats, flip), TensorImages(test_x, test_y, *stats),
        num_classes=10 if name == "cifar10" else 100, in_channels=3, image_size=32,
        small_images=True,
    )


def _imagenet(root: Path, augment: bool, size: int = 224) -> ImageData:
    missing = [root / split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"momres: ImageNet not found: {', '.join(map(str, missing))} missing. Expected "
            f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG (validation images "
            "sorted into class folders, as torchvision's reference scripts use). ImageNet cannot "
            "be downloaded automatically: get it from https://image-net.org."
        )
    normalise = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(*STATS["imagenet"])]
    test_tf = [v2.Resize(size * 8 // 7), v2.CenterCrop(size)]  # 256 / 224, the usual ratio
    train_tf = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()] if augment else test_tf
    train = datasets.ImageFolder(root / "train", v2.Compose(train_tf + normalise))
    test = datasets.ImageFolder(root / "val", v2.Compose(test_tf + normalise))
    if train.classes != test.classes:
        raise ValueError(f"momres: {root}/train and {root}/val have different class folders.")
    return ImageData("imagenet", train, test, num_classes=len(train.classes), in_channels=3,
                     image_size=size, small_images=False)


def _synthetic(
    augment: bool, n_train: int = 128, n_test: int = 64, size: int = 16
) -> ImageData:
    generator = torch.Generator().manual_seed(0)  # the same data whatever the training seed
    images = torch.randint(0, 256, (n_train + n_test, 3, size, size), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, 10, (n_train + n_test,), generator=generator)
    stats = STATS["synthetic"]
    flip = _crop_flip(size, 2, flip=True) if augment else None
    return ImageData(
        "synthetic", TensorImages(images[:n_train], labels[:n_train], *stats, flip),
        TensorImages(images[n_train:], labels[n_train:], *stats), num_classes=10,
        in_channels=3, image_size=size, small_images=True,
    )
