"""GPU memory a real-size POTSA stage needs, per GPU, with the frozen encoder cached and not.

    python -m benchmarks.memory_estimate [--batch-size 8] [--frames 1500]

Nothing here needs a GPU or a download. Parameters are counted on the meta device (training/configs/model_paper.yaml).
Activations are *measured*: one real-width Qwen2.5-7B decoder layer, the LM head and the real-size Q-Former run
forward in bfloat16 on the CPU, frozen exactly as in training (gradients flow through the frozen LLM to the soft
prompt), while `torch.autograd.graph.saved_tensors_hooks` adds up the bytes autograd keeps for the backward pass.
The LLM's 28 layers are identical, so one layer times 28 is exact for the layer stack. Results go to
benchmarks/results/memory_estimate.md.

What is left out (say so rather than guess): allocator fragmentation and CUDA context (~1-2 GiB per GPU), the
transient peak of one layer's backward, and DeepSpeed/FSDP sharding (ZeRO-2 divides the optimizer states and
gradients of the 85 M trainable parameters by the number of GPUs; they are a small share here).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers import Blip2QFormerModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation

REPO = Path(__file__).resolve().parents[1]

GIB = 2**30
BF16 = 2
# Bytes per trainable parameter: float32 weight (the connector is kept in fp32), its gradient, AdamW's two moments.
TRAINABLE_BYTES = 4 + 4 + 8
# Prompt tokens: the Qwen2.5 chat template with the instruction (about 40 tokens) + 80 soft-prompt slots. Target
# tokens: FLEURS transcripts and Chinese translations are mostly under 64 Qwen tokens; we budget for a long
# utterance, since a batch is padded to its longest row.
PROMPT_TOKENS = 40 + 80
TARGET_TOKENS = 96


def saved_bytes(module: torch.nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `run` builds its graph, less `module`'s own
    weights (saved for the input gradient, but already counted as weights)."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    del output
    return sum(seen.values())


def llm_layer_bytes_per_token(config: PotsaConfig, tokens: int) -> float:
    """Saved activations of one frozen decoder layer of the LLM, per token (input requires grad: the soft prompt)."""
    text_config = config.text_config
    text_config._attn_implementation = "sdpa"  # what training uses: no (S x S) attention matrix is kept
    layer = Qwen2DecoderLayer(text_config, layer_idx=0).to(torch.bfloat16).requires_grad_(False)
    rotary = Qwen2RotaryEmbedding(text_config)
    hidden = torch.randn(1, tokens, text_config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens).unsqueeze(0)
    cos, sin = rotary(hidden, positions)
    mask = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None].to(torch.bfloat16)
    total = saved_bytes(layer, lambda: layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))[0])
    return total / tokens


def lm_head_bytes_per_token(config: PotsaConfig) -> float:
    """The LM head's logits (bf16) and the float32 copy the cross-entropy takes, per token."""
    vocab = config.text_config.vocab_size
    return vocab * (BF16 + 4)


def qformer_bytes(config: PotsaConfig, batch_size: int, frames: int) -> int:
    """Saved activations of the real-size Q-Former (trainable, float32) for one batch of `frames` encoder frames."""
    qformer = Blip2QFormerModel(config.qformer_config)
    queries = torch.randn(batch_size, config.num_query_tokens, config.qformer_config.hidden_size, requires_grad=True)
    encoder_states = torch.randn(batch_size, frames, config.encoder_hidden_size)
    mask = torch.ones(batch_size, frames, dtype=torch.long)
    return saved_bytes(
        qformer, lambda: qformer(query_embeds=queries, encoder_hidden_states=encoder_states, encoder_attention_mask=mask)[0]
    )


def table(batch_size: int, frames: int) -> str:
    settings = yaml.safe_load((REPO / "training/configs/model_paper.yaml").read_text())
    config = PotsaConfig(**settings)
    with torch.device("meta"):
        counts = PotsaForSpeechTranslation(config).num_parameters_by_part()
    torch.manual_seed(0)
    per_token_layer = llm_layer_bytes_per_token(config, tokens=PROMPT_TOKENS + TARGET_TOKENS)
    per_token_head = lm_head_bytes_per_token(config)
    hidden_bytes = config.text_config.hidden_size * BF16
    qformer_by_batch = {batch: qformer_bytes(config, batch, frames) for batch in {batch_size, max(batch_size // 2, 1)}}
    encoder_weights = counts["speech_encoder"] * BF16
    llm_weights = counts["language_model"] * BF16
    trainable = counts["trainable"] * TRAINABLE_BYTES
    layers = config.text_config.num_hidden_layers
    lines = [
        "# GPU memory per GPU, real size (estimate; `python -m benchmarks.memory_estimate`)",
        "",
        f"Whisper-large-v3 encoder + Qwen2.5-7B-Instruct in bfloat16 (frozen), the 8-block Q-Former + projector + "
        f"bias table in float32 with AdamW ({counts['trainable'] / 1e6:.1f} M trainable parameters), {frames} "
        f"encoder frames (a 30 s window), {PROMPT_TOKENS} prompt tokens (chat template + 80 soft tokens) + "
        f"{TARGET_TOKENS} target tokens, SDPA attention. The three stage configs share these settings (batch 8 per "
        "GPU, bf16); stage 3 adds the OT loss, whose 16 pairs of 80 x 80 tokens cost a few MiB "
        "(benchmarks/results/bench_ot.md). Activations are measured from the bytes autograd saves: "
        f"{per_token_layer / 2**10:.0f} KiB per token per LLM layer, {per_token_head / 2**10:.0f} KiB per token for "
        "the LM head's logits (bf16 + the float32 copy of the loss), the Q-Former's for the batch. The encoder runs "
        "under no_grad (frozen, before the first trainable module): only its weights count, and with the encoder "
        "cache (`encoder_cache_dir`) it is not on the GPU at all.",
        "",
        "| per-GPU batch | LLM gradient checkpointing | frozen LLM (GiB) | encoder, if not cached (GiB) | trainable + "
        "AdamW (GiB) | LLM activations (GiB) | Q-Former activations (GiB) | total, encoder cached (GiB) | total, not "
        "cached (GiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, checkpointing in ((batch_size, False), (batch_size, True), (max(batch_size // 2, 1), False)):
        tokens = batch * (PROMPT_TOKENS + TARGET_TOKENS)
        # With checkpointing each layer keeps only its input (bf16 hidden state) and one layer is recomputed.
        stack = hidden_bytes * layers + per_token_layer if checkpointing else per_token_layer * layers
        llm_activations = tokens * (stack + per_token_head)
        qformer = qformer_by_batch[batch]
        cached = llm_weights + trainable + llm_activations + qformer
        lines.append(
            f"| {batch} | {'yes' if checkpointing else 'no'} | {llm_weights / GIB:.1f} | {encoder_weights / GIB:.1f} | "
            f"{trainable / GIB:.2f} | {llm_activations / GIB:.1f} | {qformer / GIB:.2f} | {cached / GIB:.1f} | "
            f"{(cached + encoder_weights) / GIB:.1f} |"
        )
    lines += [
        "",
        "Not included: CUDA context and allocator overhead (1-2 GiB), the transient peak of one layer's backward.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="per-GPU batch (the stage configs use 8)")
    parser.add_argument("--frames", type=int, default=1500, help="encoder frames per utterance (1500 = 30 s)")
    args = parser.parse_args(argv)
    report = table(args.batch_size, args.frames)
    (REPO / "benchmarks/results/memory_estimate.md").write_text(report)
    return report


if __name__ == "__main__":
    print(main())
