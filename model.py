"""GoogLeNet (Inception v1), as in Szegedy et al., "Going Deeper with Convolutions" (2014), Table 1.

Attribute names follow the widely used PyTorch implementation of this network, so its state dicts
load here unchanged (keys such as ``inception4a.branch2.1.conv.weight`` and ``aux1.fc2.bias``).

``variant="torchvision"`` builds the layout of torchvision's ImageNet GoogLeNet weights instead:
BatchNorm after every convolution, a 3x3 kernel in each Inception's third branch, a 2x2 fourth
max-pool and torchvision's pooling and dropout in the aux heads. Those weights expect inputs
normalised with mean 0.5 and std 0.5, the same as ours.

``rotation_head=True`` adds one layer that is not the paper's (train.py --rotation-weight): a Linear
on the pooled features that tells which quarter turn (0, 90, 180 or 270 degrees) an image was given,
an auxiliary task that teaches the features what an upright flower looks like (Hendrycks et al.,
"Using Self-Supervised Learning Can Improve Model Robustness and Uncertainty", 2019). Off by
default: without it the state dict is the classic one.
"""
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("paper", "torchvision")
TURNS = (0, 1, 2, 3)  # the rotation head's classes: quarter turns (torch.rot90's k), 0 to 270 degrees


class BasicConv2d(nn.Module):
    """Conv2d followed by ReLU (and BatchNorm between them in the torchvision variant)."""

    def __init__(self, in_channels, out_channels, batch_norm=False, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=not batch_norm, **kwargs)
        if batch_norm:
            self.bn = nn.BatchNorm2d(out_channels, eps=0.001)  # torchvision's eps
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return self.relu(x)


class Inception(nn.Module):
    """Four parallel branches concatenated on the channel axis."""

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj,
                 batch_norm=False, branch3_kernel=5):
        super().__init__()
        bn = batch_norm
        self.branch1 = BasicConv2d(in_channels, ch1x1, bn, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, bn, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, bn, kernel_size=3, padding=1),  # same H x W out
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, bn, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, bn, kernel_size=branch3_kernel, padding=branch3_kernel // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            BasicConv2d(in_channels, pool_proj, bn, kernel_size=1),
        )

    def forward(self, x):
        branches = (self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x))
        return torch.cat(branches, 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: only used in training, to push gradient into the middle layers."""

    def __init__(self, in_channels, num_classes, batch_norm=False):
        super().__init__()
        # The paper's 5x5/3 pooling; torchvision's weights were trained with adaptive 4x4 windows
        # and dropout 0.7, so their variant keeps those (the same 4 x 4 output at 224 px).
        self.averagePool = nn.AdaptiveAvgPool2d((4, 4)) if batch_norm else nn.AvgPool2d(kernel_size=5, stride=3)
        self.conv = BasicConv2d(in_channels, 128, batch_norm, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(0.7 if batch_norm else 0.5)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        # aux1: N x 512 x 14 x 14, aux2: N x 528 x 14 x 14 (at 224 px; H x W scale with the image)
        if isinstance(self.averagePool, nn.AvgPool2d) and x.shape[-2:] != (14, 14):
            # the paper's 5x5/3 window is sized for 224 px images; at other sizes the same 4 x 4
            # grid of averages, which fc1 expects, comes from adaptive windows
            x = F.adaptive_avg_pool2d(x, (4, 4))
        else:
            x = self.averagePool(x)
        # aux1: N x 512 x 4 x 4, aux2: N x 528 x 4 x 4
        x = self.conv(x)
        # N x 128 x 4 x 4
        x = torch.flatten(x, 1)
        # N x 2048
        x = self.dropout(x)
        x = self.relu(self.fc1(x))
        # N x 1024
        x = self.dropout(x)
        return self.fc2(x)
        # N x num_classes


class GoogLeNet(nn.Module):
    """GoogLeNet; which network each argument gives:

    - ``variant="paper"`` (this class's default): the paper's Table 1, no BatchNorm, a 5x5 kernel in
      each Inception's third branch, a 3x3 fourth max-pool. ``python train.py --variant paper``.
    - ``variant="torchvision"``: torchvision's layout, BatchNorm after every convolution, a 3x3 kernel
      in the third branch, a 2x2 fourth max-pool. What ``python train.py`` trains by default: with
      BatchNorm it trains faster from scratch, and torchvision's ImageNet weights load into it.
    - ``aux_logits=True``: the paper's two auxiliary heads after inception4a and 4d; in training
      ``forward`` returns ``(logits, aux2, aux1)``. False (or eval mode): the logits alone.
    - ``rotation_head=True``: not the paper's; a Linear on the pooled features telling which quarter
      turn an image was given (train.py --rotation-weight), its N x 4 logits last in training.
    - ``init_weights=True``: Kaiming-normal convolutions and normal(0, 0.01) Linears; False keeps PyTorch's
      defaults.
    """

    def __init__(self, num_classes=1000, aux_logits=True, init_weights=False, variant="paper", rotation_head=False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.aux_logits = aux_logits
        self.variant = variant
        bn = variant == "torchvision"
        k3 = 3 if bn else 5
        pool4 = 2 if bn else 3

        def inception(*channels):
            return Inception(*channels, batch_norm=bn, branch3_kernel=k3)

        self.conv1 = BasicConv2d(3, 64, bn, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, bn, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, bn, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(pool4, stride=2, ceil_mode=True)

        self.inception5a = inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception(832, 384, 192, 384, 48, 128, 128)

        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, bn)
            self.aux2 = InceptionAux(528, num_classes, bn)
        else:
            self.aux1 = None
            self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(1024, num_classes)
        # not the paper's: which of 4 quarter turns the image was given, from the pooled features
        self.rotation = nn.Linear(1024, len(TURNS)) if rotation_head else None
        if init_weights:
            self._initialize_weights()

    def forward(self, x):
        features, aux2, aux1 = self.features(x)
        x = self.dropout(features)
        x = self.fc(x)
        # N x num_classes
        if aux1 is None:
            return x
        if self.rotation is not None:  # training with the rotation head: its N x 4 logits come last
            return x, aux2, aux1, self.rotation(features)
        return x, aux2, aux1

    def features(self, x):
        """(the pooled features N x 1024, aux2's logits, aux1's logits); the aux heads' are None in
        eval mode or without them."""
        # N x 3 x 224 x 224
        x = self.conv1(x)
        # N x 64 x 112 x 112
        x = self.maxpool1(x)
        # N x 64 x 56 x 56
        x = self.conv2(x)
        # N x 64 x 56 x 56
        x = self.conv3(x)
        # N x 192 x 56 x 56
        x = self.maxpool2(x)

        # N x 192 x 28 x 28
        x = self.inception3a(x)
        # N x 256 x 28 x 28
        x = self.inception3b(x)
        # N x 480 x 28 x 28
        x = self.maxpool3(x)
        # N x 480 x 14 x 14
        x = self.inception4a(x)
        # N x 512 x 14 x 14
        with_aux = self.training and self.aux_logits  # in eval the aux heads cost nothing
        aux1 = self.aux1(x) if with_aux else None

        x = self.inception4b(x)
        # N x 512 x 14 x 14
        x = self.inception4c(x)
        # N x 512 x 14 x 14
        x = self.inception4d(x)
        # N x 528 x 14 x 14
        aux2 = self.aux2(x) if with_aux else None

        x = self.inception4e(x)
        # N x 832 x 14 x 14
        x = self.maxpool4(x)
        # N x 832 x 7 x 7
        x = self.inception5a(x)
        # N x 832 x 7 x 7
        x = self.inception5b(x)
        # N x 1024 x 7 x 7

        x = self.avgpool(x)
        # N x 1024 x 1 x 1
        return torch.flatten(x, 1), aux2, aux1
        # N x 1024

    def rotation_agreement(self, x):
        """How sure the rotation head is of the turns it is shown (N): each image given each quarter
        turn, the mean over the four of the head's log-probability of the right one. Near 0 for what
        looks like the training photos; lower where the model cannot tell up from down. Square images."""
        turned = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in TURNS])
        features, _, _ = self.features(turned)
        # turns x N x turns, without naming N: an exported graph keeps its batch size free
        log_p = F.log_softmax(self.rotation(features).float(), dim=1).view(len(TURNS), -1, len(TURNS))
        return torch.stack([log_p[k, :, k] for k in TURNS]).mean(dim=0)

    def _initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


# The auxiliary classifiers' state-dict keys: dropped for prediction, trained with --freeze-layers.
AUX_PREFIXES = ("aux1.", "aux2.")
# The layers that depend on the number of classes: replaced, not loaded, when fine-tuning.
HEAD_PREFIXES = ("fc.", "aux1.fc2.", "aux2.fc2.")
# The rotation head's keys (rotation_head=True): absent from the classic layout.
ROTATION_PREFIX = "rotation."


def logits_with_mirror(model, images):
    """Test-time augmentation: the mean of the logits of the images and of their mirror images."""
    return (model(images) + model(images.flip(3))) / 2


STAGES = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
          "inception4a", "aux1", "inception4b", "inception4c", "inception4d", "aux2", "inception4e", "maxpool4",
          "inception5a", "inception5b", "avgpool", "dropout", "fc")


def summary(model, image_size=224):
    """One row per stage for one image: (name, output shape, parameters, forward FLOPs), then the
    totals {"parameters", "inference_flops", "training_flops"} (torch.utils.flop_counter counts a
    multiply-add as 2 FLOPs; training is a forward and backward pass with the aux heads)."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape)
        return hook

    hooks = [getattr(model, name).register_forward_hook(record(name))
             for name in STAGES if getattr(model, name, None) is not None]
    x = torch.zeros(1, 3, image_size, image_size)
    model.train()  # the aux heads run only in training
    with FlopCounterMode(display=False) as forward:
        outputs = model(x)
    with FlopCounterMode(display=False) as backward:
        (sum(o.sum() for o in outputs) if isinstance(outputs, tuple) else outputs.sum()).backward()
    for hook in hooks:
        hook.remove()
    model.zero_grad(set_to_none=True)
    model.eval()
    with FlopCounterMode(display=False) as inference, torch.no_grad():
        model(x)
    per_module = forward.get_flop_counts()
    rows = [(name, shapes[name], sum(p.numel() for p in getattr(model, name).parameters()),
             sum(per_module.get(f"{type(model).__name__}.{name}", {}).values())) for name in STAGES if name in shapes]
    totals = {"parameters": sum(p.numel() for p in model.parameters()),
              "inference_flops": inference.get_total_flops(),
              "training_flops": forward.get_total_flops() + backward.get_total_flops()}
    return rows, totals


def print_summary(model, image_size):
    rows, totals = summary(model, image_size)
    print(f"GoogLeNet, {model.variant} variant, {model.fc.out_features} classes, {image_size} x {image_size} input"
          + ("" if model.aux_logits else ", without aux heads"))
    print(f"{'stage':<12} {'output (N x C x H x W)':<24} {'parameters':>11} {'forward GFLOPs':>15}")
    for name, shape, params, flops in rows:
        print(f"{name:<12} {' x '.join(['N', *map(str, shape[1:])]):<24} {params:>11,} {flops / 1e9:>15.3f}")
    without_aux = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(AUX_PREFIXES))
    print(f"total: {totals['parameters']:,} parameters"
          + (f" ({without_aux:,} without the aux heads)" if model.aux_logits else "")
          + f"; {totals['inference_flops'] / 1e9:.2f} GFLOPs per image "
          f"for inference, {totals['training_flops'] / 1e9:.2f} per image for a training step (forward and "
          "backward); a multiply-add counts as 2 FLOPs")


def get_args_parser():
    import argparse

    p = argparse.ArgumentParser(description="Print GoogLeNet's stages: output shapes, parameters and FLOPs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-classes", type=int, default=5, help="classes of the classifier")
    p.add_argument("--image-size", type=int, default=224, help="input height and width in pixels")
    p.add_argument("--variant", default="paper", choices=VARIANTS, help="the paper's layout or torchvision's")
    p.add_argument("--no-aux", action="store_true", help="without the auxiliary classifiers")
    return p


def main(argv=None):
    """python model.py: every stage's output shape, parameters and FLOPs (torch only)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.num_classes < 1:
        parser.error(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.image_size < 32:  # five stride-2 stages: smaller inputs end before the last pool
        parser.error(f"--image-size must be at least 32 pixels, got {args.image_size}")
    print_summary(GoogLeNet(args.num_classes, aux_logits=not args.no_aux, variant=args.variant), args.image_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
