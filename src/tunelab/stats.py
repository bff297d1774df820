"""Statistics of the study's answer, with numpy alone (the report renders without torch or sacrebleu).

Bootstrap intervals over test records, paired bootstrap tests between runs scored on the same records,
Holm's correction, and corpus BLEU recomputed from sacrebleu's per-record sufficient statistics
(so a resample of corpus BLEU costs a sum, not a re-tokenisation).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RESAMPLES = 2000  # p-values down to 1/2001: Holm over 40 comparisons can still reach 0.05
ALPHA = 0.05
Statistic = Callable[[np.ndarray], np.ndarray]  # (resamples, records, ...) -> (resamples,)


def mean(resampled: np.ndarray) -> np.ndarray:
    """The corpus figure of a per-record metric: its mean over records."""
    return resampled.mean(axis=1)


def corpus_bleu(resampled: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0-100) from per-record statistics [sys_len, ref_len, correct 1-4, total 1-4], summed over
    records: sacrebleu's formula with its default `exp` smoothing, for every resample at once."""
    totals = resampled.sum(axis=1).astype(float)
    sys_len, ref_len, correct, total = totals[:, 0], totals[:, 1], totals[:, 2:6], totals[:, 6:10]
    with np.errstate(divide="ignore", invalid="ignore"):
        brevity = np.where(sys_len < ref_len, np.exp(1 - ref_len / np.where(sys_len > 0, sys_len, 1)), 1.0)
        brevity = np.where(sys_len > 0, brevity, 0.0)
        halvings = np.cumsum(correct == 0, axis=1)  # exp smoothing: 1/2, 1/4, ... for each order with no match
        precision = np.where(correct > 0, 100 * correct / total, 100 / (2.0 ** halvings * total))
        log_precision = np.where(total > 0, np.log(precision), -9999999999.0)  # sacrebleu's floored log
    score = brevity * np.exp(log_precision.mean(axis=1))
    return np.where(correct.sum(axis=1) > 0, score, 0.0)


def resample_indices(records: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap resamples of record indices, shape (resamples, records); seeded, so figures repeat."""
    return np.random.default_rng(seed).integers(0, records, size=(resamples, records))


def interval(values: np.ndarray, statistic: Statistic = mean, resamples: int = RESAMPLES) -> list[float]:
    """The 95 % percentile bootstrap interval of `statistic` over records (the first axis of `values`)."""
    values = np.asarray(values, dtype=float)
    figures = statistic(values[resample_indices(len(values), resamples)])
    low, high = np.percentile(figures, [2.5, 97.5])
    return [float(low), float(high)]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, statistic: Statistic = mean, resamples: int = RESAMPLES) -> float:
    """Two-sided p-value that systems a and b, scored on the same records, differ in `statistic`.

    Both are resampled with the same indices; the resampled differences, shifted to mean zero, estimate the
    null distribution (Koehn 2004; Berg-Kirkpatrick et al. 2012), and p counts those at least as far from
    zero as the observed difference, (count + 1) / (resamples + 1).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same records: shapes {a.shape} and {b.shape}")
    observed = float((statistic(a[None]) - statistic(b[None]))[0])
    indices = resample_indices(len(a), resamples, seed=1)
    differences = statistic(a[indices]) - statistic(b[indices])
    extreme = np.abs(differences - differences.mean()) >= abs(observed) - 1e-12
    return float((extreme.sum() + 1) / (resamples + 1))


def paired_interval(a: np.ndarray, b: np.ndarray, statistic: Statistic = mean,
                    resamples: int = RESAMPLES) -> list[float]:
    """The 95 % percentile bootstrap interval of statistic(a) - statistic(b), both resampled with the same
    record indices (those of paired_bootstrap, so the interval and the test agree on the resamples)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    indices = resample_indices(len(a), resamples, seed=1)
    low, high = np.percentile(statistic(a[indices]) - statistic(b[indices]), [2.5, 97.5])
    return [float(low), float(high)]


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, kept monotone, capped at 1)."""
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def best_or_tied(systems: dict[str, np.ndarray], statistic: Statistic = mean,
                 alpha: float = ALPHA) -> tuple[list[str], dict[str, float]]:
    """The run with the highest figure, alone when a paired test separates it from every other run at
    `alpha` (Holm-corrected), else with every run it is not separated from; and the adjusted p-values."""
    figures = {name: float(statistic(np.asarray(values, dtype=float)[None])[0]) for name, values in systems.items()}
    leader = max(figures, key=figures.get)
    adjusted = holm({name: paired_bootstrap(systems[leader], values, statistic)
                     for name, values in systems.items() if name != leader})
    tied = [leader] + sorted((n for n, p in adjusted.items() if p >= alpha), key=figures.get, reverse=True)
    return tied, adjusted
