# SealedML runtime instance inside an SGX enclave (Gramine). Build from the repository root on a
# machine with the SGX signing key:
#   docker build -f deploy/docker/runtime-gramine.Dockerfile \
#       --build-arg WORKER_KS_POLICY=deploy/policies/keyservice-sgx-for-workers.yaml \
#       --secret id=enclave-key,src=enclave-key.pem -t REGISTRY/sealedml-runtime-sgx:TAG .
# Run with the SGX devices and the AESM socket: --device /dev/sgx_enclave --device /dev/sgx_provision
# -v /var/run/aesmd:/var/run/aesmd. deploy/gramine/README.md explains the manifest, who trusts whom
# and the build order; the MRSIGNER this prints goes into the KeyService's runtime policy.
FROM gramineproject/gramine:1.8-jammy

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sealedml
COPY pyproject.toml README.md ./
COPY src ./src
COPY deploy/gramine ./deploy/gramine
COPY deploy/policies ./deploy/policies
RUN python3.11 -m venv /opt/sealedml/venv && /opt/sealedml/venv/bin/pip install .

ARG WORKER_KS_POLICY=deploy/policies/keyservice-sgx-for-workers.yaml
RUN --mount=type=secret,id=enclave-key \
    make -C deploy/gramine worker VENV=/opt/sealedml/venv WORKER_KS_POLICY=/opt/sealedml/$WORKER_KS_POLICY \
         SGX_SIGNER_KEY=/run/secrets/enclave-key

VOLUME ["/models"]
EXPOSE 8080
WORKDIR /opt/sealedml/deploy/gramine
ENTRYPOINT ["gramine-sgx", "sealedml-worker"]
CMD []
