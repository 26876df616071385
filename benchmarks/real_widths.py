"""The paper's real-size POTSA model, exercised: one stage-3 training step and a `generate`, with random weights.

    python -m benchmarks.real_widths  # CPU (the default): real widths, 1 encoder / 1 LLM layer, 3 Q-Former blocks
    python -m benchmarks.real_widths --device cuda --dtype bfloat16 --full-depth --batch-sizes 1 2 4 8 \\
        --gradient-checkpointing both  # one GPU: peak memory per batch size, beside the estimate

The model is training/configs/model_paper.yaml without its base model ids: a Whisper-large-v3 encoder (128 mel bins,
d_model 1280, 20 heads, ffn 5120, 1500 positions), the 8-block Q-Former (d 768, 12 heads, 80 queries) and a
Qwen2.5-7B LLM (hidden 3584, 28 heads, 4 KV heads, intermediate 18944, vocabulary 152,064), built with random
weights on the target device (nothing is downloaded, nothing is initialised on the CPU and copied). Unless
`--full-depth`, each stack keeps one layer (the Q-Former three, the UCB's candidate layers): the widths, the code
path and every tensor shape but the depth are the real ones.

A step is stage 3 as training/trainer.py runs it, from potsa_training's pieces: a batch of sentences each spoken in
two languages, 30 s windows (3000 mel frames), `memory_estimate`'s prompt and target lengths; the UCB scheduler
(`AlignmentArguments()`, the paper's settings) picks the Q-Former layer, `find_parallel_pairs` pairs the two
languages of each sentence, and the loss is CE + lambda * `weighted_alignment_loss`; AdamW updates the trainable
part. As with `bf16: true` in the stage configs, a bfloat16 `--dtype` holds the frozen encoder and LLM in bfloat16,
keeps the connector in float32 and runs the step under autocast.

On a GPU, each batch size runs one step with and without gradient checkpointing (`--gradient-checkpointing`), and
`torch.cuda.max_memory_allocated` of the step (weights included) goes beside the "total, not cached" estimate of
benchmarks/memory_estimate.py for that row; a CUDA out-of-memory is recorded as OOM. Results:
benchmarks/results/real_widths.md and .json (real_widths_cpu.* on the CPU). A batch of one utterance has no
parallel pair: its OT term is 0.

It needs this repository's requirements (transformers >= 5.23, pyarrow) and `potsa_training` importable: `pip install -e .`, or from a bare clone
`mkdir -p /tmp/site && ln -s $PWD/training /tmp/site/potsa_training && export PYTHONPATH=$PWD:/tmp/site`. Progress
goes to stdout, one line per step.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from transformers import AutoModel

from benchmarks.machine import cpu_name
from benchmarks.memory_estimate import GIB, PROMPT_TOKENS, RESULTS_JSON, TARGET_TOKENS, MemoryEstimate
from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation
from modeling_potsa.configuration_potsa import IGNORE_INDEX, QWEN25_7B_INSTRUCT, WHISPER_LARGE_V3_ENCODER
from potsa_training.alignment import find_parallel_pairs, weighted_alignment_loss
from potsa_training.arguments import AlignmentArguments
from potsa_training.layer_scheduler import LayerScheduler

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = ("es", "ja")  # each sentence of a batch is spoken in both: one OT pair per sentence
# Without --full-depth: one encoder and one LLM layer; three Q-Former blocks, the UCB's candidate layers 1-3.
REDUCED_DEPTH = {"encoder_layers": 1, "llm_layers": 1, "qformer_layers": 3}
GENERATED_TOKENS = 4


def paper_config(full_depth: bool, vocab_size: int | None = None, encoder_positions: int | None = None) -> PotsaConfig:
    """The paper's model without base model ids (random weights). `vocab_size` and `encoder_positions` (frames per
    window; 1500 = 30 s) shrink the LLM's vocabulary and the encoder window: only tests use them, to stay fast."""
    settings = yaml.safe_load((REPO / "training/configs/model_paper.yaml").read_text())
    encoder = {"model_type": "whisper", **WHISPER_LARGE_V3_ENCODER}
    text = {"model_type": "qwen2", **QWEN25_7B_INSTRUCT}
    qformer = settings.pop("qformer_config")
    if not full_depth:
        encoder["encoder_layers"] = REDUCED_DEPTH["encoder_layers"]
        text["num_hidden_layers"] = REDUCED_DEPTH["llm_layers"]
        qformer["num_hidden_layers"] = REDUCED_DEPTH["qformer_layers"]
    if vocab_size is not None:
        text.update(vocab_size=vocab_size, bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 2)
    if encoder_positions is not None:
        encoder["max_source_positions"] = encoder_positions
    settings.update(encoder_model_id=None, text_model_id=None)
    return PotsaConfig(
        **settings, encoder_config=encoder, text_config=text, qformer_config=qformer,
        speech_token_id=text["vocab_size"] - 1,
    )  # fmt: skip


def build_model(config: PotsaConfig, device: str, dtype: torch.dtype) -> PotsaForSpeechTranslation:
    """Random weights made on `device`: the frozen encoder and LLM in `dtype`, the connector in float32 (what
    `_keep_in_fp32_modules_strict` gives a checkpoint loaded with `dtype=`)."""
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype)
    for name in model._keep_in_fp32_modules_strict:
        part = getattr(model, name)
        if isinstance(part, torch.nn.Parameter):
            part.data = part.data.float()
        else:
            part.float()
    return model


def synthetic_batch(
    config: PotsaConfig,
    size: int,
    device: str | torch.device,
    generator: torch.Generator,
    prompt_tokens: int = PROMPT_TOKENS,
    target_tokens: int = TARGET_TOKENS,
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """`size` utterances of sentences spoken in both LANGUAGES (utterance i: sentence i // 2, language i % 2), as
    the collator gives them: random log-mel windows, a prompt of `prompt_tokens` tokens with the speech placeholders
    inside and `target_tokens` target tokens (labels -100 on the prompt). Returns (inputs, sentence ids, languages)."""
    speech_token, queries = config.speech_token_id, config.num_query_tokens
    if prompt_tokens < queries:
        raise ValueError(f"The prompt ({prompt_tokens} tokens) must hold the {queries} speech placeholders.")
    window = 2 * config.encoder_config.max_source_positions  # mel frames
    features = torch.randn(size, config.encoder_config.num_mel_bins, window, generator=generator)
    input_ids = torch.randint(0, speech_token, (size, prompt_tokens + target_tokens), generator=generator)
    prefix = (prompt_tokens - queries) // 2  # the chat template's system turn, before the speech
    input_ids[:, prefix : prefix + queries] = speech_token
    labels = input_ids.clone()
    labels[:, :prompt_tokens] = IGNORE_INDEX
    languages = [LANGUAGES[i % 2] for i in range(size)]
    inputs = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
        "input_features": features, "feature_attention_mask": torch.ones(size, window, dtype=torch.long),
        "language_ids": torch.tensor([config.language_id(language) for language in languages]),
    }  # fmt: skip
    return {key: value.to(device) for key, value in inputs.items()}, [str(i // 2) for i in range(size)], languages


def training_step(
    model: PotsaForSpeechTranslation,
    inputs: dict[str, torch.Tensor],
    sentence_ids: list[str],
    languages: list[str],
    alignment: AlignmentArguments,
    scheduler: LayerScheduler,
    optimizer: torch.optim.Optimizer,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """One stage-3 optimizer step, as PotsaTrainer takes it: the scheduler picks the layer, CE + lambda * OT, AdamW,
    the scheduler's reward. Returns the loss terms and the layer."""
    model.train()
    scheduler.select()
    pairs = find_parallel_pairs(sentence_ids, languages, alignment.ot_pair_strategy, generator=torch.Generator())
    device_type = inputs["input_ids"].device.type
    precision = nullcontext() if autocast_dtype is None else torch.autocast(device_type, dtype=autocast_dtype)
    with precision:
        outputs = model(**inputs, output_qformer_hidden_states=True)
        ot = weighted_alignment_loss(
            outputs.qformer_hidden_states, scheduler.current_layers, pairs, alignment.ot_pair_strategy,
            languages=languages, blur=alignment.ot_blur,
        )  # fmt: skip
        loss = outputs.loss + alignment.ot_loss_weight * ot
    if not torch.isfinite(loss):
        raise ValueError(f"Non-finite loss at real widths: CE {outputs.loss.item()}, OT {ot.item()}.")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.update(ot.item() if pairs else None)
    return {"ce": outputs.loss.item(), "ot": ot.item(), "layer": scheduler.current_layer, "pairs": len(pairs)}


@torch.no_grad()
def generate(model: PotsaForSpeechTranslation, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Greedy translation of a `synthetic_batch`'s audio from its prompt (the labelled target dropped):
    `(batch, GENERATED_TOKENS)` new token ids."""
    model.eval()
    prompt_tokens = int((inputs["labels"][0] != IGNORE_INDEX).nonzero()[0])
    prompt = {key: inputs[key][:, :prompt_tokens] for key in ("input_ids", "attention_mask")}
    speech = {key: inputs[key] for key in ("feature_attention_mask", "language_ids")}
    speech["input_features"] = inputs["input_features"].to(model.speech_encoder.dtype)  # as the pipeline feeds it
    return model.generate(**prompt, **speech, max_new_tokens=GENERATED_TOKENS, min_new_tokens=GENERATED_TOKENS)


def estimated_bytes(batch_sizes: list[int], checkpointing: list[bool]) -> dict[tuple[int, bool], float]:
    """benchmarks/memory_estimate.py's "total, not cached" per (batch size, checkpointing), from its committed
    measurement (memory_estimate.json; `python -m benchmarks.memory_estimate` remakes it) of the same paper-size
    model, frames and token counts."""
    estimate = MemoryEstimate.from_json(json.loads(RESULTS_JSON.read_text()))
    return {(batch, checked): estimate.total(batch, checked, encoder_cached=False)
            for batch in batch_sizes for checked in checkpointing}  # fmt: skip


def measure_step(
    model: PotsaForSpeechTranslation,
    config: PotsaConfig,
    batch_size: int,
    checkpointing: bool,
    autocast_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """One training step of `batch_size` utterances from a fresh optimizer and scheduler: its loss terms, seconds
    and, on a GPU, `torch.cuda.max_memory_allocated` over the step (weights included; None on out-of-memory)."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    device = model.device
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-5)
    alignment = AlignmentArguments()  # the paper's stage-3 settings: lambda 10, blur 0.05, UCB over layers 1-3
    row: dict[str, Any] = {"batch_size": batch_size, "gradient_checkpointing": checkpointing}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        batch = synthetic_batch(config, batch_size, device, torch.Generator().manual_seed(batch_size))
        row |= training_step(model, *batch, alignment, alignment.layer_scheduler(seed=0), optimizer, autocast_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        row["peak_bytes"] = None
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["seconds"] = time.perf_counter() - start
    return row


def log(message: str) -> None:
    print(f"[real_widths] {message}", flush=True)


def run(
    device: str,
    dtype: torch.dtype,
    full_depth: bool,
    batch_sizes: list[int],
    checkpointing: list[bool],
    config: PotsaConfig | None = None,
) -> dict[str, Any]:
    """Build the model on `device`, take one training step per (checkpointing, batch size) and generate; returns
    the results (the rows, parameter counts, generation) as `write_results` records them."""
    config = config or paper_config(full_depth)
    autocast_dtype = None if dtype == torch.float32 else dtype
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(config, device, dtype)
    counts = model.num_parameters_by_part()
    log(f"built {counts['total'] / 1e9:.2f} B parameters on {device} in {time.perf_counter() - start:.1f} s")
    estimates = estimated_bytes(batch_sizes, checkpointing) if device == "cuda" else {}
    rows = []
    for checkpointed in checkpointing:
        for batch_size in batch_sizes:
            row = measure_step(model, config, batch_size, checkpointed, autocast_dtype)
            if device == "cuda":
                row["estimate_bytes"] = estimates[batch_size, checkpointed]
            rows.append(row)
            log(describe(row))
    inputs = synthetic_batch(config, 4, model.device, torch.Generator().manual_seed(0))[0]
    start = time.perf_counter()
    tokens = generate(model, inputs)
    generation = {"utterances": tokens.shape[0], "tokens": tokens.shape[1], "seconds": time.perf_counter() - start}
    log(f"generated {generation['tokens']} tokens for {generation['utterances']} utterances")
    depth = {
        "encoder_layers": config.encoder_config.encoder_layers,
        "llm_layers": config.text_config.num_hidden_layers,
        "qformer_layers": config.qformer_config.num_hidden_layers,
    }
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "depth": depth,
        "parameters": {"total": counts["total"], "trainable": counts["trainable"]},
        "merged_lora_parameters": merged_lora_parameters(),
        "rows": rows,
        "generation": generation,
    }


def merged_lora_parameters() -> int:
    """LLM weights that publishing a full-depth model trained with the default LoRA targets stores merged
    (examples/push_to_hub.py), counted on the meta device."""
    config = paper_config(full_depth=True)
    suffixes = tuple(f".{module}.weight" for module in config.lora_target_modules)
    with torch.device("meta"):
        model = PotsaForSpeechTranslation(config)
    return sum(param.numel() for name, param in model.language_model.named_parameters() if name.endswith(suffixes))


def gib(value: float | None) -> str:
    return "OOM" if value is None else f"{value / GIB:.1f}"


def describe(row: dict[str, Any]) -> str:
    memory = (
        f", peak {gib(row['peak_bytes'])} GiB (estimate {gib(row['estimate_bytes'])})" if "peak_bytes" in row else ""
    )
    terms = f", CE {row['ce']:.3f}, OT {row['ot']:.4f} at layer {row['layer']}" if "ce" in row else ""
    checkpointing = "on" if row["gradient_checkpointing"] else "off"
    return f"batch {row['batch_size']}, checkpointing {checkpointing}: {row['seconds']:.1f} s{terms}{memory}"


def to_markdown(results: dict[str, Any], command: str) -> str:
    depth, parameters, generation = results["depth"], results["parameters"], results["generation"]
    on_gpu = any("peak_bytes" in row for row in results["rows"])
    autocast = " under bf16 autocast" if results["dtype"] != "float32" else ""
    setup = (
        f"{results['device']}, torch {results['torch']}, transformers {results['transformers']}. Frozen encoder and "
        f"LLM in {results['dtype']}, connector in float32{autocast}. Layers (encoder / LLM / Q-Former): "
        f"{depth['encoder_layers']} / {depth['llm_layers']} / {depth['qformer_layers']}; {parameters['total']:,} "
        f"parameters, {parameters['trainable']:,} trainable. One stage-3 step per row from a fresh AdamW: utterance "
        f"i is sentence i // 2 in {' / '.join(LANGUAGES)}, a 30 s window (3000 mel frames), "
        f"{PROMPT_TOKENS} prompt tokens (80 of them speech) + {TARGET_TOKENS} target tokens; CE + 10 * OT at the "
        "Q-Former layer UCB picks among 1-3 (a batch of one utterance has no pair: OT 0)."
    )
    memory_columns = " peak allocated (GiB) | memory_estimate.py, not cached (GiB) |" if on_gpu else ""
    lines = [
        f"# POTSA at the paper's widths, random weights (`{command}`)",
        "",
        setup,
        "",
        f"| batch | gradient checkpointing |{memory_columns} CE | OT | OT layer | step (s) |",
        "|---:|---|" + ("---:|---:|" if on_gpu else "") + "---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        cells = [str(row["batch_size"]), "on" if row["gradient_checkpointing"] else "off"]
        if on_gpu:
            cells += [gib(row["peak_bytes"]), gib(row["estimate_bytes"])]
        terms = [f"{row['ce']:.3f}", f"{row['ot']:.4f}", str(row["layer"])] if "ce" in row else ["-"] * 3
        lines.append("| " + " | ".join([*cells, *terms, f"{row['seconds']:.1f}"]) + " |")
    lines += [
        "",
        (
            f"`generate`: {generation['tokens']} greedy tokens for {generation['utterances']} utterances in "
            f"{generation['seconds']:.1f} s."
        ),
        "",
        (
            "Publishing a full-depth model trained with LoRA on the default targets (q/k/v/o projections) stores "
            f"{results['merged_lora_parameters']:,} merged LLM parameters beside the connector "
            "(examples/push_to_hub.py)."
        ),
    ]
    if on_gpu:
        lines += [
            "",
            (
                "Peak allocated: `torch.cuda.max_memory_allocated` over the step, weights included; the CUDA context "
                "and the allocator's reserve are in neither column."
            ),
        ]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], command: str, out_dir: Path) -> Path:
    """benchmarks/results/real_widths.{md,json} from a GPU, real_widths_cpu.* from the CPU; returns the .md path."""
    stem = "real_widths" if any("peak_bytes" in row for row in results["rows"]) else "real_widths_cpu"
    (out_dir / f"{stem}.json").write_text(json.dumps({"command": command, **results}, indent=2) + "\n")
    markdown = out_dir / f"{stem}.md"
    markdown.write_text(to_markdown(results, command))
    return markdown


CHECKPOINTING = {"off": [False], "on": [True], "both": [False, True]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="the frozen encoder and LLM's dtype; bfloat16 also runs the step under autocast (`bf16: true`)",
    )  # fmt: skip
    parser.add_argument(
        "--full-depth", action="store_true", help="32 encoder layers, 28 LLM layers, 8 Q-Former blocks (GPU)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4], help="utterances per step")
    parser.add_argument("--gradient-checkpointing", choices=list(CHECKPOINTING), default="off")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args(argv)
    if any(size < 1 for size in args.batch_sizes):
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    results = run(
        args.device, getattr(torch, args.dtype), args.full_depth, args.batch_sizes,
        CHECKPOINTING[args.gradient_checkpointing],
    )  # fmt: skip
    command = " ".join(["python -m benchmarks.real_widths", *(argv if argv is not None else sys.argv[1:])])
    log(f"wrote {write_results(results, command, args.out_dir)}")
    return results


if __name__ == "__main__":
    main()
