"""Image classification data: scikit-learn digits (bundled), MNIST IDX files, CIFAR-10 python batches.

The files are read directly (torchvision does not import beside the pinned torch CPU wheel), and
every way a file can be wrong ends in a DatasetError naming the path and what was expected,
never in a numpy or pickle traceback.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import DatasetError, subsample_indices

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

CIFAR_DIRNAME = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


@dataclass
class ClassificationData:
    """Train/test images (N, C, H, W) as float32, normalized per channel with the train statistics."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std, shaped (1, C, 1, 1), accumulated in float64 over blocks of samples
    so that CIFAR's 50,000 images need no full-size float64 copy."""
    total = np.zeros(x.shape[1])
    total_sq = np.zeros(x.shape[1])
    for start in range(0, len(x), 1024):
        block = x[start : start + 1024].astype(np.float64)
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
    count = max(len(x), 1) * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std[std < 1e-6] = 1.0  # a constant channel (tiny subsets) is centred, not divided by zero
    shape = (1, -1, 1, 1)
    return mean.astype(np.float32).reshape(shape), std.astype(np.float32).reshape(shape)


def _finish(name, x_train, y_train, x_test, y_test, num_classes, *, seed, max_train, max_test):
    """Subsample, normalize per channel with train statistics, and wrap as tensors."""
    train = subsample_indices(len(x_train), max_train, seed)
    test = subsample_indices(len(x_test), max_test, seed + 1)
    x_train = np.asarray(x_train[train], dtype=np.float32)
    x_test = np.asarray(x_test[test], dtype=np.float32)
    mean, std = _channel_stats(x_train)
    for x in (x_train, x_test):
        x -= mean
        x /= std
    return ClassificationData(
        name=name,
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(np.asarray(y_train[train], dtype=np.int64)),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(np.asarray(y_test[test], dtype=np.int64)),
        num_classes=num_classes,
    )


def load_digits(*, seed: int = 0, max_train: int | None = None, max_test: int | None = None) -> ClassificationData:
    """scikit-learn's bundled 8x8 digits (1797 images), split 80/20 stratified by `seed`."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images, labels = bunch.images[:, None], bunch.target
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    return _finish("digits", x_train, y_train, x_test, y_test, 10, seed=seed, max_train=max_train, max_test=max_test)


# --- MNIST -----------------------------------------------------------------------------------------


def _find_idx_file(root: Path, stem: str) -> Path:
    """The file as distributed or with a dot before `idx` (both seen in the wild), optionally gzipped."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            path = root / (name + suffix)
            if path.is_file():
                return path
    expected = ", ".join(MNIST_FILES.values())
    raise DatasetError(
        f"mnist: {root / stem}[.gz] not found; expected the 4 IDX files {expected} (each optionally .gz)"
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes, checked against its magic number and its declared size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"mnist: cannot read {path}: {exc}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"mnist: {path} has {len(raw)} bytes, too short for an IDX header of {header} bytes")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(f"mnist: bad magic number {found} in {path}, expected {magic}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise DatasetError(f"mnist: {path} declares negative dimensions {dims}")
    size = math.prod(dims)  # Python ints: a header of huge dimensions cannot overflow
    if size == 0:
        raise DatasetError(f"mnist: {path} declares {dims}: no data")
    if len(raw) - header != size:
        raise DatasetError(f"mnist: {path} holds {len(raw) - header} data bytes, its header declares {dims} = {size}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_mnist_split(root: Path, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx_file(root, MNIST_FILES[images_key])
    labels_path = _find_idx_file(root, MNIST_FILES[labels_key])
    images = _read_idx(images_path, IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise DatasetError(f"mnist: {images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise DatasetError(f"mnist: {labels_path} holds label {labels.max()}, expected 0..9")
    return images[:, None], labels


def load_mnist(
    root, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None
) -> ClassificationData:
    """MNIST from the four IDX files as distributed (train-images-idx3-ubyte[.gz] ...) in `root`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"mnist: {root} is not a directory; expected one holding the 4 IDX files")
    x_train, y_train = _read_mnist_split(root, "train_images", "train_labels")
    x_test, y_test = _read_mnist_split(root, "test_images", "test_labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"mnist: train images are {x_train.shape[2:]} but test images {x_test.shape[2:]} in {root}")
    return _finish("mnist", x_train, y_train, x_test, y_test, 10, seed=seed, max_train=max_train, max_test=max_test)


# --- CIFAR-10 --------------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Allows only what a CIFAR batch holds (numpy arrays), so a stray pickle cannot run code."""

    _allowed = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # protocol 2 writes bytes via encode

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # unpickling fails in many ways (EOF, opcodes, imports): all mean "not a batch"
        raise DatasetError(
            f"cifar10: cannot unpickle {path} ({type(exc).__name__}: {exc}); expected a CIFAR-10 python batch"
        ) from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"cifar10: {path} is not a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DatasetError(f"cifar10: b'data' in {path} is {shape}, expected a uint8 array of N x 3072")
    in_range = labels.dtype.kind in "iu" and (len(labels) == 0 or 0 <= labels.min() <= labels.max() <= 9)
    if labels.shape != (len(data),) or not in_range:
        raise DatasetError(f"cifar10: b'labels' in {path} must be {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    root, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None
) -> ClassificationData:
    """CIFAR-10 python batches; `root` is the cifar-10-batches-py folder or its parent."""
    root = Path(root).expanduser()
    folder = root / CIFAR_DIRNAME if (root / CIFAR_DIRNAME).is_dir() else root
    for name in CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH,):
        if not (folder / name).is_file():
            raise DatasetError(
                f"cifar10: {folder / name} not found; expected data_batch_1..data_batch_5 and test_batch "
                f"(the python version, {CIFAR_DIRNAME}) in {root} or {root / CIFAR_DIRNAME}"
            )
    train = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_BATCHES]
    x_test, y_test = _read_cifar_batch(folder / CIFAR_TEST_BATCH)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return _finish("cifar10", x_train, y_train, x_test, y_test, 10, seed=seed, max_train=max_train, max_test=max_test)
