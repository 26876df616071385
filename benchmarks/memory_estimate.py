"""GPU memory a real-size POTSA stage needs, per GPU, with the frozen encoder cached and not, with and without
gradient checkpointing.

    python -m benchmarks.memory_estimate [--batch-size 8] [--frames 1500]

Nothing here needs a GPU or a download. Parameters are counted on the meta device (training/configs/model_paper.yaml).
Activations are *measured* through the model itself: `PotsaForSpeechTranslation` at real width (Qwen2.5-7B's decoder
layers, embeddings and LM head in bfloat16, the real-size Q-Former and projector in float32), cut to two LLM layers,
runs one training forward on the CPU with labels, exactly as a training step does (cached encoder frames in,
`model.train()`: the LLM frozen in eval mode, gradients flowing through it to the soft prompt), once as is and once
after `model.activation_checkpointing_enable()`, while `torch.autograd.graph.saved_tensors_hooks` adds up the bytes
autograd keeps for the backward pass, by the module that first saves them. The LLM's 28 layers are identical, so
the first layer (which also holds what all layers share) plus 27 times the second is exact for the layer stack.
Every activation is per utterance (rows are padded to one length), so one utterance is measured and multiplied by
the batch. Results go to benchmarks/results/memory_estimate.md, the measurement to memory_estimate.json.

What is left out (say so rather than guess): allocator fragmentation and CUDA context (~1-2 GiB per GPU), gradient
buffers that live only during the backward pass, and DeepSpeed/FSDP sharding (ZeRO-2 divides the optimizer states and
gradients of the 85 M trainable parameters by the number of GPUs; they are a small share here).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation
from modeling_potsa.configuration_potsa import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
RESULTS_JSON = REPO / "benchmarks/results/memory_estimate.json"  # the measurement, for benchmarks/real_widths.py

GIB = 2**30
BF16 = 2
# Bytes per trainable parameter: float32 weight (the connector is kept in fp32), its gradient, AdamW's two moments.
TRAINABLE_BYTES = 4 + 4 + 8
# Prompt tokens: the Qwen2.5 chat template with the instruction (about 40 tokens) + 80 soft-prompt slots. Target
# tokens: FLEURS transcripts and Chinese translations are mostly under 64 Qwen tokens; we budget for a long
# utterance, since a batch is padded to its longest row.
PROMPT_TOKENS = 40 + 80
TARGET_TOKENS = 96
MEASURED_LLM_LAYERS = 2  # the first layer holds what all layers share; the second is every further layer


def saved_bytes_by_part(
    model: torch.nn.Module, parts: Mapping[str, torch.nn.Module], run: Callable[[], object]
) -> dict[str, int]:
    """Bytes of the distinct tensors autograd saves for backward while `run` builds its graph, less the model's own
    weights (saved for the input gradient, but already counted as weights), by the part of `parts` running when a
    tensor is first saved ("rest" outside them). Under non-reentrant checkpointing a checkpointed layer's inner
    tensors go to the checkpoint's own hooks, and only the inputs it keeps for the recomputation reach these."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    running = ["rest"]
    first_saved_in: dict[int, tuple[str, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            first_saved_in.setdefault(storage.data_ptr(), (running[0], storage.nbytes()))
        return tensor

    hooks = []
    for name, module in parts.items():
        hooks.append(module.register_forward_pre_hook(lambda *_, name=name: running.__setitem__(0, name)))
        hooks.append(module.register_forward_hook(lambda *_: running.__setitem__(0, "rest")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = run()
        del output
    finally:
        for hook in hooks:
            hook.remove()
    totals = dict.fromkeys([*parts, "rest"], 0)
    for part, nbytes in first_saved_in.values():
        totals[part] += nbytes
    return totals


@dataclass(frozen=True)
class UtteranceActivations:
    """Bytes autograd keeps for the backward pass of one utterance, by part of the model."""

    first_llm_layer: int  # with what every layer shares (attention mask, rotary tables)
    llm_layer: int  # every further decoder layer
    llm_rest: int  # merged input embeddings, final norm, LM head and the loss (its float32 log-probabilities)
    connector: int  # Q-Former and projector (float32, trainable)

    def llm(self, layers: int) -> int:
        return self.first_llm_layer + (layers - 1) * self.llm_layer + self.llm_rest


def measure_utterance(config: PotsaConfig, frames: int) -> dict[bool, UtteranceActivations]:
    """One training forward of one utterance through a real-width, two-layer POTSA, without and with gradient
    checkpointing -> {checkpointing: activations}."""
    config = copy.deepcopy(config)
    config.text_config.num_hidden_layers = MEASURED_LLM_LAYERS
    config.text_config._attn_implementation = "sdpa"  # what training uses: no (S x S) attention matrix is kept
    config.encoder_config.encoder_layers = 1  # unused: the encoder is cached, its frames come in
    config.speech_token_id = config.text_config.vocab_size - 1
    torch.manual_seed(0)
    language_model = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.bfloat16)
    model = PotsaForSpeechTranslation(config, language_model=language_model)  # the connector stays float32
    tokens = PROMPT_TOKENS + TARGET_TOKENS
    input_ids = torch.randint(0, config.speech_token_id, (1, tokens))
    input_ids[0, 40:PROMPT_TOKENS] = config.speech_token_id
    labels = input_ids.clone()
    labels[0, :PROMPT_TOKENS] = IGNORE_INDEX
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": torch.ones_like(input_ids),
        "encoder_hidden_states": torch.randn(1, frames, config.encoder_hidden_size),
        "encoder_attention_mask": torch.ones(1, frames, dtype=torch.long),
        "language_ids": torch.zeros(1, dtype=torch.long),
    }
    layers = model.language_model.model.layers
    parts = {"first": layers[0], "layer": layers[1], "qformer": model.qformer, "projector": model.projector}
    measured = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        saved = saved_bytes_by_part(model, parts, lambda: model(**batch).loss)
        measured[checkpointing] = UtteranceActivations(
            first_llm_layer=saved["first"],
            llm_layer=saved["layer"],
            llm_rest=saved["rest"],
            connector=saved["qformer"] + saved["projector"],
        )
    return measured


@dataclass(frozen=True)
class MemoryEstimate:
    """What one real-size configuration needs on a GPU: frozen and trainable weights, and the measured activations
    of one utterance (`measure_utterance`), from which any batch's total follows (every activation is per
    utterance)."""

    llm_weights: int
    encoder_weights: int
    trainable: int  # trainable weights with their gradients and AdamW's moments
    trainable_parameters: int
    llm_layers: int
    activations: dict[bool, UtteranceActivations]  # gradient checkpointing -> one utterance's activations

    @classmethod
    def measure(cls, config: PotsaConfig, frames: int) -> MemoryEstimate:
        with torch.device("meta"):
            counts = PotsaForSpeechTranslation(config).num_parameters_by_part()
        return cls(
            llm_weights=counts["language_model"] * BF16,
            encoder_weights=counts["speech_encoder"] * BF16,
            trainable=counts["trainable"] * TRAINABLE_BYTES,
            trainable_parameters=counts["trainable"],
            llm_layers=config.text_config.num_hidden_layers,
            activations=measure_utterance(config, frames),
        )

    def llm_activations(self, batch: int, checkpointing: bool) -> int:
        """The LLM's, plus under checkpointing the one layer the backward pass recomputes at a time."""
        recomputed = self.activations[False].llm_layer if checkpointing else 0
        return batch * (self.activations[checkpointing].llm(self.llm_layers) + recomputed)

    def connector_activations(self, batch: int, checkpointing: bool) -> int:
        return batch * self.activations[checkpointing].connector

    def total(self, batch: int, checkpointing: bool, encoder_cached: bool) -> int:
        activations = self.llm_activations(batch, checkpointing) + self.connector_activations(batch, checkpointing)
        return self.llm_weights + self.trainable + activations + (0 if encoder_cached else self.encoder_weights)

    def to_json(self) -> dict:
        return {**asdict(self), "activations": {str(key).lower(): asdict(value) for key, value in self.activations.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> MemoryEstimate:
        activations = {key == "true": UtteranceActivations(**value) for key, value in data["activations"].items()}
        fields = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        return cls(**{**fields, "activations": activations})


def paper_config() -> PotsaConfig:
    return PotsaConfig(**yaml.safe_load((REPO / "training/configs/model_paper.yaml").read_text()))


def table(estimate: MemoryEstimate, batch_size: int, frames: int) -> str:
    plain, checkpointed = estimate.activations[False], estimate.activations[True]
    tokens = PROMPT_TOKENS + TARGET_TOKENS
    lines = [
        "# GPU memory per GPU, real size (estimate; `python -m benchmarks.memory_estimate`)",
        "",
        f"Whisper-large-v3 encoder + Qwen2.5-7B-Instruct in bfloat16 (frozen), the 8-block Q-Former + projector + "
        f"bias table in float32 with AdamW ({estimate.trainable_parameters / 1e6:.1f} M trainable parameters), {frames} "
        f"encoder frames (a 30 s window), {PROMPT_TOKENS} prompt tokens (chat template + 80 soft tokens) + "
        f"{TARGET_TOKENS} target tokens, SDPA attention. The three stage configs share these settings (batch 8 per "
        "GPU, bf16); stage 3 adds the OT loss, whose 16 pairs of 80 x 80 tokens cost a few MiB "
        "(benchmarks/results/bench_ot.md). Activations are measured from the bytes autograd saves in one training "
        "forward through the model (real width, two LLM layers, per utterance). Without checkpointing: "
        f"{plain.llm_layer / tokens / 2**10:.0f} KiB per token per LLM layer, "
        f"{plain.llm_rest / tokens / 2**10:.0f} KiB per token for the rest of the LLM (mostly the float32 "
        "log-probabilities over the vocabulary that the loss keeps), the Q-Former's for the batch. With "
        "`model.activation_checkpointing_enable()` (`activation_checkpointing: true` in a stage config), every "
        "layer of the Q-Former and of the frozen LLM keeps only its input "
        f"({checkpointed.llm_layer / tokens / 2**10:.0f} KiB per token per LLM layer) and is recomputed in the "
        "backward pass, one layer at a time: the column adds the activations of that one recomputed LLM layer. "
        "The encoder runs under no_grad (frozen, before the first trainable module): only its weights count, and "
        "with the encoder cache (`encoder_cache_dir`) it is not on the GPU at all. Measured peak memory on a GPU, "
        "beside these figures: benchmarks/results/real_widths.md.",
        "",
        "| per-GPU batch | gradient checkpointing | frozen LLM (GiB) | encoder, if not cached (GiB) | trainable + "
        "AdamW (GiB) | LLM activations (GiB) | Q-Former activations (GiB) | total, encoder cached (GiB) | total, not "
        "cached (GiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    half = max(batch_size // 2, 1)
    for batch, checkpointing in ((batch_size, False), (batch_size, True), (half, False), (half, True)):
        lines.append(
            f"| {batch} | {'yes' if checkpointing else 'no'} | {estimate.llm_weights / GIB:.1f} | "
            f"{estimate.encoder_weights / GIB:.1f} | {estimate.trainable / GIB:.2f} | "
            f"{estimate.llm_activations(batch, checkpointing) / GIB:.1f} | "
            f"{estimate.connector_activations(batch, checkpointing) / GIB:.2f} | "
            f"{estimate.total(batch, checkpointing, encoder_cached=True) / GIB:.1f} | "
            f"{estimate.total(batch, checkpointing, encoder_cached=False) / GIB:.1f} |"
        )
    lines += [
        "",
        "Not included: CUDA context and allocator overhead (1-2 GiB), gradient buffers that live only during the "
        "backward pass.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="per-GPU batch (the stage configs use 8)")
    parser.add_argument("--frames", type=int, default=1500, help="encoder frames per utterance (1500 = 30 s)")
    args = parser.parse_args(argv)
    estimate = MemoryEstimate.measure(paper_config(), args.frames)
    report = table(estimate, args.batch_size, args.frames)
    (REPO / "benchmarks/results/memory_estimate.md").write_text(report)
    RESULTS_JSON.write_text(json.dumps({"frames": args.frames, **estimate.to_json()}, indent=2) + "\n")
    return report


if __name__ == "__main__":
    print(main())
