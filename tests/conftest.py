"""Put the repo root on sys.path so tests can import the top-level modules (data, model, ...), and
keep the suite's disk use to about one module's worth."""
import os
import shutil
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """A test that builds train.StopRequest installs SIGINT/SIGTERM handlers in this process: put
    pytest's back afterwards (helpers.call does the same around every script it runs)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module", autouse=True)
def free_the_modules_folders(request, tmp_path_factory):
    """A module's fixtures train runs of about 200 MB each into folders of tmp_path_factory, which
    pytest keeps to the session's end: a CI machine with a few GB free ran out of disk. When every
    test of the module passed, what it added to the base folder goes as the module ends."""
    base = tmp_path_factory.getbasetemp()
    before, failed_before = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
