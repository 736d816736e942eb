# syntax=docker/dockerfile:1
# Prefect process worker for the `kdm-cpu` pool: Python 3.11, the kdm project installed with the exact
# pins of pyproject.toml. Build from the repository root:
#   docker build -f docker/worker-cpu.Dockerfile -t kdm-worker-cpu:0.1.0 .
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 10001 kdm \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin kdm \
 && mkdir -p /var/lib/kdm/data && chown kdm:kdm /var/lib/kdm/data \
 && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/kdm
# Dependencies resolve from the exact pins in pyproject.toml; the flow source stays on disk at
# /opt/kdm because prefect.yaml's pull step runs flows from $KDM_REPO.
COPY pyproject.toml README.md prefect.yaml ./
COPY pipeline/ pipeline/
COPY flows/ flows/
COPY models/ models/
COPY storage_schemas/ storage_schemas/
COPY configs/ configs/
RUN pip install ".[metrics]" \
 && rm -rf build *.egg-info \
 && chown -R kdm:kdm /opt/kdm

# PREFECT_API_URL (http://prefect-server:4200/api), AWS_* and KDM_ROOT come from docker/compose.yaml;
# KDM_DATA_DIR (named datasets, /var/lib/kdm/data: the volume kdm-data, owned by the worker user) too.
ENV KDM_REPO=/opt/kdm \
    PREFECT_HOME=/home/kdm/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1

USER 10001:10001

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(os.environ['PREFECT_API_URL'] + '/health', timeout=5)"

ENTRYPOINT ["prefect", "worker", "start", "--pool", "kdm-cpu", "--type", "process"]
