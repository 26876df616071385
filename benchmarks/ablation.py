"""Which part of POTSA does what, and does any alignment objective close the zero-shot gap? Rows with controls, seeds
and intervals on the offline corpus.

    python -m benchmarks.ablation                          # the rows below, 3 stage-2 x 2 stage-3 seeds, resumable
    python -m benchmarks.ablation --suite regime           # the paper's long, low-lr stage 3 (one seed; hours)
    python -m benchmarks.ablation --suite beyond           # layer sets / PCGrad / affine compensation rows

Every row is a stage 3 (training/configs/tiny_stage3_potsa.yaml, the demo's: 400 steps at lr 1e-3, lambda 1, UCB
over Q-Former layers 1-2) with the row's overrides, started from a stage-2 checkpoint. Stages 1-2 (the demo's) run
with 3 seeds, on the full corpus (every split of every language; the demo speaks less), and every row runs 2
stage-3 seeds from each: 6 runs per row (`MIN_RUNS` in intervals.py). Rows marked "3 runs" run one stage-3 seed
per stage 2: their intervals are indicative, no claim rests on them. Every run reports on every test utterance.

Each row is compared with its control (the CE-only baseline of the same zero-shot protocol) by a paired bootstrap
interval over utterances of the difference in exact match, per language group and on numbers + times
(`benchmarks/report.py`). Two zero-shot protocols: strict (the paper: the zero-shot languages' audio only estimates
their bias vector) and parallel-audio (their unlabeled training audio also joins the OT pairs). The diagnostics of
the aligned layers (state variance, parallel / non-parallel Sinkhorn divergence and their ratio, OT Recall@1) come
from each run's final evaluation.

Jobs run as single-threaded `training/run.py` subprocesses, `--workers` at a time (`benchmarks/jobs.py`); finished
jobs are kept, so an interrupted run resumes. Results: benchmarks/results/ablation.md, ablation.json, ablation.png.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import demo
from benchmarks.ablation_report import write_results
from benchmarks.bench_machine_pace import pace_ratio
from benchmarks.corpus.roles import language_roles
from benchmarks.jobs import REPO, Job, bind_to_checkpoint, execute, slug

NO_BIAS = {"use_bias_compensation": False, "estimate_bias": False}
PARALLEL_AUDIO = {"zero_shot_protocol": "parallel_audio"}
CE_ONLY = {"ot_loss_weight": 0.0}


@dataclass(frozen=True)
class Row:
    """A stage-3 setting: its overrides, its control row, and whether it gets every stage-3 seed."""

    overrides: dict[str, Any] = field(default_factory=dict)
    control: str = "baseline (CE only)"
    all_seeds: bool = True


BASELINE, PA_BASELINE = "baseline (CE only)", "baseline (CE only), parallel audio"
STAGE2_ONLY = {**CE_ONLY, **NO_BIAS, "learning_rate": 0.0, "max_steps": 1, "warmup_steps": 0}  # evaluated as it is
ROWS: dict[str, Row] = {
    BASELINE: Row({**CE_ONLY, **NO_BIAS}, control=BASELINE),
    "stage 2 only (no stage 3)": Row(STAGE2_ONLY, all_seeds=False),
    "+ bias compensation only": Row(CE_ONLY),
    "POTSA (paper objective: Sinkhorn)": Row(),
    "POTSA, the paper's lambda 10": Row({"ot_loss_weight": 10.0}, all_seeds=False),
    "POTSA, converged Sinkhorn": Row({"ot_sinkhorn_mode": "converged"}, all_seeds=False),
    "InfoNCE over Sinkhorn": Row({"alignment_loss": "infonce_sinkhorn"}),
    "centred Sinkhorn": Row({"alignment_loss": "centred_sinkhorn"}),
    "Sinkhorn + variance hinge": Row({"ot_variance_weight": 1.0}),
    "OT on fixed layer 1": Row({"ot_layer_scheduler": "fixed", "ot_candidate_layers": [1]}, all_seeds=False),
    "uniform random layer (vs UCB)": Row({"ot_layer_scheduler": "uniform"}, all_seeds=False),
    "UCB on the ratio reward, normalised": Row({"ucb_reward": "ratio_drop", "ucb_normalize_reward": True},
                                               all_seeds=False),  # fmt: skip
    "English anchor, frozen": Row({"ot_pair_strategy": "english_anchor_frozen"}, all_seeds=False),
    "English anchor, with gradients": Row({"ot_pair_strategy": "english_anchor"}, all_seeds=False),
    "as released (its UCB rule, English anchor, summed OT)": Row(
        {"ucb_rule": "released", "ot_pair_strategy": "english_anchor", "ot_pair_reduction": "half_sum"}, all_seeds=False
    ),
    PA_BASELINE: Row({**CE_ONLY, **NO_BIAS, **PARALLEL_AUDIO}, control=PA_BASELINE),
    "POTSA, parallel audio": Row(PARALLEL_AUDIO, control=PA_BASELINE),
    "InfoNCE over Sinkhorn, parallel audio": Row({"alignment_loss": "infonce_sinkhorn", **PARALLEL_AUDIO},
                                                 control=PA_BASELINE),  # fmt: skip
    "centred Sinkhorn, parallel audio": Row({"alignment_loss": "centred_sinkhorn", **PARALLEL_AUDIO},
                                            control=PA_BASELINE),  # fmt: skip
}
# The paper's stage 3: about 20 epochs of the (tiny) train set at a low learning rate with warmup; one seed each.
REGIME_EPOCHS = 20
REGIME: dict[str, Row] = {
    f"paper regime, lr {lr:g}, lambda {weight:g}": Row(
        {"learning_rate": lr, "ot_loss_weight": weight, **({} if weight else NO_BIAS)},
        control=f"paper regime, lr {lr:g}, lambda 0", all_seeds=False,
    )
    for lr in (1e-4, 3e-5)
    for weight in (0.0, 1.0, 10.0)
}  # fmt: skip
BEYOND: dict[str, Row] = {
    BASELINE: ROWS[BASELINE],
    "all of layers 1-2 each step": Row({"ot_layer_scheduler": "all", "ot_candidate_layers": [1, 2]}),
    "all of layers 1-3 + PCGrad": Row({"ot_layer_scheduler": "all", "ot_candidate_layers": [1, 2, 3],
                                       "ot_gradient_surgery": "pcgrad"}),  # fmt: skip
    "UCB over groups {1},{1,2},{1,2,3}": Row({"ot_candidate_layers": [1, 2, 3],
                                             "ot_layer_groups": [[1], [1, 2], [1, 2, 3]]}),  # fmt: skip
    "POTSA + affine compensation": Row({"bias_compensation_mode": "affine"}),
    "POTSA, bias table frozen at its estimate": Row({"train_bias": False}),
}
SUITES = {"rows": ROWS, "regime": REGIME, "beyond": BEYOND}


def stage2_dir(args: argparse.Namespace, seed: int) -> Path:
    return args.out / f"stage2_seed{seed}" / demo.STAGES[-1]


def stage2_jobs(args: argparse.Namespace, common: dict[str, Any]) -> list[Job]:
    """Stages 1-2 (the demo's settings) for every stage-2 seed. The first seed's stage 1 runs alone first: it fills
    the encoder cache with the train split, so the chains that run side by side only ever read it."""
    jobs = []
    for seed in args.stage2_seeds:
        chain = args.out / f"stage2_seed{seed}"
        first_stage = f"seed{args.stage2_seeds[0]}/{demo.STAGES[0]}"
        previous: dict[str, Any] = {"model_config": str(args.out / "model_tiny.yaml")}
        after = [] if seed == args.stage2_seeds[0] else [first_stage]
        for stage in demo.STAGES:
            settings = {**common, **previous, "seed": seed, "test_split": None}
            jobs.append(Job(f"seed{seed}/{stage}", chain / stage, stage, settings, after))
            previous, after = {"init_from": str(chain / stage)}, [f"seed{seed}/{stage}"]
    return jobs


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The full corpus (every split of every language: the parallel-audio protocol trains on the zero-shot
    languages' audio, the selection reads validation), the stand-ins, the stage-2 chains, and the encoder cache of
    everything the stage-3 runs read; returns the settings every stage shares."""
    roles = language_roles(args.seen, args.zero_shot)
    spec = demo.CorpusSpec()
    corpus = demo.prepare_corpus(args.corpus, roles, spec)
    args.out.mkdir(parents=True, exist_ok=True)
    demo.write_model_config(args.out, demo.prepare_standins(corpus, roles, spec, args.out), roles)
    common = demo.stage_settings(args.out, args.corpus, roles, seed=0)
    execute(stage2_jobs(args, common), args.workers, args.out / "logs", description="stage-2 chains")
    for seed in args.stage2_seeds:
        bind_to_checkpoint(args.out / "rows" / f"stage2_seed{seed}", stage2_dir(args, seed))
    demo.cache_stage3_inputs(stage2_dir(args, args.stage2_seeds[0]), common, roles, zero_shot_train=True)
    return common


def row_runs(args: argparse.Namespace, row: Row) -> list[tuple[int, int]]:
    """(stage-2 seed, stage-3 seed) of a row's runs: all pairs, or one stage-3 seed per stage 2."""
    stage3_seeds = args.stage3_seeds if row.all_seeds else args.stage3_seeds[:1]
    return [(s2, s3) for s2 in args.stage2_seeds for s3 in stage3_seeds]


def run_dir(args: argparse.Namespace, name: str, stage2_seed: int, stage3_seed: int) -> Path:
    """Under the stage 2 it starts from (`prepare` binds that folder to the checkpoint: a rebuilt stage 2 refuses
    to reuse the runs of the old one)."""
    return args.out / "rows" / f"stage2_seed{stage2_seed}" / slug(name) / f"stage3_seed{stage3_seed}"


def plan(args: argparse.Namespace, rows: dict[str, Row], common: dict[str, Any]) -> list[Job]:
    """Every row's stage-3 runs from the stage-2 checkpoints (`prepare` made them)."""
    stage3 = {**common, "test_split": "test", "bias_max_per_language": demo.BIAS_UTTERANCES}
    if args.suite == "regime":
        stage3.update(max_steps=-1, num_train_epochs=REGIME_EPOCHS, warmup_steps=200, logging_steps=100)
    jobs = []
    for name, row in rows.items():
        for stage2_seed, stage3_seed in row_runs(args, row):
            settings = {**stage3, "init_from": str(stage2_dir(args, stage2_seed)), "seed": stage3_seed, **row.overrides}
            out_dir = run_dir(args, name, stage2_seed, stage3_seed)
            jobs.append(Job(f"{name} / {stage2_seed}.{stage3_seed}", out_dir, "tiny_stage3_potsa", settings))
    return jobs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=tuple(SUITES), default="rows")
    parser.add_argument("--stage2-seeds", type=int, nargs="+", help="the first is the demo's (default: 0 1 2; the "
                        "regime suite, hours per run: 0)")
    parser.add_argument("--stage3-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=2, help="training processes at a time (one thread each)")
    parser.add_argument("--seen", nargs="+", default=demo.SEEN)
    parser.add_argument("--zero-shot", nargs="+", default=demo.ZERO_SHOT)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--corpus", type=Path, default=Path("data/ablation_corpus"), help="made if missing")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args(argv)
    args.stage2_seeds = args.stage2_seeds or ([0] if args.suite == "regime" else [0, 1, 2])
    roles = language_roles(args.seen, args.zero_shot)
    rows = SUITES[args.suite]
    start = time.perf_counter()
    common = prepare(args)
    execute(plan(args, rows, common), args.workers, args.out / "logs", description=f"ablation ({args.suite})")
    runs = {name: [run_dir(args, name, *pair) for pair in row_runs(args, row)] for name, row in rows.items()}
    controls = {name: row.control for name, row in rows.items()}
    timing = {"wall_seconds": time.perf_counter() - start, "pace_ratio": pace_ratio(), "workers": args.workers}
    return write_results(args.results, f"ablation_{args.suite}" if args.suite != "rows" else "ablation", runs,
                         controls, roles, timing, vars(args))  # fmt: skip


if __name__ == "__main__":
    main()
