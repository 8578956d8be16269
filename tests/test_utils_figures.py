"""atomic_path and output_folder (permissions, failures, paths in the way) and what the figures actually draw
(read back from matplotlib's objects)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import resunetpp.figures as F
from resunetpp.utils import atomic_path, output_folder, write_json


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_umask_permissions_of_an_ordinary_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".a.txt.") and tmp.suffix == ".tmp"
            tmp.write_text("x")
        with open(tmp_path / "plain.txt", "w") as fh:  # what open() would have given
            fh.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "er" / "f.json"
    write_json(target, {"v": 1})  # parents are created
    assert target.read_text() == '{\n  "v": 1\n}\n'
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert os.listdir(target.parent) == ["f.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(target.parent) == ["f.json"]


def test_a_path_in_the_way_is_said_of_the_file_asked_for_in_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "folder", IsADirectoryError, f"cannot write {tmp_path / 'folder'}: it is a folder"),
             (tmp_path / "file" / "a.json", NotADirectoryError,
              f"cannot write {tmp_path / 'file' / 'a.json'}: {tmp_path / 'file'} is a file, not a folder"),
             (tmp_path / "file" / "sub" / "a.json", NotADirectoryError, f"{tmp_path / 'file'} is a file")]
    for target, kind, words in cases:
        with pytest.raises(kind) as info, atomic_path(target):
            pytest.fail("the body must not run")
        assert words in str(info.value) and "[Errno" not in str(info.value) and ".tmp" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"] and os.listdir(tmp_path / "folder") == []
    assert (tmp_path / "file").read_text() == "x"  # never replaced


def test_a_failed_rename_names_the_target_and_keeps_its_errno(tmp_path, monkeypatch):
    """A full disk at the rename reads as the file asked for (not the temporary one), and stays recognisable."""
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", src, dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as info, atomic_path(tmp_path / "m.json") as tmp:
        tmp.write_text("x")
    assert info.value.errno == errno.ENOSPC and info.value.reason == "No space left on device"
    assert str(info.value) == f"cannot write {tmp_path / 'm.json'}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_output_folder_makes_checks_or_refuses_in_one_line(tmp_path, monkeypatch):
    assert output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert output_folder(tmp_path / "c", create=False) == tmp_path / "c" and not (tmp_path / "c").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is a file, not a folder"):
        output_folder(tmp_path / "f", create=False)
    with pytest.raises(NotADirectoryError, match=f"cannot create this folder because {tmp_path / 'f'} is a file"):
        output_folder(tmp_path / "f" / "g" / "h")

    def denied(self, *a, **k):  # root may write anywhere: the read-only disk is simulated
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(PermissionError) as info:
        output_folder(tmp_path / "ro")
    assert str(info.value) == (f"{tmp_path / 'ro'}: cannot create this folder: permission denied; choose a folder "
                               "you can write to") and info.value.errno == errno.EACCES


@pytest.fixture
def figures(monkeypatch):
    """Every figure the module saves, kept open for inspection (it is still written to disk)."""
    saved = []

    def keep(fig, path):
        saved.append(fig)
        fig.savefig(path, format="png")  # as the real one does, without closing the figure
        return Path(path)

    monkeypatch.setattr(F, "_save", keep)
    yield saved
    import matplotlib.pyplot as plt

    for fig in saved:
        plt.close(fig)


def test_plot_curves_draws_the_losses_the_scores_and_marks_the_best_epoch(tmp_path, figures):
    history = [{"epoch": e, "train_loss": tl, "val_loss": vl, "val_dice": d, "val_iou": i}
               for e, tl, vl, d, i in [(1, 0.9, 0.8, 0.3, 0.2), (2, 0.7, 0.6, 0.5, 0.35), (3, 0.5, 0.55, 0.8, 0.66),
                                       (4, 0.4, 0.58, 0.7, 0.55)]]
    path = F.plot_curves(history, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    ax_loss, ax_dice = fig.axes
    lines = {ln.get_label(): ln for ln in ax_loss.get_lines()}
    assert list(lines["train"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["train"].get_ydata()) == [0.9, 0.7, 0.5, 0.4]
    assert list(lines["val"].get_ydata()) == [0.8, 0.6, 0.55, 0.58]
    scores = {ln.get_label(): ln for ln in ax_dice.get_lines()}
    assert list(scores["val Dice"].get_ydata()) == [0.3, 0.5, 0.8, 0.7]
    assert list(scores["val IoU"].get_ydata()) == [0.2, 0.35, 0.66, 0.55]
    vline = [ln for ln in ax_dice.get_lines() if list(ln.get_xdata()) == [3, 3]]
    assert vline, "no vertical line at the best epoch (3)"
    (marker,) = ax_dice.collections
    assert marker.get_offsets().tolist() == [[3.0, 0.8]]
    assert marker.get_label() == "best 0.8000 (epoch 3)"
    assert ax_dice.get_ylim() == (0.0, 1.0) and ax_loss.get_title() == "loss"
    assert [t.get_text() for t in ax_dice.get_legend().get_texts()][-1] == "best 0.8000 (epoch 3)"


def test_plot_fig3_shows_each_image_its_truth_and_every_prediction(tmp_path, figures):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8))
    masks = torch.from_numpy(rng.integers(0, 2, (2, 1, 8, 8)))
    preds = {"U-Net": torch.from_numpy(rng.integers(0, 2, (2, 1, 8, 8))),
             "ResUNet++": torch.from_numpy(rng.integers(0, 2, (2, 1, 8, 8)))}
    F.plot_fig3(images, masks, preds, tmp_path / "f.png", row_labels=["a", "b"], title="Fig. 3")
    assert (tmp_path / "f.png").stat().st_size > 0
    (fig,) = figures
    axes = np.array(fig.axes).reshape(2, 4)
    assert [ax.get_title() for ax in axes[0]] == ["Image", "Ground truth", "U-Net", "ResUNet++"]
    assert all(ax.get_title() == "" for ax in axes[1])
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["a", "b"]
    assert fig._suptitle.get_text() == "Fig. 3"
    for r in range(2):
        shown = [np.asarray(ax.get_images()[0].get_array()) for ax in axes[r]]
        assert np.array_equal(shown[0], images[r].permute(1, 2, 0).numpy())  # HWC colour image
        assert np.array_equal(shown[1], masks[r, 0].numpy())
        assert np.array_equal(shown[2], preds["U-Net"][r, 0].numpy())
        assert np.array_equal(shown[3], preds["ResUNet++"][r, 0].numpy())
        assert axes[r][1].get_images()[0].get_cmap().name == "gray"
        assert axes[r][1].get_images()[0].get_clim() == (0, 1)
