"""A tiny POTSA model end to end, offline: build, loss + backward, generate, save, reload through AutoModel.

    python -m examples.tiny_end_to_end [--out runs/tiny_end_to_end]

The weights are random, so the "translation" is noise; what this shows is the whole path a real checkpoint takes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor

from potsa_training.tiny import build_tiny_potsa


def tone(seconds: float, pitch: float, sampling_rate: int = 22_050) -> np.ndarray:
    """A stand-in for speech at 22.05 kHz (the processor resamples it to 16 kHz)."""
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    return (0.3 * np.sin(2 * np.pi * pitch * t) * (1 + np.sin(2 * np.pi * 4 * t)) / 2).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tiny_end_to_end"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, processor = build_tiny_potsa(seed=0)
    counts = model.num_parameters_by_part()
    print(f"tiny model: {counts['trainable']:,} trainable of {counts['total']:,} parameters")

    clips = [tone(1.2, 180), tone(2.5, 220)]
    batch = processor(clips, sampling_rate=22_050, language=["es", "ja"], text=["三月三日", "十四点三十分"])
    model.train()
    output = model(**batch, output_qformer_hidden_states=True)
    output.loss.backward()
    print(f"loss {output.loss.item():.3f}; Q-Former states: {len(output.qformer_hidden_states)} x "
          f"{tuple(output.qformer_hidden_states[-1].shape)}; query-token grad norm {model.query_tokens.grad.norm():.2e}")

    model.eval()
    prompts = processor(clips, sampling_rate=22_050, language=["es", "ja"])
    generated = model.generate(**prompts, max_new_tokens=8, num_beams=2, no_repeat_ngram_size=2)
    texts = processor.batch_decode_translations(generated)
    print(f"generated (random weights): {texts}")

    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    reloaded = AutoModel.from_pretrained(args.out, trust_remote_code=True)
    reprocessor = AutoProcessor.from_pretrained(args.out, trust_remote_code=True)
    again = reloaded.generate(**reprocessor(clips, sampling_rate=22_050, language=["es", "ja"]),
                              max_new_tokens=8, num_beams=2, no_repeat_ngram_size=2)
    if not torch.equal(generated, again):
        raise SystemExit("reloaded model generates differently")
    print(f"saved to {args.out} and reloaded with AutoModel(trust_remote_code=True): identical output "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
