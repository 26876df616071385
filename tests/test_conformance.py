"""PotsaForSpeechTranslation as transformers' common model tests see it: the main input comes first, the standard
outputs (hidden states, attentions, tuples) exist, eager and SDPA attention agree, gradient checkpointing reaches
the frozen LLM, and weights initialise correctly however the model is built."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.whisper.modeling_whisper import sinusoids

from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation

from .conftest import SAMPLING_RATE, synthetic_audio


@pytest.fixture(scope="module")
def batch(tiny_processor):
    """Two clips of different lengths with targets: padded audio frames and a padded prompt + target."""
    clips = [synthetic_audio(1.1, seed=11), synthetic_audio(2.9, seed=12)]
    return tiny_processor(clips, sampling_rate=SAMPLING_RATE, language=["es", "ja"], text=["三月三日", "十四点三十分"])


@pytest.fixture(scope="module")
def eager_model(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.set_attn_implementation("eager")
    return model


# ------------------------------------------------------------------------------------------------ main input name
def test_main_input_is_the_first_argument():
    for method in (PotsaForSpeechTranslation.forward, PotsaForSpeechTranslation.generate):
        assert list(inspect.signature(method).parameters)[1] == PotsaForSpeechTranslation.main_input_name


def test_positional_arguments_follow_the_main_input(tiny_model, batch):
    positional = tiny_model(
        batch["input_features"], batch["input_ids"], batch["feature_attention_mask"], batch["language_ids"]
    )
    keywords = {key: batch[key] for key in ("input_features", "input_ids", "feature_attention_mask", "language_ids")}
    torch.testing.assert_close(positional.logits, tiny_model(**keywords).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`input_ids` are required"):
        tiny_model(batch["input_features"], language_ids=batch["language_ids"])


# ---------------------------------------------------------------------------------------------- standard outputs
def test_hidden_states_and_attentions_of_the_llm_and_the_q_former(eager_model, batch):
    config = eager_model.config
    output = eager_model(**batch, output_hidden_states=True, output_attentions=True)
    size, length = batch["input_ids"].shape
    frames = config.encoder_config.max_source_positions
    heads = (config.text_config.num_attention_heads, config.qformer_config.num_attention_heads)
    queries = config.num_query_tokens

    assert len(output.hidden_states) == config.text_config.num_hidden_layers + 1
    assert all(states.shape == (size, length, config.text_config.hidden_size) for states in output.hidden_states)
    # index 0 is the LLM's input: the soft prompt sits on the speech placeholders; the last one gives the logits
    speech = batch["input_ids"] == config.speech_token_id
    soft_prompt = eager_model.encode(
        batch["input_features"], batch["feature_attention_mask"], batch["language_ids"]
    ).soft_prompt
    torch.testing.assert_close(output.hidden_states[0][speech], soft_prompt.reshape(-1, soft_prompt.shape[-1]))
    head = eager_model.language_model.get_output_embeddings()
    torch.testing.assert_close(head(output.hidden_states[-1]), output.logits)

    assert len(output.attentions) == config.text_config.num_hidden_layers
    assert all(weights.shape == (size, heads[0], length, length) for weights in output.attentions)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(
        output.attentions[0].sum(-1).permute(0, 2, 1)[valid], torch.ones(int(valid.sum()), heads[0])
    )

    assert len(output.qformer_hidden_states) == config.num_qformer_layers + 1
    assert len(output.qformer_attentions) == len(output.qformer_cross_attentions) == config.num_qformer_layers
    assert all(weights.shape == (size, heads[1], queries, queries) for weights in output.qformer_attentions)
    assert all(weights.shape == (size, heads[1], queries, frames) for weights in output.qformer_cross_attentions)
    # the short clip's padded frames get no cross-attention
    frame_mask = batch["feature_attention_mask"][0, ::2].bool()
    assert not frame_mask.all() and (output.qformer_cross_attentions[-1][0][..., ~frame_mask] == 0).all()

    plain = eager_model(**batch)
    assert plain.hidden_states is plain.attentions is plain.qformer_hidden_states is None
    assert plain.qformer_attentions is plain.qformer_cross_attentions is None


def test_outputs_default_to_the_config(eager_model, batch):
    model = copy.deepcopy(eager_model)
    model.config.output_hidden_states = model.config.output_attentions = True
    output = model(**batch)
    assert output.hidden_states is not None and output.attentions is not None
    assert output.qformer_hidden_states is not None and output.qformer_cross_attentions is not None
    model.config.return_dict = False
    assert isinstance(model(**batch), tuple)


def test_hidden_states_and_attentions_retain_gradients(eager_model, batch):
    model = copy.deepcopy(eager_model).train()
    output = model(**batch, output_hidden_states=True, output_attentions=True)
    kept = {
        "hidden_states": output.hidden_states[0],
        "attentions": output.attentions[0],
        "qformer_hidden_states": output.qformer_hidden_states[1],
        "qformer_attentions": output.qformer_attentions[0],
        "qformer_cross_attentions": output.qformer_cross_attentions[0],
    }
    for tensor in kept.values():
        tensor.retain_grad()
    output.loss.backward()
    for name, tensor in kept.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


def test_return_dict_false_gives_the_set_fields_as_a_tuple(tiny_model, batch):
    output = tiny_model(**batch, output_qformer_hidden_states=True)
    as_tuple = tiny_model(**batch, output_qformer_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4
    for expected, got in zip((output.loss, output.logits, output.qformer_hidden_states[-1], output.pooled_speech),
                             (as_tuple[0], as_tuple[1], as_tuple[2][-1], as_tuple[3])):  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_eager_and_sdpa_attention_give_the_same_logits(tiny_model, eager_model, batch):
    for part in (eager_model.speech_encoder, eager_model.qformer, eager_model.language_model):
        assert part.config._attn_implementation == "eager"
    assert tiny_model.language_model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager_model(**batch).logits, tiny_model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_attentions_need_eager_attention(tiny_model, batch):
    with pytest.raises(ValueError, match="needs eager attention.*'sdpa'"):
        tiny_model(**batch, output_attentions=True)


# ------------------------------------------------------------------------------------------ gradient checkpointing
@pytest.fixture(scope="module")
def opt_model(tiny_model):
    """The tiny model over an OPT LLM with heavy dropout, whose decoder layers apply dropout themselves (reading
    their own training flag), and a Q-Former without dropout: in training mode it must compute exactly as in eval
    mode, since only the Q-Former trains."""
    config = tiny_model.config
    text = config.text_config
    opt = {
        "model_type": "opt", "vocab_size": text.vocab_size, "hidden_size": 32, "word_embed_proj_dim": 32,
        "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 512,
        "dropout": 0.5, "attention_dropout": 0.5, "pad_token_id": text.pad_token_id, "eos_token_id": text.eos_token_id,
    }  # fmt: skip
    qformer = {**config.qformer_config.to_dict(), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    config = PotsaConfig(**{**config.to_dict(), "text_config": opt, "qformer_config": qformer})
    return PotsaForSpeechTranslation(config).eval()


def _training_step(model, batch):
    """One forward + backward; how often each checkpointable layer of the LLM and the Q-Former computed (the hook
    sits on a layer's first sub-module: checkpointing recomputes a layer's `forward`, not its hooked call)."""
    calls = {"language_model": 0, "qformer": 0}

    def counter(part):
        return lambda *_: calls.__setitem__(part, calls[part] + 1)

    hooks = [
        next(layer.children()).register_forward_hook(counter(part))
        for part in calls
        for layer in getattr(model, part).modules()
        if isinstance(layer, GradientCheckpointingLayer)
    ]
    output = model(**batch)
    output.loss.backward()
    for hook in hooks:
        hook.remove()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return output.logits.detach(), gradients, calls


@pytest.mark.parametrize("llm", ["opt", "qwen2"])
def test_gradient_checkpointing_recomputes_the_frozen_llm_in_eval_mode(llm, opt_model, tiny_model, batch):
    model = opt_model if llm == "opt" else tiny_model
    eval_logits = model(**batch).logits
    plain = copy.deepcopy(model).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()
    layers = {"language_model": model.config.text_config.num_hidden_layers, "qformer": model.config.num_qformer_layers}

    torch.manual_seed(1)
    plain_logits, plain_gradients, plain_calls = _training_step(plain, batch)
    torch.manual_seed(1)
    logits, gradients, calls = _training_step(checkpointed, batch)
    assert plain_calls == layers  # each layer once
    assert calls == {part: 2 * count for part, count in layers.items()}  # and once more in the backward pass
    if llm == "opt":  # nothing trains with dropout: training mode computes as eval mode does
        torch.testing.assert_close(plain_logits, eval_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
    assert gradients.keys() == plain_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, plain_gradients[name], rtol=1e-6, atol=1e-7, msg=name)


def test_gradient_checkpointing_leaves_the_frozen_llm_in_eval_mode(opt_model):
    model = copy.deepcopy(opt_model)
    model.activation_checkpointing_enable()
    layers = model.language_model.model.decoder.layers
    model.train()
    assert all(layer.training for layer in layers)  # the flag transformers checkpoints by, on the layer alone
    assert not any(module.training for layer in layers for module in layer.modules() if module is not layer)
    model.eval()
    assert not any(module.training for module in model.modules())
    model.train()
    model.activation_checkpointing_disable()
    assert model.qformer.training and not any(module.training for module in model.language_model.modules())


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
