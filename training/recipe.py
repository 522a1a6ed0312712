"""The default recipe's training pieces: the loss (main + aux heads share it), the optimizer and
the exponential moving average of the weights."""
import torch
from torch import nn

from training import data


class ClassWeightedLoss(nn.CrossEntropyLoss):
    """Cross-entropy with label smoothing and optional class weights, averaged over the images.
    PyTorch's weighted mean divides by the batch's sum of weights instead, which undoes the weights
    in every batch of one class: with 4 images a batch and a 10:1 imbalance, most batches.

    logit_norm > 0 (--logit-norm TAU) is LogitNorm (Wei et al., "Mitigating Neural Network
    Overconfidence with Logit Normalization", 2022): the loss sees each image's logits scaled to the
    norm 1 / TAU, so training cannot lower it by growing the logits, which is what makes a plain
    network as sure of anything as of its classes. Every head's loss goes through here, the aux
    heads' too; the network's own logits (what predict.py sees) stay as they are."""

    def __init__(self, weight=None, label_smoothing=0.0, logit_norm=0.0):
        super().__init__(weight=weight, label_smoothing=label_smoothing,
                         reduction="mean" if weight is None else "sum")
        self.logit_norm = logit_norm

    def forward(self, logits, targets):
        if self.logit_norm:
            logits = normalized_logits(logits, self.logit_norm)
        loss = super().forward(logits, targets)
        return loss if self.weight is None else loss / len(logits)


def normalized_logits(logits, tau):
    """LogitNorm's logits: each row divided by its L2 norm (+ 1e-7, as the paper's code) and by tau."""
    return logits / (logits.norm(p=2, dim=1, keepdim=True) + 1e-7) / tau


def class_weights(args, train_loader, device):
    """--class-weights balanced: images / (classes x the class's images) per class, None otherwise."""
    if args.class_weights == "none" or train_loader is None:
        return None
    return data.inverse_frequency(train_loader.dataset.targets).to(device)


def build_optimizer(args, params):
    # fused: the whole update of every parameter in one kernel (CPU, CUDA and MPS); on this
    # project's 2-core CPU an Adam step takes 8 ms instead of 33 ms with foreach=True
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, fused=True)
    opt_class = torch.optim.AdamW if args.opt == "adamw" else torch.optim.Adam
    return opt_class(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)


def build_ema(args, model):
    """The weights' exponential moving average, held by torch.optim.swa_utils' AveragedModel (its
    state dict is what last.pth keeps) and updated by update_ema; None without --model-ema."""
    if not args.model_ema:
        return None
    # device: AveragedModel creates its n_averaged counter on the CPU otherwise, and NCCL, which
    # serves CUDA tensors only, then fails to broadcast it when the ranks are compared
    return torch.optim.swa_utils.AveragedModel(model, device=next(model.parameters()).device, use_buffers=True)


@torch.no_grad()
def update_ema(ema, model, max_decay):
    """One EMA update with a decay that grows as (1 + n) / (10 + n) after n updates up to max_decay,
    as TensorFlow's ExponentialMovingAverage does with num_updates: a fixed 0.999 would still hold
    60% of the random initial weights after 500 steps (6 epochs of the flower photos). The first
    update copies the weights, as AveragedModel.update_parameters does.

    Not update_parameters itself: it reads its counter on the host twice a step (n_averaged == 0,
    n_averaged > 0), and on a GPU each read waits for every queued kernel. Here the decay is worked
    out on the device, from the counter where it lies."""
    n = ema.n_averaged
    decay = torch.where(n == 0, 0.0, ((1 + n) / (10 + n)).clamp(max=max_decay))
    pairs = list(zip([*ema.module.parameters(), *ema.module.buffers()], [*model.parameters(), *model.buffers()]))
    averaged = [a for a, _ in pairs if a.is_floating_point()]
    torch._foreach_mul_(averaged, decay)  # the foreach kernels torch's own EMA uses, one launch for all tensors
    torch._foreach_add_(averaged, torch._foreach_mul([c for a, c in pairs if a.is_floating_point()], 1 - decay))
    for a, c in pairs:
        if not a.is_floating_point():  # BatchNorm's count of batches: the model's, not an average of counts
            a.copy_(c)
    n += 1
