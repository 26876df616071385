"""Training runs as jobs: `training/run.py` subprocesses with their settings, run a few at a time, resumable.

Small models use a second CPU thread poorly (1.3x for a step on 2 cores), so two single-threaded runs side by side
get more done than one two-threaded run: every job runs on one thread, `workers` at a time. A job whose output
says it finished (results.json, or train_results.json for a job without a final report) is not run again, so an
interrupted benchmark resumes where it stopped; `bind_to_checkpoint` keeps a folder of finished jobs from being
reused after the checkpoint they started from has changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    """One `training/run.py` invocation (a stage config plus `key=value` settings) and the jobs it waits for."""

    name: str
    out_dir: Path
    config: str
    settings: dict[str, Any]
    after: list[str] = field(default_factory=list)

    @property
    def reports(self) -> bool:
        """Whether the run ends with a report on a split (results.json)."""
        return self.settings.get("test_split") is not None or self.settings.get("eval_split") is not None

    @property
    def done(self) -> bool:
        return (self.out_dir / ("results.json" if self.reports else "train_results.json")).exists()

    def command(self) -> list[str]:
        settings = {**self.settings, "output_dir": str(self.out_dir)}
        overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
        config = REPO / f"training/configs/{self.config}.yaml"
        return [sys.executable, str(REPO / "training/run.py"), "--config", str(config), *overrides]


def slug(name: str) -> str:
    """A folder name for a job or row name."""
    return "".join(char if char.isalnum() else "_" for char in name.lower()).strip("_")


def bind_to_checkpoint(out: Path, checkpoint: Path) -> None:
    """Tie `out` (whose finished jobs a rerun reuses) to the checkpoint its jobs start from: a rerun after that
    checkpoint was rebuilt must not mix runs trained from two checkpoints, so it is refused."""
    digest = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    marker = out / f"{slug(checkpoint.name)}.sha256"
    if marker.exists() and marker.read_text().strip() != digest:
        raise SystemExit(f"{out} holds runs from another {checkpoint.name} checkpoint than {checkpoint} (rebuilt "
                         "since?): delete it or pass another --out.")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")


def execute(jobs: Sequence[Job], workers: int, log_dir: Path, description: str = "jobs") -> None:
    """Run the jobs, `workers` at a time, each when the jobs it waits for have finished; stop at the first failure.
    Each job's output goes to `log_dir/<job>.log`; a progress bar counts finished jobs."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [job for job in jobs if not job.done]
    finished = {job.name for job in jobs if job.done}
    unknown = {name for job in pending for name in job.after} - {job.name for job in jobs}
    if unknown:
        raise ValueError(f"Jobs wait for jobs that do not exist: {sorted(unknown)}.")
    running: dict[str, subprocess.Popen] = {}
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tqdm(total=len(pending), desc=description, unit="job") as progress:
        while pending or running:
            for job in [job for job in pending if set(job.after) <= finished][: workers - len(running)]:
                pending.remove(job)
                with open(log_dir / f"{slug(job.name)}.log", "w") as log:  # the child keeps its own handle
                    running[job.name] = subprocess.Popen(job.command(), stdout=log, stderr=subprocess.STDOUT,
                                                         env=environment)  # fmt: skip
            time.sleep(0.5)
            for name, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                if process.returncode != 0:
                    for other in running.values():
                        other.terminate()
                    raise RuntimeError(f"{name} failed (exit {process.returncode}); see {log_dir / slug(name)}.log")
                finished.add(name)
                progress.update()
                progress.set_postfix_str(name)


__all__ = ["Job", "bind_to_checkpoint", "execute", "slug"]
