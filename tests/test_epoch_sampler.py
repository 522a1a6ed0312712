"""data.EpochSampler split over processes: in training every process gets the same number of
samples (DDP needs every process at every step), however few the images; in validation each image
goes to exactly one process."""
import pytest

from training import data


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
