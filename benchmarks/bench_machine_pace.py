"""How fast this machine runs the tiny recipe, against the prototype that set the demo's 10-minute target.

    python -m benchmarks.bench_machine_pace

../shared/DEMO_NOTES.md gives the prototype's phase times on its 2-core machine. Its most expensive phase was the
stand-in encoder: a WhisperEncoder of d=128, 3 layers, 40 mel bins, 88 positions (3.5 s), trained 1,500 steps at
batch 64 in 300 s, 0.20 s per step. This script times the same training step here (random features and CTC
targets: the time of a step does not depend on the values) with all CPU threads and with one, so the demo's wall
time can be read against the hardware it runs on. Results go to benchmarks/results/machine_pace.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from benchmarks.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
PROTOTYPE_SECONDS_PER_STEP = 300 / 1500  # DEMO_NOTES.md: stand-in encoder, 1,500 steps x 64 in 300 s
POSITIONS, MEL_BINS, BATCH, SYMBOLS, TARGET_LENGTH = 88, 40, 64, 64, 20


def seconds_per_step(threads: int, steps: int, warmup: int = 3) -> float:
    """Mean wall time of one AdamW step of the prototype's encoder + CTC head on `threads` CPU threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=128, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=512, decoder_layers=1,
        num_mel_bins=MEL_BINS, max_source_positions=POSITIONS,
    )  # fmt: skip
    encoder, head = WhisperEncoder(config), torch.nn.Linear(128, SYMBOLS)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    features = torch.randn(BATCH, MEL_BINS, 2 * POSITIONS)
    targets = torch.randint(1, SYMBOLS, (BATCH, TARGET_LENGTH))
    lengths = torch.full((BATCH,), POSITIONS), torch.full((BATCH,), TARGET_LENGTH)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        log_probs = head(encoder(features).last_hidden_state).log_softmax(-1)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, *lengths)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def pace_ratio(steps: int = 10) -> float:
    """This machine's step time on all its threads over the prototype's: divide a wall time by it to compare runs made
    on machines of different speed (a pace-normalised time)."""
    return seconds_per_step(os.cpu_count() or 1, steps) / PROTOTYPE_SECONDS_PER_STEP


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/machine_pace.md")
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 1
    rows = {f"{threads} threads": seconds_per_step(threads, args.steps), "1 thread": seconds_per_step(1, args.steps)}
    lines = [
        "# Machine pace: the prototype's stand-in-encoder step (`python -m benchmarks.bench_machine_pace`)",
        "",
        f"CPU: {cpu_name()}, {threads} cores; torch {torch.__version__}.",
        "",
        "| threads | seconds per step | x the prototype's 0.20 s |",
        "|---|---:|---:|",
        *(f"| {name} | {seconds:.3f} | {seconds / PROTOTYPE_SECONDS_PER_STEP:.2f} |" for name, seconds in rows.items()),
        "",
        "The prototype's 8.5-minute recipe scales by about the all-threads ratio on this machine.",
    ]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
