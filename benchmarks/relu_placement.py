"""What the paper's ReLU placement costs: model.py applies the ReLU of conv1 and conv3 before their
max-pools, as Table 1 reads; the same function is computed with the ReLU after the pool (max and
ReLU commute), on a quarter of the values. This times the training step (forward with the aux heads,
the loss, backward, the AdamW step; the default recipe's layout) of both, alternating them so that
a busy machine slows both alike, and prints the fastest and the median step times and their ratios
(on a shared machine the fastest steps are the ones that ran alone).

    python benchmarks/relu_placement.py --amp bf16      # a CPU with native bf16
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/relu_placement.py --amp off   # as AVX2
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import cpu_description  # noqa: E402
from model import GoogLeNet  # noqa: E402
from plumbing import device as dev  # noqa: E402
from plumbing import options  # noqa: E402
from training import recipe  # noqa: E402


class PoolThenReLU(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool(x).relu_()


def relu_after_pool(model):
    """The same network with conv1's and conv3's ReLU moved after the max-pool that follows each."""
    for conv, pool in (("conv1", "maxpool1"), ("conv3", "maxpool2")):
        getattr(model, conv).relu = nn.Identity()
        setattr(model, pool, PoolThenReLU(getattr(model, pool)))
    return model


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amp", default="bf16", choices=["off", "bf16"], help="the precision of the step")
    p.add_argument("--image-size", type=options.image_size, default=128, help="training crop in pixels")
    p.add_argument("--batch-size", type=options.positive_int, default=32, help="images per step")
    p.add_argument("--rounds", type=options.positive_int, default=8, help="timed rounds; each times both, in turn")
    p.add_argument("--steps", type=options.positive_int, default=5, help="training steps per model and round")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    cpu = torch.device("cpu")
    dtype = torch.bfloat16 if args.amp == "bf16" else None
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (args.batch_size,))
    steps = {}
    for name, make in (("paper (ReLU before the pool)", lambda m: m), ("ReLU after the pool", relu_after_pool)):
        torch.manual_seed(0)
        model = make(GoogLeNet(5, aux_logits=True, init_weights=True, variant="torchvision"))
        model = model.to(memory_format=torch.channels_last).train()
        adamw = argparse.Namespace(opt="adamw", lr=1e-3, weight_decay=0.05)  # the default recipe's
        optimizer = recipe.build_optimizer(adamw, model.parameters())
        steps[name] = (model, optimizer, [])
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        with dev.autocast(cpu, dtype):
            logits, aux2, aux1 = model(x)
        loss = criterion(logits.float(), y) + 0.3 * (criterion(aux1.float(), y) + criterion(aux2.float(), y))
        loss.backward()
        optimizer.step()

    for model, optimizer, _ in steps.values():  # warm-up: oneDNN picks and caches its kernels
        for _ in range(2):
            step(model, optimizer)
    for _ in range(args.rounds):
        for model, optimizer, times in steps.values():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizer)
            times.append((time.perf_counter() - start) / args.steps)
    print(f"{cpu_description()}; threads {torch.get_num_threads()}; "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(default)')}")
    print(f"training step, batch {args.batch_size}, {args.image_size} px, {args.amp}: {args.rounds} rounds "
          f"of {args.steps} steps each")
    for label, pick in (("fastest", min), ("median", statistics.median)):
        seconds = {name: pick(times) for name, (_, _, times) in steps.items()}
        for name, s in seconds.items():
            print(f"  {label:<8} {name:<30} {s * 1000:8.1f} ms")
        paper, moved = seconds.values()
        print(f"  {label:<8} paper / moved: {paper / moved:.3f} "
              f"(the paper's placement costs {100 * (paper / moved - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
