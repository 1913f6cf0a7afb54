# syntax=docker/dockerfile:1
#
# The image every Ray node runs: the Ray head and GPU workers of cluster/gpu.yaml, and the `ray-head`
# service of docker/compose.yaml. It executes `python -m trainer.run --job-dir <uri>` (the Ray Jobs
# entrypoint that trainctl submits) and the DDP workers it starts.
#
# Base: the official Ray image for exactly the Ray version in pyproject.toml (2.60.0), Python 3.11 and
# CUDA 12.8. Pinned tag, never `latest`: every node of a cluster must run the same Ray and Python, or
# they refuse to join. It already has the non-root user `ray` (uid 1000, gid 100 "users") and the Ray
# autoscaler's requirements (rsync, ssh client, bash); the cluster launcher expects that layout.
#
#   docker build -f docker/trainer.Dockerfile -t trainctl-trainer:0.1.0 .
FROM rayproject/ray:2.60.0-py311-cu128

USER 1000:100
WORKDIR /home/ray/trainctl

# Only what the package needs (see .dockerignore: the build context is an allow-list).
COPY --chown=1000:100 pyproject.toml ./
COPY --chown=1000:100 trainer/ trainer/
COPY --chown=1000:100 service/ service/
COPY --chown=1000:100 objstore/ objstore/

# pyproject pins ray==2.60.0 (already in the image, so pip keeps it) and torch==2.14.1, whose Linux
# wheels on PyPI bundle their CUDA 12 runtime libraries; the host only needs the NVIDIA driver.
# DL3013 reads '.[train]' as an unpinned package; it is this project, whose pins are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[train]' \
    && python -c "import torch, ray, trainer.run, objstore; assert ray.__version__ == '2.60.0', ray.__version__"

# Token auth on by default: a Ray node started from this image never runs unauthenticated by accident.
# The token itself is mounted at run time (~/.ray/auth_token or RAY_AUTH_TOKEN_PATH), never baked in.
ENV RAY_AUTH_MODE=token \
    PYTHONUNBUFFERED=1

# Ray's launcher and compose supply the command (`ray start ...`).
CMD ["bash"]
