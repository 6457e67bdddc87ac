# The puller worker, one per node. Build on a laptop as is; on a machine that
# cannot pull python:3.12-slim, pass a local base that has python3 and venv:
#   docker build --build-arg BASE_IMAGE=local/debian-python:bookworm -t puller-worker .
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

RUN python3 -m venv /opt/puller
COPY pyproject.toml README.md /src/
COPY contract /src/contract
COPY worker /src/worker
COPY publisher /src/publisher
COPY serving /src/serving
COPY localcluster /src/localcluster
# build-ca/*.crt, if any, is what pip trusts (for networks that intercept TLS).
COPY build-ca /tmp/build-ca
RUN set -e; \
    if ls /tmp/build-ca/*.crt >/dev/null 2>&1; then \
      cat /tmp/build-ca/*.crt > /tmp/build-ca/bundle.pem; export PIP_CERT=/tmp/build-ca/bundle.pem; \
    fi; \
    /opt/puller/bin/pip install --no-cache-dir --disable-pip-version-check /src; \
    rm -rf /src /tmp/build-ca

# The commit the image was built from: puller-http answers it at /sha.
ARG SHA
ENV SHA=${SHA}

# The worker talks to the node's Docker Engine through a mounted socket
# (-v /var/run/docker.sock:/var/run/docker.sock), which belongs to root.
ENV PULLER_LOG_FORMAT=json \
    PULLER_STATE_DIR=/var/lib/puller \
    PULLER_HEALTH_PORT=8080 \
    PATH=/opt/puller/bin:$PATH
# How far the node has caught up on the history: keep it on the node's disk.
VOLUME /var/lib/puller
# GET /alive, /ready and /metrics; puller-http (--entrypoint puller-http) listens on 5017
EXPOSE 8080 5017
ENTRYPOINT ["puller-worker"]
