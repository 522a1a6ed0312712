"""report.py's plots: PNG files from a run's CSVs, and one clear error (UserError) without
data or matplotlib."""
import sys

import pytest
import torch

import report
from plumbing.options import UserError
from training import metrics

pytestmark = pytest.mark.quick


def write_run(folder):
    for epoch, (loss, acc) in enumerate([(1.5, 0.4), (1.1, 0.55), (0.9, 0.6)], start=1):
        metrics.append_metrics(str(folder / "metrics.csv"), epoch,
                              dict(lr=3e-4, train_loss=loss, val_loss=loss + 0.1, val_accuracy=acc,
                                   images_per_s=9.0, seconds=300.0))
    metrics.write_confusion_csv(str(folder / "confusion_matrix.csv"), ["a", "b", "c"],
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
    with pytest.raises(UserError, match="no metrics.csv, confusion_matrix.csv or predictions.csv"):
        report.plot(str(tmp_path))


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    write_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(UserError, match="pip install matplotlib"):
        report.plot(str(tmp_path))


def test_top_losses_shows_the_highest_loss_images_with_their_captions(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    rows = []
    for i in range(7):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((40, 60, 3), 30 * i, np.uint8)).save(path)
        probabilities = [0.2, 0.3, 0.5] if i % 2 else [0.7, 0.2, 0.1]
        rows.append((str(path), i % 3, probabilities, -np.log(probabilities[i % 3])))
    metrics.write_predictions_csv(str(tmp_path / "predictions.csv"), ["a", "b", "c"], rows)
    fig = report.draw_top_losses(plt, str(tmp_path / "predictions.csv"), 4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    expected = sorted(rows, key=lambda r: r[3], reverse=True)[:4]
    assert len(titles) == 4
    for title, (_, target, probabilities, loss) in zip(titles, expected):
        best = int(np.argmax(probabilities))
        assert title == (f"true {'abc'[target]}\npredicted {'abc'[best]} {probabilities[best]:.2f}\n"
                         f"loss {loss:.2f}")
    plt.close(fig)
    written = report.plot(str(tmp_path), top_losses=4)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["top_losses.png", "reliability.png", "risk_coverage.png"]
    (tmp_path / "img0.png").unlink()  # moved away since the evaluation: one clear line
    with pytest.raises(UserError, match="cannot read .*img0.png"):
        report.plot(str(tmp_path), top_losses=7)
