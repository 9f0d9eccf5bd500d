"""``./dlbook image``: the serving image, built the way BentoML builds one, with podman (or docker).

    ./dlbook image                    # CPU image of bentofile.yaml's models: dlbook:<version>-cpu and dlbook:cpu
    ./dlbook image --variant cuda     # onnxruntime-gpu with its CUDA 13 / cuDNN 9 libraries (from PyPI)
    ./dlbook image --models fashion-lenet,house-price

1. A base image: the official ``python:3.11-slim`` where Docker Hub answers; where it does not, a Debian
   bookworm root filesystem made from Debian's own packages (``mmdebstrap``: python3 3.11, ca-certificates),
   imported as ``localhost/dlbook-base:bookworm`` (made once; ``--rebuild-base`` makes it again).
2. ``bentoml build`` of bentofile.yaml, with the models given (default: bentofile.yaml's, each pinned to the
   version in the store, ``$BENTOML_HOME``), the variant's requirements and that base as ``docker.base_image``.
3. ``bentoml containerize --backend podman``, through its Python API (``bentoml.container.build``): BentoML
   generates the Dockerfile (with deploy/container/Dockerfile.j2 as its ``dockerfile_template``) and runs
   ``podman build``. Three build options are ours: the network of the host, the machine's CA bundle mounted
   for uv where TLS is re-signed (never kept in the image), and uv itself mounted from ./.venv (BentoML's
   Dockerfile otherwise runs ``pip install uv``, which Debian's Python refuses: PEP 668,
   https://peps.python.org/pep-0668/; a base image without pip fails the same way upstream,
   https://github.com/bentoml/BentoML/issues/5245; and it would leave 37 MB of uv in the image), with uv's
   download cache kept outside the image. The mount can go when BentoML's Dockerfile takes uv from the base
   image instead of running ``pip install uv``. The CLI's ``--opt volume=`` takes one volume only (it joins
   several with ':', as the podman backend reads a tuple as one volume's parts; BentoML 1.4.39, no upstream
   report found), hence the Python API: back to the CLI when ``bentoml containerize --opt volume=A --opt
   volume=B`` passes both.

Variants: ``cpu`` installs ``onnxruntime`` (ONNX Runtime's CPU build) instead of ``onnxruntime-gpu`` at the
same version: the same serving code (serving/runtime.py asks for CUDA only when NVML finds a GPU *and* the
build offers the CUDA provider), 67 MB installed instead of 340 MB. ``cuda`` keeps ``onnxruntime-gpu`` and
adds ``onnxruntime-gpu[cuda,cudnn]``'s NVIDIA libraries from PyPI (no CUDA base image needed; setup.sh registers
their folders with the dynamic loader).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMAGE_NAME = "dlbook"  # tags: <bento version>-<variant> (immutable) and <variant> (the newest; the manifests' tag)
DEBIAN_BASE = "localhost/dlbook-base:bookworm"
OFFICIAL_BASE = "docker.io/library/python:3.11-slim"
DEBIAN_MIRRORS = ["deb http://deb.debian.org/debian bookworm main",
                  "deb http://deb.debian.org/debian bookworm-updates main",
                  "deb http://deb.debian.org/debian-security bookworm-security main"]
VARIANTS = ("cpu", "cuda")


def log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def container_tool() -> str:
    """podman (tried here) or docker, whichever is installed; podman first."""
    for tool in ("podman", "docker"):
        if shutil.which(tool):
            return tool
    raise SystemExit("image: needs podman (Debian: apt-get install podman runc) or docker")


def tool_env(tool: str) -> dict[str, str]:
    """podman with runc and no default ulimits where runc is installed (deploy/container/containers.conf)."""
    env = dict(os.environ)
    if tool == "podman" and shutil.which("runc") and "CONTAINERS_CONF" not in env:
        env["CONTAINERS_CONF"] = str(HERE / "containers.conf")
    return env


def ca_bundle() -> str | None:
    """The CA bundle this machine's pip trusts, when it names one (TLS re-signed by a proxy), else None."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(name) and Path(os.environ[name]).is_file():
            return os.environ[name]
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out if out and Path(out).is_file() else None


def docker_hub_reachable(timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen("https://registry-1.docker.io/v2/", timeout=timeout)
    except urllib.error.HTTPError as err:  # 401: the registry is there and wants a token
        return err.code == 401
    except (OSError, ValueError):
        return False
    return True


def image_exists(tool: str, ref: str) -> bool:
    return subprocess.run([tool, "image", "exists" if tool == "podman" else "inspect", ref],
                          capture_output=True, env=tool_env(tool)).returncode == 0


def build_debian_base(tool: str, ref: str = DEBIAN_BASE) -> float:
    """bookworm minbase + python3 + ca-certificates from Debian's own packages; seconds taken."""
    if not shutil.which("mmdebstrap"):
        raise SystemExit("image: Docker Hub is out of reach and mmdebstrap is missing (apt-get install mmdebstrap)")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dlbook-base-") as tmp:
        tarball = Path(tmp) / "base.tar"
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--include=python3,ca-certificates",
             # no documentation, manual pages or translations in a server image (licences stay)
             "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
             "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
             "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
             "bookworm", str(tarball), *DEBIAN_MIRRORS], check=True)
        subprocess.run([tool, "import", "--change", 'CMD ["/bin/bash"]', str(tarball), ref],
                       check=True, env=tool_env(tool), stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def pick_base(tool: str, base: str, rebuild: bool) -> tuple[str, float]:
    """The base image to use and the seconds spent making it (0 when it was there)."""
    if base == "auto":
        base = "official" if docker_hub_reachable() else "debian"
        log(f"Docker Hub {'answers' if base == 'official' else 'is out of reach'}: "
            f"base {'python:3.11-slim' if base == 'official' else 'made from Debian packages'}")
    if base == "official":
        return OFFICIAL_BASE, 0.0
    if base != "debian":
        return base, 0.0  # any image the user names
    if rebuild or not image_exists(tool, DEBIAN_BASE):
        log(f"making {DEBIAN_BASE} with mmdebstrap (Debian bookworm: python3 3.11, ca-certificates)")
        return DEBIAN_BASE, build_debian_base(tool)
    return DEBIAN_BASE, 0.0


def variant_requirements(variant: str) -> list[str]:
    """requirements-serving.txt's pins for the variant: cpu swaps onnxruntime-gpu for onnxruntime, same version."""
    pins = []
    for line in (REPO / "requirements-serving.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"onnxruntime-gpu==(\S+)", line)
        if match and variant == "cpu":
            line = f"onnxruntime=={match.group(1)}"  # ONNX Runtime's CPU build
        elif match and variant == "cuda":
            line = f"onnxruntime-gpu[cuda,cudnn]=={match.group(1)}"  # with NVIDIA's CUDA 13 / cuDNN 9 wheels
        pins.append(line)
    return pins


def bentofile(folder: Path, variant: str, base_image: str, models: list[str] | None, service: str | None) -> Path:
    spec = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    if models:
        spec["models"] = [m if ":" in m else f"{m}:latest" for m in models]
    if service:
        spec["service"] = service
    # the pins as a list: bentoml build takes no requirements file outside the build context
    spec["python"] = {**{k: v for k, v in spec["python"].items() if k != "requirements_txt"},
                      "packages": variant_requirements(variant)}
    spec["docker"]["base_image"] = base_image
    path = folder / "bentofile.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def bentoml_build(spec: Path) -> str:
    """``bentoml build`` (no package locking: the pins are exact); returns the Bento's tag."""
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", str(spec), "-o", "tag", str(REPO)],
                            capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "BENTOML_DO_NOT_TRACK": "True"})
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit("image: bentoml build failed (are the models exported? `bentoml models list`)")
    return result.stdout.strip().splitlines()[-1].split("__tag__:")[-1].strip()


def uv_binary() -> Path | None:
    """uv's own executable (an ELF file, not a shim script) from the virtualenv running this, ./.venv or PATH."""
    for candidate in (Path(sys.executable).parent / "uv", REPO / ".venv" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            with open(candidate, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return Path(candidate).resolve()
    return None


def containerize(tool: str, bento_tag: str, tags: list[str], fresh: bool = False) -> None:
    """``bentoml containerize --backend <tool>`` through BentoML's Python API, with our build options."""
    import bentoml

    # BentoML relays the build's output through its logger: show it
    build_logger = logging.getLogger("bentoml._internal.container")
    if not build_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        build_logger.addHandler(handler)
        build_logger.setLevel(logging.INFO)
    options: dict = {"tag": tuple(tags), "network": "host"}
    volumes = []
    if tool == "podman":
        # OCI images drop HEALTHCHECK (not in the OCI image spec: https://github.com/opencontainers/image-spec/issues/749);
        # Docker's format keeps it. Delete when that spec carries a health check and podman writes it.
        options["format"] = "docker"
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dlbook-image" / "uv"
        if fresh:  # every package downloaded again, every layer built again: the time a first build takes
            shutil.rmtree(cache, ignore_errors=True)
            options["no_cache"] = True
        cache.mkdir(parents=True, exist_ok=True)
        volumes.append(f"{cache}:/root/.cache/uv")  # uv's downloads: kept between builds, out of the image
        build_args = ["UV_LINK_MODE=copy"]  # from that cache into the image (no hard links across filesystems)
        uv = uv_binary()
        if uv:
            volumes.append(f"{uv}:/usr/local/bin/uv:ro")
        bundle = ca_bundle()
        if bundle:
            volumes.append(f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro")
            build_args.append("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
        options["build_arg"] = tuple(build_args)
        # a list: BentoML's podman backend reads a tuple as the parts of one volume (its signature in BentoML
        # 1.4.39: volume: str | tuple[str, str, str]) and joins them with ':'
        options["volume"] = volumes
    os.environ.update({k: v for k, v in tool_env(tool).items() if k == "CONTAINERS_CONF"})
    log(f"bentoml containerize {bento_tag} --backend {tool} " + " ".join(f"-t {t}" for t in tags))
    # BentoML 1.4.39 re-reads the Bento's dockerfile_template from a temporary folder and refuses it unless that
    # folder lies under the working directory ("Accessing file outside of current working directory is not
    # allowed"): so containerize runs from the temporary folders' parent. A regression of BentoML 1.4.36
    # (https://github.com/bentoml/BentoML/issues/5566, open; fixes proposed in pull requests 5596 and 5673).
    # Delete the chdir when a BentoML release with that fix containerizes from the repository root.
    here = os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        bentoml.container.build(bento_tag, backend=tool, **options)
    finally:
        os.chdir(here)
    for tag in tags:
        if not image_exists(tool, tag):
            raise SystemExit(f"image: containerize did not produce {tag} (see BentoML's log above)")


def image_size(tool: str, ref: str) -> int:
    out = subprocess.run([tool, "image", "inspect", ref, "--format", "{{.Size}}"], capture_output=True,
                         text=True, check=True, env=tool_env(tool)).stdout
    return int(out.strip())


def build(variant: str = "cpu", base: str = "auto", models: list[str] | None = None, service: str | None = None,
          rebuild_base: bool = False, name: str = IMAGE_NAME, fresh: bool = False) -> dict:
    """Build the image; returns what was built (tags, sizes, seconds)."""
    tool = container_tool()
    started = time.monotonic()
    base_image, base_seconds = pick_base(tool, base, rebuild_base or fresh)
    if base_image == DEBIAN_BASE and uv_binary() is None:  # Debian's Python has no pip for BentoML's `pip install uv`
        raise SystemExit("image: the Debian base needs uv from the host (it is in ./.venv after ./dlbook setup)")
    with tempfile.TemporaryDirectory(prefix="dlbook-image-") as tmp:
        t0 = time.monotonic()
        bento_tag = bentoml_build(bentofile(Path(tmp), variant, base_image, models, service))
        bento_seconds = time.monotonic() - t0
        version = bento_tag.split(":")[1]
        tags = [f"{name}:{version}-{variant}", f"{name}:{variant}"]
        t0 = time.monotonic()
        containerize(tool, bento_tag, tags, fresh)
        containerize_seconds = time.monotonic() - t0
    import bentoml

    bento = bentoml.bentos.get(bento_tag)
    report = {
        "image": tags[0], "also_tagged": tags[1], "variant": variant, "fresh": fresh, "tool": tool,
        "base_image": base_image,
        "bento": bento_tag, "models": sorted(str(m.tag) for m in bento.info.all_models),
        "size_bytes": image_size(tool, tags[0]),
        "base_size_bytes": image_size(tool, base_image) if image_exists(tool, base_image) else None,
        "seconds": {"base": round(base_seconds, 1), "bentoml_build": round(bento_seconds, 1),
                    "containerize": round(containerize_seconds, 1), "total": round(time.monotonic() - started, 1)},
    }
    log(f"built {tags[0]} (also {tags[1]}): {report['size_bytes'] / 1e6:.0f} MB, "
        f"{report['seconds']['total']:.0f} s; run it with\n"
        f"  {tool} run --rm -p 127.0.0.1:3000:3000 --read-only --tmpfs /tmp --cpus 2 {tags[1]}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dlbook image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="cpu")
    parser.add_argument("--base", default="auto",
                        help="auto (python:3.11-slim when Docker Hub answers, else debian), official, debian, "
                             "or any image reference")
    parser.add_argument("--models", help="comma-separated model names (default: bentofile.yaml's)")
    parser.add_argument("--service", help="the Bento's service (default: bentofile.yaml's, DlbookService)")
    parser.add_argument("--name", default=IMAGE_NAME, help="image name (default: %(default)s)")
    parser.add_argument("--rebuild-base", action="store_true", help="make the Debian base image again")
    parser.add_argument("--fresh", action="store_true",
                        help="build from nothing: the base again, no layer cache, no download cache (first-build time)")
    parser.add_argument("--json", type=Path, help="write what was built (tags, size, seconds) to this file")
    args = parser.parse_args(argv)
    report = build(args.variant, args.base, args.models.split(",") if args.models else None, args.service,
                   args.rebuild_base, args.name, args.fresh)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
