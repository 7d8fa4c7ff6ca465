"""Data sets: tiny files in the real on-disk formats, read through the real loaders."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from momres import data
from momres.data import load_dataset


def pixel(dataset, index, mean, std):
    """Undo the normalisation of one image: back to uint8 values."""
    image, label = dataset[index]
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return ((image * std + mean) * 255).round().to(torch.uint8), label


def write_cifar(root, name, n=4):
    """Files laid out as torchvision's CIFAR archives extract, ``n`` images per file."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [
            *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"], "labels"
        meta = ("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], "fine_labels"
        meta = ("meta", {"fine_label_names": [f"class{i}" for i in range(100)]})
    folder.mkdir(parents=True)
    written = {}
    for file in files:
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with (folder / file).open("wb") as f:
            pickle.dump({"data": images, key: labels, "batch_label": file}, f)
        written[file] = (images, labels)
    with (folder / meta[0]).open("wb") as f:
        pickle.dump(meta[1], f)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_through_the_loader(tmp_path, name):
    written = write_cifar(tmp_path, name)
    d = load_dataset(name, tmp_path, augment=False)
    train_files = [f for f in written if f not in ("test_batch", "test")]
    assert (len(d.train), len(d.test)) == (4 * len(train_files), 4)
    assert (d.num_classes, d.in_channels, d.image_size) == (
        10 if name == "cifar10" else 100, 3, 32)
    mean, std = data.STATS[name]
    images, labels = written[train_files[-1]]
    index = len(d.train) - 1  # the last image of the last training file
    image, label = pixel(d.train, index, mean, std)
    assert torch.equal(image, torch.from_numpy(images[-1].reshape(3, 32, 32)))
    assert label == labels[-1]
    test_images, test_labels = written["test_batch" if name == "cifar10" else "test"]
    image, label = pixel(d.test, 0, mean, std)
    assert torch.equal(image, torch.from_numpy(test_images[0].reshape(3, 32, 32)))
    assert label == test_labels[0]


def test_cifar_augmentation_keeps_shape_and_changes_images(tmp_path):
    write_cifar(tmp_path, "cifar10", n=8)
    augmented, plain = load_dataset("cifar10", tmp_path), load_dataset("cifar10", tmp_path,
                                                                        augment=False)
    torch.manual_seed(0)
    pairs = [(augmented.train[i][0], plain.train[i][0]) for i in range(16)]
    assert all(a.shape == (3, 32, 32) for a, _ in pairs)
    assert any(not torch.equal(a, p) for a, p in pairs)
    assert torch.equal(augmented.test[0][0], plain.test[0][0])  # no augmentation at test time


def test_missing_cifar_names_the_path_and_the_remedy(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data_batch_1.*--download"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("cifar100")


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(folder, suffix, n=(6, 3)):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in zip(("train", "t10k"), n, strict=True):
        arrays[split] = (rng.integers(0, 256, (count, 28, 28)), rng.integers(0, 10, count))
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", arrays[split][0])
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", arrays[split][1])
    return arrays


@pytest.mark.parametrize("layout", ["gz-in-data-dir", "torchvision-raw"])
def test_fashion_mnist_idx_files(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    if layout == "gz-in-data-dir":
        arrays = write_fashion(tmp_path, ".gz")
    else:
        arrays = write_fashion(tmp_path / "FashionMNIST" / "raw", "")
    d = load_dataset("fashion-mnist", tmp_path, augment=False)
    assert (len(d.train), len(d.test), d.in_channels, d.image_size) == (6, 3, 1, 28)
    mean, std = data.STATS["fashion-mnist"]
    for dataset, split in ((d.train, "train"), (d.test, "t10k")):
        images, labels = arrays[split]
        image, label = pixel(dataset, 1, mean, std)
        assert torch.equal(image[0], torch.from_numpy(images[1].astype(np.uint8)))
        assert label == labels[1]


def test_fashion_mnist_default_folder_is_debians(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path)
    write_fashion(tmp_path, ".gz")
    assert len(load_dataset("fashion-mnist").train) == 6  # no --data-dir needed


def test_missing_fashion_mnist_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("fashion-mnist", tmp_path / "mine")
    message = str(error.value)
    for expected in ("train-images-idx3-ubyte", str(tmp_path / "mine"), str(tmp_path / "debian"),
                     "--download", "apt-get install dataset-fashion-mnist"):
        assert expected in message


def test_bad_idx_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((4, 2, 2)))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short")


def test_digits_is_embedded_fixed_and_normalised():
    a, b = load_dataset("digits", augment=False), load_dataset("digits", augment=False)
    assert (len(a.train), len(a.test), a.num_classes, a.in_channels) == (1437, 360, 10, 1)
    assert torch.equal(a.test.images, b.test.images)  # the split is fixed
    assert torch.bincount(a.test.labels).min() >= 35  # stratified: ~36 of each digit
    x = torch.stack([a.train[i][0] for i in range(len(a.train))])
    assert x.shape[1:] == (1, 16, 16)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_synthetic_and_unknown():
    d = load_dataset("synthetic")
    assert d.train[0][0].shape == (3, d.image_size, d.image_size)
    assert torch.equal(d.test.images, load_dataset("synthetic").test.images)
    with pytest.raises(ValueError, match="unknown data set 'mnist'.*digits, fashion-mnist"):
        load_dataset("mnist")


def test_imagenet_folders(tmp_path):
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    d = load_dataset("imagenet", tmp_path)
    assert (len(d.train), len(d.test), d.num_classes, d.small_images) == (4, 4, 2, False)
    image, label = d.train[3]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == 1
    assert d.test[0][0].shape == (3, 224, 224)


def test_missing_imagenet(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val missing.*image-net\.org"):
        load_dataset("imagenet", tmp_path)
