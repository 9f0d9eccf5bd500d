#!/bin/sh
# bentofile.yaml `docker.setup_script`: runs as root once the Bento and its packages are in the image.
set -eu
# The root filesystem may be read-only at run time: compile our sources now (uv compiled the packages), so that
# no start-up pays for it and nothing tries to write __pycache__ there.
python -m compileall -q "$BENTO_PATH/src"
# BentoML makes these folders of its home at every start (seen with BentoML 1.4.39); on a read-only root
# filesystem they must exist already. Drop them when BentoML no longer writes its home at start.
# Its scratch folder is the tmpfs at /tmp.
mkdir -p "$BENTOML_HOME/bentos" "$BENTOML_HOME/envs"
ln -sfn /tmp "$BENTOML_HOME/tmp"
# The home's model store is the Bento's: `bentoml serve serving.service:ImageService` (one kind per container,
# deploy/kubernetes/) then finds the very models `bentoml serve $BENTO_PATH` serves.
ln -sfn "$BENTO_PATH/models" "$BENTOML_HOME/models"
# The CUDA variant: onnxruntime-gpu loads CUDA and cuDNN from NVIDIA's wheels (site-packages/nvidia/*/lib);
# register those folders with the dynamic loader (the CPU variant has none). onnxruntime.preload_dlls()
# (https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider, "Preload DLLs") would find them too;
# this block can go if serving calls it before creating a CUDA session.
nvidia=$(find /app/.venv/lib -maxdepth 4 -type d -path '*/site-packages/nvidia' | head -n 1)
if [ -n "$nvidia" ]; then
  find "$nvidia" -type d -name lib > /etc/ld.so.conf.d/dlbook-nvidia.conf
  ldconfig
fi
