"""Accuracy and calibration of a stream of predictions: top-1, ECE, reliability bins."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins over [0, 1]: sample count, mean confidence and accuracy."""

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def reliability_bins(
    confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> ReliabilityBins:
    """Bin i holds the samples with confidence in (edges[i], edges[i+1]] (bin 0 also takes 0).

    Empty bins have NaN confidence and accuracy.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, confidences, minlength=bins) / counts
        accuracy = np.bincount(which, correct, minlength=bins) / counts
    return ReliabilityBins(edges, counts, confidence, accuracy)


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE = sum over bins of (n_bin / n) * |accuracy_bin - confidence_bin|."""
    table = reliability_bins(confidences, correct, bins)
    used = table.counts > 0
    if not used.any():
        return float("nan")
    weights = table.counts[used] / table.counts.sum()
    return float(np.sum(weights * np.abs(table.accuracy[used] - table.confidence[used])))


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> dict[int, float]:
    """Top-1 accuracy of every class that has samples, by class index."""
    labels = np.asarray(labels)
    hits = np.asarray(predictions) == labels
    return {int(c): float(hits[labels == c].mean()) for c in np.unique(labels)}
