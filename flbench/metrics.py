"""Named metrics and how rounds are selected: always on validation data, never on test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty split is undefined")
    return float(100.0 * np.mean(np.asarray(predictions) == np.asarray(labels)))


def harmonic_mean(base: float, novel: float) -> float:
    """HM of base and novel accuracy. Across seeds/datasets, call it on the *averaged* base and novel (as CoOp,
    CoCoOp and MaPLe tables do), never average per-seed HMs."""
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def select_round(history: Sequence[Mapping[str, float]], selection_key: str) -> int:
    """Index of the round with the best validation metric (the earliest on ties, so the choice is stable)."""
    scores = [row.get(selection_key, float("-inf")) for row in history]
    if not scores or all(s == float("-inf") for s in scores):
        raise ValueError(f"no round reported the selection metric {selection_key!r}")
    return int(np.argmax(scores))


def summarise(history: Sequence[Mapping[str, float]], reported: Sequence[str], selection_key: str
              ) -> dict[str, dict[str, float | int]]:
    """For each reported metric: its value at the best-by-validation round and at the last round."""
    best = select_round(history, selection_key)
    return {name: {"best_val": history[best][name], "last": history[-1][name],
                   "best_val_round": int(history[best]["round"])}
            for name in reported if name in history[-1]}
