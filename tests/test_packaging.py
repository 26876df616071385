"""What `pip install` puts on a user's machine: the model package and the training library under a name of its own,
nothing named `training` or `benchmarks` that could shadow another project's; and repository scripts that find the
code through the installed packages or `python -m`, never by editing `sys.path`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_model_package_and_the_training_library(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("potsa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"modeling_potsa", "potsa_training"}
    assert "potsa_training/configs/tiny_stage3_potsa.yaml" in names and "potsa_training/run.py" in names
    assert "modeling_potsa/pipeline_potsa.py" in names


def test_no_code_in_the_repository_edits_sys_path():
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("modeling_potsa", "training", "benchmarks", "examples", "tests")
        for path in (REPO / folder).rglob("*.py")
        if "sys.path" in path.read_text(encoding="utf-8") and path != Path(__file__)
    ]
    assert offenders == []
