"""The report's statistics: corpus BLEU from sufficient statistics equals sacrebleu, the paired bootstrap separates
what differs and not what does not, Holm's correction matches its textbook values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tunelab import stats

HYPOTHESES = ["the cat sat on the mat", "a dog", "", "one two three four five six", "x y", "the the the", "a b c d e"]
REFERENCES = ["the cat sat on a mat", "a big dog barked", "nothing", "one two three four five six", "y x", "the",
              "a c e b d"]  # the last: no 2-, 3- or 4-gram matches


def _record_stats(hypotheses, references):
    import sacrebleu

    return np.asarray(sacrebleu.BLEU()._extract_corpus_statistics(hypotheses, [references]), dtype=float)


@pytest.mark.parametrize("subset", [range(7), [0, 0, 3], [1, 2, 4], [2], [4, 5, 5], [1, 4], [6]])
def test_corpus_bleu_from_statistics_is_sacrebleu(subset):
    import sacrebleu

    hypotheses, references = [HYPOTHESES[i] for i in subset], [REFERENCES[i] for i in subset]
    expected = sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert stats.corpus_bleu(_record_stats(hypotheses, references)[None])[0] == pytest.approx(expected, abs=1e-9)


def test_interval_is_the_percentile_bootstrap_of_the_mean():
    values = np.arange(100.0)
    low, high = stats.interval(values)
    means = values[stats.resample_indices(100)].mean(axis=1)
    assert [low, high] == [np.percentile(means, 2.5), np.percentile(means, 97.5)]
    assert 40 < low < 49.5 < high < 59


def test_paired_bootstrap_separates_a_real_difference_only():
    rng = np.random.default_rng(3)
    base = rng.normal(50, 20, size=200)
    better = base + rng.normal(8, 5, size=200)   # paired: the same records, each a bit better
    noise = base + rng.normal(0, 5, size=200)    # the same system up to record-level noise
    assert stats.paired_bootstrap(better, base) < 0.01
    assert stats.paired_bootstrap(base, better) < 0.01
    assert stats.paired_bootstrap(noise, base) > 0.05
    assert stats.paired_bootstrap(base, base) == 1.0
    with pytest.raises(ValueError, match="same records"):
        stats.paired_bootstrap(base, base[:-1])


def test_paired_bootstrap_of_corpus_bleu():
    good = _record_stats(REFERENCES * 10, REFERENCES * 10)
    bad = _record_stats(HYPOTHESES * 10, REFERENCES * 10)
    assert stats.paired_bootstrap(good, bad, stats.corpus_bleu) < 0.01


def test_holm_adjusts_step_down_and_monotone():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert stats.holm({"a": 0.6, "b": 0.9}) == {"a": 1.0, "b": 1.0}


def test_best_or_tied():
    rng = np.random.default_rng(0)
    base = rng.binomial(1, 0.3, size=300) * 100.0
    best = np.maximum(base, rng.binomial(1, 0.6, size=300) * 100.0)
    twin = np.where(rng.random(300) < 0.05, 100 - base, base)  # base with 5 % of records flipped
    tied, adjusted = stats.best_or_tied({"base": base, "best": best, "twin": twin})
    assert tied == ["best"] and max(adjusted.values()) < 0.05
    tied, adjusted = stats.best_or_tied({"base": base, "twin": twin})
    assert sorted(tied) == ["base", "twin"] and list(adjusted.values())[0] >= 0.05


def test_stats_needs_numpy_only():
    code = ("import sys; import tunelab.stats; heavy = {'torch', 'sacrebleu', 'scipy', 'transformers'} & "
            "set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
