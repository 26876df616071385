"""Checkpoints: what is saved, and loading with trust_remote_code in a fresh process without the package."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, WhisperConfig, WhisperModel
from transformers.dynamic_module_utils import get_imports

from modeling_potsa import PotsaForSpeechTranslation, PotsaSpeechTranslationPipeline

from .conftest import SAMPLING_RATE, synthetic_audio

REPO = Path(__file__).resolve().parents[1]
CODE_FILES = {
    "audio.py", "bias_compensation.py", "configuration_potsa.py", "modeling_potsa.py", "processing_potsa.py",
    "speech_encoders.py",
}  # fmt: skip
ALLOWED_IMPORTS = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
OPTIONAL_PACKAGES = ("peft", "soundfile", "soxr")  # LoRA, decoding audio files, resampling

# Runs in a fresh interpreter in which `import modeling_potsa` is impossible: only the checkpoint's own code files
# (through trust_remote_code) can provide the classes.
FRESH_PROCESS_SCRIPT = """
import sys
sys.modules["modeling_potsa"] = None
import numpy as np, torch
from transformers import AutoModel, AutoProcessor
for checkpoint, out in zip(sys.argv[1::2], sys.argv[2::2]):
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    batch = processor(np.load(checkpoint + "/clip.npy"), sampling_rate=16000, language="es", text="三月三日")
    with torch.no_grad():
        torch.save(model(**batch).logits, out)
"""


# A bare interpreter without the project and without its optional packages (a `None` entry in sys.modules makes an
# import fail and `importlib.util.find_spec` find nothing, as for a package that is not installed): what works, and
# which error each missing package gives.
BARE_EXTRAS_SCRIPT = """
import json, sys
for name in ("modeling_potsa", "potsa_training", *sys.argv[4:]):
    sys.modules[name] = None
import numpy as np
from transformers import AutoConfig, AutoModel, pipeline
folder, clip_file, wav_file = sys.argv[1:4]

def error(call):
    try:
        call()
    except Exception as raised:
        return [type(raised).__name__, str(raised)]

model = AutoModel.from_pretrained(folder, trust_remote_code=True)
translate = pipeline("translation", model=folder, trust_remote_code=True)
clip = np.load(clip_file)
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
config.use_lora = True
print(json.dumps({
    "module": type(model).__module__,
    "translation": translate(clip, sampling_rate=16000, language="es", max_new_tokens=3),
    "file": error(lambda: translate(wav_file, language="es", max_new_tokens=3)),
    "22050 Hz": error(lambda: translate(clip, sampling_rate=22050, language="es", max_new_tokens=3)),
    "lora": error(lambda: AutoModel.from_config(config, trust_remote_code=True)),
}))
"""


def _logits(model, processor, clip):
    batch = processor(clip, sampling_rate=SAMPLING_RATE, language="es", text="三月三日")
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def base_ids(tiny, tmp_path_factory):
    """The tiny encoder and LLM saved as stand-alone base checkpoints, referenced by path like hub ids."""
    model, _ = tiny
    root = tmp_path_factory.mktemp("bases")
    whisper = WhisperModel(WhisperConfig(**model.config.encoder_config.to_dict()))
    whisper.encoder.load_state_dict(model.speech_encoder.state_dict())
    whisper.save_pretrained(root / "whisper")
    model.language_model.save_pretrained(root / "llm")
    config = copy.deepcopy(model.config)
    config.encoder_model_id, config.text_model_id = str(root / "whisper"), str(root / "llm")
    return config


def test_tiny_checkpoint_script_writes_a_complete_bundle(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(REPO / "examples/make_tiny_checkpoint.py"), "--out", str(out)], check=True)
    names = {path.name for path in out.iterdir()}
    assert CODE_FILES <= names and {"config.json", "model.safetensors", "processor_config.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_potsa.PotsaConfig",
        "AutoModel": "modeling_potsa.PotsaForSpeechTranslation",
    }
    assert {key.split(".")[0] for key in load_file(out / "model.safetensors")} >= {"speech_encoder", "language_model"}


def test_trainable_only_checkpoint_and_full_bundle(tiny, base_ids, tmp_path):
    _, processor = tiny
    model = PotsaForSpeechTranslation.from_base_models(base_ids).eval()
    model.save_pretrained(tmp_path / "trainable")
    saved = load_file(tmp_path / "trainable/model.safetensors")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable  # no frozen encoder / LLM weight in the checkpoint
    reloaded = PotsaForSpeechTranslation.from_pretrained(tmp_path / "trainable")
    clip = synthetic_audio(1.5)
    torch.testing.assert_close(_logits(reloaded, processor, clip), _logits(model, processor, clip), rtol=0, atol=0)

    model.save_pretrained(tmp_path / "bundle", include_base_weights=True)
    bundled = load_file(tmp_path / "bundle/model.safetensors")
    assert set(bundled) == set(model.state_dict()) | {n for n, _ in model.named_parameters()}
    assert not model.config.base_weights_in_checkpoint  # the option does not leak into the live model
    assert json.loads((tmp_path / "bundle/config.json").read_text())["base_weights_in_checkpoint"] is True
    offline = PotsaForSpeechTranslation.from_pretrained(tmp_path / "bundle")
    torch.testing.assert_close(_logits(offline, processor, clip), _logits(model, processor, clip), rtol=0, atol=0)


def test_loading_info_for_both_checkpoint_kinds(tiny, base_ids, tmp_path):
    """`output_loading_info=True` returns (model, info): nothing missing or unexpected in a proper checkpoint, both
    when the base models come from their ids and when they are bundled; a damaged checkpoint is reported."""
    model, _ = tiny
    PotsaForSpeechTranslation.from_base_models(base_ids).save_pretrained(tmp_path / "trainable")
    model.save_pretrained(tmp_path / "bundle")
    for name in ("trainable", "bundle"):
        loaded, info = PotsaForSpeechTranslation.from_pretrained(tmp_path / name, output_loading_info=True)
        assert isinstance(loaded, PotsaForSpeechTranslation)
        assert not any(info.values()), (name, info)  # missing, unexpected and mismatched keys, error messages
        assert not any(p.requires_grad for p in loaded.language_model.parameters())

    weights = load_file(tmp_path / "trainable/model.safetensors")
    weights["projector.extra"] = weights.pop("projector.linear.bias")
    save_file(weights, tmp_path / "trainable/model.safetensors", {"format": "pt"})
    _, info = PotsaForSpeechTranslation.from_pretrained(tmp_path / "trainable", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == ({"projector.linear.bias"}, {"projector.extra"})


def test_base_model_mismatch_is_reported(base_ids, tmp_path):
    config = copy.deepcopy(base_ids)
    other = AutoModelForCausalLM.from_config(config.text_config.__class__(**{
        **config.text_config.to_dict(), "hidden_size": 48, "intermediate_size": 96,
    }))  # fmt: skip
    other.save_pretrained(tmp_path / "other_llm")
    config.text_model_id = str(tmp_path / "other_llm")
    with pytest.raises(ValueError, match="hidden_size=48"):
        PotsaForSpeechTranslation.from_base_models(config)


def test_fresh_process_loads_with_trust_remote_code(tiny, base_ids, tmp_path):
    """Both checkpoint kinds load in a bare process (HF_HUB_OFFLINE=1) and give identical logits."""
    model, processor = tiny
    clip = synthetic_audio(1.5)
    with_ids = PotsaForSpeechTranslation.from_base_models(base_ids).eval()
    arguments = []
    for name, candidate in (("bundle", model), ("trainable", with_ids)):
        candidate.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        np.save(tmp_path / name / "clip.npy", clip)
        arguments += [str(tmp_path / name), str(tmp_path / f"{name}.pt")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, *arguments], check=True, cwd=tmp_path, env=environment
    )
    for name, candidate in (("bundle", model), ("trainable", with_ids)):
        expected = _logits(candidate, processor, clip)
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), expected, rtol=0, atol=0)


def test_shipped_code_imports_only_stdlib_torch_transformers():
    """Every file of modeling_potsa/ ships as remote code. transformers refuses to load remote code that imports a
    package the environment lacks, wherever the import stands (in a function too), unless it is inside a `try`
    block: its own check (`get_imports`) finds nothing but the standard library, torch and transformers."""
    for path in sorted((REPO / "modeling_potsa").glob("*.py")):
        assert set(get_imports(path)) <= ALLOWED_IMPORTS, path.name


def test_bare_process_without_optional_packages(tiny, tmp_path):
    """Without peft, soundfile and soxr (and without the project) a checkpoint loads and translates 16 kHz arrays;
    each missing package is named by the error of the one thing that needs it."""
    model, processor = tiny
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    clip = synthetic_audio(1.5)
    np.save(tmp_path / "clip.npy", clip)
    soundfile.write(tmp_path / "clip.wav", clip, SAMPLING_RATE, subtype="FLOAT")
    environment = {
        **os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-c", BARE_EXTRAS_SCRIPT, str(folder), str(tmp_path / "clip.npy"), str(tmp_path / "clip.wav"),
         *OPTIONAL_PACKAGES],
        check=True, cwd=tmp_path, env=environment, capture_output=True, text=True,
    )  # fmt: skip
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert not results["module"].startswith("modeling_potsa")  # the checkpoint's own code served
    expected = PotsaSpeechTranslationPipeline(model=model, processor=processor, device="cpu")(
        clip, sampling_rate=SAMPLING_RATE, language="es", max_new_tokens=3
    )
    assert results["translation"] == expected
    for case, package in (("file", "soundfile"), ("22050 Hz", "soxr")):
        kind, message = results[case]
        assert kind == "ValueError" and f"`{package}` package" in message, (case, message)
    kind, message = results["lora"]
    assert kind == "ImportError" and "`peft` package" in message, message


def test_loaded_bundle_keeps_base_models_frozen(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    loaded = PotsaForSpeechTranslation.from_pretrained(tmp_path)
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith(("speech_encoder.", "language_model.")) for name in trainable)
