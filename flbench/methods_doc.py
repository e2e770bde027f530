"""`python -m flbench.methods_doc`: docs/methods.md, the method table, computed from the code.

    python -m flbench.methods_doc                      # writes docs/methods.md
    python -m flbench.methods_doc --out - --classes 10  # print it, at another number of classes

Every registered method is built with its `conf/algorithm/<name>.yaml` defaults on a randomly initialised open_clip
ViT-B/16 (text width 512, embedding 512; no weights are needed to count parameters) and the 64 class names of the
synthetic `shapes` family. What is trained, shared and kept local is read from the built module (`named_parameters`,
`shared_state`, `local_state`), the counts and bytes from the tensors themselves, the paper and the extra loss from
the method class (`paper`, `extra_loss`), the notes from each method module's docstring, and the "Fidelity" section
from each class's `fidelity` text and the presets in `conf/algorithm/` — so a new method file appears here by
rerunning the command, and the table cannot drift from the code.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from flbench.algorithms.base import PromptMethod, available_methods, method_class
from flbench.backbones.clip import FrozenCLIP

log = logging.getLogger("flbench.methods_doc")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def algorithm_defaults(name: str) -> dict[str, Any]:
    """The resolved `algorithm` group of the default config with algorithm=`name` (interpolations resolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from flbench.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="methods_doc"):
        cfg = compose(config_name="config", overrides=[f"algorithm={name}"])
    algorithm = dict(OmegaConf.to_container(cfg.algorithm, resolve=True))
    algorithm.pop("name", None)
    return algorithm


def vit_b16() -> FrozenCLIP:
    import open_clip

    torch.manual_seed(0)
    return FrozenCLIP(open_clip.create_model("ViT-B-16", pretrained=None), "ViT-B-16")


def groups(names: Iterable[str]) -> str:
    """Parameter names grouped by their top-level module: `meta_net.linear1.weight` → `meta_net`."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.split(".")[0], None)
    return ", ".join(f"`{g}`" for g in seen) or "—"


def paper_of(cls: type[PromptMethod]) -> str:
    if cls.paper:
        return cls.paper
    doc = inspect.getmodule(cls).__doc__ or ""
    return doc.strip().split("\n")[0].split(":")[0] or cls.name


def describe(name: str, backbone: FrozenCLIP, classnames: Sequence[str]) -> dict[str, Any]:
    """One table row: what `name` trains, shares and keeps, and its sizes, at the given backbone and classes."""
    cls = method_class(name)
    row: dict[str, Any] = {"name": name, "paper": paper_of(cls),
                           "extra_loss": cls.extra_loss or "(not declared; see the notes)"}
    try:
        torch.manual_seed(0)
        method = cls(backbone, classnames, ["a photo of a {}."], **algorithm_defaults(name))
    except Exception as exc:  # a method that cannot be built here says why, in its row
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    shared = method.shared_state()
    local = method.local_state()
    local_params = [n for n in local if n in set(trainable)]
    shared_bytes = method.shared_bytes()
    return {**row, "trained": groups(trainable), "shared": groups(shared), "local": groups(local_params),
            "trainable_params": method.num_trainable(), "shared_params": sum(v.numel() for v in shared.values()),
            "bytes_per_round": 2 * shared_bytes}


def cell(text: Any) -> str:
    """Markdown table cell: a literal | (as in |cos|) would end the cell."""
    return str(text).replace("|", "\\|")


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| method | paper | trained | shared | kept local | extra loss | trainable params | shared params "
            "| bytes / client / round (up + down) |\n|---|---|---|---|---|---|--:|--:|--:|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['name']}` | {cell(r['paper'])} | not built at ViT-B/16: {cell(r['error'])} "
                         "| | | | | | |")
            continue
        lines.append(f"| `{r['name']}` | {cell(r['paper'])} | {r['trained']} | {r['shared']} | {r['local']} "
                     f"| {cell(r['extra_loss'])} | {r['trainable_params']:,} | {r['shared_params']:,} "
                     f"| {r['bytes_per_round']:,} |")
    return head + "\n".join(lines) + "\n"


def notes(names: Sequence[str]) -> str:
    """Each method module's docstring: the method in brief and the choices made where the paper leaves room."""
    parts = []
    for name in names:
        doc = inspect.cleandoc(importlib.import_module(method_class(name).__module__).__doc__ or "")
        parts.append(f"### `{name}`\n\n{doc}\n")
    return "\n".join(parts)


def presets_of(name: str, conf_dir: Path | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Named presets of method `name`: `conf/algorithm/<preset>.yaml` files whose defaults list starts from
    `<name>`, with the keys each one sets (e.g. `kgcoop_flip`: FLIP's setting)."""
    import yaml

    from flbench.cli import CONF_DIR

    found = []
    for path in sorted(Path(conf_dir or CONF_DIR, "algorithm").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        defaults = data.pop("defaults", None) or []
        if defaults and defaults[0] == name:
            found.append((path.stem, data))
    return found


def fidelity(names: Sequence[str]) -> str:
    """Each method's `fidelity` text (the reference read, what is implemented, the deliberate deviations) and the
    presets its config group offers."""
    parts = []
    for name in names:
        text = inspect.cleandoc(method_class(name).fidelity) or "(not declared)"
        presets = presets_of(name)
        if presets:
            listed = "; ".join(f"`algorithm={preset}` sets " + ", ".join(f"`{k}={_yaml_value(v)}`"
                                                                       for k, v in keys.items())
                               for preset, keys in presets)
            text += f"\n\nPresets: {listed}. The default (`algorithm={name}`) is the authors' setting."
        parts.append(f"### `{name}`\n\n{text}\n")
    return "\n".join(parts)


def _yaml_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def render(rows: Sequence[dict[str, Any]], num_classes: int) -> str:
    names = [r["name"] for r in rows]
    return (
        "# Methods\n\n"
        "<!-- Generated by `python -m flbench.methods_doc`; edit the method modules, not this file. -->\n\n"
        "Every prompt-learning method in flbench, built with its `conf/algorithm/<name>.yaml` defaults on a randomly "
        f"initialised open_clip ViT-B/16 (text width 512, embedding 512) for {num_classes} classes. *Trained*, "
        "*shared* and *kept local* list parameter groups as the code declares them (`shared_state()` goes to the "
        "server; `local_state()` stays in the client's Flower `Context.state`). Bytes are fp32 tensors as sent: "
        "each participating client uploads the shared parameters and downloads the aggregate every round. Counts "
        "are at the benchmark's default prompt length (4 context tokens, initialised from \"a photo of a\" where "
        "the method has word initialisation); the papers often use 16 at CLIP's 77-token context, which the tiny "
        "CLIP's 16-token context cannot hold. Method-specific hyper-parameters default to the papers' values "
        "(see the notes below for where we had to choose).\n\n"
        + table(rows)
        + "\n## Notes per method\n\nFrom each method module's docstring.\n\n"
        + notes(names)
        + "\n## Fidelity\n\nFor each method: the reference read (paper, repository, files), what flbench implements, "
        "every remaining deliberate deviation with its reason, and the preset that reproduces FLIP's setting where it "
        "differs from the authors' (each method's `fidelity` text; the parity tests that check it are "
        "`tests/test_fidelity_*.py`). Defaults follow the authors' released code; a preset is a file "
        "`conf/algorithm/<name>_flip.yaml` whose defaults list starts from `<name>`, selected with "
        "`algorithm=<name>_flip` (its `name:` stays the method's, and command-line overrides still win).\n\n"
        + fidelity(names)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flbench.methods_doc", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output file, or - for stdout (default: docs/methods.md)")
    p.add_argument("--classes", type=int, default=64, help="number of class names (default: the 64 shapes classes)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from flbench.datasets.synthetic import FAMILIES

    names = FAMILIES["shapes"].classnames
    classnames = (names * (args.classes // len(names) + 1))[:args.classes]
    backbone = vit_b16()
    rows = []
    for name in available_methods():
        log.info("building %s", name)
        rows.append(describe(name, backbone, classnames))
    text = render(rows, args.classes)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        from flbench.io import atomic_write

        atomic_write(Path(args.out), lambda f: f.write(text.encode()))
        log.info("wrote %s (%d methods)", args.out, len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
