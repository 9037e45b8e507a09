# SealedML runtime image: the platform gateway and the runtime instances it starts (`platform serve`),
# a standalone instance (`worker serve`) or the untrusted executor (`executor serve`). Build from the
# repository root:
#   docker build -f deploy/docker/runtime.Dockerfile -t REGISTRY/sealedml-runtime:TAG .
#
# The default command is the gateway; the model store (/models: ciphertext only) is a volume the
# owners' `model seal --store` writes to. For SGX, deploy/docker/runtime-gramine.Dockerfile builds
# the same package into a Gramine enclave.
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
    && mkdir -p /models /var/lib/sealedml/home \
    && chown -R "$SEALEDML_UID" /models /var/lib/sealedml \
    && chmod 0700 /var/lib/sealedml/home
USER ${SEALEDML_UID}
WORKDIR /var/lib/sealedml
VOLUME ["/models"]
EXPOSE 8701

ENTRYPOINT ["python", "-m", "sealedml"]
CMD ["platform", "serve", "--host", "0.0.0.0", "--port", "8701", "--store", "/models", "--keyservice", "http://keyservice:8700"]
