"""Hub release: the exact folder push_to_hub.py uploads, its model card, a bare-process load of it, and the
examples that run on a released checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from examples import batch_translate, inference, make_tiny_checkpoint, plot_language_bias, push_to_hub
from modeling_potsa import PotsaForSpeechTranslation, PotsaSpeechTranslationPipeline
from potsa_training.arguments import AlignmentArguments
from potsa_training.evaluation import EvaluationResult, write_results

from .conftest import SAMPLING_RATE, synthetic_audio
from .test_hub_loading import base_ids  # noqa: F401  (fixture: the tiny encoder and LLM as base checkpoints)

CODE_FILES = {
    "audio.py", "bias_compensation.py", "checkpoint_potsa.py", "configuration_potsa.py", "language_model_potsa.py",
    "modeling_potsa.py", "outputs_potsa.py", "pipeline_potsa.py", "processing_potsa.py", "speech_encoders.py",
}  # fmt: skip
RELEASE_FILES = CODE_FILES | {
    "README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
}  # fmt: skip
SHORT = {"max_new_tokens": 3}

# A bare interpreter: `modeling_potsa` cannot be imported, so only the released folder's own code can serve.
FRESH_PROCESS_SCRIPT = """
import json, sys
sys.modules["modeling_potsa"] = None
from transformers import AutoModel, pipeline
results = {}
for folder in sys.argv[2:]:
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert not type(model).__module__.startswith("modeling_potsa"), type(model).__module__
    for task in ("translation", "speech-translation"):
        translate = pipeline(task, model=folder, trust_remote_code=True)
        results[f"{folder} {task}"] = translate(sys.argv[1], language="es", max_new_tokens=3)
print(json.dumps(results))
"""


# A bare interpreter without peft: the merged LoRA release must load; the unmerged one must ask for peft.
NO_PEFT_SCRIPT = """
import sys, torch
sys.modules["modeling_potsa"] = None
sys.modules["peft"] = None
from transformers import AutoModel
merged, unmerged, batch, out = sys.argv[1:]
model = AutoModel.from_pretrained(merged, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(**torch.load(batch)).logits, out)
try:
    AutoModel.from_pretrained(unmerged, trust_remote_code=True)
except ImportError as error:
    print("unmerged:", error)
"""


@pytest.fixture(scope="module")
def results_json(tmp_path_factory):
    """A results.json as training/evaluation.py writes it."""
    scores = {
        "es": {"bleu": 21.456, "exact_match": 0.25, "off_target_rate": 0.0, "count": 40.0},
        "ja": {"bleu": 9.5, "exact_match": 0.1, "off_target_rate": 0.05, "count": 38.0},
    }
    groups = {"seen": {"bleu": 15.478, "exact_match": 0.175, "off_target_rate": 0.025}}
    out = tmp_path_factory.mktemp("evaluation")
    settings = {"split": "test", "alignment": AlignmentArguments(ot_loss_weight=1.0).to_dict()}
    write_results(EvaluationResult(scores, groups, {"recall_at_1": 0.75}), out, settings=settings)
    return out / "results.json"


@pytest.fixture(scope="module")
def checkpoints(tiny, base_ids, tmp_path_factory):  # noqa: F811
    """{"bundle": the tiny demo checkpoint (no base ids), "trainable": a checkpoint on top of base checkpoints}."""
    root = tmp_path_factory.mktemp("checkpoints")
    make_tiny_checkpoint.main(["--out", str(root / "bundle")])
    model = PotsaForSpeechTranslation.from_base_models(base_ids).eval()
    model.save_pretrained(root / "trainable")
    tiny[1].save_pretrained(root / "trainable")
    return {"bundle": root / "bundle", "trainable": root / "trainable"}


@pytest.fixture(scope="module")
def releases(checkpoints, results_json, tmp_path_factory):
    """The dry-run folders of both checkpoints, and the (name, size) lists push_to_hub printed."""
    root = tmp_path_factory.mktemp("releases")
    listed = {}
    for name, checkpoint in checkpoints.items():
        argv = ["--checkpoint", str(checkpoint), "--repo-id", f"me/potsa-{name}", "--dry-run", str(root / name)]
        listed[name] = push_to_hub.main([*argv, "--results", str(results_json)])
    return root, listed


def test_release_folder_holds_exactly_config_code_weights_processor_and_card(releases, tiny):
    root, listed = releases
    for name in ("bundle", "trainable"):
        folder = root / name
        assert {path.name for path in folder.iterdir()} == RELEASE_FILES
        assert listed[name] == sorted((path.name, path.stat().st_size) for path in folder.iterdir())
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == {
            "AutoConfig": "configuration_potsa.PotsaConfig",
            "AutoModel": "modeling_potsa.PotsaForSpeechTranslation",
        }
        assert set(config["custom_pipelines"]) == {"translation", "speech-translation"}
        assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
            "AutoProcessor": "processing_potsa.PotsaProcessor"
        }
    bundle_keys = set(load_file(root / "bundle/model.safetensors"))
    assert {key.split(".")[0] for key in bundle_keys} >= {"speech_encoder", "language_model"}
    trainable = {name for name, param in tiny[0].named_parameters() if not name.startswith(("speech_", "language_"))}
    assert set(load_file(root / "trainable/model.safetensors")) == trainable  # no frozen base weight uploaded
    sizes = dict(listed["trainable"])
    assert sizes["model.safetensors"] < dict(listed["bundle"])["model.safetensors"] / 2


def test_model_card_is_filled_from_config_and_results(releases):
    root, _ = releases
    card = ModelCard.load(root / "trainable/README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.pipeline_tag == "translation"
    assert data.base_model is None  # the bases are local paths here; only Hub ids may be a card's base_model
    assert set(data.language) == {"en", "es", "ja", "ko", "ru", "zh"}
    bleu = {result.dataset_config: result.metric_value for result in data.eval_results}
    assert bleu == {"es": 21.46, "ja": 9.5}
    assert "| es | 21.46 | 0.250 | 0.000 | 40 |" in card.text and "| **seen** (mean) | 15.48 |" in card.text
    assert 'pipeline("translation", model="me/potsa-trainable", trust_remote_code=True)' in card.text
    assert "arXiv" in card.text and "2511.09232" in card.text and "4 s windows" in card.text
    assert "`ot_loss_weight=1.0`" in card.text and "`alignment_loss=sinkhorn`" in card.text  # how it was trained
    assert "on the test split" in card.text
    stored = sum(tensor.numel() for tensor in load_file(root / "trainable/model.safetensors").values())
    assert f"| weights in this repository | {stored:,} of the model's 94,240 parameters |" in card.text
    bundle = ModelCard.load(root / "bundle/README.md")
    assert bundle.data.base_model is None and "self-contained bundle" in bundle.text


def test_release_folders_load_and_translate_in_a_bare_process(releases, checkpoints, tiny, tmp_path):
    root, _ = releases
    clip = synthetic_audio(1.5)
    soundfile.write(tmp_path / "clip.wav", clip, SAMPLING_RATE, subtype="FLOAT")
    folders = [str(root / "bundle"), str(root / "trainable")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(tmp_path / "clip.wav"), *folders],
        check=True, cwd=tmp_path, env=environment, capture_output=True, text=True,
    )  # fmt: skip
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for folder, checkpoint in zip(folders, (checkpoints["bundle"], checkpoints["trainable"])):
        model = PotsaForSpeechTranslation.from_pretrained(checkpoint).eval()  # the checkpoint, not the release
        expected = PotsaSpeechTranslationPipeline(model=model, processor=tiny[1], device="cpu")(
            clip, sampling_rate=SAMPLING_RATE, language="es", **SHORT
        )
        assert results[f"{folder} translation"] == results[f"{folder} speech-translation"] == expected


def test_upload_sends_the_built_folder(checkpoints, monkeypatch, capsys):
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            uploads.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploads.append(("upload", repo_id, sorted(path.name for path in Path(folder_path).iterdir())))
            return "commit-url"

    monkeypatch.setattr(push_to_hub, "HfApi", FakeApi)
    push_to_hub.main(["--checkpoint", str(checkpoints["bundle"]), "--repo-id", "me/potsa-tiny"])
    assert uploads == [("create", "me/potsa-tiny", False, True), ("upload", "me/potsa-tiny", sorted(RELEASE_FILES))]
    assert "uploaded: commit-url" in capsys.readouterr().out


def test_release_refuses_a_folder_with_other_files(checkpoints, tmp_path):
    (tmp_path / "stale.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="not empty"):
        push_to_hub.build_release_folder(checkpoints["bundle"], tmp_path, "me/potsa-tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A benchmark-corpus-like dataset on disk: int16 PCM lists at 22.05 kHz, a language and a reference."""
    features = datasets.Features({
        "audio": {"array": datasets.List(datasets.Value("int16")), "sampling_rate": datasets.Value("int32")},
        "language": datasets.Value("string"), "translation": datasets.Value("string"),
    })  # fmt: skip
    rows = [
        {"audio": {"array": (synthetic_audio(1.0 + 0.2 * i, seed=i, sampling_rate=22_050) * 32767).astype(np.int16),
                   "sampling_rate": 22_050},
         "language": ("es", "ja", "ko")[i % 3], "translation": "三月三日"}
        for i in range(6)
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, features=features)}).save_to_disk(str(out))
    return out


def test_inference_example_translates_a_file_and_an_array(checkpoints, tmp_path):
    clip = synthetic_audio(1.2)
    soundfile.write(tmp_path / "clip.flac", clip, SAMPLING_RATE)
    np.save(tmp_path / "clip.npy", np.stack([clip, clip]))
    common = ["--model", str(checkpoints["bundle"]), "--max-new-tokens", "3"]
    from_file = inference.main([*common, "--audio", str(tmp_path / "clip.flac"), "--language", "es", "--num-beams=2"])
    from_array = inference.main(
        [*common, "--array", str(tmp_path / "clip.npy"), "--sampling-rate", str(SAMPLING_RATE), "--language", "ko"]
    )
    assert from_file[0]["language"] == "es" and from_array[0]["language"] == "ko"


def test_batch_translate_example_writes_one_json_line_per_row(checkpoints, corpus, tmp_path):
    out = batch_translate.main([
        "--model", str(checkpoints["bundle"]), "--dataset", str(corpus), "--out", str(tmp_path / "predictions.jsonl"),
        "--batch-size", "4", "--max-new-tokens", "3",
    ])  # fmt: skip
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [record["index"] for record in records] == list(range(6))
    assert [record["language"] for record in records] == ["es", "ja", "ko"] * 2
    assert all(set(record) == {"index", "language", "translation", "translation_text"} for record in records)


def test_plot_language_bias_example_writes_a_png(checkpoints, corpus, tmp_path, capsys):
    argv = ["--model", str(checkpoints["bundle"]), "--dataset", str(corpus), "--out", str(tmp_path / "bias.png")]
    out = plot_language_bias.main(argv)
    assert out.read_bytes().startswith(b"\x89PNG")
    shares = [line for line in capsys.readouterr().out.splitlines() if "language explains" in line]
    assert len(shares) == 2 and shares[1].endswith("0.0% of the variance")  # centroids meet after compensation


def test_language_id_accuracy_is_measured_per_language(tiny, corpus):
    from benchmarks.bench_inference import language_id_accuracy

    model, processor = tiny
    pipe = PotsaSpeechTranslationPipeline(model=model, processor=processor, device="cpu")
    pipe.detect_language = lambda audio: ["es"] * len(audio)  # a stand-in detector: the measure is under test
    dataset = batch_translate.load_split(corpus, "test")
    assert language_id_accuracy(pipe, dataset) == {"es": 1.0, "ja": 0.0, "ko": 0.0, "overall": pytest.approx(1 / 3)}
    assert language_id_accuracy(pipe, dataset, per_language=1)["overall"] == pytest.approx(1 / 3)


def test_only_hub_ids_become_base_models(tmp_path):
    assert push_to_hub._is_hub_id("Qwen/Qwen2.5-7B-Instruct") and push_to_hub._is_hub_id("openai/whisper-large-v3")
    assert not push_to_hub._is_hub_id("runs/standins/llm") and not push_to_hub._is_hub_id(None)
    (tmp_path / "llm").mkdir()
    assert not push_to_hub._is_hub_id(str(tmp_path / "llm"))


@pytest.fixture(scope="module")
def lora_releases(tiny, base_ids, tmp_path_factory):  # noqa: F811
    """A LoRA checkpoint on top of base checkpoints (adapters made non-zero, as training leaves them), published
    merged (the default) and `--unmerged`."""
    root = tmp_path_factory.mktemp("lora")
    config = base_ids.__class__(**{**base_ids.to_dict(), "use_lora": True, "lora_target_modules": ["q_proj", "v_proj"]})
    model = PotsaForSpeechTranslation.from_base_models(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapters would change nothing
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(root / "checkpoint")
    tiny[1].save_pretrained(root / "checkpoint")
    for name, flags in (("merged", []), ("unmerged", ["--unmerged"])):
        push_to_hub.main(["--checkpoint", str(root / "checkpoint"), "--repo-id", "me/x", "--dry-run", str(root / name),
                          *flags])  # fmt: skip
    return root


def test_lora_release_is_merged_and_loads_without_peft_like_the_adapters_with_it(lora_releases, tiny, tmp_path):
    root, processor = lora_releases, tiny[1]
    merged_config = json.loads((root / "merged/config.json").read_text())
    assert not merged_config["use_lora"] and merged_config["merged_lora_modules"] == ["q_proj", "v_proj"]
    merged_llm = {key for key in load_file(root / "merged/model.safetensors") if key.startswith("language_model.")}
    assert merged_llm == {f"language_model.model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qv"}
    assert json.loads((root / "unmerged/config.json").read_text())["use_lora"]
    unmerged_llm = [key for key in load_file(root / "unmerged/model.safetensors") if key.startswith("language_model.")]
    assert unmerged_llm and all("lora_" in key for key in unmerged_llm)  # adapters only, no base weight
    assert "merged in" in (root / "merged/README.md").read_text()
    assert "pip install peft" in (root / "unmerged/README.md").read_text()

    batch = dict(processor(synthetic_audio(1.5), sampling_rate=SAMPLING_RATE, language="es", text="三月三日"))
    torch.save(batch, tmp_path / "batch.pt")
    completed = subprocess.run(
        [sys.executable, "-c", NO_PEFT_SCRIPT, str(root / "merged"), str(root / "unmerged"), str(tmp_path / "batch.pt"),
         str(tmp_path / "logits.pt")],
        check=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}, capture_output=True,
        text=True,
    )  # fmt: skip
    assert "unmerged:" in completed.stdout and "peft" in completed.stdout
    with torch.no_grad():
        with_adapters = PotsaForSpeechTranslation.from_pretrained(root / "unmerged").eval()
        expected = with_adapters(**batch).logits
        with with_adapters.language_model.disable_adapter():
            base = with_adapters(**batch).logits
    assert (expected - base).abs().max() > 0.1  # the adapters matter, so the comparison below means something
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)


def test_merging_needs_lora_adapters(tiny):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        push_to_hub.merge_lora_adapters(tiny[0])
