"""`python -m flbench.report`: table numbers against hand computations from hand-made RunRecords, the rules
(HM of averaged base/novel, zero-shot row, bold best but never a tie, no ± for seed-independent values, std / SE /
95 % CI, mixed/empty folders, unreadable files refused or named), human names, renderers, plots (PDF + PNG) and the
leaderboard in the records' W&B group."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flbench.experiment import config_hash
from flbench.metrics import harmonic_mean
from flbench.report import main as report_main
from flbench.results.plots import OKABE_ITO, client_accuracies, curve_style, plot_clients, plot_rounds, round_curves
from flbench.results.record import result_config, write_record
from flbench.results.render import to_csv, to_html, to_latex, to_markdown
from flbench.results.tables import ReportError, build_table, filter_records, parse_filters
from flbench.results.tables import load_records as load_with_skipped

ROOT = Path(__file__).resolve().parents[1]


def load_records(results_dir):
    return load_with_skipped(results_dir)[0]


def make_record(algorithm: str, seed: int, metrics: dict[str, tuple[float, float]], zeroshot: dict[str, float],
                scenario: str = "base2novel", family: str = "shapes", params: int = 512, wall: float = 10.0,
                history: list[dict] | None = None, **extra) -> dict:
    """A RunRecord shaped like run.py's: metrics maps name → (best_val, last)."""
    config = {"seed": seed, "shots": 8, "num_clients": 4, "num_rounds": 2, "algorithm": {"name": algorithm},
              "protocol": {"name": "fedavg"}, "dataset": {"name": "synthetic", "family": family},
              "scenario": {"name": scenario}, "backbone": {"name": "tiny"}, "partition": {"name": "domain"},
              "results_dir": "ignored", "logger": {"name": "none"}, **extra}
    return {"config": config, "config_hash": config_hash(result_config(config)), "seed": seed,
            "metrics": {m: {"best_val": b, "last": l, "best_val_round": 1} for m, (b, l) in metrics.items()},
            "zeroshot": zeroshot, "costs": {"trainable_params": params, "bytes_per_round": 4 * params * 2 * 4,
                                            "wall_time_s": wall},
            "history": history or [{"round": 0, "test/base": 50.0}, {"round": 1, "test/base": 60.0 + seed}],
            "selection": "val/base", "complete": True, "wandb": {"group": "synthetic_base2novel"}}


ZS = {"base": 50.0, "novel": 40.0, "hm": harmonic_mean(50.0, 40.0)}
# Per-seed (base, novel) chosen so that HM(mean base, mean novel) != mean of per-seed HMs.
COOP = {0: (80.0, 30.0), 1: (70.0, 60.0), 2: (75.0, 42.0)}
KGCOOP = {0: (72.0, 50.0), 1: (74.0, 52.0), 2: (76.0, 54.0)}


def base2novel_records() -> list[dict]:
    records = []
    for name, table in (("coop", COOP), ("kgcoop", KGCOOP)):
        for seed, (base, novel) in table.items():
            records.append(make_record(name, seed, {"base": (base, base - 5), "novel": (novel, novel - 5),
                                                    "hm": (harmonic_mean(base, novel),) * 2}, ZS,
                                       params=512 if name == "coop" else 512, wall=10.0 + seed))
    return records


@pytest.fixture
def results(tmp_path: Path) -> Path:
    for record in base2novel_records():
        write_record(tmp_path / "records" / f"{record['config_hash']}.json", record)
    return tmp_path


def test_table_numbers_equal_a_hand_computation(results):
    table = build_table(load_records(results), rows=["algorithm.name"])
    assert [c.label for c in table.columns][:3] == ["base", "novel", "hm"]
    for name, per_seed in (("coop", COOP), ("kgcoop", KGCOOP)):
        base = np.array([b for b, _ in per_seed.values()])
        novel = np.array([n for _, n in per_seed.values()])
        cell = table.value([name], "base")
        assert cell.mean == pytest.approx(base.mean()) and cell.std == pytest.approx(base.std(ddof=1)) and cell.n == 3
        assert table.value([name], "novel").mean == pytest.approx(novel.mean())
        hm = table.value([name], "hm")
        assert hm.mean == pytest.approx(harmonic_mean(base.mean(), novel.mean())) and hm.std is None
    per_seed_hm = np.mean([harmonic_mean(b, n) for b, n in COOP.values()])
    assert abs(table.value(["coop"], "hm").mean - per_seed_hm) > 0.5, "HM must come from averaged base/novel"
    # the zero-shot row: first, from the records' zeroshot block, counted once per seed
    assert table.rows[0] == ("zero-shot",)
    assert table.value(["zero-shot"], "novel").mean == pytest.approx(40.0)
    assert table.value(["zero-shot"], "trainable params").mean == 0
    assert table.value(["coop"], "wall time (s)").mean == pytest.approx(11.0)
    assert table.value(["coop"], "MB / round").mean == pytest.approx(512 * 4 * 2 * 4 / 1e6)


def test_best_per_column_is_bold_and_last_selection_reads_last(results):
    table = build_table(load_records(results), rows=["algorithm.name"], selection="last")
    assert table.value(["coop"], "base").mean == pytest.approx(np.mean([b for b, _ in COOP.values()]) - 5)
    bold = {(row[0], col.label) for row, line in zip(table.rows, table.cells) for cell, col in zip(line, table.columns)
            if cell.bold}
    # coop base 70 vs kgcoop 69: coop; novel kgcoop 47 vs coop 39: kgcoop; equal costs: nobody
    assert ("coop", "base") in bold and ("kgcoop", "novel") in bold and ("kgcoop", "hm") in bold
    assert ("kgcoop", "base") not in bold and not any(label == "trainable params" for _, label in bold)
    markdown = to_markdown(table)
    assert markdown.startswith("| method | Base | Novel | HM |"), "human column names"
    assert "| CoOp | **70.00 ± 5.00** |" in markdown and "| KgCoOp |" in markdown, markdown


def test_a_tie_is_not_bold_and_seed_independent_values_have_no_plus_minus(tmp_path):
    records = [make_record(name, seed, {"base": (70.0, 70.0), "novel": (40.0 + seed, 40.0)}, ZS)
               for name in ("coop", "kgcoop") for seed in (0, 1)]
    table = build_table(records, rows=["algorithm.name"])
    assert not table.value(["coop"], "base").bold and not table.value(["kgcoop"], "base").bold, "a tie points at nobody"
    markdown = to_markdown(table)
    assert "± 0.00" not in markdown and "| CoOp | 70.00 | 40.50 ± 0.71 |" in markdown, markdown
    assert "| zero-shot | 50.00 | 40.00 |" in markdown  # identical over seeds: no ±
    assert "n = 2 seeds per cell" in table.caption


def test_mixed_folder_names_the_differing_key_and_columns_resolve_it(results):
    extra = make_record("coop", 0, {"base": (10.0, 10.0), "novel": (5.0, 5.0)}, ZS, family="patterns")
    write_record(results / "records" / f"{extra['config_hash']}.json", extra)
    records = load_records(results)
    with pytest.raises(ReportError, match=r"dataset\.family"):
        build_table(records, rows=["algorithm.name"])
    table = build_table(records, rows=["algorithm.name"], columns=["dataset.family"])
    assert table.value(["coop"], "patterns · base").mean == 10.0 and table.value(["kgcoop"], "patterns · base").mean is None
    assert table.value(["coop"], "shapes · base").n == 3
    only = filter_records(records, parse_filters(["dataset.family=patterns"]))
    assert len(only) == 1
    with pytest.raises(ReportError, match="no record matches"):
        filter_records(records, {"dataset.family": "cars"})
    with pytest.raises(ReportError, match="--filter key"):
        filter_records(records, {"datset.family": "cars"})


def test_records_of_one_backbone_from_two_builds_are_refused_naming_both():
    """Two machines' tiny CLIPs from the same config (README: another CPU type builds other weights) must not meet
    in one table; converted towers of one build (attention differs, the build does not) may."""
    records = base2novel_records()
    for record in records:
        record["backbone"] = {"name": "tiny", "weights_sha1": "44e8696e1f82", "build_sha1": "44e8696e1f82"}
    gqa = make_record("coop", 0, {"base": (60.0, 60.0), "novel": (50.0, 50.0)}, ZS,
                      backbone={"name": "tiny", "attention": {"name": "gqa"}})
    gqa["backbone"] = {"name": "tiny", "weights_sha1": "0123456789ab", "build_sha1": "44e8696e1f82"}
    build_table([*records, gqa], rows=["algorithm.name", "backbone.attention.name"])
    records[-1]["backbone"] = {"name": "tiny", "weights_sha1": "fbf83dd9f714", "build_sha1": "fbf83dd9f714"}
    with pytest.raises(ReportError, match="come from 2 builds \\(weights SHA-1 44e8696e1f82, fbf83dd9f714"):
        build_table(records, rows=["algorithm.name"])
    del records[-1]["backbone"]["build_sha1"]  # a record from before builds were stored: not judged
    build_table(records, rows=["algorithm.name"])


def test_empty_or_corrupt_folder_gives_a_clear_message(tmp_path, capsys):
    with pytest.raises(ReportError, match="no records folder"):
        load_records(tmp_path / "nothing")
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "half.json").write_text('{"complete": true, "metrics": {')
    with pytest.raises(ReportError, match="half.json is not JSON"):
        load_records(tmp_path)
    with pytest.raises(ReportError, match="no complete RunRecords"):
        load_with_skipped(tmp_path, skip_unreadable=True)
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flbench.report: error: 1 of 1 record files"), err


def test_an_unreadable_record_is_refused_or_named_never_dropped_silently(results, tmp_path):
    (victim,) = [p for p in sorted((results / "records").glob("*.json"))
                 if json.loads(p.read_text())["config"]["algorithm"]["name"] == "coop"][:1]
    victim.write_text(victim.read_text()[:200])  # cut off: 2 of coop's 3 seeds are left
    command = [sys.executable, "-m", "flbench.report", str(results), "--metrics", "base,novel,hm"]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and victim.name in lines[0] and "--skip-unreadable" in lines[0], lines
    skipped = subprocess.run([*command, "--skip-unreadable"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0, skipped.stderr
    assert victim.name in skipped.stderr and victim.name in skipped.stdout, "skipped files are named, twice"
    assert "| CoOp | " in skipped.stdout and "(n=2)" in skipped.stdout and "(n=3)" in skipped.stdout, skipped.stdout
    index = list(csv.DictReader((results / "records" / "index.csv").open()))
    problems = {row["file"]: row["problem"] for row in index}
    assert len(index) == 6 and problems[victim.name].startswith("not JSON"), problems
    assert {r["method"] for r in index if not r["problem"]} == {"coop", "kgcoop"}


def test_standard_error_and_95_ci_beside_std(results):
    from scipy.stats import t

    base = np.array([b for b, _ in COOP.values()])
    std = base.std(ddof=1)
    for spread, width in (("std", std), ("se", std / math.sqrt(3)), ("ci95", t.ppf(0.975, 2) * std / math.sqrt(3))):
        table = build_table(load_records(results), rows=["algorithm.name"], metrics=["base"], spread=spread)
        assert table.value(["coop"], "base").spread(spread) == pytest.approx(width)
        assert f"75.00 ± {width:.2f}" in to_markdown(table)
    with pytest.raises(ReportError, match="--spread"):
        build_table(load_records(results), spread="iqr")


def test_renderers(results):
    table = build_table(load_records(results), rows=["algorithm.name"], metrics=["base", "hm"])
    latex = to_latex(table)
    assert r"\textbf{" in latex and r"$\pm$" in latex and r"\toprule" in latex and "method & Base & HM" in latex
    rows = list(csv.reader(io.StringIO(to_csv(table))))
    header, coop = rows[0], next(r for r in rows if r[0] == "coop")
    assert float(coop[header.index("base mean")]) == pytest.approx(75.0)
    assert float(coop[header.index("base std")]) == pytest.approx(5.0) and coop[header.index("base n")] == "3"
    assert "<b>" in to_html(table) and "<table>" in to_html(table)


def test_cli_writes_the_table_and_plots(results, tmp_path):
    out = tmp_path / "t.md"
    assert report_main([str(results), "--out", str(out), "--metrics", "base,novel,hm", "--plots",
                        str(tmp_path / "fig"), "--plot-metric", "test/base", "--spread", "ci95"]) == 0
    assert out.read_text().startswith("| method | Base | Novel | HM |")
    assert (tmp_path / "fig" / "rounds.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "rounds.pdf").read_bytes().startswith(b"%PDF"), "vector figure for papers"
    assert not (tmp_path / "fig" / "clients.png").exists(), "no per-client metrics: no per-client plot"
    assert (results / "records" / "index.csv").read_text().startswith("file,name,method,")


def test_plot_styles_are_colour_blind_safe_and_change_line_style_past_eight():
    styles = [curve_style(i) for i in range(12)]
    assert [s["color"] for s in styles[:8]] == list(OKABE_ITO) and styles[8]["color"] == OKABE_ITO[0]
    assert {s["linestyle"] for s in styles[:8]} == {"-"} and styles[8]["linestyle"] != "-"
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 12


def test_round_curves_mean_and_band_over_seeds(results):
    curves = round_curves(load_records(results), ["algorithm.name"], "test/base")
    rounds, mean, std, seeds = curves["CoOp"]
    assert rounds.tolist() == [0, 1] and mean.tolist() == [50.0, 61.0] and std[1] == pytest.approx(1.0)
    assert seeds == 3
    _, _, se, _ = round_curves(load_records(results), ["algorithm.name"], "test/base", spread="se")["CoOp"]
    assert se[1] == pytest.approx(1.0 / math.sqrt(3))
    with pytest.raises(ReportError, match="plot-metric"):
        round_curves(load_records(results), ["algorithm.name"], "test/nothing")


def test_per_client_plot_when_records_have_per_client_metrics(tmp_path):
    history = [{"round": 1, "test/personal/client/1": 70.0, "test/personal/client/0": 60.0}]
    records = [make_record("fedpgp", s, {"personal": (65.0, 65.0)}, {}, scenario="personal", history=history)
               for s in (0, 1)]
    assert client_accuracies(records[0]) == {"test/personal": [60.0, 70.0]}
    assert all(p.stat().st_size > 1000 for p in plot_clients(records, ["algorithm.name"], tmp_path / "c.png"))
    assert [p.suffix for p in plot_rounds(records, ["algorithm.name"], "test/personal/client/0", tmp_path / "r")] \
        == [".pdf", ".png"]


def test_wandb_leaderboard_is_a_table_in_the_offline_run_and_written_locally(results, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    board = tmp_path / "board"
    assert report_main([str(results), "--wandb", "--leaderboard-dir", str(board), "--metrics", "base,novel,hm"]) == 0
    assert "| CoOp |" in (board / "leaderboard.md").read_text() and (board / "leaderboard.html").exists()
    tables = list(results.glob("wandb/offline-run-*/files/media/table/leaderboard_*.table.json"))
    assert len(tables) == 1, list(results.rglob("*"))
    logged = json.loads(tables[0].read_text())
    assert logged["columns"][:3] == ["method", "Base", "Base (std)"]
    coop = next(row for row in logged["data"] if row[0] == "CoOp")
    from wandb_files import read_run

    (run,) = [read_run(folder) for folder in results.glob("wandb/offline-run-*")]
    assert run["group"] == "synthetic_base2novel" and run["job_type"] == "leaderboard", "the sweep's group"
    assert coop[1] == pytest.approx(75.0) and coop[-1] == 3


def test_kv_bytes_percent_from_the_records_attention_costs():
    from flbench.results.cost_columns import kv_percent

    text = {"kind": "dense", "layers": 3, "heads": 4, "head_dim": 32, "seq_len": 16, "kv_fraction": 1.0,
            "kv_bytes_per_token_per_layer": 1024.0, "kv_bytes_per_token_per_layer_realised": 1024.0}
    vision = {"kind": "routed_kv", "layers": 4, "heads": 4, "head_dim": 16, "seq_len": 65, "kv_fraction": 0.5,
              "kv_bytes_per_token_per_layer": 257.0, "kv_bytes_per_token_per_layer_realised": 269.8}
    expected = 100 * (3 * 16 * 1024 + 4 * 65 * 269.8) / (3 * 16 * 1024 + 4 * 65 * 512)
    assert kv_percent({"attention": {"text": text, "vision": vision}}) == pytest.approx(expected)
    assert kv_percent({"attention": {"text": text}}) == pytest.approx(100.0)
    assert kv_percent({"trainable_params": 1}) is None
