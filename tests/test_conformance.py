"""PotsaForSpeechTranslation as transformers' common model tests see it: weights initialise correctly however the
model is built."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import load_file, save_file
from transformers.models.whisper.modeling_whisper import sinusoids

from modeling_potsa import PotsaForSpeechTranslation


# -------------------------------------------------------------------------------------------------- initialisation
def _root_mean_square(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().pow(2).mean().sqrt()


def _assert_initialised_like(model, language_model_embeddings):
    gain = model.projector.layer_norm.weight
    assert torch.isfinite(gain).all()
    torch.testing.assert_close(gain, torch.full_like(gain, _root_mean_square(language_model_embeddings).item()))
    positions = model.speech_encoder.embed_positions.weight
    torch.testing.assert_close(positions, sinusoids(*positions.shape))


def test_meta_device_construction_then_initialisation(tiny_model):
    with torch.device("meta"):
        model = PotsaForSpeechTranslation(copy.deepcopy(tiny_model.config))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))  # what uninitialised memory may hold
    model.init_weights()
    assert all(torch.isfinite(tensor).all() for tensor in [*model.parameters(), *model.buffers()])
    _assert_initialised_like(model, model.get_input_embeddings().weight)


def test_checkpoint_without_projector_or_positions_initialises_them(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = {key for key in weights if key.startswith("projector.") or key.endswith("embed_positions.weight")}
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors", {"format": "pt"})
    model, info = PotsaForSpeechTranslation.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == dropped
    _assert_initialised_like(model, weights["language_model.model.embed_tokens.weight"])
