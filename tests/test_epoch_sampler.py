"""data.EpochSampler, the order of an epoch: split over processes, in training every process gets
the same number of samples (DDP needs every process at every step), however few the images; in
validation each image goes to exactly one process; --sampler balanced draws every class as often,
and a resumed epoch continues the same order."""
import pytest

from training import data

pytestmark = pytest.mark.quick


def shares(size, world_size, pad=True, shuffle=True, weights=None):
    samplers = [data.EpochSampler(size, shuffle, 5, rank, world_size, pad=pad, weights=weights)
                for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(2)
    return [[item[0] if isinstance(item, tuple) else item for item in sampler] for sampler in samplers]


@pytest.mark.parametrize("size, world_size", [(1, 4), (3, 4), (1, 8), (2, 8), (5, 8), (7, 3), (8, 4)])
def test_training_pads_every_process_to_the_same_length_with_every_image(size, world_size):
    got = shares(size, world_size)
    per_process = -(-size // world_size)  # the one-pass count, rounded up
    assert [len(share) for share in got] == [per_process] * world_size
    every = sorted(i for share in got for i in share)
    assert set(every) == set(range(size))  # each image, and nothing else


def test_one_image_on_four_processes_goes_to_each_of_them():
    assert shares(1, 4) == [[0], [0], [0], [0]]
    assert shares(1, 4, shuffle=False) == [[0], [0], [0], [0]]


def test_three_images_on_four_processes_repeat_the_first_of_the_epoch():
    got = shares(3, 4)
    assert sorted(sum(got[:3], [])) == [0, 1, 2] and got[3] == got[0]


def test_balanced_draws_pad_as_plain_orders_do():
    got = shares(2, 8, weights=data.balanced_draws([0, 1]))
    assert [len(share) for share in got] == [1] * 8


def test_validation_is_not_padded():
    got = shares(3, 4, pad=False, shuffle=False)
    assert got == [[0], [1], [2], []]


def test_the_balanced_sampler_draws_classes_evenly_and_exactly_again():
    targets = [0] * 90 + [1] * 10
    sampler = data.EpochSampler(100, True, seed=3, weights=data.balanced_draws(targets))
    sampler.set_epoch(0)
    drawn = list(sampler)
    assert len(drawn) == 100 and 35 <= sum(targets[i] for i, _ in drawn) <= 65  # about half from class 1
    assert len({seed for _, seed in drawn}) == 100  # a sample drawn twice is augmented two ways
    sampler.set_epoch(0, skip=40)
    assert list(sampler) == drawn[40:]  # the same epoch again, resumed after 40 samples
    halves = [data.EpochSampler(100, True, 3, rank, 2, weights=data.balanced_draws(targets)) for rank in (0, 1)]
    assert sorted(list(halves[0]) + list(halves[1])) == sorted(drawn)  # split over 2 processes
    sampler.set_epoch(1)
    assert list(sampler) != drawn
