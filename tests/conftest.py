"""Put the repo root on sys.path so tests can import the top-level modules (model, train, ...); the
one small trained run and its ONNX export that many test files share; and the suite's disk use kept
to about one module's worth."""
import functools
import os
import shutil
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = "shared-"  # the session fixtures' folders: kept until the session ends


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda are skipped where torch finds no CUDA GPU (torch is imported only when one is collected)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in marked:
        item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)"))


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """A test that builds a plumbing.stopping.StopRequest (train.py does) installs SIGINT/SIGTERM handlers
    in this process: put pytest's back afterwards (helpers.call does the same around every script it runs)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture
def fake_cuda(monkeypatch):
    """helpers.FakeCuda's maker: fake_cuda(count=2, capability=(7, 0)) gives this test that many GPUs.
    The flags that device.tune_backends turns on for a GPU are put back afterwards (monkeypatch cannot:
    torch keeps them in C++, behind properties)."""
    import torch

    from helpers import FakeCuda

    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield functools.partial(FakeCuda, monkeypatch)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.fixture(scope="module", autouse=True)
def free_the_modules_folders(request, tmp_path_factory):
    """A module's fixtures train runs of about 200 MB each into folders of tmp_path_factory, which
    pytest keeps to the session's end: a CI machine with a few GB free ran out of disk. When every
    test of the module passed, what it added to the base folder goes as the module ends (but the
    session's shared run, which later modules use)."""
    base = tmp_path_factory.getbasetemp()
    before, failed_before = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for path in set(base.iterdir()) - before:
            if not path.name.startswith(SHARED):
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """helpers.train_small_run, trained once for the session: 1 epoch at 48 px, 3 classes. Its files
    are read, copied, evaluated and exported, never changed."""
    from helpers import train_small_run

    return train_small_run(tmp_path_factory.mktemp(SHARED + "run"))


@pytest.fixture(scope="session")
def small_onnx(small_run, tmp_path_factory):
    """small_run's best.pth exported by export.py (fp32): the path of the .onnx file."""
    pytest.importorskip("onnxruntime", reason="ONNX export needs onnxruntime (requirements-dev.txt)")
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (requirements-dev.txt)")
    import export
    from helpers import call

    path = tmp_path_factory.mktemp(SHARED + "onnx") / "model.onnx"
    code, _, err = call(export, ["--weights", small_run["best"], "--output", path])
    assert code == 0, err
    return path
