"""Is the language bias really additive? The language-ID probe (a metric evaluation reports) and the affine
(mean and scale) compensation: estimate, effect, zero-shot growth, checkpoints, trainability."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch

from modeling_potsa import PotsaForSpeechTranslation
from modeling_potsa.bias_compensation import LanguageBiasCompensation, masked_time_mean
from potsa_training.bias_estimation import (
    LanguageBiasEstimate,
    LanguageBiasEstimator,
    apply_language_bias,
    estimate_language_bias,
)
from potsa_training.collator import PotsaCollator
from potsa_training.evaluation import eval_batches, evaluate_model
from potsa_training.representation_probes import _probe_split, language_id_probe, language_probe_metrics
from potsa_training.tiny import build_tiny_potsa

from .test_data import _parallel_rows

LANGUAGES = ["a", "b", "c"]


def _synthetic(num_sentences: int = 40, dim: int = 16, seed: int = 0):
    """Per utterance (sentence-major, then language): sentence content, language index, noise; ids and labels."""
    generator = torch.Generator().manual_seed(seed)
    content = torch.randn(num_sentences, dim, generator=generator).repeat_interleave(len(LANGUAGES), dim=0)
    language = torch.arange(len(LANGUAGES)).repeat(num_sentences)
    noise = torch.randn(content.shape, generator=generator)
    sentence_ids = [str(s) for s in range(num_sentences) for _ in LANGUAGES]
    return content, language, noise, sentence_ids, [LANGUAGES[k] for k in language.tolist()]


def test_probe_finds_a_language_offset_and_nothing_in_content_alone():
    content, language, noise, sentence_ids, labels = _synthetic()
    offsets = torch.randn(len(LANGUAGES), content.shape[1], generator=torch.Generator().manual_seed(1))
    assert language_id_probe(content + offsets[language] + 0.1 * noise, labels, sentence_ids) > 0.9
    assert language_id_probe(content + 0.1 * noise, labels, sentence_ids) < 0.5  # chance: 1/3


def test_a_linear_probe_cannot_use_a_language_difference_in_spread_alone():
    """Why the probe after mean compensation tests additivity: equal class means leave a linear probe at about
    chance even when the languages differ in spread, which a non-linear read-out could still exploit."""
    _, language, noise, sentence_ids, labels = _synthetic()
    spread = torch.tensor([0.5, 1.0, 2.0])[language].unsqueeze(1)
    assert language_id_probe(noise * spread, labels, sentence_ids) < 0.5
    assert language_id_probe((noise * spread).square(), labels, sentence_ids) > 0.6  # squared: linear again


def test_probe_is_deterministic_and_splits_by_sentence():
    content, language, noise, sentence_ids, labels = _synthetic(num_sentences=10)
    features = content + noise
    assert language_id_probe(features, labels, sentence_ids) == language_id_probe(features, labels, sentence_ids)
    train, test = _probe_split(sentence_ids, 0.5, seed=0)
    assert not {sentence_ids[i] for i in train} & {sentence_ids[i] for i in test}
    assert len(test) == 15 and sorted(train + test) == list(range(30))
    assert language_id_probe(features, ["a"] * 30, sentence_ids) is None  # one language: nothing to identify
    assert language_id_probe(features[:3], labels[:3], sentence_ids[:3]) is None  # one sentence: no held-out part


def test_probe_metrics_name_each_setting_and_report_chance():
    content, language, noise, sentence_ids, labels = _synthetic()
    metrics = language_probe_metrics({"encoder": content + noise, "qformer": noise}, labels, sentence_ids)
    assert set(metrics) == {"lid_probe_encoder", "lid_probe_qformer", "lid_probe_chance"}
    assert metrics["lid_probe_chance"] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def eval_rows():
    return _parallel_rows(4, ("es", "ja"))


def test_evaluation_reports_the_probe_on_encoder_compensated_and_qformer_outputs(tiny, eval_rows):
    model, processor = tiny
    dataset = datasets.Dataset.from_list(eval_rows)

    def alignment(probe: bool, **kwargs) -> dict[str, float]:
        batches = eval_batches(dataset, PotsaCollator(processor), 4)
        result = evaluate_model(model, processor, batches, show_progress=False, language_probe=probe, **kwargs)
        return result.alignment

    metrics = alignment(True, max_new_tokens=1)
    names = {"lid_probe_encoder", "lid_probe_compensated", "lid_probe_qformer", "lid_probe_chance"}
    assert names <= set(metrics) and all(0.0 <= metrics[name] <= 1.0 for name in names)
    assert metrics["lid_probe_chance"] == 0.5  # two languages, every sentence in both
    assert not any(key.startswith("lid_probe") for key in alignment(False, max_new_tokens=1))


# ------------------------------------------------------------------------------------------ affine compensation
def test_estimator_spreads_are_the_per_language_population_std():
    generator = torch.Generator().manual_seed(0)
    pooled = torch.randn(9, 4, generator=generator) * 3 + 1
    language_ids = torch.tensor([0, 1, 0, 0, 1, 2, 1, 0, 1])
    estimator = LanguageBiasEstimator(num_languages=4, hidden_size=4)
    estimator.update(pooled[:4], language_ids[:4])
    estimator.update(pooled[4:], language_ids[4:])
    stds, has_spread = estimator.stds()
    assert has_spread.tolist() == [True, True, False, False]  # language 2 has one utterance, 3 none
    for row in (0, 1):
        expected = pooled[language_ids == row].std(dim=0, unbiased=False)
        torch.testing.assert_close(stds[row], expected, rtol=1e-5, atol=1e-6)


def test_affine_compensation_subtracts_the_mean_then_scales():
    compensation = LanguageBiasCompensation(2, 3, mode="affine")
    with torch.no_grad():
        compensation.bias.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]))
        compensation.scale.copy_(torch.tensor([[2.0, 1.0, 0.5], [1.0, 1.0, 1.0]]))
    frames = torch.ones(2, 5, 3)
    out = compensation(frames, torch.tensor([0, 1]))
    torch.testing.assert_close(out[0], torch.tensor([0.0, -1.0, -1.0]).expand(5, 3))
    torch.testing.assert_close(out[1], torch.tensor([1.0, 1.0, 0.0]).expand(5, 3))
    mean_only = LanguageBiasCompensation(2, 3)
    assert mean_only.mode == "mean" and set(mean_only.state_dict()) == {"bias"}  # the paper's checkpoints
    assert set(compensation.state_dict()) == {"bias", "scale", "reference_std"}
    with pytest.raises(ValueError, match="Unknown bias compensation mode"):
        LanguageBiasCompensation(2, 3, mode="whiten")


def test_scales_aim_at_the_reference_but_stay_bounded():
    compensation = LanguageBiasCompensation(2, 3, mode="affine")
    compensation.set_reference_std([torch.tensor([2.0, 1.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])])
    compensation.set_language_std(0, torch.tensor([4.0, 1e-9, 0.0]))
    # Half the spread where it is twice the reference; at most 100x where it barely varies; 0 where all are constant.
    torch.testing.assert_close(compensation.scale[0], torch.tensor([0.5, 100.0, 0.0]))
    compensation.set_language_std(1, None)
    assert torch.equal(compensation.scale[1], torch.ones(3))
    with pytest.raises(ValueError, match="affine mode"):
        LanguageBiasCompensation(2, 3).set_language_std(0, torch.ones(3))


def _pooled_by_language(model, processor, rows) -> dict[str, torch.Tensor]:
    """(n, d) time-pooled encoder outputs per language, before and after the model's compensation."""
    batch = PotsaCollator(processor)(rows)
    with torch.no_grad():
        frames, mask = model.encode_speech(batch["input_features"], batch["feature_attention_mask"])
        compensated = masked_time_mean(model.bias_compensation(frames, batch["language_ids"]), mask)
    return {code: compensated[[i for i, row in enumerate(rows) if row["language"] == code]] for code in ("es", "ja")}


@pytest.fixture(scope="module")
def affine_model():
    return build_tiny_potsa(languages=("es", "ja", "de"), seed=0, bias_compensation_mode="affine")


def test_affine_estimate_gives_every_language_zero_mean_and_the_reference_spread(affine_model):
    model, processor = copy.deepcopy(affine_model)
    rows = _parallel_rows(5, ("es", "ja"))
    estimate = estimate_language_bias(model, datasets.Dataset.from_list(rows), processor, ["es", "ja"])
    assert isinstance(estimate, LanguageBiasEstimate) and sorted(estimate.std) == ["es", "ja"]
    apply_language_bias(model, estimate, processor)
    compensation = model.bias_compensation
    reference = (0.5 * (estimate.std["es"].square() + estimate.std["ja"].square())).sqrt()
    torch.testing.assert_close(compensation.reference_std, reference)
    for code, pooled in _pooled_by_language(model, processor, rows).items():
        torch.testing.assert_close(pooled.mean(dim=0), torch.zeros(pooled.shape[1]), rtol=0, atol=1e-4)
        torch.testing.assert_close(pooled.std(dim=0, unbiased=False), reference, rtol=1e-3, atol=1e-5, msg=code)
    assert compensation.scale.requires_grad  # trained like the bias (train_bias defaults to True)
    assert torch.equal(compensation.scale[2], torch.ones(compensation.scale.shape[1]))  # de: no audio, identity


def test_a_language_added_later_is_scaled_to_the_same_reference(affine_model):
    model, processor = copy.deepcopy(affine_model)
    apply_language_bias(
        model, estimate_language_bias(model, datasets.Dataset.from_list(_parallel_rows(4, ("es", "ja"))), processor)
    )
    reference = model.bias_compensation.reference_std.clone()
    new_rows = _parallel_rows(4, ("es", "sw"))
    estimate = estimate_language_bias(
        model, datasets.Dataset.from_list(new_rows), processor, ["sw"]
    )  # only the new language's audio
    apply_language_bias(model, estimate, processor)
    assert model.config.languages[-1] == "sw" and model.bias_compensation.scale.shape[0] == 4
    torch.testing.assert_close(model.bias_compensation.reference_std, reference)  # not re-estimated from sw alone
    torch.testing.assert_close(model.bias_compensation.scale[3], reference / estimate.std["sw"])
    batch = PotsaCollator(processor)([row for row in new_rows if row["language"] == "sw"])
    assert torch.isfinite(model(**{k: v for k, v in batch.items() if k not in ("sentence_ids", "languages")}).loss)


def test_affine_mode_refuses_vectors_without_spread_and_tables_out_of_step(affine_model):
    model, processor = copy.deepcopy(affine_model)
    with pytest.raises(ValueError, match="spread as well as its mean"):
        apply_language_bias(model, {"es": torch.zeros(32)})
    model.add_language("sw", torch.zeros(32))  # the model's own method knows nothing of scales
    frames = torch.zeros(1, 3, 32)
    with pytest.raises(ValueError, match="without its spread"):
        model.bias_compensation(frames, torch.tensor([0]))


def test_a_mean_checkpoint_continues_as_affine(tiny):
    """How a stage-2 ("mean") checkpoint trained further with `bias_compensation_mode: affine` (a config override
    after loading) gets its scales: `apply_language_bias` switches the module in place."""
    model, processor = copy.deepcopy(tiny)
    model.config.bias_compensation_mode = "affine"
    rows = _parallel_rows(3, ("es", "ja"))
    apply_language_bias(model, estimate_language_bias(model, datasets.Dataset.from_list(rows), processor, ["es", "ja"]))
    compensation = model.bias_compensation
    assert compensation.mode == "affine" and compensation.has_reference and compensation.scale.requires_grad
    estimated = compensation.scale[model.config.language_id("es")]
    untouched = compensation.scale[model.config.language_id("en")]  # no audio given
    assert not torch.equal(estimated, torch.ones_like(estimated)) and torch.equal(untouched, torch.ones_like(untouched))


def test_mean_mode_is_untouched_by_the_spreads(tiny):
    model, processor = copy.deepcopy(tiny)
    rows = _parallel_rows(3, ("es", "ja"))
    estimate = estimate_language_bias(model, datasets.Dataset.from_list(rows), processor, ["es", "ja"])
    apply_language_bias(model, estimate, processor)
    assert model.bias_compensation.mode == "mean" and model.bias_compensation.scale is None
    torch.testing.assert_close(model.bias_compensation.bias[model.config.language_id("es")], estimate["es"])


def test_affine_checkpoints_round_trip_and_mean_checkpoints_load_as_identity(affine_model, tiny, tmp_path):
    model, processor = copy.deepcopy(affine_model)
    rows = _parallel_rows(3, ("es", "ja"))
    apply_language_bias(model, estimate_language_bias(model, datasets.Dataset.from_list(rows), processor))
    model.save_pretrained(tmp_path / "affine")
    reloaded = PotsaForSpeechTranslation.from_pretrained(tmp_path / "affine")
    assert reloaded.config.bias_compensation_mode == "affine"
    torch.testing.assert_close(reloaded.bias_compensation.scale, model.bias_compensation.scale)
    torch.testing.assert_close(reloaded.bias_compensation.reference_std, model.bias_compensation.reference_std)

    mean_model = copy.deepcopy(tiny[0])
    mean_model.save_pretrained(tmp_path / "mean")
    config = copy.deepcopy(mean_model.config)
    config.bias_compensation_mode = "affine"
    upgraded = PotsaForSpeechTranslation.from_pretrained(tmp_path / "mean", config=config)
    compensation = upgraded.bias_compensation
    assert torch.equal(compensation.scale, torch.ones_like(compensation.scale))  # initialised, not leftover memory
    assert torch.equal(compensation.reference_std, torch.zeros_like(compensation.reference_std))
    torch.testing.assert_close(compensation.bias, mean_model.bias_compensation.bias)


def test_scales_are_frozen_with_the_bias():
    """Training's `train_bias=False` freezes the table; scales added later (a "mean" model continued as affine) follow
    the bias, frozen or not."""
    model, _ = build_tiny_potsa(languages=("es", "ja"), bias_compensation_mode="affine")
    assert model.bias_compensation.scale.requires_grad and model.bias_compensation.bias.requires_grad
    model.bias_compensation.requires_grad_(False)
    assert not model.bias_compensation.scale.requires_grad and not model.bias_compensation.bias.requires_grad
    mean_model, _ = build_tiny_potsa(languages=("es", "ja"))
    mean_model.bias_compensation.requires_grad_(False)
    mean_model.bias_compensation.enable_affine()
    assert not mean_model.bias_compensation.scale.requires_grad
