"""One CoOp training step's text side, alone: a cohort of G clients' class prompts encoded in one shared-prefix call,
forward + backward to the contexts (tiny CLIP, random weights, the default experiment's 64 classes). It uses only
APIs that commit 3d888bc already had, so the same file times such an older checkout beside the new one:

    python benchmarks/text_step.py --groups 1,10                          # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/text_step.py ...   # another one (run them alternately)

Prints, per G, the median milliseconds of a step over `--repeats` blocks of `--steps` steps (a block's mean, so a
scheduling hiccup costs one block, not the figure), with the thread count and the load before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def measure(groups: int, repeats: int, steps: int) -> float:
    """Median over blocks of the mean step time in ms, one block of warm-up first."""
    import open_clip
    import torch

    from flbench.algorithms.base import build_method
    from flbench.backbones import clip, tiny
    from flbench.datasets.synthetic import FAMILIES

    torch.manual_seed(0)
    backbone = clip.FrozenCLIP(open_clip.CLIP(**tiny.TINY_CONFIGS["tiny"]), "tiny")
    coop = build_method("coop", backbone, FAMILIES["shapes"].classnames, ["a photo of a {}."], {})
    contexts = (torch.stack([coop.ctx.detach()] * groups) + torch.randn(groups, 1, 1) / 10).requires_grad_()

    def step() -> None:
        contexts.grad = None
        coop.prompt.encode(contexts.unsqueeze(1)).square().sum().backward()

    blocks = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append(1e3 * (time.perf_counter() - started) / steps)
    return statistics.median(blocks[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="1,10", help="cohort sizes G, comma-separated")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per G")
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    args = parser.parse_args()
    import torch

    print(f"threads {torch.get_num_threads()}, load before {os.getloadavg()[0]:.2f}")
    for groups in (int(g) for g in args.groups.split(",")):
        print(f"G={groups}: {measure(groups, args.repeats, args.steps):.2f} ms/step")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
