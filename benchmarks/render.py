"""The synthetic renderer's speed: milliseconds per image in one process, and the cold run's images end to end.

    python benchmarks/render.py per-image             # both families, all domains, 32 px, one process
    python benchmarks/render.py cold-images           # the default suite + pretraining corpus, 2 workers, empty cache

It uses only APIs that commit dbf0fd0 already had (`render_spec`, `Family.spec`, `load_synthetic`,
`pretraining_corpus`), so the same file times an older checkout beside this one, alternately:

    PYTHONPATH=/path/to/old/checkout python benchmarks/render.py per-image

`cold-images` renders what a cold `python -m flbench` renders (its suite's three splits, then the tiny CLIP's
pretraining corpus) into a fresh temporary `FLBENCH_CACHE`; time it as a whole process (`farm-bench`), since the
workers' start-up belongs to the figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def mixed_specs(per_class: int, sizes: list[int]) -> list:
    """Every family × domain × class at each size, `per_class` seeds each (4 × 96 × per_class specs a size)."""
    from flbench.datasets.synthetic import DOMAINS, FAMILIES

    return [family.spec(label, domain, (99, family.index, d, label, i), size)
            for size in sizes for family in FAMILIES.values() for d, domain in enumerate(DOMAINS)
            for label in range(family.num_classes) for i in range(per_class)]


def per_image(repeats: int, per_class: int, sizes: list[int]) -> None:
    """Median over `repeats` passes of the mean ms per image, one warm-up pass first."""
    from flbench.datasets.render import render_spec

    specs = mixed_specs(per_class, sizes)
    passes = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for spec in specs:
            render_spec(spec)
        passes.append((time.perf_counter() - started) * 1e3 / len(specs))
    timed = passes[1:]
    print(f"{len(specs)} images a pass at {sizes} px, ms per image over {repeats} passes: "
          f"median {statistics.median(timed):.3f} ({', '.join(f'{p:.3f}' for p in timed)})")


def cold_images() -> None:
    """Render the default experiment's suite and the pretraining corpus into an empty cache, as a cold run does."""
    with tempfile.TemporaryDirectory(prefix="flbench-render-") as cache:
        os.environ["FLBENCH_CACHE"] = cache
        from flbench.backbones.pretrain import DEFAULT_PRETRAIN
        from flbench.datasets.synthetic import load_synthetic, pretraining_corpus

        started = time.perf_counter()
        load_synthetic()
        images, _ = pretraining_corpus(DEFAULT_PRETRAIN["corpus"], suite_seed=DEFAULT_PRETRAIN["corpus_seed"])
        print(f"rendered the suite and {len(images)} pretraining images in {time.perf_counter() - started:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=["per-image", "cold-images"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=6, help="per-image: seeds per family/domain/class/size")
    parser.add_argument("--sizes", default=[32], type=lambda s: [int(v) for v in s.split(",")],
                        help="per-image: image sizes in px, e.g. 32,64 (the default experiment renders 32)")
    args = parser.parse_args()
    if args.bench == "per-image":
        per_image(args.repeats, args.per_class, args.sizes)
    else:
        cold_images()


if __name__ == "__main__":
    main()
