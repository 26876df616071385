"""Evaluation metrics: BLEU / exact match per language and group, off-target rate, Recall@1, 1 - JSD."""

from __future__ import annotations

import json

import pytest
import sacrebleu
import torch

from potsa_training.evaluation import (
    EvaluationResult,
    Prediction,
    off_target,
    one_minus_jsd,
    recall_at_1,
    score_predictions,
    translation_scores,
    write_results,
)


def test_translation_scores_use_chinese_tokenisation():
    hypotheses, references = ["三月三日星期二", "十四点"], ["三月三日星期二", "十四点三十分"]
    scores = translation_scores(hypotheses, references, "zh")
    expected = sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score
    assert scores["bleu"] == pytest.approx(expected) and 0 < scores["bleu"] < 100
    assert scores["exact_match"] == 0.5 and scores["off_target_rate"] == 0.0 and scores["count"] == 2


def test_off_target_detects_wrong_script():
    assert off_target("three o'clock", "zh") and not off_target("三点 3", "zh") and not off_target("", "zh")
    assert not off_target("three", "en")  # only checked for Chinese targets


def test_scores_per_language_and_group():
    predictions = [
        Prediction("es", "1", "三", "三"),
        Prediction("es", "2", "四", "五"),
        Prediction("de", "1", "三", "三"),
        Prediction("de", "3", "x", None),  # no reference: not scored
    ]
    per_language, groups = score_predictions(predictions, "zh", {"seen": ["es"], "zero_shot": ["de", "ko"]})
    assert per_language["es"]["exact_match"] == 0.5 and per_language["de"]["count"] == 1
    assert groups["seen"]["exact_match"] == 0.5 and groups["zero_shot"]["exact_match"] == 1.0


def test_recall_at_1_and_jsd_on_aligned_and_shuffled_states():
    torch.manual_seed(0)
    content = torch.randn(6, 16)
    sentence_ids = [str(i) for i in range(6)] * 2
    languages = ["es"] * 6 + ["ja"] * 6
    aligned = torch.cat([content, content + 0.01 * torch.randn(6, 16)])
    assert recall_at_1(aligned, sentence_ids, languages) == 1.0
    assert one_minus_jsd(aligned, sentence_ids, languages) > 0.999
    shuffled = torch.cat([content, content[torch.tensor([1, 2, 3, 4, 5, 0])]])
    assert recall_at_1(shuffled, sentence_ids, languages) == 0.0
    assert one_minus_jsd(shuffled, sentence_ids, languages) < one_minus_jsd(aligned, sentence_ids, languages)
    assert recall_at_1(content, sentence_ids[:6], languages[:6]) is None  # one language: nothing to retrieve


def test_results_are_written_as_json_and_markdown(tmp_path):
    prediction = Prediction("es", "1", "三月三日星期二", "三月三日星期二")
    per_language, groups = score_predictions([prediction], "zh", {"seen": ["es"]})
    result = EvaluationResult(per_language, groups, {"recall_at_1": 0.5}, [prediction])
    table = write_results(result, tmp_path, title="tiny")
    assert "| es | 100.00 | 1.000 | 0.000 | 1 |" in table.read_text()
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["alignment"]["recall_at_1"] == 0.5 and payload["predictions"][0]["hypothesis"] == "三月三日星期二"
    assert result.flat_metrics("eval_")["eval_seen_exact_match"] == 1.0
