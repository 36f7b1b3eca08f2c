"""The package installs as one import package `mm` (editable and wheel), beside Hugging Face `datasets`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import mm, mm.text_backbone, mm.encoders, mm.adapters, mm.datasets, datasets, json; "
    "print(json.dumps({'mm': mm.__file__, 'tb': mm.text_backbone.__file__, 'ds': mm.datasets.__file__, "
    "'hf_datasets': datasets.__file__, 'has_load_dataset': hasattr(datasets, 'load_dataset')}))"
)


def _probe(cwd: Path, env: dict | None = None) -> dict:
    import json

    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_editable_install_imports_beside_hf_datasets(tmp_path):
    found = _probe(tmp_path)
    assert Path(found["tb"]) == ROOT / "text_backbone" / "__init__.py"
    assert Path(found["ds"]) == ROOT / "datasets" / "__init__.py"
    assert found["has_load_dataset"] and "site-packages" in found["hf_datasets"]


def test_wheel_holds_every_subpackage_and_installs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for sub in ("text_backbone", "encoders", "adapters", "datasets"):
        assert f"mm/{sub}/__init__.py" in names
    assert not any(n.startswith(("text_backbone/", "datasets/", "tests/")) for n in names)
    recipes = {f"mm/recipes/{p.name}" for p in (ROOT / "mm" / "recipes").glob("*.yaml")}
    assert recipes and recipes <= names  # the shipped recipes (package data of mm.recipes)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    found = _probe(tmp_path, env)
    assert Path(found["tb"]) == target / "mm" / "text_backbone" / "__init__.py"
    assert found["has_load_dataset"]
