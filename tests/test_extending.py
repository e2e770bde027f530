"""docs/extending.md, executed: its files are written out as the page shows them and run through the front door's
composition — a method from the user's own package and a CoOp-layout dataset described by YAML alone."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from fake_roots import write_image
from flbench.errors import ConfigError
from flbench.registry import Registry
from flbench.run import run
from flbench.validation import validate
from helpers import TEST_PRETRAIN, compose_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def doc_files() -> dict[str, str]:
    """Every fenced block of the page whose first line is `# file: <path>`."""
    files = {}
    for block in re.findall(r"```\w*\n(.*?)```", DOC.read_text(), flags=re.S):
        first, _, body = block.partition("\n")
        if first.startswith("# file: "):
            files[first.removeprefix("# file: ").strip()] = body
    return files


def _birds_root(base: Path) -> Path:
    """A CoOp-layout folder with 3 classes, as the page's dataset YAML describes it."""
    rows = {split: [[f"c{c}/{split}{i}.jpg", c, f"bird_{c}"] for c in range(3) for i in range(n)]
            for split, n in (("train", 4), ("val", 2), ("test", 2))}
    for split in rows.values():
        for rel, label, _ in split:
            write_image(base / "my_birds" / "images" / rel, label)
    (base / "my_birds" / "split_my_birds.json").write_text(json.dumps(rows))
    return base


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    for rel, text in doc_files().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "mypkg" / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mypkg.my_method", None)
    sys.modules.pop("mypkg", None)


def test_the_page_shows_a_method_and_a_dataset():
    assert set(doc_files()) == {"mypkg/my_method.py", "my_conf/algorithm/biased_zeroshot.yaml",
                                "my_conf/dataset/my_birds.yaml"}


def test_the_worked_examples_run_as_written(user_project, tmp_path):
    overrides = [f"hydra.searchpath=[file://{user_project / 'my_conf'}]", "algorithm=biased_zeroshot",
                 "dataset=my_birds", f"dataset.root={_birds_root(tmp_path / 'data')}", "shots=4", "num_clients=2",
                 "num_rounds=1", "partition=iid", "logger.mode=disabled", "checkpoint.every=0",
                 f"+backbone.pretrain={TEST_PRETRAIN}"]
    record = run(compose_config(overrides, results_dir=tmp_path / "results", small=False))
    assert record["config"]["algorithm"] == {"name": "mypkg.my_method:BiasedZeroShot", "scale": 1.0}
    assert record["config"]["dataset"]["title"] == "MyBirds"
    assert record["costs"]["trainable_params"] == 3, "one bias per class, nothing else trained"
    assert "global" in record["metrics"]
    with pytest.raises(ConfigError, match=r"algorithm\.scal is not a known key .*did you mean algorithm\.scale"):
        validate(compose_config([*overrides, "+algorithm.scal=2"], small=False))


def test_a_registry_finds_entry_points_and_paths():
    registry: Registry = Registry("nothing-here", "thing.name")
    registry.register("mine", 1)
    assert registry.get("mine") == 1 and registry.get("json:dumps") is json.dumps
    assert "json:no_such" not in registry and "other" not in registry
    with pytest.raises(ConfigError, match=r"thing.name='other' is unknown; choose one of \['mine'\]"):
        registry.get("other")
