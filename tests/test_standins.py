"""The stand-ins shipped in benchmarks/standins/checkpoints: small, loadable the way the real recipe loads Whisper and
Qwen by id, and still as good as their quality.json says: re-measured here on the validation split of their corpus,
spoken afresh (synthesis is deterministic, so these are the clips they were measured on)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from benchmarks.corpus import generate_corpus
from benchmarks.standins import SHIPPED, STANDIN_LANGUAGES, CorpusSpec, check_standins
from benchmarks.standins.encoder import asr_quality, load_ctc_head
from benchmarks.standins.language_model import text_translation_accuracy
from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation

QUALITY = json.loads((SHIPPED / "quality.json").read_text())


def test_shipped_standins_are_small_and_serve_the_demo_corpus():
    size = sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file())
    assert size < 8 * 2**20, f"{size / 2**20:.1f} MiB"
    assert check_standins(SHIPPED, CorpusSpec(), STANDIN_LANGUAGES) == []
    assert check_standins(SHIPPED, CorpusSpec(), ["en", "xx"]) == ["they never heard ['xx']"]
    assert any("another corpus" in problem for problem in check_standins(SHIPPED, CorpusSpec(seed=1), ["en"]))


def test_potsa_loads_the_shipped_standins_by_path_as_it_loads_hub_ids():
    encoder, llm = SHIPPED / "encoder", SHIPPED / "llm"
    config = PotsaConfig.from_base_models(str(encoder), str(llm), languages=["en", "de"], num_query_tokens=24)
    model = PotsaForSpeechTranslation.from_base_models(config)
    assert model.speech_encoder.config.d_model == config.encoder_hidden_size == 128
    assert not any(p.requires_grad for p in model.language_model.parameters())


@pytest.fixture(scope="module")
def validation():
    """The validation split of the stand-ins' corpus (its train and test splits are not spoken: splits are dealt
    test first, then validation, so the validation sentences do not depend on the train size)."""
    spec = CorpusSpec()
    sizes = {**spec.num_sentences, "train": 0}
    return generate_corpus(STANDIN_LANGUAGES, num_sentences=sizes, seed=spec.seed, categories=spec.categories,
                           max_seconds=spec.max_seconds)["validation"]  # fmt: skip


def test_shipped_encoder_still_transcribes_as_recorded(validation):
    encoder = WhisperEncoder.from_pretrained(SHIPPED / "encoder")
    head, symbols = load_ctc_head(SHIPPED / "encoder")
    features = WhisperFeatureExtractor.from_pretrained(SHIPPED / "encoder")
    measured = asr_quality(encoder, head, symbols, validation, features)
    recorded = QUALITY["encoder"]["validation"]
    assert set(measured) == set(recorded) == {"all", *STANDIN_LANGUAGES}
    for name, figures in recorded.items():  # same model, same clips: equal up to float rounding across CPUs
        assert measured[name]["cer"] == pytest.approx(figures["cer"], abs=0.005), name
        assert measured[name]["exact"] == pytest.approx(figures["exact"], abs=0.01), name


def test_shipped_llm_still_translates_text_as_recorded(validation):
    model = AutoModelForCausalLM.from_pretrained(SHIPPED / "llm")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(SHIPPED / "llm")  # as written (AutoTokenizer: Qwen2's recipe)
    pairs = list(zip(validation["transcript"], validation["translation"]))  # as `language_model_text` reads them
    accuracy = text_translation_accuracy(model, tokenizer, pairs)
    assert accuracy == pytest.approx(QUALITY["llm"]["text_translation_exact"], abs=0.01)
