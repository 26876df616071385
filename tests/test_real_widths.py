"""benchmarks/real_widths.py: the paper's widths build, take a stage-3 training step and generate on the CPU; a GPU
row that runs out of memory is recorded as OOM."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from benchmarks import real_widths
from benchmarks.real_widths import (
    GENERATED_TOKENS,
    build_model,
    generate,
    measure_step,
    paper_config,
    synthetic_batch,
    to_markdown,
    training_step,
)
from potsa_training.arguments import AlignmentArguments

# Shrunk to stay fast, every width untouched: the vocabulary (152,064 -> 1,024: the embedding and LM head go from
# 1.1 B parameters to 7 M), the encoder window (1500 -> 150 positions: 30 s -> 3 s), the text around the 80 speech
# placeholders (8 prompt and 8 target tokens instead of memory_estimate's 40 and 96) and the batch (one sentence in
# two languages: one OT pair). Depth is the script's CPU default: 1 encoder layer, 1 LLM layer, 3 Q-Former blocks.
VOCAB_SIZE, ENCODER_POSITIONS, TEXT_TOKENS = 1024, 150, 8


@pytest.fixture(scope="module")
def real_width_model():
    config = paper_config(full_depth=False, vocab_size=VOCAB_SIZE, encoder_positions=ENCODER_POSITIONS)
    torch.manual_seed(0)
    return config, build_model(config, "cpu", torch.float32)


def test_the_config_has_the_papers_widths(real_width_model):
    config, model = real_width_model
    encoder, text, qformer = config.encoder_config, config.text_config, config.qformer_config
    assert (encoder.num_mel_bins, encoder.d_model, encoder.encoder_attention_heads, encoder.encoder_ffn_dim) == (
        128, 1280, 20, 5120,
    )  # fmt: skip
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (
        3584, 28, 4, 18944,
    )  # fmt: skip
    assert (qformer.hidden_size, qformer.num_attention_heads, config.num_query_tokens) == (768, 12, 80)
    assert model.language_model.model.layers[0].mlp.gate_proj.weight.shape == (18944, 3584)
    full = paper_config(full_depth=True)
    assert (full.encoder_config.encoder_layers, full.text_config.num_hidden_layers, full.num_qformer_layers) == (
        32,
        28,
        8,
    )
    assert (full.encoder_config.max_source_positions, full.text_config.vocab_size) == (1500, 152064)


def test_one_stage3_step_trains_the_connector_only_and_generate_runs(real_width_model):
    config, model = real_width_model
    inputs, sentence_ids, languages = synthetic_batch(
        config, 2, "cpu", torch.Generator().manual_seed(0), config.num_query_tokens + TEXT_TOKENS, TEXT_TOKENS
    )
    alignment = AlignmentArguments()
    scheduler = alignment.layer_scheduler(seed=0)
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-3)
    before = {name: param.detach().clone() for name, param in model.named_parameters() if "layers.0.mlp" not in name}

    terms = training_step(model, inputs, sentence_ids, languages, alignment, scheduler, optimizer, None)

    assert terms["pairs"] == 1 and terms["layer"] in alignment.ot_candidate_layers
    assert terms["ot"] > 0 and math.isfinite(terms["ce"]) and terms["ce"] > 0
    assert scheduler.pick_counts[terms["layer"]] == 1
    changed = {
        name for name, param in model.named_parameters() if name in before and not torch.equal(param, before[name])
    }
    assert {
        "query_tokens",
        "projector.linear.weight",
        "qformer.encoder.layer.0.crossattention.attention.key.weight",
    } <= changed
    assert not any(name.startswith(("speech_encoder.", "language_model.")) for name in changed)
    tokens = generate(model, inputs)
    assert tokens.shape == (2, GENERATED_TOKENS) and int(tokens.max()) < VOCAB_SIZE


def test_an_out_of_memory_step_is_recorded_and_the_run_goes_on(tiny, monkeypatch):
    model = copy.deepcopy(tiny[0])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(real_widths, "training_step", out_of_memory)
    row = measure_step(model, model.config, batch_size=8, checkpointing=True, autocast_dtype=None)
    assert row["peak_bytes"] is None and "ce" not in row
    assert all(param.grad is None for param in model.parameters())
    results = {
        "device": "GPU", "torch": "2", "transformers": "5", "dtype": "bfloat16", "merged_lora_parameters": 1,
        "depth": {"encoder_layers": 32, "llm_layers": 28, "qformer_layers": 8},
        "parameters": {"total": 10, "trainable": 1}, "generation": {"utterances": 4, "tokens": 4, "seconds": 1.0},
        "rows": [
            {**row, "estimate_bytes": 20 * 2**30},
            {"batch_size": 1, "gradient_checkpointing": False, "peak_bytes": 17 * 2**30, "estimate_bytes": 18 * 2**30,
             "ce": 12.0, "ot": 0.0, "layer": 2, "pairs": 0, "seconds": 1.5},
        ],
    }  # fmt: skip
    table = to_markdown(results, "python -m benchmarks.real_widths --device cuda")
    assert "| 8 | on | OOM | 20.0 | - | - | - |" in table
    assert "| 1 | off | 17.0 | 18.0 | 12.000 | 0.0000 | 2 | 1.5 |" in table


def test_cuda_mode_needs_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        real_widths.main(["--device", "cuda"])
