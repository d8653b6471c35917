import json

import h5py
import numpy as np
import pytest
import torch

from hvd_sparse.log import COLUMNS, LogError, StorageError, TrialLog, read_log
from conftest import fill_disk
from hvd_sparse.mask import Mask

ATTRS = {
    "config": json.dumps({"train": {"seed": 0}}), "run_hash": "abc", "world_size": 2, "mask_sha256": "00",
    "mask_density": 0.5, "hvd_sparse_version": "0", "torch_version": "0", "horovod_version": "0",
}


def mask():
    return Mask({"w": torch.tensor([[True, False, True], [False, False, True]]), "b": torch.tensor([False, True])})


def row(step):
    return {"step": step, "val_error": 0.5 / (step + 1), "val_loss": 1.0, "train_loss": 2.0, "wall_time": 0.1 * step,
            "allreduce_bytes": 400 * step}


def test_create_append_finish_read(tmp_path):
    path = tmp_path / "sub" / "t.h5"
    log = TrialLog.create(path, ATTRS, mask())
    data = read_log(path)
    assert data.status == "RUNNING" and data.steps_to_result is None
    assert all(len(v) == 0 for v in data.measurements.values())
    for step in (0, 10, 20):
        log.append(row(step))
        assert read_log(path).measurements["step"].tolist()[-1] == step  # readable after every append
    log.finish("COMPLETE", 20, best_val_error=0.02)
    data = read_log(path)
    assert data.status == "COMPLETE" and data.steps_to_result == 20 and data.attrs["best_val_error"] == 0.02
    assert data.config == {"train": {"seed": 0}} and data.attrs["world_size"] == 2
    assert set(data.measurements) == set(COLUMNS)
    np.testing.assert_allclose(data.measurements["val_error"], [0.5, 0.5 / 11, 0.5 / 21])
    assert data.mask == mask() and data.mask.sha256() == mask().sha256()  # model order survives
    assert list(data.mask) == ["w", "b"]


def test_existing_log_is_not_overwritten_unless_asked(tmp_path):
    path = tmp_path / "t.h5"
    TrialLog.create(path, ATTRS, mask()).append(row(0))
    before = path.read_bytes()
    with pytest.raises(LogError, match="already exists"):
        TrialLog.create(path, ATTRS, mask())
    assert path.read_bytes() == before
    TrialLog.create(path, ATTRS, mask(), overwrite=True)
    assert len(read_log(path).measurements["step"]) == 0


def test_unwritable_folder_is_a_storage_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write the log"):
        TrialLog.create(folder / "file" / "t.h5", ATTRS, mask())  # a file where a folder should be


def test_an_output_folder_that_is_a_dangling_link_says_so(tmp_path):
    from hvd_sparse.log import check_writable

    (tmp_path / "out").symlink_to(tmp_path / "gone")
    for folder in (tmp_path / "out", tmp_path / "out" / "study"):  # the link itself, or above the folder
        with pytest.raises(LogError) as e:
            check_writable(folder, "--out")
        assert str(e.value) == (f"--out {folder}: {tmp_path / 'out'} is a symbolic link to {tmp_path / 'gone'}, "
                                "which does not exist")


def test_truncated_and_foreign_files_are_log_errors(tmp_path):
    path = tmp_path / "t.h5"
    TrialLog.create(path, ATTRS, mask()).append(row(0))
    data = path.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(LogError, match="unreadable or corrupt"):
        read_log(tmp_path / "trunc.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(LogError, match="not a trial log"):
        read_log(tmp_path / "other.h5")


@pytest.mark.timeout(20)  # the defect was a read that waited for a writer for ever
def test_a_fifo_named_like_a_log_checkpoint_or_cell_record_is_refused_without_waiting(tmp_path):
    import os

    from hvd_sparse.capping import CellRecord
    from hvd_sparse.checkpoint import load_checkpoint_state

    for name in ("x.h5", "x.ckpt.pt", "cell.json"):
        os.mkfifo(tmp_path / name)
    with pytest.raises(LogError, match=r"x.h5: unreadable or corrupt HDF5 log: not a regular file \(a FIFO"):
        read_log(tmp_path / "x.h5")
    with pytest.raises(LogError, match=r"x.ckpt.pt: unreadable checkpoint \(not a regular file"):
        load_checkpoint_state(tmp_path / "x.ckpt.pt")
    assert CellRecord(tmp_path, {0: "abc"}).read() == {}  # a record that cannot be read bounds nothing


def test_a_log_without_its_checksum_is_believed_only_as_an_old_log_whose_result_agrees(tmp_path):
    """Cutting a log's user block off (its checksum) leaves a readable HDF5 file, as logs were before
    0.3.0: it is read only if its version says it is that old and its attributes agree with its
    measurements, so an edited result is never believed."""
    from hvd_sparse.log import USERBLOCK

    def stripped(name, version, edit=None):
        path = tmp_path / f"{name}.h5"
        cfg = json.dumps({"train": {"seed": 0, "goal_error": 0.1}})
        log = TrialLog.create(path, {**ATTRS, "config": cfg, "hvd_sparse_version": version}, mask())
        for step, error in ((0, 0.5), (10, 0.3), (20, 0.1)):
            log.append({**row(step), "val_error": error})
        log.finish("COMPLETE", 20)
        path.write_bytes(path.read_bytes()[USERBLOCK:])
        if edit:
            with h5py.File(path, "r+") as f:
                f.attrs.update(edit)
        return path

    assert read_log(stripped("old", "0.2.0")).steps_to_result == 20
    with pytest.raises(LogError, match="no checksum, but written by hvd_sparse '0.5.0', whose logs all carry one"):
        read_log(stripped("new", "0.5.0"))
    with pytest.raises(LogError, match=r"no checksum, and its result \(status COMPLETE, steps_to_result 5\) disagrees "
                                       r"with its measurements \(goal 0.1 first reached at step 20\)"):
        read_log(stripped("edited", "0.2.0", {"steps_to_result": 5}))
    with pytest.raises(LogError, match="disagrees with its measurements"):
        read_log(stripped("promoted", "0.2.0", {"status": "INCOMPLETE", "steps_to_result": -1}))
    # before 0.3.0 a non-finite loss ended a trial INFEASIBLE even at an error within the goal
    infeasible = tmp_path / "infeasible.h5"
    log = TrialLog.create(infeasible, {**ATTRS, "config": json.dumps({"train": {"goal_error": 0.1}}),
                                       "hvd_sparse_version": "0.2.0"}, mask())
    log.append({**row(0), "val_error": 0.05, "val_loss": float("nan")})
    log.finish("INFEASIBLE", None)
    infeasible.write_bytes(infeasible.read_bytes()[USERBLOCK:])
    assert read_log(infeasible).status == "INFEASIBLE"


def test_final_status_is_checked(tmp_path):
    log = TrialLog.create(tmp_path / "t.h5", ATTRS, mask())
    with pytest.raises(LogError):
        log.finish("RUNNING", None)


@pytest.mark.parametrize("leave_pages", range(0, 24, 2))
def test_a_full_disk_never_corrupts_the_log_nor_records_an_end_that_was_not_written(mount_tmpfs, leave_pages):
    """At every amount of space left: each write either lands whole or raises StorageError and
    leaves the previous version; the log never says COMPLETE unless that reached the disk."""
    disk = mount_tmpfs("size=512k")
    path = disk / "t.h5"
    log = TrialLog.create(path, ATTRS, Mask({"w": torch.ones(30, 30, dtype=torch.bool)}))
    for i in range(250):  # near the end of the first 256-entry chunk: the next appends need new space
        log.append(row(i))
    fill_disk(disk, leave_pages)
    written, failures = 250, []
    for i in range(250, 270):
        try:
            log.append(row(i))
            written += 1
        except StorageError as e:
            failures.append(str(e))
            break
    try:
        log.finish("COMPLETE", 5, best_val_error=0.1)
        ended = "COMPLETE"
    except StorageError as e:
        failures.append(str(e))
        ended = "RUNNING"
    data = read_log(path)
    assert data.status == ended and list(data.measurements["step"]) == list(range(written))
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "t.h5"]  # no temporary file left
    assert all(m.startswith(f"{path}: cannot write the log: ") and "\n" not in m for m in failures), failures
    if leave_pages == 0:
        assert len(failures) == 2 and "No space left on device (0 KiB free there)" in failures[0]


def test_a_log_removed_or_damaged_under_the_run_is_a_storage_error(tmp_path):
    path = tmp_path / "t.h5"
    log = TrialLog.create(path, ATTRS, mask())
    path.unlink()
    with pytest.raises(StorageError, match="cannot update the log"):
        log.append(row(0))
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(StorageError, match="cannot update the log"):
        log.append(row(0))
    assert path.read_bytes() == b"\x89HDF\r\n\x1a\n" + b"\0" * 64  # left as it was


def test_lipschitz_measurements_append_read_and_truncate_with_the_evaluations(tmp_path):
    path = tmp_path / "t.h5"
    log = TrialLog.create(path, {"config": "{}", "run_hash": "x", "world_size": 1, "mask_sha256": "m",
                                 "hvd_sparse_version": "t", "torch_version": "t", "horovod_version": "t"}, mask())
    assert read_log(path).lipschitz == {}
    for step in (0, 10, 20, 30):
        log.append(row(step))
    for step in (10, 20, 30):
        log.append_table("lipschitz", step, {"value": step / 10, "per_gamma": [step / 10, step / 20]}, {"gammas": (0.1, 0.9)})
    back = read_log(path).lipschitz
    assert back["step"].tolist() == [10, 20, 30] and back["value"].tolist() == [1.0, 2.0, 3.0]
    assert back["per_gamma"].tolist()[1] == [2.0, 1.0] and back["gammas"].tolist() == [0.1, 0.9]
    log.truncate(20)  # a resume from the checkpoint at step 20 redoes what came after it
    back = read_log(path)
    assert back.measurements["step"].tolist() == [0, 10, 20] and back.lipschitz["step"].tolist() == [10, 20]
    assert back.lipschitz["per_gamma"].shape == (2, 2)


def flipped(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_measurement_is_caught_not_believed(tmp_path):
    path = tmp_path / "t.h5"
    log = TrialLog.create(path, ATTRS, mask())
    for i in range(5):
        log.append(row(i))
    with h5py.File(path, "r") as f:
        offset = f["measurements/val_error"].id.get_chunk_info(0).byte_offset + 8  # inside val_error[1]
    flipped(path, offset)
    with pytest.raises(LogError, match=r"t\.h5: unreadable or corrupt HDF5 log: it fails its checksum") as exc:
        read_log(path)
    assert "\n" not in str(exc.value)


def test_no_flipped_byte_anywhere_in_a_log_changes_what_is_read(tmp_path):
    """Every 13th byte of a finished log flipped in turn: each read either raises LogError or returns
    exactly the original (the byte was in unused space): never a changed measurement, never another error."""
    path = tmp_path / "t.h5"
    log = TrialLog.create(path, ATTRS, mask())
    for i in range(3):
        log.append(row(i))
    log.finish("COMPLETE", 2, best_val_error=0.1)
    original, good = read_log(path), path.read_bytes()
    caught = 0
    for offset in range(0, len(good), 13):
        path.write_bytes(good)
        flipped(path, offset)
        try:
            data = read_log(path)
        except LogError:
            caught += 1
            continue
        assert data.attrs == original.attrs and data.mask == original.mask, offset
        assert all(np.array_equal(data.measurements[k], original.measurements[k], equal_nan=True)
                   for k in original.measurements), offset
    assert caught > 0


def test_a_resume_records_its_world_size():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.h5"
        log = TrialLog.create(path, {**ATTRS, "world_sizes": "[2]"}, mask())
        log.append(row(0))
        log.truncate(0, world_size=4)
        log.truncate(0, world_size=1)
        attrs = read_log(path).attrs
        assert json.loads(attrs["world_sizes"]) == [2, 4, 1] and attrs["world_size"] == 1
