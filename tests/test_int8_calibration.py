"""export.py --int8 without ONNX: which training photos calibrate (evenly over the classes, the same
every time, never more than there are), the calibration reader's handling of photos that cannot be
decoded, and the accuracy gate counted in whole photos. The end-to-end runs are in test_export.py."""
from collections import Counter

import pytest

import export
from helpers import COLORS, save_image, write_corrupt, write_truncated_jpeg
from inference import images

pytestmark = pytest.mark.quick

# the training photos of a run on the flower photos, sorted by class as data.find_data lists them
FLOWERS = {0: 457, 1: 646, 2: 462, 3: 503, 4: 579}  # daisy, dandelion, roses, sunflowers, tulips: 2,647


def flower_samples():
    return [(f"train/{k}/{i:04d}.jpg", k) for k, n in FLOWERS.items() for i in range(n)]


@pytest.mark.parametrize("count", [300, 1000, 2285])
def test_calibration_photos_are_spread_evenly_over_the_classes(count):
    samples = flower_samples()
    chosen = export.quantization_photos(samples, count)
    assert len(chosen) == count and len(set(chosen)) == count and set(chosen) <= set(samples)
    per_class = Counter(k for _, k in chosen)
    assert sorted(per_class) == sorted(FLOWERS)  # tulips, the last class, too
    assert max(per_class.values()) - min(per_class.values()) <= 1


def test_a_small_class_gives_all_it_has_and_the_others_make_up_the_rest():
    samples = [(f"{name}/{i}", k) for k, (name, n) in enumerate((("a", 10), ("b", 100), ("c", 100))) for i in range(n)]
    per_class = Counter(k for _, k in export.quantization_photos(samples, 100))
    assert per_class == {0: 10, 1: 45, 2: 45}


def test_the_choice_is_random_within_a_class_and_the_same_every_time():
    samples = flower_samples()
    chosen = export.quantization_photos(samples, 300)
    assert export.quantization_photos(list(reversed(samples)), 300) == chosen  # whatever the listing order
    daisies = sorted(p for p, k in chosen if k == 0)
    assert daisies != [p for p, k in samples if k == 0][:60]  # not the first photos of the class
    assert export.quantization_photos(samples, 300, seed=1) != chosen


def test_more_calibration_photos_than_the_run_has_is_one_error():
    with pytest.raises(export.ExportError, match=r"--calibration-images 2648: the run has only 2647 training photos"):
        export.quantization_photos(flower_samples(), 2648)
    assert len(export.quantization_photos(flower_samples(), 2647)) == 2647


def test_calibration_skips_photos_that_cannot_be_decoded(tmp_path):
    good = [str(save_image(tmp_path / f"good{i}.jpg", COLORS[i], seed=i)) for i in range(3)]
    truncated = str(write_truncated_jpeg(tmp_path / "truncated.jpg"))  # its header parses: only decoding fails
    garbage = str(write_corrupt(tmp_path / "garbage.jpg"))
    reader = export.QuantizationReader([good[0], truncated, good[1], garbage, good[2]], images.Preprocessing(40, 32),
                                batch_size=2)
    batches = []
    while (batch := reader.get_next()) is not None:
        batches.append(batch["images"])
    assert [b.shape for b in batches] == [(1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 32)]
    assert sorted(reader.skipped) == sorted([truncated, garbage])
    assert "truncated" in reader.skipped[truncated]
    reader.rewind()  # a second pass, as a calibrator may make, lists each photo once
    while reader.get_next() is not None:
        pass
    assert len(reader.skipped) == 2


def test_calibration_with_no_readable_photo_is_one_error(tmp_path):
    files = [str(write_truncated_jpeg(tmp_path / f"t{i}.jpg", seed=i)) for i in range(3)]
    reader = export.QuantizationReader(files, images.Preprocessing(40, 32))
    with pytest.raises(export.ExportError, match="none of the 3 calibration photos could be read"):
        reader.get_next()


def measured(fp32_correct, int8_correct, val_images):
    return export.Quantized(b"", fp32_correct, int8_correct, min(fp32_correct, int8_correct), val_images, 1)


def test_the_accuracy_gate_counts_whole_photos():
    assert not measured(90, 89, 100).loses_more_than(1.0)  # exactly 1 point: 100 * (0.89 - 0.90) is -1.0000000000000009
    assert measured(90, 88, 100).loses_more_than(1.0)
    assert not measured(900, 897, 1000).loses_more_than(0.3)  # 0.3 as written, not 0.29999999999999998...
    assert measured(900, 896, 1000).loses_more_than(0.3)
    assert not measured(5, 5, 7).loses_more_than(0.0) and measured(5, 4, 7).loses_more_than(0.0)
    assert not measured(5, 6, 7).loses_more_than(0.0)  # INT8 better
    result = measured(89, 90, 100)
    assert (result.fp32_accuracy, result.int8_accuracy, result.agreement) == (0.89, 0.9, 0.89)
