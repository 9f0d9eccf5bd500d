"""The serving settings: one typed object read from the environment, the README's table generated from
it, unknown DLBOOK_* names warned about, and the one route table everything else derives from."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from serving import settings as settings_module
from serving.settings import ELSEWHERE, Settings, is_known, markdown_table, unknown_names, warn_unknown, with_table

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bDLBOOK_[A-Z0-9_]*[A-Z0-9]\b")


def test_defaults_are_the_documented_ones() -> None:
    s = Settings.from_env({})
    assert (s.api_key, s.device, s.ort_intra_threads, s.ort_inter_threads, s.ort_spin, s.ort_optimisation) == (
        None, "auto", None, 0, False, "all")
    assert (s.max_body_bytes, s.max_images, s.max_records, s.max_poems) == (12 * 1024 * 1024, 64, 1000, 8)
    assert (s.generation_timeout_s, s.request_timeout_s, s.max_batch, s.max_poem_batch) == (30.0, 60.0, 256, 64)
    assert (s.inline_rows, s.stream_flush_ms, s.max_in_flight, s.max_queue_ms, s.workers) == (16, 20.0, 32, 100.0, 1)
    assert (s.direct_routes, s.log_level, s.bentoml_access_log, s.bentoml_metrics, s.tracing) == (
        True, "INFO", False, False, False)
    assert s.models_for("image") is None and s.default_model("image", "fashion-lenet") == "fashion-lenet"
    assert s.pinned_tag("fashion-lenet") == "fashion-lenet:latest" and s.prefer_cuda and not s.prefer_int8


def test_values_and_patterns_are_read_from_the_environment() -> None:
    s = Settings.from_env({
        "DLBOOK_MAX_IMAGES": "5", "DLBOOK_GENERATION_TIMEOUT_S": "2.5", "DLBOOK_DIRECT_ROUTES": "0",
        "DLBOOK_TRACING": "1", "DLBOOK_WORKERS": "cpu_count", "DLBOOK_LOG_LEVEL": "warning", "DLBOOK_DEVICE": "cpu",
        "DLBOOK_ORT_INTRA_THREADS": "0", "DLBOOK_MAX_QUEUE_MS": "0", "DLBOOK_API_KEY": "s3cret",
        "DLBOOK_IMAGE_MODELS": " fashion-lenet, digits-mlp ,", "DLBOOK_DEFAULT_POEM_MODEL": "tang-poem-big",
        "DLBOOK_MODEL_FASHION_LENET": "fashion-lenet:abc123", "DLBOOK_PRICE_MODELS": "",
    })
    assert (s.max_images, s.generation_timeout_s, s.direct_routes, s.tracing) == (5, 2.5, False, True)
    assert (s.workers, s.log_level, s.prefer_cuda, s.ort_intra_threads, s.queue_budget_s) == (
        "cpu_count", "WARNING", False, 0, 0.0)
    assert s.api_key == "s3cret"
    assert s.models_for("image") == ["fashion-lenet", "digits-mlp"] and s.models_for("price") is None
    assert s.default_model("poem", "tang-poem") == "tang-poem-big"
    assert s.pinned_tag("fashion-lenet") == "fashion-lenet:abc123" and s.pinned_tag("digits-mlp") == "digits-mlp:latest"
    with pytest.raises(ValueError, match="DLBOOK_MAX_IMAGES='many'"):
        Settings.from_env({"DLBOOK_MAX_IMAGES": "many"})
    with pytest.raises(AttributeError):
        s.max_images = 3  # type: ignore[misc]  # frozen
    with pytest.raises(TypeError):
        s.task_models["image"] = ("x",)  # type: ignore[index]  # read-only too


def test_a_misspelt_name_is_warned_about_with_the_closest_known_one(caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    typo, pattern_typo = "DLBOOK_MAX_IMAGE", "DLBOOK_IMAGES_MODELS"
    assert unknown_names({typo: "3", pattern_typo: "x", "DLBOOK_MAX_IMAGES": "3", "DLBOOK_DATA": "/d",
                          "DLBOOK_MODEL_ANY_NAME": "any-name:1", "DLBOOK_POEM_MODELS": "tang-poem",
                          "DLBOOK_ZZZQQQ": "1", "PATH": "/bin"}) == {
        pattern_typo: "DLBOOK_IMAGE_MODELS", typo: "DLBOOK_MAX_IMAGES", "DLBOOK_ZZZQQQ": None}
    caplog.set_level(logging.WARNING, logger="dlbook.serving")
    warn_unknown({typo: "3"})
    assert [r.getMessage() for r in caplog.records] == [
        f"{typo} is set but is not a setting: it has no effect; did you mean DLBOOK_MAX_IMAGES? "
        "(settings: serving/settings.py)"]
    # current(): read once per process, and the warning comes with that first read
    caplog.clear()
    monkeypatch.setenv("DLBOOK_MAX_POEM", "2")
    monkeypatch.setenv("DLBOOK_MAX_POEMS", "3")
    settings_module.current.cache_clear()
    try:
        first = settings_module.current()
        monkeypatch.setenv("DLBOOK_MAX_POEMS", "4")
        assert settings_module.current() is first and first.max_poems == 3
        assert any("DLBOOK_MAX_POEM is set" in r.getMessage() and "DLBOOK_MAX_POEMS?" in r.getMessage()
                   for r in caplog.records)
    finally:
        settings_module.current.cache_clear()


def test_the_readme_table_is_the_settings() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "stale: run python -m serving.settings --write-readme README.md"
    assert with_table(readme) == readme
    for name in ("DLBOOK_API_KEY", "DLBOOK_<TASK>_MODELS", "DLBOOK_MODEL_<NAME>", "DLBOOK_TRACING"):
        assert f"| `{name}` |" in markdown_table()
    changed = with_table(readme.replace("| `DLBOOK_MAX_IMAGES` | int | 64 |", "| `DLBOOK_MAX_IMAGES` | int | 65 |"))
    assert changed == readme  # the block is rewritten whole


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    suffixes = (".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".j2", ".txt", ".cfg")
    return [REPO / n for n in out.split("\0") if n.endswith(suffixes) or n == "dlbook"]


def test_every_dlbook_name_the_project_uses_is_known() -> None:
    """A name read anywhere (training, tests, load tests, deploy, docs) is a setting, a pattern or listed in
    ELSEWHERE: so the start-up warning never fires on a name the project itself uses."""
    used: dict[str, str] = {}
    for path in _tracked_text_files():
        if path.name == "test_settings.py" or not path.is_file():
            continue
        for name in NAME.findall(path.read_text(encoding="utf-8", errors="replace")):
            used.setdefault(name, str(path.relative_to(REPO)))
    assert "DLBOOK_MAX_IMAGES" in used and "DLBOOK_DATA" in used
    unknown = {name: where for name, where in used.items() if not is_known(name)}
    assert unknown == {}, "add these to serving.settings (a setting) or ELSEWHERE (read outside serving/)"
    assert not set(ELSEWHERE) & {f.metadata["env"] for f in fields(Settings)}


def test_only_the_settings_module_reads_dlbook_variables() -> None:
    for path in sorted((REPO / "serving").glob("*.py")):
        if path.name == "settings.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"\b(os\.environ|environ\.get|getenv)\b", line):
                assert "DLBOOK" not in line, f"{path.name}:{number} reads a setting: {line.strip()}"
                if not path.name.startswith("poem_"):  # the decoding process's own start-up is not ours
                    assert "PROMETHEUS_MULTIPROC_DIR" in line, f"{path.name}:{number}: {line.strip()}"


def test_runtime_and_bentoml_options_follow_the_settings() -> None:
    from serving.config import service_options
    from serving.routes import ROUTES
    from serving.runtime import RuntimeConfig, gpu_present

    cpu = Settings.from_env({"DLBOOK_DEVICE": "cpu", "DLBOOK_ORT_INTRA_THREADS": "3", "DLBOOK_ORT_SPIN": "1"})
    runtime = RuntimeConfig.from_settings(cpu)
    assert (runtime.prefer_cuda, runtime.intra_op_threads, runtime.spin) == (False, 3, True)
    assert gpu_present(cpu) is False
    options = service_options(Settings.from_env({"DLBOOK_WORKERS": "cpu_count", "DLBOOK_REQUEST_TIMEOUT_S": "9"}))
    assert options["workers"] == "cpu_count" and options["traffic"] == {"timeout": 9.0}
    assert options["tracing"]["excluded_urls"] == [r.path for r in ROUTES] and options["metrics"] == {"enabled": False}
    assert options["logging"] == {"access": {"enabled": False}}
    traced = service_options(Settings.from_env({"DLBOOK_TRACING": "1", "DLBOOK_BENTOML_METRICS": "1"}))
    assert "tracing" not in traced and "metrics" not in traced


def test_the_route_table_is_the_services_routes_and_the_direct_paths() -> None:
    """Every API of the services sits on the path the table gives it and nowhere else; the direct routes are
    the table's fast routes, called undecorated (no refusal wrapper on the hot path)."""
    from serving.errors import ApiError
    from serving.routes import API_PATHS, BY_PATH, ROUTES
    from serving.service import DlbookService, ImageService

    apis = DlbookService.apis
    assert {name: api.route for name, api in apis.items()} == {r.handler: r.path for r in ROUTES}
    assert {r.path for r in ROUTES} == API_PATHS
    classify = BY_PATH["/classify"]
    assert classify.form_fields == set(apis["classify"].input_spec.model_fields)
    assert classify.upload_field in classify.form_fields

    service = DlbookService.inner.__new__(DlbookService.inner)
    direct = service._direct_routes()
    assert set(direct) == {r.path for r in ROUTES if r.fast}
    assert direct["/classify"].upload_field == "images" and direct["/predict_price"].upload_field is None
    assert direct["/classify_pixels"].endpoint == "classify_pixels"
    assert set(ImageService.inner.__new__(ImageService.inner)._direct_routes()) == {"/classify", "/classify_pixels"}

    def refuse(count: int, top_k: int) -> None:
        raise ApiError("no image", 400)

    service._check_image_request = refuse
    with pytest.raises(ApiError):  # the direct path gets the refusal itself, and the guard answers it
        asyncio.run(direct["/classify_pixels"].answer(images=[], model="", top_k=3))
    wrapped = apis["classify_pixels"].func  # BentoML's path: the same refusal answered as JSON
    assert inspect.unwrap(wrapped) is not wrapped
    response = asyncio.run(wrapped(service, images=[], model="", top_k=3))
    body = json.loads(response.body)
    assert response.status_code == 400 and body["error"] == "no image" and body["status"] == 400


def test_errors_become_one_json_shape() -> None:
    from serving.errors import REQUEST_ID, ApiError, error_answer

    token = REQUEST_ID.set("req-1")
    try:
        answers = [error_answer(e, "classify") for e in (ApiError("too many", 413), ApiError("busy", 503),
                                                         TimeoutError(), RuntimeError("bug"))]
    finally:
        REQUEST_ID.reset(token)
    assert [a.status_code for a in answers] == [413, 503, 504, 500]
    bodies = [json.loads(a.body) for a in answers]
    assert all(set(b) == {"error", "status", "request_id"} and b["request_id"] == "req-1" for b in bodies)
    assert bodies[0]["error"] == "too many" and "DLBOOK_REQUEST_TIMEOUT_S" in bodies[2]["error"]
    assert answers[1].headers["retry-after"] == "1" and "retry-after" not in answers[0].headers
