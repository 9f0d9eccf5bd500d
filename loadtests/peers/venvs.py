"""One virtualenv per peer server, built once under ``loadtests/peers/.venvs/`` (git-ignored) and reused.

Why separate environments: PyTriton pins numpy < 2 (nvidia-pytriton 0.7.0: ``numpy<2.0.0,>=1.21``;
https://github.com/triton-inference-server/pytriton/issues/93, open) and brings its own tritonclient/grpc stack;
TorchServe wants torch. Neither may touch the project's ``.venv`` or ``constraints.txt``, whose
versions our service is measured with. Each environment records, in ``.dlbook-peer.json``, what it
was built from (the spec), how long the build took and how big it is, so the benchmark can report
the setup cost and rebuild when the spec changes.

Two traps this module handles:

* Triton's Python backend stub (``pytriton/tritonserver/python_backend_stubs/3.11/...``) links the
  *system* ``libpython3.11.so.1.0`` (Debian 12: 3.11.2) but imports the standard library of the
  virtualenv's interpreter. Built on pyenv's 3.11.7, the stub dies at model load with
  ``AttributeError: '_thread.RLock' object has no attribute '_recursion_count'`` (3.11.7's
  ``multiprocessing.resource_tracker`` calling a C method 3.11.2 lacks). So the Triton venv is built
  on the interpreter that matches that library (``/usr/bin/python3.11`` here), and
  :func:`check_triton_stub` verifies the match, failing with that explanation otherwise. Reported
  upstream for 3.11.7 against 3.11.5 (https://github.com/triton-inference-server/pytriton/issues/51,
  closed as stale, nvidia-pytriton 0.7.0 still affected here); the pick of interpreter can go when
  the stub loads the virtualenv's own libpython, i.e. when ``check_triton_stub`` passes on pyenv's 3.11.
* ``torch==2.13.0`` exactly: pip finds the CPU wheel in the machine's local ``find-links`` folder;
  any other torch spec resolves on PyPI to the CUDA build and its gigabytes of nvidia-* wheels
  (there is no CPU-only torch on PyPI: https://github.com/pytorch/pytorch/issues/26340). Loosen it
  when PyPI offers one, or when the venv installs from PyTorch's CPU index.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

VENVS = Path(__file__).resolve().parent / ".venvs"
MARKER = ".dlbook-peer.json"


def _project_ort_version() -> str:
    """The onnxruntime version our service runs (the project has the -gpu build; the peer gets the CPU one)."""
    import onnxruntime

    return onnxruntime.__version__


def _triton_python() -> str:
    """The interpreter whose version matches the libpython that Triton's Python-backend stub links.

    ``DLBOOK_TRITON_PYTHON`` overrides; otherwise the system's python3.11 (Debian ships the
    ``libpython3.11`` the stub finds on the default library path).
    """
    return os.environ.get("DLBOOK_TRITON_PYTHON") or shutil.which("python3.11", path="/usr/bin") or sys.executable


@dataclass(frozen=True)
class PeerSpec:
    """What a peer's virtualenv is built from."""

    name: str
    python: str
    packages: tuple[str, ...]


def specs() -> dict[str, PeerSpec]:
    return {
        "triton": PeerSpec("triton", _triton_python(),
                           ("nvidia-pytriton==0.7.0", f"onnxruntime=={_project_ort_version()}", "numpy")),
        "torchserve": PeerSpec("torchserve", sys.executable,
                               ("torchserve==0.12.*", "torch-model-archiver==0.12.*", "torch==2.13.0", "numpy",
                                # ts.utils imports yaml but torchserve 0.12.0 does not declare it
                                # (https://github.com/pytorch/serve/issues/2013: the fix went into its
                                # requirements files, not the package's Requires-Dist); drop it when
                                # `pip show torchserve` lists PyYAML
                                "pyyaml")),
    }


@dataclass
class PeerEnv:
    """A built peer environment and what it cost."""

    name: str
    path: Path
    build_seconds: float
    size_bytes: int
    versions: dict[str, str]
    python_version: str

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def bin(self, tool: str) -> Path:
        return self.path / "bin" / tool

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def clean_env() -> dict[str, str]:
    """The environment for pip and the peers: nothing that points at the project's venv or constraints."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_CONSTRAINT", "PIP_REQUIRE_VIRTUALENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def _installed_versions(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    names = [p.split("=")[0].split("<")[0].split(">")[0] for p in packages]
    code = ("import json, sys; from importlib import metadata; "
            "print(json.dumps({n: metadata.version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True,
                         env=clean_env()).stdout
    return json.loads(out)


def _python_version(python: Path | str) -> str:
    return subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def check_triton_stub(env: PeerEnv) -> None:
    """Fail early, and say why, when Triton's Python-backend stub would load a different libpython.

    The stub for this interpreter's X.Y links ``libpython X.Y`` by soname; ``ldd`` says which file
    the loader picks. Its ``Py_GetVersion()`` must equal the venv interpreter's version, else the
    stub runs C code of one patch release against the standard library of another.
    """
    major_minor = ".".join(env.python_version.split(".")[:2])
    site = next((env.path / "lib").glob("python*/site-packages"))
    stub = site / "pytriton" / "tritonserver" / "python_backend_stubs" / major_minor / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"PyTriton has no Python-backend stub for Python {major_minor} ({stub})")
    ldd = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, check=True).stdout
    missing = [line.strip() for line in ldd.splitlines() if "not found" in line]
    if missing:
        raise RuntimeError(f"Triton's Python-backend stub misses shared libraries: {missing}")
    libpython = next((line.split("=>")[1].split("(")[0].strip() for line in ldd.splitlines()
                      if "libpython" in line and "=>" in line), None)
    if libpython is None:
        return  # statically linked stub: nothing can mismatch
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).Py_GetVersion; f.restype = ctypes.c_char_p; "
            "print(f().decode().split()[0])")
    lib_version = subprocess.run([str(env.python), "-c", code, libpython], capture_output=True, text=True,
                                 check=True).stdout.strip()
    if lib_version != env.python_version:
        raise RuntimeError(
            f"Triton's Python-backend stub loads {libpython} (Python {lib_version}) but the Triton venv runs "
            f"Python {env.python_version}: the stub would mix the two and fail at model load. Rebuild the venv "
            f"on a {lib_version} interpreter: DLBOOK_TRITON_PYTHON=/path/to/python{major_minor} "
            f"(and delete {env.path}).")


def _key(spec: PeerSpec) -> dict:
    """What decides whether a built venv still fits: the packages and the interpreter's version (not its path)."""
    return {"name": spec.name, "packages": list(spec.packages), "python_version": _python_version(spec.python)}


def _load(path: Path, spec: PeerSpec) -> PeerEnv | None:
    marker = path / MARKER
    if not marker.exists() or not (path / "bin" / "python").exists():
        return None
    saved = json.loads(marker.read_text())
    if saved.get("key") != _key(spec):
        return None
    return PeerEnv(name=spec.name, path=path, **saved["env"])


def ensure(name: str, log=print) -> PeerEnv:
    """The peer's virtualenv, built on first use (minutes; a lock keeps two builds from racing)."""
    spec = specs()[name]
    path = VENVS / name
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = _load(path, spec)
        if env is None:
            env = _build(path, spec, log)
    if name == "triton":
        check_triton_stub(env)
    return env


def _build(path: Path, spec: PeerSpec, log) -> PeerEnv:
    if path.exists():
        shutil.rmtree(path)
    log(f"building the {spec.name} virtualenv in {path} ({spec.python}; {' '.join(spec.packages)}) ...")
    began = time.monotonic()
    pip_log = VENVS / f"{spec.name}-pip.log"
    try:
        with open(pip_log, "w") as out:
            subprocess.run([spec.python, "-m", "venv", str(path)], check=True, stdout=out, stderr=subprocess.STDOUT,
                           env=clean_env())
            subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "--no-input", *spec.packages],
                           check=True, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    except subprocess.CalledProcessError as err:
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
        tail = "\n".join(ln for ln in pip_log.read_text().splitlines() if "is ignored" not in ln)[-3000:]
        raise RuntimeError(f"building the {spec.name} virtualenv failed ({err}); pip said:\n{tail}") from err
    python = path / "bin" / "python"
    env = PeerEnv(name=spec.name, path=path, build_seconds=round(time.monotonic() - began, 1),
                  size_bytes=_dir_size(path), versions=_installed_versions(python, spec.packages),
                  python_version=_python_version(python))
    saved = {k: v for k, v in env.as_dict().items() if k not in ("name", "path")}
    (path / MARKER).write_text(json.dumps({"key": _key(spec), "python": spec.python, "env": saved}, indent=2))
    log(f"  built in {env.build_seconds:.0f} s, {env.size_bytes / 2**20:.0f} MiB: {env.versions}")
    return env
