"""`bentoml build` (no Docker needed): the Bento pins our models, ships a Dockerfile, imports cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from serving.artifacts import verify_model_dir

REPO = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _installed_requirements(bento: Path) -> Path:
    """The requirements file the Bento's Dockerfile installs: directly (BentoML's own base image) or
    through ``env/python/install.sh`` (a ``base_image`` of ours), which prefers a lock file when there is one."""
    python_env = bento / "env" / "python"
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    if "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile:
        return python_env / "requirements.txt"
    assert re.search(r"^RUN bash .*/env/python/install\.sh$", dockerfile, re.M), dockerfile
    assert '-r "$REQUIREMENTS_TXT"' in (python_env / "install.sh").read_text()
    assert not (python_env / "requirements.lock.txt").exists()  # install.sh would install that instead
    return python_env / "requirements.txt"


def test_serving_requirements_match_the_project_pins() -> None:
    pins = {line.split("==")[0].lower().replace("_", "-"): line.strip()
            for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    wanted = _requirements(REPO / "requirements-serving.txt")
    for line in wanted:
        name = line.split("==")[0].lower().replace("_", "-")
        assert pins.get(name, "").lower().replace("_", "-") == line.lower().replace("_", "-"), line
    assert not any(line.startswith("torch") for line in wanted), "serving must not install torch"


def test_bento_build_pins_models_and_ships_a_dockerfile(exported: dict[str, dict], tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    bentofile = tmp_path / "bentofile.yaml"
    spec = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    # the session's store holds the brief models of the test run (digits-mlp, fashion-lenet, …)
    spec["models"] = [f"{exported[k]['name']}:latest" for k in ("lenet", "mlp", "price_mlp", "poem_rnn")]
    bentofile.write_text(yaml.safe_dump(spec))
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "-o", "tag", str(REPO)],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].split("__tag__:")[-1].strip()
    name, version = tag.split(":")
    bento = Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    pinned = {m["tag"] for m in manifest["models"]}
    assert pinned == {exported[k]["tag"] for k in ("lenet", "mlp", "price_mlp", "poem_rnn")}
    for tag_ in pinned:  # each pinned model is in the store, its files matching their sha256
        model_name, model_version = tag_.split(":")
        verify_model_dir(Path(os.environ["BENTOML_HOME"]) / "models" / model_name / model_version)
    # the image installs the Bento's requirements.txt, which is requirements-serving.txt (no torch)
    shipped = _requirements(_installed_requirements(bento))
    assert set(shipped) == set(_requirements(REPO / "requirements-serving.txt")), shipped
    assert not (bento / "src" / "models").exists() and not (bento / "src" / "training").exists()
    check = subprocess.run(
        [sys.executable, "-c", "import sys; import serving.service as s; "
         "assert 'torch' not in sys.modules; print(s.__file__); print(s.DlbookService.name)"],
        capture_output=True, text=True, cwd=bento / "src",
        env={**env, "PYTHONPATH": str(bento / "src")})
    assert check.returncode == 0, check.stderr[-2000:]
    imported_from, service_name = check.stdout.strip().splitlines()[-2:]
    assert Path(imported_from).is_relative_to(bento / "src") and service_name == "dlbook"
