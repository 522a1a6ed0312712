"""Starting from other weights (train.py --weights): transfer learning, proven offline.

A torchvision GoogLeNet built here (random weights, same layout as the ImageNet file) stands in for
the ImageNet weights: it must load through our code path and compute the same logits, fine-tune on
3 classes from the command line, freeze what --freeze-layers freezes, and fail cleanly on the wrong
file, the wrong --variant or without a network. A checkpoint of this repository fine-tunes on new
data with a split of its own.
"""
import os
import time

import pytest
import torch
import torchvision

import train
from helpers import assert_clean_error, call, eval_argv, make_tree, train_argv
from inference import checkpoint
from model import GoogLeNet
from plumbing.options import UserError

CLASSES = ["daisy", "roses", "tulips"]
HEADS = ("fc.", "aux1.", "aux2.")  # what --freeze-layers leaves trainable


def lines(text):
    """Output lines, with tqdm's carriage-return redraws split off."""
    return [line for chunk in text.splitlines() for line in chunk.split("\r")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tree(tmp_path_factory.mktemp("flowers"), CLASSES, 4, 2))


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=False)
    return model.eval()


@pytest.fixture(scope="module")
def tv_file(tv_model, tmp_path_factory):
    """torchvision's GoogLeNet state dict, as the ImageNet file holds it (1000 classes, aux heads)."""
    path = str(tmp_path_factory.mktemp("tv") / "googlenet-torchvision.pth")
    torch.save(tv_model.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------
# our loader on a torchvision file
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_torchvision_file_loads_through_our_code_and_gives_the_same_logits(tv_model, tv_file):
    state_dict = checkpoint.load_checkpoint(tv_file)["model"]
    ours = GoogLeNet(num_classes=1000, aux_logits=True, variant="torchvision")
    assert checkpoint.load_weights(ours, state_dict, tv_file) == []
    ours.eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = tv_model(x), ours(x)
    assert got.shape == (1, 1000)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()


@pytest.mark.quick
def test_reinit_heads_replaces_exactly_the_class_layers(tv_file):
    state_dict = checkpoint.load_checkpoint(tv_file)["model"]
    model = GoogLeNet(num_classes=3, variant="torchvision")
    assert checkpoint.load_weights(model, state_dict, tv_file, reinit_heads=True) == ["aux1.fc2", "aux2.fc2", "fc"]
    own = model.state_dict()
    assert set(own) == set(state_dict)
    for key, value in own.items():
        if key.startswith(("fc.", "aux1.fc2.", "aux2.fc2.")):
            assert value.shape[0] == 3, key
        else:
            assert torch.equal(value, state_dict[key]), key


@pytest.mark.quick
def test_without_reinit_heads_a_1000_class_file_is_an_error_naming_fc(tv_file):
    state_dict = checkpoint.load_checkpoint(tv_file)["model"]
    with pytest.raises(UserError) as info:
        checkpoint.load_weights(GoogLeNet(num_classes=3, variant="torchvision"), state_dict, tv_file)
    message = str(info.value)
    assert "fc.weight (1000, 1024) vs (3, 1024)" in message
    assert "1000 classes" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# the command line: fine-tune, freeze, wrong files
# ---------------------------------------------------------------------------------------------
def test_cli_finetunes_from_a_torchvision_file(tiny, tv_file, tmp_path):
    out_dir = tmp_path / "finetuned"
    code, out, err = call(train, train_argv(tiny, out_dir, "--weights", tv_file, "--image-size", 48))
    assert code == 0, err
    reinit = [line for line in lines(out) if "re-initialised" in line]
    assert reinit == [f"weights: loaded {tv_file}; re-initialised for 3 classes: aux1.fc2, aux2.fc2, fc"]
    best = checkpoint.load_checkpoint(str(out_dir / "best.pth"))
    assert best["variant"] == "torchvision" and best["classes"] == CLASSES and best["epoch"] == 1
    assert best["model"]["fc.weight"].shape == (3, 1024)
    assert sorted(os.listdir(out_dir)) == ["best.pth", "ci.json", "class_indices.json", "last.pth", "metrics.csv",
                                           "suspect_labels.csv"]


def test_freeze_layers_trains_only_the_heads(tiny, tv_file, tmp_path):
    out_dir = str(tmp_path / "frozen")
    code, out, err = call(train, train_argv(tiny, out_dir, "--weights", tv_file, "--freeze-layers",
                                            "--image-size", 48))
    assert code == 0, out + err
    source = checkpoint.load_checkpoint(tv_file)["model"]
    trained = checkpoint.load_checkpoint(os.path.join(out_dir, "last.pth"))
    params = {name for name, _ in GoogLeNet(num_classes=3, aux_logits=True, variant="torchvision").named_parameters()}
    frozen = sorted(n for n in params if not n.startswith(HEADS))
    assert len(frozen) > 100
    for name in frozen:
        assert torch.equal(trained["model"][name], source[name]), f"{name} changed under --freeze-layers"
    # frozen layers keep their BatchNorm statistics too
    assert torch.equal(trained["model"]["conv1.bn.running_mean"], source["conv1.bn.running_mean"])
    # the heads did train: the new fc starts with zero biases, the aux fc1 layers came from the file
    assert trained["model"]["fc.bias"].abs().sum() > 0
    assert not torch.equal(trained["model"]["aux1.fc1.weight"], source["aux1.fc1.weight"])
    # only the head parameters are in the optimizer
    n_heads = sum(1 for n in params if n.startswith(HEADS))
    assert sum(len(g["params"]) for g in trained["optimizer"]["param_groups"]) == n_heads


def test_weights_of_another_architecture_are_a_one_line_error(tiny, tmp_path):
    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    code, out, err = call(train, train_argv(tiny, str(tmp_path / "out"), "--weights", path))
    line = assert_clean_error(code, err, path, "missing keys: aux1.", "unexpected keys: bn1.")
    assert code == 2 and err.strip() == line


def test_a_variant_other_than_the_weights_is_refused(small_run, tiny, tmp_path):
    code, _, err = call(train, train_argv(tiny, tmp_path / "x", "--variant", "paper", "--weights", small_run["best"]))
    assert_clean_error(code, err, "--variant paper", "torchvision variant", "leave out --variant")


def test_imagenet_without_network_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "IMAGENET_URL", "http://127.0.0.1:9/googlenet-1378be20.pth")  # port 9 refuses
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    start = time.monotonic()
    code, out, err = call(train, train_argv(tiny, str(tmp_path / "out"), "--weights", "imagenet"))
    assert time.monotonic() - start < 120
    line = assert_clean_error(code, err, "cannot download the ImageNet weights", "--weights FILE")
    assert code == 2 and err.strip() == line
    assert not os.path.exists(os.path.join(tmp_path, "out", "best.pth"))


def test_eval_only_does_not_reinitialise_heads_of_other_weights(tiny, tv_file, tmp_path):
    """Evaluating 1000-class weights on 3 classes must fail, not score freshly random heads."""
    code, out, err = call(train, eval_argv(tv_file, tiny, tmp_path / "eval"))
    assert_clean_error(code, err, "fc.weight (1000, 1024) vs (3, 1024)")
    assert "re-initialised" not in out


def test_fine_tuning_a_checkpoint_on_another_plain_folder_splits_it_afresh(small_run, tmp_path):
    other = make_tree(tmp_path / "other", classes=("a", "b"), n_train=6, n_val=0) / "train"
    code, stdout, err = call(train, train_argv(other, tmp_path / "tuned", "--weights", small_run["best"],
                                               "--image-size", 32, "--val-ratio", 0.5))
    assert code == 0, err
    assert "held out for val (ratio 0.5, seed 0): a 3/3, b 3/3" in stdout
