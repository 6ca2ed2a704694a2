"""The bundled 14x14 MNIST subset (`mnist14`): what ships, how it loads (no pickle), bad files."""

import numpy as np
import pytest
import torch

from ranksearch.models.data import DatasetError, load_dataset
from ranksearch.models.data import bundled


def test_ships_a_small_balanced_real_subset():
    assert bundled.PATH.stat().st_size < 600_000
    with np.load(bundled.PATH, allow_pickle=False) as f:  # plain arrays only: nothing to unpickle
        assert sorted(f.files) == sorted(bundled.KEYS)
        assert f["x_train"].shape == (4000, 14, 14) and f["x_test"].shape == (1000, 14, 14)
        assert f["x_train"].dtype == np.uint8
        assert np.bincount(f["y_train"]).tolist() == [400] * 10
        assert np.bincount(f["y_test"]).tolist() == [100] * 10
        assert f["x_train"].max() > 200 and f["x_train"].min() == 0  # pooled digits, not noise


def test_loads_by_name_normalized_and_subsampled():
    data = load_dataset("mnist14")
    assert data.name == "mnist14" and data.num_classes == 10 and data.input_shape == (1, 14, 14)
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    small = load_dataset("mnist14", max_train=500, max_test=100, seed=3)
    assert len(small.x_train) == 500 and len(small.y_test) == 100 and small.y_train.dtype == torch.int64


def test_a_damaged_file_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "mnist14.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.setattr(bundled, "PATH", bad)
    with pytest.raises(DatasetError, match="mnist14: the bundled file"):
        load_dataset("mnist14")
    np.savez(bad, x_train=np.zeros((2, 14, 14), np.uint8))  # a key missing
    with pytest.raises(DatasetError, match="missing or damaged"):
        load_dataset("mnist14")
