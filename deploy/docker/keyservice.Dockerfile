# SealedML KeyService image. Build from the repository root:
#   docker build -f deploy/docker/keyservice.Dockerfile -t REGISTRY/sealedml-keyservice:TAG .
#
# `pip install .` installs what serving needs and nothing more (no scikit-learn, SciPy or
# matplotlib). The state (master key sealed to this measurement, SQLite store, audit log) lives
# in /data: mount a persistent volume there, or give --store postgresql://… (docs/deployment.md).
# With the simulated TEE (no hardware) the KeyService and the runtimes must share one simulated
# platform root: the compose file and the manifests mount one volume at $SEALEDML_HOME for that.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SEALEDML_HOME=/var/lib/sealedml/home \
    SEALEDML_LOG_LEVEL=INFO

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf /build

ARG SEALEDML_UID=10001
RUN useradd --system --uid "$SEALEDML_UID" --home-dir /var/lib/sealedml --no-create-home sealedml \
    && mkdir -p /data /var/lib/sealedml/home \
    && chown -R "$SEALEDML_UID" /data /var/lib/sealedml \
    && chmod 0700 /data /var/lib/sealedml/home
USER ${SEALEDML_UID}
WORKDIR /var/lib/sealedml
VOLUME ["/data"]
EXPOSE 8700

# JSON logs on stderr; /livez and /readyz for the orchestrator's probes.
ENTRYPOINT ["python", "-m", "sealedml", "keyservice", "serve", "--host", "0.0.0.0", "--port", "8700", "--data-dir", "/data"]
CMD []
