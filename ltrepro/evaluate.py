"""Test-set metrics and plots as pure functions over numpy arrays (docs/methods/README.md#evaluation).

Accuracies and ECE are in percent, as the papers report them; NLL is in nats per image.
Many/medium/few groups come from training counts with the standard thresholds, not from the
H2T/MiSLAS index ranges (docs/methods/h2t.md#differences-from-the-released-code, H5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ltrepro.errors import LtreproError

ECE_BINS = 15


def shot_groups(train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean class masks: many (> 100 training images), medium (20..100 inclusive), few (< 20)."""
    counts = np.asarray(train_counts)
    return {"many": counts > 100, "medium": (counts >= 20) & (counts <= 100), "few": counts < 20}


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy (%) of each class over its test images; NaN for a class with no test images."""
    labels = np.asarray(labels)
    totals = np.bincount(labels, minlength=num_classes).astype(float)
    hits = np.bincount(labels, weights=np.asarray(pred) == labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * hits / totals, np.nan)


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean per-class accuracy (%) over the classes present in ``labels``."""
    accs = per_class_accuracy(pred, labels, num_classes)
    present = accs[~np.isnan(accs)]
    return float(present.mean()) if present.size else float("nan")


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    flat = np.asarray(labels) * num_classes + np.asarray(pred)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, accuracy, mean confidence) on equal-width, right-closed bins (k/B, (k+1)/B].

    Edges are computed as k/B (correctly rounded), so a confidence written as k/B, e.g. 0.6 with
    15 bins, lands exactly on an edge and goes to the lower bin, as in H2T/MiSLAS. Empty bins give NaN.
    """
    confidence = np.asarray(confidence, dtype=float)
    edges = np.arange(bins + 1) / bins
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    hits = np.bincount(index, weights=np.asarray(correct, dtype=float), minlength=bins)
    conf_sums = np.bincount(index, weights=confidence, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, hits / counts, conf_sums / counts


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (%) = sum_b |B_b|/N * |acc_b - conf_b| over max-softmax confidence bins (Guo et al., ICML'17)."""
    counts, acc, conf = calibration_bins(confidence, correct, bins)
    filled = counts > 0
    return float(100.0 * np.sum(counts[filled] / counts.sum() * np.abs(acc[filled] - conf[filled])))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, shifted by the row max so large logits cannot overflow."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def summarize(logits: np.ndarray, labels: np.ndarray, train_counts: np.ndarray) -> dict:
    """All test metrics for one model.

    Group accuracies average over the test images of the group's classes (the LT literature's
    many/medium/few numbers); NaN when the group has no classes or no test images.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    num_classes = len(train_counts)
    if logits.ndim != 2 or logits.shape != (len(labels), num_classes):
        raise LtreproError(
            f"logits have shape {logits.shape}; expected ({len(labels)} images, {num_classes} classes)"
        )
    log_probs = log_softmax(logits)
    pred = log_probs.argmax(axis=1)
    correct = pred == labels
    confidence = np.exp(log_probs.max(axis=1))
    summary = {
        "top1": float(100.0 * correct.mean()),
        "balanced": balanced_accuracy(pred, labels, num_classes),
    }
    for group, mask in shot_groups(train_counts).items():
        in_group = mask[labels]
        summary[group] = float(100.0 * correct[in_group].mean()) if in_group.any() else float("nan")
    summary["ece"] = expected_calibration_error(confidence, correct)
    summary["nll"] = float(-log_probs[np.arange(len(labels)), labels].mean())
    summary["per_class"] = per_class_accuracy(pred, labels, num_classes).tolist()
    summary["confusion"] = confusion_matrix(pred, labels, num_classes).tolist()
    return summary


def plot_per_class(per_class: np.ndarray, train_counts: np.ndarray, path: Path | str) -> Path:
    """Accuracy bars by class index, with the training count (log scale) on a second axis."""
    per_class = np.asarray(per_class, dtype=float)
    classes = np.arange(len(per_class))
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(classes, per_class, width=1.0, color="tab:blue", alpha=0.7)
    ax.set(xlabel="class", ylabel="test accuracy (%)", ylim=(0, 100), xlim=(-0.5, len(classes) - 0.5))
    counts_ax = ax.twinx()
    counts_ax.plot(classes, train_counts, color="tab:red", marker="." if len(classes) <= 100 else None)
    counts_ax.set_yscale("log")
    counts_ax.set_ylabel("training images", color="tab:red")
    return save_figure(fig, path)


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path | str) -> Path:
    """Row-normalised confusion matrix: each row is where that true class's images went."""
    confusion = np.asarray(confusion, dtype=float)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    ax.set(xlabel="predicted class", ylabel="true class")
    if len(class_names) <= 30:  # beyond that the names overlap into noise
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        ax.set_yticks(ticks, class_names, fontsize=7)
    return save_figure(fig, path)


def plot_reliability(
    confidence: np.ndarray, correct: np.ndarray, path: Path | str, bins: int = ECE_BINS
) -> Path:
    """Reliability diagram: per-bin accuracy against the diagonal, with the ECE in the title."""
    _, acc, _ = calibration_bins(confidence, correct, bins)
    edges = np.arange(bins + 1) / bins
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(edges[:-1], np.nan_to_num(acc), width=1 / bins, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"ECE {expected_calibration_error(confidence, correct, bins):.2f}%")
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def save_plots(
    logits: np.ndarray,
    labels: np.ndarray,
    train_counts: np.ndarray,
    class_names: list[str],
    out_dir: Path | str,
) -> list[Path]:
    """Write per_class.png, confusion.png and reliability.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64))
    labels = np.asarray(labels)
    num_classes = len(train_counts)
    pred = log_probs.argmax(axis=1)
    return [
        plot_per_class(
            per_class_accuracy(pred, labels, num_classes), train_counts, out_dir / "per_class.png"
        ),
        plot_confusion(confusion_matrix(pred, labels, num_classes), class_names, out_dir / "confusion.png"),
        plot_reliability(np.exp(log_probs.max(axis=1)), pred == labels, out_dir / "reliability.png"),
    ]


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Save as PNG through a bare Figure: no pyplot, so no global backend or display is touched."""
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path
