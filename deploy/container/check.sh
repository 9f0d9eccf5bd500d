#!/usr/bin/env bash
# Build the serving image and check it for real; the record goes to docs/records/container-check.{json,md}.
#
#   deploy/container/check.sh            # CPU image of the models in the BentoML store ($BENTOML_HOME)
#   deploy/container/check.sh --fresh    # from nothing: base image, every layer, every download (first-build time)
#
# Needs podman + runc (+ mmdebstrap where Docker Hub is out of reach: apt-get install podman runc mmdebstrap),
# Debian's mirror and PyPI, and the models exported (./dlbook up --no-serve). Binds 127.0.0.1 only. What it
# checks: deploy/container/check.py. Not part of ./dlbook test (several minutes); tests/test_container.py runs
# the same check with DLBOOK_CONTAINER_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
export BENTOML_DO_NOT_TRACK=True
exec .venv/bin/python deploy/container/check.py --record docs/records/container-check.json "$@"
