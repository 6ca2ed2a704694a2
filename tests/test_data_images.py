"""Image data sets: digits (bundled), MNIST IDX and CIFAR-10 batches written into tmp_path in their real formats."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from ranksearch.models.data import ClassificationData, DatasetError, load_dataset
from ranksearch.models.data.images import MNIST_FILES

# --- digits ----------------------------------------------------------------------------------------


def test_digits_shapes_and_types():
    data = load_dataset("digits")
    assert isinstance(data, ClassificationData)
    assert data.name == "digits" and data.num_classes == 10
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.input_shape == (1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert set(data.y_test.tolist()) == set(range(10))


def test_digits_normalized_with_train_statistics():
    data = load_dataset("digits")
    assert abs(float(data.x_train.mean())) < 1e-5
    assert float(data.x_train.std()) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(data.x_test.mean())) < 0.2  # the test set is close to, not exactly, standardized


def test_digits_split_is_deterministic_and_stratified():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    assert np.bincount(a.y_test.numpy()).min() >= 35  # 360 test images over 10 balanced classes


def test_subsampling_is_seeded():
    a = load_dataset("digits", max_train=100, max_test=30, seed=1)
    b = load_dataset("digits", max_train=100, max_test=30, seed=1)
    assert len(a.x_train) == 100 and len(a.y_test) == 30
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert abs(float(a.x_train.mean())) < 1e-5  # statistics of the subset actually trained on
    assert len(load_dataset("digits", max_train=10**6).x_train) == 1437


def test_unknown_and_incomplete_specs_name_what_is_accepted():
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet'.*mnist:DIR.*synthetic-criteo"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match=r"'mnist'.*expected the form mnist:DIR"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match=r"expected the form digits"):
        load_dataset("digits:/tmp")
    assert issubclass(DatasetError, ValueError)


# --- MNIST -----------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: magic, big-endian dims, data."""
    magic = magic if magic is not None else 0x0800 + array.ndim
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(root, *, n_train=30, n_test=12, gz=False, dot_names=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        name = MNIST_FILES[key].replace("-idx", ".idx") if dot_names else MNIST_FILES[key]
        content = idx_bytes(array)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(content))
        else:
            (root / name).write_bytes(content)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    data = load_dataset(f"mnist:{tmp_path}")
    assert data.name == "mnist" and data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (12, 1, 28, 28)
    assert data.y_train.tolist() == arrays["train_labels"].tolist()
    raw_train = arrays["train_images"].astype(np.float64)
    mean, std = raw_train.mean(), raw_train.std()
    expected_test = (arrays["test_images"] - mean) / std  # test normalized with train statistics
    np.testing.assert_allclose(data.x_test[:, 0].numpy(), expected_test, rtol=1e-4, atol=1e-4)


def test_mnist_accepts_dot_names(tmp_path):
    write_mnist(tmp_path, dot_names=True)
    assert len(load_dataset(f"mnist:{tmp_path}").y_test) == 12


def test_mnist_missing_file_names_path_and_expectation(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found; expected the 4 IDX files"):
        load_dataset(f"mnist:{tmp_path}")
    with pytest.raises(DatasetError, match="is not a directory"):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")


def test_mnist_bad_magic_number(tmp_path):
    arrays = write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(arrays["train_images"], magic=1234))
    with pytest.raises(DatasetError, match=rf"bad magic number 1234 in {path}, expected 2051"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_count_mismatch_and_truncation(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(29)))
    with pytest.raises(DatasetError, match="holds 30 images but .*train-labels-idx1-ubyte 29 labels"):
        load_dataset(f"mnist:{tmp_path}")
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"holds 9403 data bytes, its header declares \(12, 28, 28\)"):
        load_dataset(f"mnist:{tmp_path}")
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="too short for an IDX header"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_corrupt_gzip_and_bad_labels(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b this is not gzip")
    with pytest.raises(DatasetError, match="cannot read .*train-images-idx3-ubyte.gz"):
        load_dataset(f"mnist:{tmp_path}")
    write_mnist(tmp_path / "b")
    (tmp_path / "b" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(12, 11)))
    with pytest.raises(DatasetError, match="label 11, expected 0..9"):
        load_dataset(f"mnist:{tmp_path / 'b'}")


# --- CIFAR-10 --------------------------------------------------------------------------------------


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def write_cifar(folder, n=4):
    """The python batches as distributed; numpy.core is the module path of the originals."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(n, i) for i in range(1, 6)} | {"test_batch": cifar_batch(n - 1, 9)}
    for name, batch in batches.items():
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
    return batches


@pytest.mark.parametrize("layout", ["folder", "parent"])
def test_cifar_reads_python_batches(tmp_path, layout):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    root = tmp_path / "cifar-10-batches-py" if layout == "folder" else tmp_path
    data = load_dataset(f"cifar10:{root}")
    assert data.name == "cifar10" and data.input_shape == (3, 32, 32)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    assert data.y_train[:4].tolist() == batches["data_batch_1"][b"labels"]
    raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    red = raw[:, 0].astype(np.float64)
    expected = (raw[0, 0] - red.mean()) / red.std()  # channel 0 = red: channel-first rows of 1024
    np.testing.assert_allclose(data.x_train[0, 0].numpy(), expected, rtol=1e-4, atol=1e-4)
    means = data.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.zeros(3), atol=1e-5)


def test_cifar_missing_batch(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_3 not found; expected data_batch_1..data_batch_5 and test"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar_malformed_pickles(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match=rf"cannot unpickle {path} .*expected a CIFAR-10 python batch"):
        load_dataset(f"cifar10:{tmp_path}")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"b'data' in .*test_batch is \(2, 100\), expected a uint8 array"):
        load_dataset(f"cifar10:{tmp_path}")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}))
    with pytest.raises(DatasetError, match="must be 2 integers in 0..9"):
        load_dataset(f"cifar10:{tmp_path}")
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetError, match="is not a dict with b'data' and b'labels'"):
        load_dataset(f"cifar10:{tmp_path}")


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_refuses_pickles_that_run_code(tmp_path, capsys):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        load_dataset(f"cifar10:{tmp_path}")
    assert "never run" not in capsys.readouterr().out
