"""Put the repo root on sys.path so tests can import the top-level modules (data, model, ...)."""
import os
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
