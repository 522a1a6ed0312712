"""training/recipe.py: the loss (class weights, label smoothing), the optimizer (--opt) and the
exponential moving average of the weights (--model-ema), and how train.py wires them: the balancing
options reach the loss and the sampler, and the EMA is what is validated and saved as best.pth."""
import pytest
import torch
from torch import nn

import train
from helpers import COLORS, call, load, save_image, train_argv
from training import data, recipe

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_class_weighted_loss_is_the_mean_over_images_of_the_weighted_losses():
    """PyTorch's weighted mean divides by the batch's sum of weights, which undoes the weights in a
    batch of one class; ClassWeightedLoss divides by the number of images."""
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 3), torch.tensor([0, 0, 0, 2])
    weights = torch.tensor([0.5, 1.0, 4.0])
    each = nn.functional.cross_entropy(logits, targets, reduction="none")
    expected = (weights[targets] * each).sum() / 4
    torch.testing.assert_close(recipe.ClassWeightedLoss(weights)(logits, targets), expected)
    one_class = torch.tensor([0, 0, 0, 0])
    torch.testing.assert_close(recipe.ClassWeightedLoss(weights)(logits, one_class),
                               0.5 * nn.functional.cross_entropy(logits, one_class))  # the weight holds
    torch.testing.assert_close(recipe.ClassWeightedLoss()(logits, targets), each.mean())
    smoothed = recipe.ClassWeightedLoss(label_smoothing=0.1)(logits, targets)
    torch.testing.assert_close(smoothed, nn.functional.cross_entropy(logits, targets, label_smoothing=0.1))


@pytest.mark.quick
def test_balanced_class_weights_are_inverse_class_frequencies():
    targets = [0] * 90 + [1] * 10
    torch.testing.assert_close(data.inverse_frequency(targets), torch.tensor([100 / (2 * 90), 100 / (2 * 10)]))
    draws = data.balanced_draws(targets)
    assert draws[:90].sum().item() == pytest.approx(draws[90:].sum().item())  # each class as likely


def test_the_balancing_options_reach_the_loss_and_the_sampler(tmp_path, monkeypatch):
    """--class-weights balanced and --sampler balanced, in a run on 8 images of one class and 2 of
    another: the loss gets the inverse class frequencies, the training order balanced draws."""
    for split, counts in (("train", (8, 2)), ("val", (1, 1))):
        for k, (name, n) in enumerate(zip(("many", "rare"), counts)):
            for i in range(n):
                save_image(tmp_path / "data" / split / name / f"{i}.jpg", COLORS[k], seed=10 * k + i)
    losses, samplers = recording(monkeypatch, recipe, "ClassWeightedLoss"), recording(monkeypatch, data, "EpochSampler")
    code, _, err = call(train, train_argv(tmp_path / "data", tmp_path / "out", "--image-size", 32, "--class-weights",
                                          "balanced", "--sampler", "balanced", "--no-model-ema"))
    assert code == 0, err
    (loss,) = losses
    torch.testing.assert_close(loss.weight, torch.tensor([10 / (2 * 8), 10 / (2 * 2)]))
    train_sampler, val_sampler = samplers[:2]  # then the suspect-label pass's
    torch.testing.assert_close(train_sampler.weights, data.balanced_draws([0] * 8 + [1] * 2))
    assert val_sampler.weights is None  # validation counts every image once


def recording(monkeypatch, module, name):
    """The objects module.name makes while the test runs (module.name still makes them)."""
    made, real = [], getattr(module, name)

    def make(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(module, name, make)
    return made


# ---------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("opt,kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_the_optimizer_follows_opt(opt, kind):
    args = train.get_args_parser().parse_args(["--opt", opt, "--lr", "0.02", "--weight-decay", "0.01",
                                               "--momentum", "0.8"])
    optimizer = recipe.build_optimizer(args, list(nn.Linear(2, 2).parameters()))
    assert type(optimizer) is kind
    defaults = optimizer.defaults
    assert (defaults["lr"], defaults["weight_decay"], defaults["fused"]) == (0.02, 0.01, True)
    assert defaults.get("momentum") == (0.8 if opt == "sgd" else None)


# ---------------------------------------------------------------------------------------------
# the EMA
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_ema_is_pytorchs_averaged_model_with_a_growing_decay():
    args = train.get_args_parser().parse_args(["--model-ema", "--model-ema-decay", "0.5"])
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ema = recipe.build_ema(args, model)
    assert isinstance(ema, torch.optim.swa_utils.AveragedModel)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    expected = model[0].weight.detach().clone()
    recipe.update_ema(ema, model, args.model_ema_decay)  # the first update copies
    torch.testing.assert_close(ema.module[0].weight, expected, rtol=0, atol=0)
    for n in range(1, 30):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(4, 2))  # BatchNorm's statistics: averaged too, and its batch count copied
        recipe.update_ema(ema, model, args.model_ema_decay)
        decay = min(0.5, (1 + n) / (10 + n))  # 1/10, 2/11, ... until it reaches --model-ema-decay
        expected = decay * expected + (1 - decay) * model[0].weight.detach()
        torch.testing.assert_close(ema.module[0].weight, expected)
        assert int(ema.n_averaged) == n + 1
        assert int(ema.module[1].num_batches_tracked) == n
    assert recipe.build_ema(train.get_args_parser().parse_args(["--no-model-ema"]), model) is None


def test_the_ema_weights_are_validated_and_saved_as_best(small_run):
    """The default recipe keeps an EMA: best.pth holds the average (BatchNorm's buffers too), last.pth
    the raw weights and the average beside them."""
    best, last = load(small_run["best"]), load(small_run["last"])
    ema = {k[len("module."):]: v for k, v in last["model_ema"].items() if k.startswith("module.")}
    assert last["model_ema"]["n_averaged"].item() == 3  # updated once per step
    assert ema.keys() == best["model"].keys()
    for key in best["model"]:
        assert torch.equal(best["model"][key], ema[key]), key
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
