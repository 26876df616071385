"""The paper's ablations (and potsa's beyond-the-paper switches) on the offline corpus, several seeds.

    python -m benchmarks.ablation                       # paper + beyond rows, seeds 0 1 2, 2 worker processes
    python -m benchmarks.ablation --suite paper --seeds 0 --stage3-steps 100    # a quick look

Same data, same budget for every row: every row is a stage 3 of the same number of steps from the demo's stage-2
checkpoint (stages 1 ASR and 2 S2TT, `python -m benchmarks.demo`, run first if missing), differing only in the
settings of the row; the seeds are stage 3's (data order, pair sampling, layer sampling). Stages 1-2 are shared
because on 2 CPU cores they cost more than all rows of a seed together; the spread therefore covers stage 3 only.
Rows (`PAPER_ROWS`, `BEYOND_ROWS`) name their stage-3 overrides; "stage 2 only" is the stage-2 checkpoint itself,
evaluated on the same test utterances. Two zero-shot protocols: strict (the paper: de and ko take part in no stage;
their unlabeled audio only estimates their bias vector) and parallel-audio (their unlabeled audio also joins the OT
pairs, without labels).

Jobs run as `training/run.py` subprocesses, one CPU thread each, `--workers` at a time (small models use a second
thread poorly: two single-threaded runs on 2 cores get more done than one 2-threaded run). A finished job (its
results.json exists) is not rerun, so an interrupted ablation resumes where it stopped.
Results: benchmarks/results/ablation.md, ablation.json, ablation.png and (issue "beyond the paper") the CE/OT
gradient cosine per layer over training, gradient_cosine.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

from benchmarks import demo
from benchmarks.demo import REPO, STAGES

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NO_BIAS = {"use_bias_compensation": False, "estimate_bias": False}
PARALLEL_AUDIO = {"zero_shot_protocol": "parallel_audio"}
ALL_LAYERS = {"ot_layer_scheduler": "all", "ot_candidate_layers": [1, 2, 3]}
STAGE2_ONLY = "stage 2 only (no stage 3)"
PAPER_LAMBDA = 10.0
POTSA = "POTSA (BC + OT + UCB 1-2)"
# Row name -> stage-3 overrides of training/configs/tiny_stage3_potsa.yaml (POTSA: BC + OT, UCB over layers 1-2)
# at the paper's lambda.
PAPER_ROWS: dict[str, dict[str, Any]] = {
    STAGE2_ONLY: {**NO_BIAS, "ot_loss_weight": 0.0, "learning_rate": 0.0, "max_steps": 1, "warmup_steps": 0},
    "baseline (no BC, no OT)": {**NO_BIAS, "ot_loss_weight": 0.0},
    "+ BC only": {"ot_loss_weight": 0.0},
    "+ OT only (UCB 1-2)": NO_BIAS,
    POTSA: {},
    "OT on fixed layer 1": {"ot_layer_scheduler": "fixed", "ot_candidate_layers": [1]},
    "UCB over all layers 1-3": {"ot_candidate_layers": [1, 2, 3]},
    "uniform random layer 1-2": {"ot_layer_scheduler": "uniform"},
    "English anchor, frozen": {"ot_pair_strategy": "english_anchor_frozen"},
    "English anchor, with gradients": {"ot_pair_strategy": "english_anchor"},
    "POTSA, lambda 1 (paper: 10)": {"ot_loss_weight": 1.0},
    "+ OT only, parallel-audio": {**NO_BIAS, **PARALLEL_AUDIO},
    "POTSA, parallel-audio": PARALLEL_AUDIO,
}
BEYOND_ROWS: dict[str, dict[str, Any]] = {
    "all of layers 1-2 each step": {"ot_layer_scheduler": "all", "ot_candidate_layers": [1, 2]},
    "all of layers 1-3 each step": {**ALL_LAYERS, "ot_gradient_cosine_every": 5, "logging_steps": 10},
    "all of layers 1-3, weights 1/0.5/0.25": {**ALL_LAYERS, "ot_layer_weights": [1.0, 0.5, 0.25]},
    "all of layers 1-3 + PCGrad": {**ALL_LAYERS, "ot_gradient_surgery": "pcgrad"},
    "UCB over groups {1},{1,2},{1,2,3}": {"ot_candidate_layers": [1, 2, 3], "ot_layer_groups": [[1], [1, 2], [1, 2, 3]]},
    "POTSA + affine compensation": {"bias_compensation_mode": "affine"},
    "POTSA, bias table frozen at its estimate": {"train_bias": False},
}
COSINE_ROW = "all of layers 1-3 each step"
METRICS = (("seen", "bleu"), ("seen", "exact_match"), ("zero_shot", "bleu"), ("zero_shot", "exact_match"))
ALIGNMENT = ("recall_at_1", "lid_probe_compensated", "lid_probe_qformer")


@dataclass
class Job:
    """One training/run.py invocation and the jobs it waits for."""

    name: str
    out_dir: Path
    config: str
    settings: dict[str, Any]
    after: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Finished: evaluated (results.json) or, for a job without evaluation, trained and saved."""
        evaluated = self.settings.get("eval_split", "") is not None
        return (self.out_dir / ("results.json" if evaluated else "train_results.json")).exists()

    def command(self) -> list[str]:
        overrides = [f"{key}={json.dumps(value)}" for key, value in {**self.settings, "output_dir": str(self.out_dir)}.items()]
        return [sys.executable, str(REPO / "training/run.py"), "--config", str(REPO / f"training/configs/{self.config}.yaml"), *overrides]


def bind_to_checkpoint(out: Path, checkpoint: Path) -> None:
    """Tie `out` (whose finished jobs a rerun reuses) to the stage-2 checkpoint its rows start from: a rerun after
    the demo has been rebuilt must not mix rows trained from two checkpoints, so it is refused."""
    digest = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    marker = out / "stage2_checkpoint.sha256"
    if marker.exists() and marker.read_text().strip() != digest:
        raise SystemExit(f"{out} holds runs from another stage-2 checkpoint than {checkpoint} (rebuilt since?): "
                         "delete it or pass another --out.")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")


def slug(name: str) -> str:
    return "".join(char if char.isalnum() else "_" for char in name.lower()).strip("_")


def plan(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> list[Job]:
    """One stage 3 per row and seed, all from the demo's stage-2 checkpoint; "stage 2 only" once (no training: a
    learning rate of 0 for one step, then the same evaluation). The first seed's POTSA row runs alone first: if the
    encoder cache lacks anything (another eval size), it completes it, so concurrent jobs only ever read it."""
    common = {
        "data_path": str(args.corpus), "encoder_cache_dir": str(args.demo / "encoder_cache"),
        "init_from": str(args.demo / STAGES[1]), "eval_split": "test", "max_eval_samples": args.eval_utterances,
        "max_steps": args.stage3_steps, "bias_max_per_language": args.bias_utterances,
        "ot_loss_weight": PAPER_LAMBDA,  # rows are the paper's lambda unless they say otherwise (the demo uses 1)
    }  # fmt: skip
    first = f"seed{args.seeds[0]}/{POTSA}"
    jobs = [Job(first, args.out / f"seed{args.seeds[0]}" / slug(POTSA), STAGES[2], {**common, "seed": args.seeds[0]})]
    for name, overrides in rows.items():
        for seed in args.seeds[:1] if name == STAGE2_ONLY else args.seeds:
            job_name = f"seed{seed}/{name}"
            if job_name != first:
                settings = {**common, "seed": seed, **overrides}
                jobs.append(Job(job_name, args.out / f"seed{seed}" / slug(name), STAGES[2], settings, [first]))
    return jobs


def execute(jobs: list[Job], workers: int, log_dir: Path) -> None:
    """Run the jobs, `workers` at a time, each when the jobs it waits for have finished; stop at the first failure."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [job for job in jobs if not job.done]
    finished = {job.name for job in jobs if job.done}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    total, start = len(pending), time.perf_counter()
    while pending or running:
        for job in [job for job in pending if set(job.after) <= finished][: workers - len(running)]:
            pending.remove(job)
            with open(log_dir / f"{slug(job.name)}.log", "w") as log:  # the child keeps its own handle
                process = subprocess.Popen(job.command(), stdout=log, stderr=subprocess.STDOUT, env=environment)
            running[job.name] = (process, time.perf_counter())
        time.sleep(1)
        for name, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0:
                for other, _ in running.values():
                    other.terminate()
                raise RuntimeError(f"{name} failed (exit {process.returncode}); see {log_dir / slug(name)}.log")
            finished.add(name)
            done = total - len(pending) - len(running)
            print(f"[ablation] {done}/{total} {name}: {time.perf_counter() - started:.0f} s "
                  f"(elapsed {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


def collect(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Row -> metric -> one value per seed, from each job's results.json."""
    table: dict[str, dict[str, list[float]]] = {}
    for name in rows:
        values: dict[str, list[float]] = {}
        for seed in args.seeds[:1] if name == STAGE2_ONLY else args.seeds:
            folder = args.out / f"seed{seed}" / slug(name)
            results = json.loads((folder / "results.json").read_text())
            for group, metric in METRICS:
                values.setdefault(f"{group}_{metric}", []).append(results["groups"][group][metric])
            for metric in ALIGNMENT:
                values.setdefault(metric, []).append(results["alignment"].get(metric, float("nan")))
        table[name] = values
    return table


def _cell(values: list[float], digits: int) -> str:
    values = [value for value in values if not math.isnan(value)]  # a probe a row does not have (no BC) is NaN
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def markdown(table: dict[str, dict[str, list[float]]], args: argparse.Namespace, seconds: float) -> str:
    header = ["seen BLEU", "seen EM", "zero-shot BLEU", "zero-shot EM", "Recall@1", "LID probe (compensated)",
              "LID probe (Q-Former)"]  # fmt: skip
    keys = [f"{group}_{metric}" for group, metric in METRICS] + list(ALIGNMENT)
    lines = [
        "# Ablations on the offline corpus (`python -m benchmarks.ablation`)",
        "",
        f"Stage-3 seeds {' '.join(map(str, args.seeds))}: mean ± standard deviation over seeds. Every row runs "
        f"{args.stage3_steps} stage-3 steps from the demo's stage-2 checkpoint (`{STAGE2_ONLY}`: that checkpoint, "
        f"one evaluation); test: {args.eval_utterances} utterances "
        "(seen: en es ru ja, zero-shot: de ko). BC = bias compensation, EM = exact match, LID probe = accuracy of a "
        "linear language-ID probe (chance 0.167) on pooled encoder outputs after BC / on the Q-Former output. "
        f"This invocation ran {seconds / 60:.0f} min on 2 CPU cores ({args.workers} single-threaded workers; jobs "
        "finished by an earlier invocation are reused).",
        "",
        "| row | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for name, values in table.items():
        cells = [_cell(values[key], 1 if key.endswith("bleu") else 3) for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Seen and zero-shot exact match per row, mean and standard deviation over seeds."""
    names = list(table)
    figure, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(names) + 1.5), sharey=True)
    for axis, key, title in zip(axes, ("seen_exact_match", "zero_shot_exact_match"), ("seen", "zero-shot")):
        means = [statistics.mean(table[name][key]) for name in names]
        spreads = [statistics.stdev(table[name][key]) if len(table[name][key]) > 1 else 0 for name in names]
        axis.barh(range(len(names)), means, xerr=spreads, color="tab:blue" if title == "seen" else "tab:orange")
        axis.set_title(f"{title} languages: exact match")
        axis.set_xlim(min(means) - 0.1, min(max(means) + 0.05, 1.0))
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_gradient_cosines(args: argparse.Namespace, path: Path) -> bool:
    """Cosine between the CE and OT gradients on the Q-Former, per aligned layer over training (every seed)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    plotted = False
    for seed in args.seeds:
        state = args.out / f"seed{seed}" / slug(COSINE_ROW) / "trainer_state.json"
        if not state.exists():
            continue
        history = json.loads(state.read_text())["log_history"]
        for layer, color in zip((1, 2, 3), ("tab:blue", "tab:orange", "tab:green")):
            points = [(entry["step"], entry[f"grad_cosine_layer_{layer}"]) for entry in history
                      if f"grad_cosine_layer_{layer}" in entry]  # fmt: skip
            if points:
                steps, cosines = zip(*points)
                axis.plot(steps, cosines, color=color, alpha=0.8, label=f"layer {layer}" if seed == args.seeds[0] else None)
                plotted = True
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("stage-3 step")
    axis.set_ylabel("cos(grad CE, grad OT at layer l)")
    axis.set_title("CE vs OT gradient on the Q-Former (one line per seed)")
    axis.legend()
    figure.tight_layout()
    if plotted:
        figure.savefig(path, dpi=120)
    return plotted


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("paper", "beyond", "all"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage3-steps", type=int, default=150, help="stage-3 steps of every row")
    parser.add_argument("--eval-utterances", type=int, default=720, help="test utterances (whole sentences)")
    parser.add_argument("--bias-utterances", type=int, default=500, help="per language, for its bias vector")
    parser.add_argument("--workers", type=int, default=2, help="training processes at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo's output (made if missing)")
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus"))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {**(PAPER_ROWS if args.suite != "beyond" else {STAGE2_ONLY: {}}),
            **(BEYOND_ROWS if args.suite != "paper" else {})}  # fmt: skip
    if not (args.demo / STAGES[1] / "config.json").exists():
        demo.main(["--out", str(args.demo), "--corpus", str(args.corpus)])
    bind_to_checkpoint(args.out, args.demo / STAGES[1])
    start = time.perf_counter()
    execute(plan(args, rows), args.workers, args.out / "logs")
    table = collect(args, rows)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ablation.json").write_text(json.dumps(table, indent=2))
    text = markdown(table, args, time.perf_counter() - start)
    (args.results / "ablation.md").write_text(text)
    plot(table, args.results / "ablation.png")
    if args.suite != "paper":
        plot_gradient_cosines(args, args.results / "gradient_cosine.png")
    print(text)
    return table


if __name__ == "__main__":
    main()
