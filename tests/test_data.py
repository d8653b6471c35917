import gzip

import numpy as np
import pytest
import torch

from hvd_sparse.config import DataConfig
from hvd_sparse.data import (
    DataError, GlobalBatches, check_data_dir, eval_slice, load_datasets, load_mnist5k, split_indices,
)


def test_split_is_fixed_disjoint_and_complete():
    train, val = split_indices(1000, 0.1, split_seed=0)
    assert len(val) == 100 and len(train) == 900
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    again, _ = split_indices(1000, 0.1, split_seed=0)
    other, _ = split_indices(1000, 0.1, split_seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_normalization_uses_training_split_statistics():
    data = load_datasets(DataConfig(dataset="synthetic"))
    x = data.train.x
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    assert data.val.x.mean().abs() < 0.1  # same transform, not its own statistics
    assert data.input_shape == (1, 16, 16) and data.num_classes == 10


def test_mnist5k_is_the_real_5000_digits():
    raw = load_mnist5k(None)
    assert raw.train_x.shape == (5000, 1, 28, 28) and raw.train_x.dtype == np.uint8
    assert np.bincount(raw.train_y).tolist() == [500] * 10
    data = load_datasets(DataConfig(dataset="mnist5k"))
    assert len(data.train) == 4500 and len(data.val) == 500 and data.test is None


def _write_csv(path, rows):
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(",".join(map(str, row)) + "\n")


def test_mnist5k_reads_a_user_supplied_folder(tmp_path):
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, 256, 784)) + [i % 10] for i in range(30)]
    _write_csv(tmp_path / "mnist_5k.csv.gz", rows)
    raw = load_mnist5k(str(tmp_path))
    assert raw.train_x.shape == (30, 1, 28, 28)
    assert raw.train_x[3].ravel().tolist() == rows[3][:784] and raw.train_y.tolist() == [i % 10 for i in range(30)]


@pytest.mark.parametrize("content, fragment", [
    (None, "file not found"),
    ([[1, 2, 3]] * 4, "expected 785 columns"),
    ([[300] * 784 + [1]] * 4, "pixels must be in 0..255"),
    ("garbage", "not a gzip CSV"),
])
def test_malformed_mnist5k_names_the_file(tmp_path, content, fragment):
    path = tmp_path / "mnist_5k.csv.gz"
    if content == "garbage":
        path.write_bytes(b"this is not gzip")
    elif content is not None:
        _write_csv(path, content)
    with pytest.raises(DataError, match=fragment) as exc:
        load_mnist5k(str(tmp_path))
    assert str(path) in str(exc.value)


def test_missing_data_dir_and_unknown_dataset():
    with pytest.raises(DataError, match="no such directory"):
        check_data_dir(DataConfig(dataset="mnist5k", data_dir="/nonexistent/dir"))
    with pytest.raises(ValueError, match="valid: mnist5k, synthetic"):
        check_data_dir(DataConfig(dataset="imagenet"))


def test_global_batches_are_a_pure_function_of_the_step():
    a, b = GlobalBatches(100, 8, seed=3), GlobalBatches(100, 8, seed=3)
    seq = [a.global_indices(s) for s in range(40)]
    assert torch.equal(b.global_indices(37), seq[37])  # fresh object, jump straight to a step
    assert not torch.equal(GlobalBatches(100, 8, seed=4).global_indices(0), seq[0])
    epoch = torch.cat(seq[:12])  # 100 // 8 = 12 steps per epoch, without replacement
    assert len(set(epoch.tolist())) == 96
    assert not torch.equal(seq[0], seq[12])  # a new permutation each epoch


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_shards_concatenate_to_the_global_batch(world):
    batches = GlobalBatches(1000, 64, seed=0)
    for step in (0, 5, 15, 16):
        shards = [batches.shard(step, r, world) for r in range(world)]
        assert all(len(s) == 64 // world for s in shards)
        assert torch.equal(torch.cat(shards), batches.global_indices(step))


def test_batch_larger_than_the_data_is_an_error():
    with pytest.raises(DataError, match="exceeds"):
        GlobalBatches(10, 11, seed=0)


@pytest.mark.parametrize("n, world", [(10, 3), (500, 2), (7, 8), (1000, 1)])
def test_eval_slices_cover_every_example_once(n, world):
    covered = [i for r in range(world) for i in range(n)[eval_slice(n, r, world)]]
    assert covered == list(range(n))
