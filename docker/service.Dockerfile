# syntax=docker/dockerfile:1
#
# The trainctl control plane: `trainctl serve` (FastAPI + SQLite job store) and the `trainctl` CLI.
# It does not train, so no torch and no CUDA: a slim Python image with only the service's dependencies.
# It still needs ray[default]: the Ray Jobs client (ray.job_submission) that submits
# `python -m trainer.run` to the cluster lives in that extra. Its Ray and Python versions must match the
# cluster's (2.60.0 / 3.11).
#
#   docker build -f docker/service.Dockerfile -t trainctl-service:0.1.0 .
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_AUTH_MODE=token \
    TRAINCTL_DATA_DIR=/data

RUN groupadd --system --gid 1000 trainctl \
    && useradd --system --uid 1000 --gid trainctl --create-home --home-dir /home/trainctl trainctl \
    && mkdir -p /data \
    && chown trainctl:trainctl /data

WORKDIR /opt/trainctl

# The service's dependencies, pinned (kept consistent with pyproject.toml by tests/cluster/test_docker.py).
COPY docker/service-requirements.txt ./
RUN pip install --no-cache-dir -r service-requirements.txt

# The project itself without its dependencies (pyproject's torch/torchvision are the trainer's, GBs).
COPY pyproject.toml ./
COPY trainer/ trainer/
COPY service/ service/
COPY objstore/ objstore/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import service.server.app, service.client.cli.main, objstore, ray.job_submission"

USER 1000:1000
WORKDIR /data
EXPOSE 8000
# Inside a container the API must listen on all of the container's interfaces to be reachable at all;
# compose publishes it on the host's 127.0.0.1 only. The API keeps its bearer-token auth.
ENTRYPOINT ["trainctl"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
