"""model.py: GoogLeNet (Inception v1) as the paper's Table 1, in the paper's and torchvision's
variants: every stage's shape, the aux heads (at any image size), the state-dict keys the classic
googleNet.pth and torchvision's file use, the initialisation, TTA's mirror, and python model.py's
summary. No model is trained here."""
import copy
import math

import pytest
import torch
from torch import nn

import model as model_py
from model import BasicConv2d, GoogLeNet, Inception, InceptionAux, logits_with_mirror

pytestmark = pytest.mark.quick

N = 1  # one image: every shape below is per image, and a pass at 224 px costs seconds on two cores
NUM_CLASSES = 5

INCEPTIONS = ("inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
              "inception4d", "inception4e", "inception5a", "inception5b")

# Table 1 of Szegedy et al. 2014:
# name: (in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj, out)
PAPER_TABLE = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32, 256),
    "inception3b": (256, 128, 128, 192, 32, 96, 64, 480),
    "inception4a": (480, 192, 96, 208, 16, 48, 64, 512),
    "inception4b": (512, 160, 112, 224, 24, 64, 64, 512),
    "inception4c": (512, 128, 128, 256, 24, 64, 64, 512),
    "inception4d": (512, 112, 144, 288, 32, 64, 64, 528),
    "inception4e": (528, 256, 160, 320, 32, 128, 128, 832),
    "inception5a": (832, 256, 160, 320, 32, 128, 128, 832),
    "inception5b": (832, 384, 192, 384, 48, 128, 128, 1024),
}

STAGE_SHAPES = {
    "conv1": (64, 112, 112),
    "maxpool1": (64, 56, 56),
    "conv2": (64, 56, 56),
    "conv3": (192, 56, 56),
    "maxpool2": (192, 28, 28),
    "inception3a": (256, 28, 28),
    "inception3b": (480, 28, 28),
    "maxpool3": (480, 14, 14),
    "inception4a": (512, 14, 14),
    "inception4b": (512, 14, 14),
    "inception4c": (512, 14, 14),
    "inception4d": (528, 14, 14),
    "inception4e": (832, 14, 14),
    "maxpool4": (832, 7, 7),
    "inception5a": (832, 7, 7),
    "inception5b": (1024, 7, 7),
    "avgpool": (1024, 1, 1),
}


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    """Paper variant, aux heads, 5 classes, init_weights=True. Tests must restore eval()."""
    torch.manual_seed(0)
    m = GoogLeNet(num_classes=NUM_CLASSES, aux_logits=True, init_weights=True)
    m.eval()
    return m


@pytest.fixture(scope="module")
def model_noaux():
    torch.manual_seed(1)
    m = GoogLeNet(num_classes=NUM_CLASSES, aux_logits=False, init_weights=True)
    m.eval()
    return m


@pytest.fixture(scope="module")
def tv_variant():
    torch.manual_seed(3)
    return GoogLeNet(num_classes=NUM_CLASSES, aux_logits=True, init_weights=True, variant="torchvision").eval()


@pytest.fixture(scope="module")
def tv_reference():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(4)
    return torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True,
                                        transform_input=False, num_classes=NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(123)
    return torch.randn(N, 3, 224, 224, generator=g)


class Recorder:
    """Forward hooks on named submodules; records outputs (and call counts)."""

    def __init__(self, model, names):
        self.outputs = {}
        self.calls = {n: 0 for n in names}
        self.handles = []
        modules = dict(model.named_modules())
        for name in names:
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name] += 1
            self.outputs[name] = output.detach().clone()
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def run_train(m, x):
    m.train()
    try:
        with torch.no_grad():
            return m(x)
    finally:
        m.eval()


@pytest.fixture(scope="module")
def train_pass(model, x):
    """One training-mode forward of the paper model at 224 px, recorded: (outputs, every stage's
    output and call count, the aux heads' inputs)."""
    inputs = {}

    def keep_input(name):
        def hook(module, args):
            inputs[name] = args[0].detach().clone()
        return hook

    handles = [model.aux1.register_forward_pre_hook(keep_input("aux1")),
               model.aux2.register_forward_pre_hook(keep_input("aux2"))]
    try:
        with Recorder(model, list(STAGE_SHAPES) + ["fc", "aux1", "aux2"]) as rec:
            out = run_train(model, x)
    finally:
        for h in handles:
            h.remove()
    return out, rec, inputs


AUX_MODULES = ["aux1", "aux2", "aux1.conv", "aux1.fc1", "aux1.fc2", "aux2.conv", "aux2.fc1", "aux2.fc2"]


@pytest.fixture(scope="module")
def eval_pass(model, x):
    """One eval-mode forward of the paper model at 224 px, recorded (the aux heads' layers too)."""
    with Recorder(model, list(STAGE_SHAPES) + AUX_MODULES + ["fc"]) as rec, torch.inference_mode():
        out = model(x)
    return out, rec


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def test_stage_shapes_224(train_pass):
    out, rec, _ = train_pass
    for name, shape in STAGE_SHAPES.items():
        assert rec.calls[name] == 1, name
        assert tuple(rec.outputs[name].shape) == (N, *shape), name
    assert tuple(rec.outputs["fc"].shape) == (N, NUM_CLASSES)
    assert tuple(rec.outputs["aux1"].shape) == (N, NUM_CLASSES)
    assert tuple(rec.outputs["aux2"].shape) == (N, NUM_CLASSES)
    logits, aux2, aux1 = out
    assert logits.shape == aux1.shape == aux2.shape == (N, NUM_CLASSES)


def test_eval_shapes(eval_pass):
    out, rec = eval_pass
    for name, shape in STAGE_SHAPES.items():
        assert tuple(rec.outputs[name].shape) == (N, *shape), name
    assert out.shape == (N, NUM_CLASSES)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# outputs in train / eval, aux heads
# ---------------------------------------------------------------------------------------------
def test_training_returns_logits_aux2_aux1_in_order(train_pass):
    out, rec, _ = train_pass
    assert isinstance(out, tuple) and len(out) == 3
    logits, second, third = out
    assert torch.equal(logits, rec.outputs["fc"])
    assert torch.equal(second, rec.outputs["aux2"])
    assert torch.equal(third, rec.outputs["aux1"])
    # the two aux heads differ (different weights, different inputs), so the order is meaningful
    assert not torch.equal(rec.outputs["aux1"], rec.outputs["aux2"])
    assert rec.calls["aux1"] == rec.calls["aux2"] == 1


def test_aux1_runs_on_inception4a_and_aux2_on_inception4d(train_pass):
    """aux1 consumes inception4a's output (512 ch), aux2 inception4d's output (528 ch)."""
    _, rec, inputs = train_pass
    assert torch.equal(inputs["aux1"], rec.outputs["inception4a"])
    assert torch.equal(inputs["aux2"], rec.outputs["inception4d"])


def test_eval_returns_single_tensor_and_skips_aux(eval_pass):
    # aux submodules are not run at all in eval (not even their inner layers)
    out, rec = eval_pass
    assert isinstance(out, torch.Tensor)
    assert out.shape == (N, NUM_CLASSES)
    assert torch.equal(out, rec.outputs["fc"])
    assert rec.calls["fc"] == 1
    assert all(rec.calls[n] == 0 for n in AUX_MODULES), rec.calls


def test_no_aux_returns_single_tensor_in_training(model_noaux):
    x = torch.randn(2, 3, 64, 64)
    out = run_train(model_noaux, x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, NUM_CLASSES)
    with torch.inference_mode():
        out = model_noaux(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_CLASSES)


def test_no_aux_has_no_aux_parameters(model_noaux):
    assert model_noaux.aux_logits is False
    assert getattr(model_noaux, "aux1", None) is None
    assert getattr(model_noaux, "aux2", None) is None
    keys = model_noaux.state_dict().keys()
    assert not [k for k in keys if k.startswith(("aux1", "aux2"))]
    assert not [n for n, _ in model_noaux.named_parameters() if "aux" in n]
    assert not any(isinstance(m, InceptionAux) for m in model_noaux.modules())


# ---------------------------------------------------------------------------------------------
# parameter counts and state-dict layout
# ---------------------------------------------------------------------------------------------
def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_count_with_aux(model):
    assert n_params(model) == 10_318_655


def test_parameter_count_without_aux(model_noaux):
    assert n_params(model_noaux) == 5_978_677


def test_aux_heads_parameter_count(model, model_noaux):
    # each aux head: 1x1 conv (C*128 + 128) + fc1 (2048*1024 + 1024) + fc2 (1024*5 + 5)
    def head(c):
        return c * 128 + 128 + 2048 * 1024 + 1024 + 1024 * NUM_CLASSES + NUM_CLASSES

    assert n_params(model.aux1) == head(512)
    assert n_params(model.aux2) == head(528)
    assert n_params(model) - n_params(model_noaux) == head(512) + head(528)


def test_state_dict_top_level_prefixes(model):
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"conv1", "conv2", "conv3", *INCEPTIONS, "aux1", "aux2", "fc"}


def test_state_dict_top_level_prefixes_no_aux(model_noaux):
    prefixes = {k.split(".")[0] for k in model_noaux.state_dict()}
    assert prefixes == {"conv1", "conv2", "conv3", *INCEPTIONS, "fc"}


@pytest.mark.parametrize("key,shape", [
    ("conv1.conv.weight", (64, 3, 7, 7)),
    ("conv1.conv.bias", (64,)),
    ("conv2.conv.weight", (64, 64, 1, 1)),
    ("conv3.conv.weight", (192, 64, 3, 3)),
    ("inception3a.branch1.conv.weight", (64, 192, 1, 1)),
    ("inception4a.branch2.0.conv.weight", (96, 480, 1, 1)),
    ("inception4a.branch2.1.conv.weight", (208, 96, 3, 3)),
    ("inception4a.branch3.1.conv.weight", (48, 16, 5, 5)),
    ("inception4a.branch4.1.conv.weight", (64, 480, 1, 1)),
    ("inception4a.branch4.1.conv.bias", (64,)),
    ("inception5b.branch1.conv.weight", (384, 832, 1, 1)),
    ("aux1.conv.conv.weight", (128, 512, 1, 1)),
    ("aux2.conv.conv.weight", (128, 528, 1, 1)),
    ("aux1.fc1.weight", (1024, 2048)),
    ("aux1.fc1.bias", (1024,)),
    ("aux1.fc2.weight", (NUM_CLASSES, 1024)),
    ("aux1.fc2.bias", (NUM_CLASSES,)),
    ("aux2.fc2.bias", (NUM_CLASSES,)),
    ("fc.weight", (NUM_CLASSES, 1024)),
    ("fc.bias", (NUM_CLASSES,)),
])
def test_state_dict_exact_keys(model, key, shape):
    sd = model.state_dict()
    assert key in sd
    assert tuple(sd[key].shape) == shape


def test_state_dict_has_no_unexpected_key_kinds(model):
    # paper variant: no BatchNorm, every conv has a bias; parameters only (no buffers)
    keys = list(model.state_dict())
    assert not [k for k in keys if ".bn." in k or "running" in k or "num_batches" in k]
    assert len(keys) == len(list(model.parameters()))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 + 6 * 9 + 2  # stem + 6 per Inception + one per aux head
    for n in convs:
        assert f"{n}.weight" in keys and f"{n}.bias" in keys


def test_aux_heads_structure(model):
    for name, cin in (("aux1", 512), ("aux2", 528)):
        aux = getattr(model, name)
        assert isinstance(aux, InceptionAux)
        assert aux.conv.conv.in_channels == cin
        assert aux.conv.conv.out_channels == 128
        assert aux.conv.conv.kernel_size == (1, 1)
        assert isinstance(aux.fc1, nn.Linear)
        assert (aux.fc1.in_features, aux.fc1.out_features) == (2048, 1024)
        assert (aux.fc2.in_features, aux.fc2.out_features) == (1024, NUM_CLASSES)


def test_aux_head_standalone_shapes():
    torch.manual_seed(0)
    aux = InceptionAux(512, 7).eval()
    with torch.inference_mode():
        out = aux(torch.randn(N, 512, 14, 14))
    assert out.shape == (N, 7)


@pytest.mark.parametrize("name", INCEPTIONS)
def test_inception_branch_shapes_match_paper_table(model, name):
    cin, c1, c3r, c3, c5r, c5, pp, _ = PAPER_TABLE[name]
    block = getattr(model, name)
    assert isinstance(block, Inception)

    def check(conv, i, o, k, pad):
        assert isinstance(conv, nn.Conv2d)
        assert (conv.in_channels, conv.out_channels) == (i, o)
        assert conv.kernel_size == (k, k)
        assert conv.stride == (1, 1)
        assert conv.padding == (pad, pad)

    check(block.branch1.conv, cin, c1, 1, 0)
    check(block.branch2[0].conv, cin, c3r, 1, 0)
    check(block.branch2[1].conv, c3r, c3, 3, 1)
    check(block.branch3[0].conv, cin, c5r, 1, 0)
    check(block.branch3[1].conv, c5r, c5, 5, 2)
    pool = block.branch4[0]
    assert isinstance(pool, nn.MaxPool2d)
    assert _pair(pool.kernel_size) == (3, 3)
    assert _pair(pool.stride) == (1, 1)
    assert _pair(pool.padding) == (1, 1)
    check(block.branch4[1].conv, cin, pp, 1, 0)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def test_stage_maxpools_paper(model):
    for name in ("maxpool1", "maxpool2", "maxpool3", "maxpool4"):
        pool = getattr(model, name)
        assert isinstance(pool, nn.MaxPool2d), name
        assert _pair(pool.kernel_size) == (3, 3), name
        assert _pair(pool.stride) == (2, 2), name
        assert pool.ceil_mode is True, name


def test_stem_layers(model):
    c1 = model.conv1.conv
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.stride, c1.padding) == \
        (3, 64, (7, 7), (2, 2), (3, 3))
    c2 = model.conv2.conv
    assert (c2.in_channels, c2.out_channels, c2.kernel_size) == (64, 64, (1, 1))
    c3 = model.conv3.conv
    assert (c3.in_channels, c3.out_channels, c3.kernel_size, c3.padding) == \
        (64, 192, (3, 3), (1, 1))
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert (model.fc.in_features, model.fc.out_features) == (1024, NUM_CLASSES)


def test_paper_basicconv_has_no_bn(model):
    for n, m in model.named_modules():
        if isinstance(m, BasicConv2d):
            assert not hasattr(m, "bn"), n
            assert m.conv.bias is not None, n
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Inception block behaviour
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [
    PAPER_TABLE["inception3a"][:7],
    PAPER_TABLE["inception4e"][:7],
    (10, 3, 4, 5, 2, 6, 7),
])
def test_inception_block_output_channels(channels):
    cin, c1, _, c3, _, c5, pp = channels
    torch.manual_seed(0)
    block = Inception(*channels).eval()
    with torch.inference_mode():
        out = block(torch.randn(N, cin, 9, 11))
    assert out.shape == (N, c1 + c3 + c5 + pp, 9, 11)


def test_inception_concatenates_branches_in_order():
    torch.manual_seed(0)
    block = Inception(10, 3, 4, 5, 2, 6, 7).eval()
    inp = torch.randn(N, 10, 8, 8)
    with torch.inference_mode():
        out = block(inp)
        parts = [block.branch1(inp), block.branch2(inp), block.branch3(inp), block.branch4(inp)]
    assert [p.shape[1] for p in parts] == [3, 5, 6, 7]
    assert torch.allclose(out, torch.cat(parts, 1))


# ---------------------------------------------------------------------------------------------
# weight initialisation
# ---------------------------------------------------------------------------------------------
BIG_CONV = "inception5b.branch2.1.conv"  # 384 x 192 x 3 x 3


def test_init_weights_kaiming_fan_out(model):
    modules = dict(model.named_modules())
    w = modules[BIG_CONV].weight.detach()
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    expected = math.sqrt(2.0 / fan_out)
    assert abs(w.std().item() / expected - 1) < 0.03
    assert abs(w.mean().item()) < 0.05 * expected
    # fan_in would be sqrt(2/1728) ~ 0.034: clearly different from sqrt(2/3456) ~ 0.024
    assert abs(w.std().item() - math.sqrt(2.0 / (w.shape[1] * 9))) > 0.005
    # every sizeable conv follows the same rule
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 50_000:
            fo = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert abs(m.weight.std().item() / math.sqrt(2.0 / fo) - 1) < 0.05, n


def test_init_weights_biases_zero(model):
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) > 50
    for n, p in biases:
        assert torch.count_nonzero(p).item() == 0, n


def test_init_weights_linear_std(model):
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert {n for n, _ in linears} == {"fc", "aux1.fc1", "aux1.fc2", "aux2.fc1", "aux2.fc2"}
    for n, m in linears:
        w = m.weight.detach()
        assert abs(w.std().item() / 0.01 - 1) < 0.06, n
        assert abs(w.mean().item()) < 0.002, n


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
def test_invalid_variant_raises():
    with pytest.raises(ValueError):
        GoogLeNet(num_classes=NUM_CLASSES, variant="resnet")
    with pytest.raises(ValueError):
        GoogLeNet(num_classes=NUM_CLASSES, variant="Torchvision")


def test_torchvision_variant_structure(tv_variant):
    basics = [(n, m) for n, m in tv_variant.named_modules() if isinstance(m, BasicConv2d)]
    assert len(basics) == 3 + 6 * 9 + 2
    for n, m in basics:
        assert isinstance(getattr(m, "bn", None), nn.BatchNorm2d), n
        assert m.bn.eps == pytest.approx(0.001), n
        assert m.bn.num_features == m.conv.out_channels, n
        assert m.conv.bias is None, n
    for name in INCEPTIONS:
        block = getattr(tv_variant, name)
        conv = block.branch3[1].conv
        assert conv.kernel_size == (3, 3), name
        assert conv.padding == (1, 1), name
        assert block.branch2[1].conv.kernel_size == (3, 3), name
    assert _pair(tv_variant.maxpool4.kernel_size) == (2, 2)
    assert _pair(tv_variant.maxpool4.stride) == (2, 2)
    assert tv_variant.maxpool4.ceil_mode is True
    for name in ("maxpool1", "maxpool2", "maxpool3"):
        assert _pair(getattr(tv_variant, name).kernel_size) == (3, 3), name


def test_torchvision_variant_stage_shapes(tv_variant, x):
    with Recorder(tv_variant, list(STAGE_SHAPES)) as rec, torch.inference_mode():
        out = tv_variant(x)
    for name, shape in STAGE_SHAPES.items():
        assert tuple(rec.outputs[name].shape) == (N, *shape), name
    assert out.shape == (N, NUM_CLASSES)


def test_torchvision_variant_state_dict_matches_torchvision(tv_variant, tv_reference):
    ours = tv_variant.state_dict()
    theirs = tv_reference.state_dict()
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs))[:10],
                                      sorted(set(theirs) - set(ours))[:10])
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k


def test_torchvision_variant_logits_match_torchvision(tv_variant, tv_reference):
    tv_ref = copy.deepcopy(tv_reference)
    # Make the weights and BN statistics non-trivial, so a mismatch in wiring would show.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in tv_ref.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(c, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    ours = copy.deepcopy(tv_variant)
    result = ours.load_state_dict(tv_ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours.eval()
    tv_ref.eval()
    inp = torch.randn(N, 3, 224, 224, generator=g)
    with torch.inference_mode():
        expected = tv_ref(inp)
        got = ours(inp)
    assert isinstance(got, torch.Tensor) and got.shape == (N, NUM_CLASSES)
    assert expected.abs().max().item() > 1e-2  # the comparison is not trivially of zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_torchvision_variant_training_returns_three_outputs(tv_variant):
    m = copy.deepcopy(tv_variant)
    out = run_train(m, torch.randn(2, 3, 96, 96))
    assert isinstance(out, tuple) and len(out) == 3
    assert all(o.shape == (2, NUM_CLASSES) for o in out)


# ---------------------------------------------------------------------------------------------
# python model.py: the layer summary
# ---------------------------------------------------------------------------------------------
def summary_lines(capsys, *args):
    assert model_py.main(list(args)) == 0
    stdout = capsys.readouterr().out
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "N":
            rows[parts[0]] = (line[13:37].strip(), int(parts[-2].replace(",", "")), float(parts[-1]))
    return rows, stdout.strip().splitlines()[-1]


def test_summary_prints_every_stage_and_the_tested_totals(capsys):
    rows, total = summary_lines(capsys)
    assert list(rows) == list(model_py.STAGES)  # conv1 ... fc with aux1 after 4a and aux2 after 4d
    model = GoogLeNet(num_classes=5)
    for name in ("conv1", "conv3", "inception4e", "aux1", "aux2", "fc"):
        assert rows[name][1] == sum(p.numel() for p in getattr(model, name).parameters()), name
    assert rows["conv1"][0] == "N x 64 x 112 x 112"
    assert rows["inception3b"][0] == "N x 480 x 28 x 28"
    assert rows["inception5b"][0] == "N x 1024 x 7 x 7"
    assert rows["aux1"][0] == rows["aux2"][0] == rows["fc"][0] == "N x 5"
    assert sum(r[1] for r in rows.values()) == 10_318_655
    assert "10,318,655 parameters (5,978,677 without the aux heads)" in total
    assert "3.16 GFLOPs per image for inference, 9.29 per image for a training step" in total  # as README states
    # 2 FLOPs per multiply-add: conv3 is 56 x 56 positions x 192 outputs x (64 x 3 x 3) inputs, plus nothing else
    assert rows["conv3"][2] == pytest.approx(2 * 56 * 56 * 192 * 64 * 9 / 1e9, abs=1e-3)


def test_summary_without_aux_heads_and_at_other_sizes(capsys):
    rows, total = summary_lines(capsys, "--no-aux", "--image-size", "96", "--num-classes", "3", "--variant",
                                "torchvision")
    assert "aux1" not in rows and "aux2" not in rows and rows["fc"][0] == "N x 3"
    assert rows["inception5b"][0] == "N x 1024 x 3 x 3"
    model = GoogLeNet(num_classes=3, aux_logits=False, variant="torchvision")
    assert total.startswith(f"total: {sum(p.numel() for p in model.parameters()):,} parameters;")


def test_summary_refuses_sizes_it_cannot_run(capsys):
    for argv, words in ((["--image-size", "16"], "--image-size must be at least 32"),
                        (["--num-classes", "0"], "--num-classes must be at least 1")):
        with pytest.raises(SystemExit) as stop:
            model_py.main(argv)
        assert stop.value.code == 2 and words in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the aux heads at any image size, and TTA's mirror
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "torchvision"])
@pytest.mark.parametrize("size", [64, 160])
def test_aux_heads_work_at_other_image_sizes(variant, size):
    model = GoogLeNet(num_classes=5, variant=variant).train()
    logits, aux2, aux1 = model(torch.randn(2, 3, size, size))
    assert logits.shape == aux2.shape == aux1.shape == (2, 5)
    logits.sum().add(aux1.sum()).add(aux2.sum()).backward()
    assert model.aux1.fc1.weight.grad.abs().sum() > 0


def test_paper_aux_head_at_224_is_exactly_the_5x5_stride_3_pool():
    torch.manual_seed(0)
    head = GoogLeNet(num_classes=5).aux1.eval()
    features = torch.randn(2, 512, 14, 14)
    x = torch.nn.functional.avg_pool2d(features, kernel_size=5, stride=3)
    expected = head.fc2(head.relu(head.fc1(torch.flatten(head.conv(x), 1))))
    assert torch.equal(head(features), expected)
    other = torch.randn(2, 512, 10, 10)  # 160 px: adaptive windows give the same 4 x 4 grid
    x = torch.nn.functional.adaptive_avg_pool2d(other, 4)
    assert torch.equal(head(other), head.fc2(head.relu(head.fc1(torch.flatten(head.conv(x), 1)))))


def test_tta_averages_the_image_and_its_mirror(model_noaux):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        both = logits_with_mirror(model_noaux, x)
        torch.testing.assert_close(both, (model_noaux(x) + model_noaux(x.flip(3))) / 2)
        symmetric = (x + x.flip(3)) / 2  # its mirror is itself: TTA changes nothing
        torch.testing.assert_close(logits_with_mirror(model_noaux, symmetric), model_noaux(symmetric), rtol=1e-4,
                                   atol=1e-5)
        assert not torch.allclose(both, model_noaux(x), atol=1e-6)
