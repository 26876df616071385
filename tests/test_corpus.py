"""Tests of the offline espeak corpus (benchmarks/corpus): Chinese numerals, lexicons, splits, synthesis."""

import datasets
import numpy as np
import pytest

from benchmarks.corpus import (
    CATEGORY_WEIGHTS,
    FEATURES,
    SPLITS,
    chinese_numeral,
    generate_corpus,
    load_lexicon,
    reading_problems,
    sentence_inventory,
    split_targets,
    supported_languages,
)
from benchmarks.corpus.__main__ import main as corpus_cli
from benchmarks.corpus.lexicon import PLURAL_FORMS, TARGET_LANGUAGE, plural_category
from benchmarks.corpus.roles import language_roles

SMALL = {"train": 6, "validation": 3, "test": 3}
LANGUAGES = ["es", "ja", "ru"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "零"), (7, "七"), (10, "十"), (15, "十五"), (20, "二十"), (100, "一百"), (101, "一百零一"),
        (110, "一百一十"), (205, "二百零五"), (1001, "一千零一"), (1010, "一千零一十"), (1100, "一千一百"),
        (2000, "二千"), (2024, "二千零二十四"), (9999, "九千九百九十九"), (10010, "一万零一十"),
        (100000, "十万"), (1100000, "一百一十万"), (100000001, "一亿零一"),
    ],
)
def test_chinese_numeral(value: int, text: str) -> None:
    assert chinese_numeral(value) == text


def test_chinese_numeral_pads_minutes_and_rejects_out_of_range() -> None:
    assert [chinese_numeral(minute, 2) for minute in (5, 10, 30)] == ["零五", "十", "三十"]
    with pytest.raises(ValueError):
        chinese_numeral(-1)


def test_lexicons_load_with_the_same_keys() -> None:
    lexicons = [load_lexicon(code) for code in supported_languages()]
    assert {"en", "es", "fr", "de", "it", "pt", "ru", "ja", "ko", "zh"} <= {lexicon.code for lexicon in lexicons}
    target = load_lexicon(TARGET_LANGUAGE)
    for lexicon in lexicons:
        assert lexicon.colours.keys() == target.colours.keys(), lexicon.code
        assert lexicon.units.keys() == target.units.keys(), lexicon.code
        assert all(set(forms) == set(PLURAL_FORMS[lexicon.plural]) for forms in lexicon.units.values())
        assert set(lexicon.templates) <= set(CATEGORY_WEIGHTS), lexicon.code
        assert set(lexicon.spelled) <= {"day", "hour", "minute"}, lexicon.code
    assert set(target.templates) == set(CATEGORY_WEIGHTS)  # every sentence has a target


def test_rendering_one_sentence_in_every_language() -> None:
    date = {"weekday": 1, "month": 2, "day": 3}
    assert load_lexicon("zh").render("date", date) == "三月三日星期二"
    assert load_lexicon("es").render("date", date) == "martes, 3 de marzo"
    assert load_lexicon("de").render("date", date) == "Dienstag, der dritte März"
    assert load_lexicon("ja").render("date", date) == "さんがつ みっか かようび"
    assert load_lexicon("ru").render("date", date) == "вторник, третье марта"
    time = {"hour": 14, "minute": 5}
    assert load_lexicon("zh").render("time", time) == "十四点零五分"
    assert load_lexicon("en").render("time", time) == "14:05"
    assert load_lexicon("ja").render("time", time) == "じゅうよじ ごふん"
    assert load_lexicon("ko").render("time", time) == "14시 5분"
    assert load_lexicon("zh").render("digits", {"digits": (3, 0, 1)}) == "三零一"
    assert load_lexicon("fr").render("colours", {"colours": ("red", "blue")}) == "rouge, bleu"


def test_russian_units_agree_with_the_number() -> None:
    assert [plural_category("east_slavic", n) for n in (2, 5, 11, 12, 21, 22, 25, 111, 122)] == [
        "few", "many", "many", "many", "one", "few", "many", "many", "few",
    ]
    russian = load_lexicon("ru")
    assert [russian.render("quantity", {"n": n, "unit": "km"}) for n in (21, 22, 25)] == [
        "21 километр", "22 километра", "25 километров",
    ]


def test_inventory_splits_are_disjoint_and_stable() -> None:
    inventory = sentence_inventory({"train": 200, "validation": 20, "test": 40}, seed=3)
    ids = {split: [sentence.sentence_id for sentence in inventory[split]] for split in SPLITS}
    assert [len(ids[split]) for split in SPLITS] == [200, 20, 40]
    assert sum(map(len, ids.values())) == len(set().union(*ids.values()))
    assert {sentence.category for sentence in inventory["train"]} == set(CATEGORY_WEIGHTS)
    bigger = sentence_inventory({"train": 400, "validation": 20, "test": 40}, seed=3)
    assert [sentence.sentence_id for sentence in bigger["test"]] == ids["test"]  # test set ignores the train size
    assert split_targets("train", {"train": 200, "validation": 20, "test": 40}, seed=3) == [
        sentence.translation for sentence in inventory["train"]
    ]


def test_unknown_language_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="supported: .*es.*ja"):
        generate_corpus(["es", "xx"], num_sentences=SMALL)


def _arrays(dataset) -> list[np.ndarray]:
    """The stored int16 arrays, read from Arrow (row access turns them into Python ints)."""
    column = dataset.data.column("audio").combine_chunks().field("array")
    return [column[index].values.to_numpy() for index in range(len(column))]


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(LANGUAGES, num_sentences=SMALL, seed=1)


def test_corpus_schema_and_audio(corpus) -> None:
    assert list(corpus) == list(SPLITS)
    for split in SPLITS:
        dataset = corpus[split]
        assert dataset.features == FEATURES
        assert dataset.num_rows == SMALL[split] * len(LANGUAGES)
        for row, audio in zip(dataset, _arrays(dataset)):
            assert row["audio"]["sampling_rate"] == 22050
            assert audio.dtype == np.int16 and 0.2 * 22050 < audio.size <= 3.5 * 22050
            assert np.abs(audio.astype(np.int32)).max() > 1000  # speech, not silence
            assert row["transcript"] and row["translation"]
            assert row["speaker"].startswith(load_lexicon(row["language"]).voice + "+")


def test_corpus_is_n_way_parallel_with_disjoint_splits(corpus) -> None:
    ids = {}
    for split in SPLITS:
        rows = list(zip(corpus[split]["language"], corpus[split]["sentence_id"]))
        by_language = {language: sorted(id_ for code, id_ in rows if code == language) for language in LANGUAGES}
        assert all(by_language[language] == by_language[LANGUAGES[0]] for language in LANGUAGES)
        ids[split] = set(by_language[LANGUAGES[0]])
        targets = {row["sentence_id"]: row["translation"] for row in corpus[split]}
        assert all(row["translation"] == targets[row["sentence_id"]] for row in corpus[split])
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])


def test_corpus_is_deterministic_and_round_trips(corpus, tmp_path) -> None:
    import datasets

    again = generate_corpus(LANGUAGES, out_dir=tmp_path / "corpus", num_sentences=SMALL, seed=1, workers=1)
    loaded = datasets.load_from_disk(str(tmp_path / "corpus"))
    for split in SPLITS:
        assert corpus[split]["speaker"] == again[split]["speaker"] == loaded[split]["speaker"]
        for first, second in zip(_arrays(corpus[split]), _arrays(loaded[split])):
            assert np.array_equal(first, second)


def test_clips_over_max_seconds_are_dropped() -> None:
    short = generate_corpus(["de"], num_sentences={"train": 12}, seed=0, max_seconds=1.2, max_redraws=1)
    lengths = [audio.size for audio in _arrays(short["train"])]
    assert len(lengths) < 12 and all(length <= 1.2 * 22050 for length in lengths)


@pytest.mark.parametrize("language", supported_languages())
def test_espeak_reads_the_lexicon_natively(language: str) -> None:
    assert reading_problems(language) == []


def test_language_roles_parse_named_zero_shot_groups() -> None:
    roles = language_roles(["en", "es"], ["related:it,pt", "distant:de,ko", "fr"])
    assert roles.groups() == {"seen": ["en", "es"], "related": ["it", "pt"], "distant": ["de", "ko"],
                              "zero_shot": ["fr"]}  # fmt: skip
    assert roles.languages == ["en", "es", "it", "pt", "de", "ko", "fr"]
    for seen, zero_shot, message in [([], ["de"], "at least one seen"), (["en"], ["en"], "named twice"),
                                     (["en"], ["far:xx"], "No lexicon"), (["en"], ["seen:de"], "group name")]:
        with pytest.raises(ValueError, match=message):
            language_roles(seen, zero_shot)


def test_corpus_cli_speaks_seen_and_zero_shot_languages(tmp_path, capsys) -> None:
    out = tmp_path / "corpus"
    assert corpus_cli(["--seen", "es", "--zero-shot", "distant:ko", "--out", str(out), "--sentences-train", "2",
                       "--sentences-validation", "1", "--sentences-test", "1", "--workers", "1"]) == 0  # fmt: skip
    summary = capsys.readouterr().out
    assert "es        seen" in summary and "ko        distant" in summary
    assert set(datasets.load_from_disk(str(out))["test"]["language"]) == {"es", "ko"}


def test_subsets_speak_fewer_sentences_of_a_split_spread_over_its_categories(tmp_path) -> None:
    sizes = {"train": 12, "validation": 3, "test": 3}
    full = sentence_inventory(sizes, seed=0, languages=["es"])
    corpus = generate_corpus(["es", "ja"], num_sentences=sizes, seed=0, workers=1,
                             subsets={"ja": {"train": 4, "validation": 0}})  # fmt: skip
    ja_train = corpus["train"].filter(lambda row: row["language"] == "ja")
    assert len(ja_train) == 4 and len(corpus["train"].filter(lambda row: row["language"] == "es")) == 12
    assert set(ja_train["sentence_id"]) <= {sentence.sentence_id for sentence in full["train"]}  # still parallel
    assert len(set(ja_train["category"])) > 1  # spread over the split, not its first category
    assert "ja" not in set(corpus["validation"]["language"]) and set(corpus["test"]["language"]) == {"es", "ja"}
    unspoken = generate_corpus(["es"], num_sentences=sizes, workers=1, subsets={"es": {"validation": 0}}, out_dir=tmp_path)
    assert list(datasets.load_from_disk(str(tmp_path))) == ["train", "test"] == list(unspoken)  # no empty split
    with pytest.raises(ValueError, match="subsets"):
        generate_corpus(["es"], num_sentences=sizes, subsets={"fr": {"train": 1}})
