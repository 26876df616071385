"""Evaluation metrics: BLEU / exact match per language, group, category and category set (the shipped `evaluate`
metric), off-target rate, Recall@1, 1 - JSD, and what results.json / results.md keep."""

from __future__ import annotations

import json
import socket

import datasets
import evaluate
import pytest
import sacrebleu
import torch

from potsa_training.collator import PotsaCollator
from potsa_training.evaluation import (
    METRIC_PATH,
    UNCATEGORIZED,
    EvaluationResult,
    Prediction,
    eval_batches,
    evaluate_model,
    score_predictions,
    write_results,
)
from potsa_training.representation_probes import one_minus_jsd, recall_at_1

from .test_data import _parallel_rows

GROUPS = {"seen": ["es", "ja"], "zero_shot": ["de", "ko"]}


def _predictions() -> list[Prediction]:
    """es: number right, time right, date wrong; ja: number wrong, time right; de: number right, time wrong, date
    wrong; one unlabeled de utterance."""
    return [
        Prediction("es", "1", "二千零二十四", "二千零二十四", "number"),
        Prediction("es", "2", "十四点零五分", "十四点零五分", "time"),
        Prediction("es", "3", "三月三日", "三月三日星期二", "date"),
        Prediction("ja", "1", "二千", "二千零二十四", "number"),
        Prediction("ja", "2", "十四点零五分", "十四点零五分", "time"),
        Prediction("de", "1", "二千零二十四", "二千零二十四", "number"),
        Prediction("de", "2", "fourteen", "十四点零五分", "time"),
        Prediction("de", "3", "三月", "三月三日星期二", "date"),
        Prediction("de", "4", "x", None, "date"),  # no reference: not scored
    ]


@pytest.mark.parametrize(("target_language", "tokenize"), [("zh", "zh"), ("en", "13a"), (None, "char")])
def test_bleu_tokenises_for_the_target(target_language, tokenize):
    hypotheses, references = ["三月三日星期二", "十四点 三十"], ["三月三日星期二", "十四点 三十分"]
    predictions = [Prediction("es", str(k), h, r) for k, (h, r) in enumerate(zip(hypotheses, references))]
    scores = score_predictions(predictions, target_language)["per_language"]["es"]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize).score)
    assert scores["exact_match"] == 0.5 and scores["count"] == 2


def test_off_target_counts_chinese_target_outputs_in_another_script():
    predictions = [Prediction("es", str(k), h, "三点") for k, h in enumerate(["three o'clock", "三点 3", ""])]
    assert score_predictions(predictions, "zh")["per_language"]["es"]["off_target_rate"] == pytest.approx(1 / 3)
    assert score_predictions(predictions, "en")["per_language"]["es"]["off_target_rate"] == 0.0  # zh targets only


def test_scores_per_language_and_group():
    scores = score_predictions(_predictions(), "zh", GROUPS)
    assert scores["per_language"]["es"]["exact_match"] == pytest.approx(2 / 3)
    assert scores["per_language"]["de"]["count"] == 3  # the unlabeled utterance is left out
    assert scores["groups"]["seen"]["exact_match"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # mean over languages
    assert scores["groups"]["zero_shot"]["exact_match"] == pytest.approx(1 / 3)  # ko is not evaluated: ignored
    assert scores["groups"]["zero_shot"]["off_target_rate"] == pytest.approx(1 / 3)
    assert set(score_predictions(_predictions(), "zh")["groups"]) == {"all"}


def test_categories_and_the_default_number_time_set_pool_utterances_per_language():
    scores = score_predictions(_predictions(), "zh", GROUPS)
    assert scores["category_sets"] == {"number+time": ["number", "time"]}  # both categories occur: the default
    es, ja, de = (scores["per_category"][language] for language in ("es", "ja", "de"))
    assert set(es) == set(de) == {"date", "number", "time", "number+time"}
    assert set(ja) == {"number", "time", "number+time"}
    assert es["date"]["exact_match"] == 0.0 and es["number+time"]["exact_match"] == 1.0
    pooled = score_predictions(_predictions()[5:7], "zh")["per_language"]["de"]  # de's number and time utterances
    assert de["number+time"] == pooled  # scored together (one corpus BLEU), not a mean of the two categories
    seen, zero_shot = scores["group_categories"]["seen"], scores["group_categories"]["zero_shot"]
    assert seen["number+time"]["exact_match"] == pytest.approx((1.0 + 0.5) / 2)
    assert seen["date"]["exact_match"] == 0.0  # ja has no date: the mean is over es alone
    assert zero_shot["number+time"]["exact_match"] == 0.5 and zero_shot["date"]["off_target_rate"] == 0.0
    assert "count" not in seen["number"]


def test_named_category_sets_are_checked_and_replace_the_default():
    scores = score_predictions(_predictions(), "zh", GROUPS, {"dates": ["date"]})
    assert scores["category_sets"] == {"dates": ["date"]} and "number+time" not in scores["per_category"]["es"]
    assert "dates" not in scores["per_category"]["ja"]  # ja has no date utterance
    assert score_predictions(_predictions(), "zh", GROUPS, {})["category_sets"] == {}
    with pytest.raises(ValueError, match=r"'digits\+time' names \['digits'\], which no utterance has"):
        score_predictions(_predictions(), "zh", GROUPS, {"digits+time": ["digits", "time"]})
    with pytest.raises(ValueError, match="has the name of a category"):
        score_predictions(_predictions(), "zh", GROUPS, {"time": ["number"]})
    with pytest.raises(ValueError, match="non-empty list"):
        score_predictions(_predictions(), "zh", GROUPS, {"none": []})


def test_data_without_categories_is_one_category_and_gets_no_set():
    predictions = [Prediction(p.language, p.sentence_id, p.hypothesis, p.reference) for p in _predictions()]
    scores = score_predictions(predictions, "zh", GROUPS)
    assert scores["category_sets"] == {} and set(scores["per_category"]["es"]) == {UNCATEGORIZED}
    assert scores["per_category"]["es"][UNCATEGORIZED] == scores["per_language"]["es"]


def test_the_metric_loads_from_its_path_without_network(monkeypatch):
    """`evaluate.load(path)` of the shipped module must not fetch anything: every socket connection fails here."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert METRIC_PATH.parent.parent.name == "training"  # inside the installed training package
    metric = evaluate.load(str(METRIC_PATH), keep_in_memory=True)
    scores = metric.compute(
        predictions=["三点", "四点"], references=["三点", "五点"], languages=["es", "de"], categories=["time", "time"],
        groups={"seen": ["es"]},
    )  # fmt: skip
    assert scores["groups"] == {"seen": {"bleu": 0.0, "exact_match": 1.0, "off_target_rate": 0.0}}
    assert scores["per_category"]["de"]["time"]["exact_match"] == 0.0
    with pytest.raises(ValueError, match="reference string"):
        metric.compute(predictions=["三", "四"], references=["三", None], languages=["es"] * 2, categories=["time"] * 2)


def test_categories_reach_the_predictions_through_eval_batches(tiny):
    model, processor = tiny
    rows = _parallel_rows(2, ("es", "ja"))
    rows = [{**row, "category": category} for row, category in zip(rows, ["number", "number", "time", None])]
    batches = eval_batches(datasets.Dataset.from_list(rows), PotsaCollator(processor), 3)
    result = evaluate_model(model, processor, batches, show_progress=False, language_probe=False, max_new_tokens=1)
    assert [(p.language, p.sentence_id, p.category) for p in result.predictions] == [
        ("es", "s0", "number"), ("ja", "s0", "number"), ("es", "s1", "time"), ("ja", "s1", UNCATEGORIZED),
    ]  # fmt: skip
    assert result.category_sets == {"number+time": ["number", "time"]}  # both categories occur
    assert set(result.per_category["ja"]) == {"number", UNCATEGORIZED, "number+time"}  # ja's set: its number alone
    layers = model.config.num_qformer_layers  # every layer's OT diagnostics, from the states of the whole eval set
    for layer in range(1, layers + 1):
        assert 0 <= result.alignment[f"state_var_layer_{layer}"] <= 1
        assert {f"ot_par_layer_{layer}", f"ot_recall_at_1_layer_{layer}"} <= set(result.alignment)


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
    predictions = _predictions()
    scores = score_predictions(predictions, "zh", GROUPS)
    result = EvaluationResult(alignment={"recall_at_1": 0.5}, predictions=predictions, **scores)
    table = write_results(result, tmp_path, title="tiny").read_text()
    assert f"| es | {result.per_language['es']['bleu']:.2f} | 0.667 | 0.000 | 3 |" in table
    assert "| language | date | number | time | number+time |" in table
    assert "| **zero_shot** (mean) | 0.000 / " in table and "| ja | - | 0.000 / " in table
    payload = json.loads((tmp_path / "results.json").read_text())
    assert {"per_language", "groups", "alignment", "predictions"} <= set(payload)  # what benchmarks read
    assert payload["group_categories"]["zero_shot"]["number+time"]["exact_match"] == 0.5
    assert payload["per_category"]["ja"]["time"]["count"] == 1 and payload["category_sets"] == result.category_sets
    assert payload["predictions"][3] == {
        "language": "ja", "sentence_id": "1", "hypothesis": "二千", "reference": "二千零二十四", "category": "number"
    }  # fmt: skip
    metrics = result.flat_metrics("eval_")
    assert metrics["eval_seen_exact_match"] == pytest.approx(7 / 12)
    assert metrics["eval_zero_shot_number+time_exact_match"] == 0.5 and "eval_es_number_bleu" not in metrics


def test_results_of_uncategorized_data_have_no_category_table(tmp_path):
    prediction = Prediction("es", "1", "三月三日星期二", "三月三日星期二")
    result = EvaluationResult(alignment={}, predictions=[prediction], **score_predictions([prediction], "zh"))
    table = write_results(result, tmp_path).read_text()
    assert "| es | 100.00 | 1.000 | 0.000 | 1 |" in table and "per category" not in table
    expected = {f"{name}_{key}" for name in ("all", "es") for key in result.per_language["es"]} - {"all_count"}
    assert set(result.flat_metrics()) == expected  # no per-category scalars: they would repeat the per-language ones
