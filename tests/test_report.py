"""report.py's plots: PNG files from a run's CSVs, and a clear message without matplotlib."""
import sys

import pytest
import torch

import report


def write_run(folder):
    for epoch, (loss, acc) in enumerate([(1.5, 0.4), (1.1, 0.55), (0.9, 0.6)], start=1):
        report.append_metrics(str(folder / "metrics.csv"), epoch,
                              dict(lr=3e-4, train_loss=loss, val_loss=loss + 0.1, val_accuracy=acc,
                                   images_per_s=9.0, seconds=300.0))
    report.write_confusion_csv(str(folder / "confusion_matrix.csv"), ["a", "b", "c"],
                               torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 6]]))


def test_plot_writes_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path)
    written = report.plot(str(tmp_path))
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["confusion_matrix.png", "curves.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_data_is_a_clear_error(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit, match="neither metrics.csv nor confusion_matrix.csv"):
        report.plot(str(tmp_path))


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    write_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        report.plot(str(tmp_path))
