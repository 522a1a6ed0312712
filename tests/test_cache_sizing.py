"""image_cache.cache_capacity: the decoded-image cache of one process is anonymous memory, limited by the
free memory only; the cache that a torchrun's processes share is a file in /dev/shm, also limited by
the space free there (Docker gives a container 64 MB by default). The free figures are faked."""
import pytest

from plumbing.options import UserError
from training import image_cache

pytestmark = pytest.mark.quick

GIB = 2 ** 30
NEED = int(0.9 * GIB)  # the flower photos decoded


@pytest.fixture
def machine(monkeypatch):
    """8 GiB of free memory, a 64 MB /dev/shm, photos that need 0.9 GiB decoded."""
    monkeypatch.setattr(image_cache, "available_memory_bytes", lambda: 8 * GIB)
    monkeypatch.setattr(image_cache, "free_bytes", lambda folder: 64 * 2 ** 20)
    monkeypatch.setattr(image_cache, "estimate_decoded_bytes", lambda paths: NEED)
    monkeypatch.setattr(image_cache, "FORKED_WORKERS", True)
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_one_process_caches_in_memory_whatever_dev_shm_holds(machine, mode):
    lines = []
    assert image_cache.cache_capacity(mode, ["a.jpg"], log=lines.append) == NEED + NEED // 4
    assert lines == ["cache: keeping decoded images in memory as they are first loaded: about 0.90 GiB of "
                     "8.0 GiB available in memory"]


def test_one_process_is_still_limited_by_free_memory(machine):
    machine.setattr(image_cache, "available_memory_bytes", lambda: GIB)
    with pytest.raises(UserError, match="needs about 0.9 GiB but only 1.0 GiB is available in memory"):
        image_cache.cache_capacity("on", ["a.jpg"], log=lambda line: None)


def test_processes_that_share_the_cache_are_limited_by_dev_shm(machine):
    machine.setenv("LOCAL_RANK", "0")
    machine.setenv("LOCAL_WORLD_SIZE", "2")
    folder = image_cache.shared_folder()
    lines = []
    assert image_cache.cache_capacity("auto", ["a.jpg"], log=lines.append) == 0
    assert lines == [f"cache: decoded images need about 0.9 GiB, more than half of the 0.1 GiB available in "
                     f"{folder}, where this machine's processes share it: streaming from disk instead"]
    with pytest.raises(UserError, match=f"only 0.1 GiB is available in {folder}, where"):
        image_cache.cache_capacity("on", ["a.jpg"], log=lambda line: None)
    machine.setattr(image_cache, "free_bytes", lambda folder: 64 * GIB)  # a large /dev/shm: memory decides
    assert image_cache.cache_capacity("on", ["a.jpg"], log=lines.append) == NEED + NEED // 4
    assert lines[-1].endswith("of 8.0 GiB available in memory")


def test_a_single_process_with_spawned_workers_shares_its_cache_through_the_folder(machine):
    machine.setattr(image_cache, "FORKED_WORKERS", False)  # macOS, Windows: workers open the cache's file
    assert image_cache.cache_in_shared_folder()
    assert image_cache.cache_capacity("auto", ["a.jpg"], log=lambda line: None) == 0
