"""How the demo's stage-3 learning rate and OT weight were chosen: on the validation split, never on test.

    python -m benchmarks.stage3_selection

The paper's stage 3 runs 20 epochs at lr 1e-5 with lambda 10; the tiny recipe has 400 steps, so it needs a larger
learning rate, and lambda 10 then pulls the Q-Former away from what stage 2 taught it (benchmarks/ablation.py). Each
row here is the demo's stage 3 (training/configs/tiny_stage3_potsa.yaml: BC + OT with UCB over layers 1-2, 400
steps, seed 0) from the demo's stage-2 checkpoint with one (learning rate, lambda) pair, evaluated on the whole
validation split. The demo config takes the row with the best seen-language exact match. Jobs run like the
ablation's (single-threaded `training/run.py` subprocesses, resumable).
Results: benchmarks/results/stage3_selection.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.ablation import Job, bind_to_checkpoint, execute, slug
from benchmarks.demo import REPO, STAGES

# (learning rate, lambda): the paper's lambda and two smaller ones, at the tiny recipe's learning rate and below.
GRID = ((1e-3, 10.0), (1e-3, 3.0), (1e-3, 1.0), (5e-4, 3.0), (2e-4, 10.0), (2e-4, 1.0))


def row_name(learning_rate: float, weight: float) -> str:
    return f"lr {learning_rate:g}, lambda {weight:g}"


def plan(args: argparse.Namespace) -> list[Job]:
    """One demo stage 3 per grid row, from the demo's stage-2 checkpoint, evaluated on the validation split. The
    first row runs alone: it completes the encoder cache if needed, so the concurrent rows only ever read it."""
    common = {
        "data_path": str(args.corpus), "encoder_cache_dir": str(args.demo / "encoder_cache"),
        "init_from": str(args.demo / STAGES[1]), "eval_split": "validation", "seed": 0,
        "test_split": None,  # the config's final report is on test: here it is on validation (eval_split)
    }  # fmt: skip
    jobs: list[Job] = []
    for learning_rate, weight in GRID:
        name = row_name(learning_rate, weight)
        settings = {**common, "learning_rate": learning_rate, "ot_loss_weight": weight}
        jobs.append(Job(name, args.out / slug(name), STAGES[2], settings, [jobs[0].name] if jobs else []))
    return jobs


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo's output (stage 2 is used)")
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus"))
    parser.add_argument("--out", type=Path, default=Path("runs/stage3_selection"))
    parser.add_argument("--workers", type=int, default=2, help="training processes at a time (one thread each)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args(argv)
    if not (args.demo / STAGES[1] / "config.json").exists():
        raise SystemExit(f"No stage-2 checkpoint in {args.demo / STAGES[1]}: run `python -m benchmarks.demo` first.")
    bind_to_checkpoint(args.out, args.demo / STAGES[1])
    jobs = plan(args)
    start = time.perf_counter()
    execute(jobs, args.workers, args.out / "logs")
    table = {job.name: json.loads((job.out_dir / "results.json").read_text())["groups"] for job in jobs}
    best = max(table, key=lambda name: table[name]["seen"]["exact_match"])
    lines = [
        "# Stage-3 learning rate and lambda, chosen on validation (`python -m benchmarks.stage3_selection`)",
        "",
        f"The demo's stage 3 (400 steps, seed 0) from its stage-2 checkpoint; the whole validation split "
        f"(seen: en es ru ja, zero-shot: de ko). This invocation ran {(time.perf_counter() - start) / 60:.0f} min "
        f"on 2 CPU cores. Best seen exact match: **{best}**.",
        "",
        "| learning rate, lambda | seen BLEU | seen EM | zero-shot BLEU | zero-shot EM |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, groups in table.items():
        seen, zero_shot = groups["seen"], groups["zero_shot"]
        lines.append(f"| {name} | {seen['bleu']:.1f} | {seen['exact_match']:.3f} | {zero_shot['bleu']:.1f} | "
                     f"{zero_shot['exact_match']:.3f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "stage3_selection.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
