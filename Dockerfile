# puller's two images, from one build stage:
#
#   docker build --target worker -t cyberdojo/puller-worker .   # one per node (a DaemonSet)
#   docker build --target http   -t cyberdojo/puller-http .     # the HTTP API, port 5017
#
# A plain `docker build .` builds the worker (the last stage). On a laptop it builds
# as is; on a machine that cannot pull python:3.12-slim, pass a local base that has
# python3 (3.11 or later) and its venv module: --build-arg BASE_IMAGE=local/debian-python:bookworm
# Labels: --build-arg VERSION=0.1.0 --build-arg SHA=$(git rev-parse HEAD)
# (`python -m localcluster test-images` passes both).
ARG BASE_IMAGE=python:3.12-slim

# ---------------------------------------------------------------------------------
# build: the project and its runtime dependencies, installed into the venv
# /opt/puller. The runtime stages copy that directory and nothing else: no pip, no
# setuptools, no dev extra, no sources.
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
# build-ca/*.crt, if any, is what pip trusts (for networks that intercept TLS). It
# goes into this stage's pip configuration only; the runtime images never see it.
COPY build-ca /tmp/build-ca
RUN set -e; \
    if ls /tmp/build-ca/*.crt >/dev/null 2>&1; then \
      cat /tmp/build-ca/*.crt > /etc/pip-build-ca.pem; \
      printf '[global]\ncert = /etc/pip-build-ca.pem\n' > /etc/pip.conf; \
    fi; \
    rm -rf /tmp/build-ca; \
    python3 -m venv /opt/build-tools; \
    /opt/build-tools/bin/pip install --quiet 'setuptools>=77' wheel; \
    python3 -m venv --without-pip /opt/puller
# The dependencies first, from pyproject.toml alone, so that a change to the code (or
# to README.md, the package's long description) reuses this layer from the cache.
COPY pyproject.toml /src/pyproject.toml
RUN /opt/build-tools/bin/python -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
 && /opt/build-tools/bin/pip --python /opt/puller/bin/python install --quiet -r /tmp/requirements.txt
COPY README.md /src/
COPY contract /src/contract
COPY worker /src/worker
COPY publisher /src/publisher
COPY serving /src/serving
COPY gateway /src/gateway
COPY blob_cache /src/blob_cache
# A wheel built with the tools venv's setuptools, installed without dependencies (they
# are in already); `pip check` fails the build if one is missing.
RUN /opt/build-tools/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /tmp/wheels /src \
 && /opt/build-tools/bin/pip --python /opt/puller/bin/python install --quiet --no-deps /tmp/wheels/*.whl \
 && /opt/build-tools/bin/pip --python /opt/puller/bin/python check

# ---------------------------------------------------------------------------------
# runtime: what both images share (so they share these layers on a node, too).
FROM ${BASE_IMAGE} AS runtime
COPY --from=build /opt/puller /opt/puller
# pip compiled the bytecode at install: nothing needs to write beside the code, which
# lets the root file system be read-only.
ENV PATH=/opt/puller/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PULLER_LOG_FORMAT=json

# ---------------------------------------------------------------------------------
# http: puller-http, the HTTP API (a drop-in for cyber-dojo's puller on port 5017).
# It needs no privilege and writes nothing but its log to stdout: it runs as
# nobody:nogroup and works with a read-only root file system (give it a small tmpfs
# /tmp for libraries that want one):
#   docker run -d --read-only --tmpfs /tmp:size=8m --cap-drop ALL \
#     --security-opt no-new-privileges -p 5017:5017 \
#     -e PULLER_AMQP_URL=amqp://... cyberdojo/puller-http
FROM runtime AS http
ENV PULLER_HTTP_PORT=5017
USER 65534:65534
EXPOSE 5017
# GET /alive on the API's own port; Python's standard library, no curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import http.client as h, os, sys; c = h.HTTPConnection('127.0.0.1', int(os.environ.get('PULLER_HTTP_PORT') or 5017), timeout=4); c.request('GET', '/alive'); sys.exit(c.getresponse().status != 200)"]
# Last, so that a new commit rebuilds only these two small layers.
ARG VERSION=dev
ARG SHA=
ARG SOURCE=https://github.com/cyber-dojo/puller
LABEL org.opencontainers.image.title="puller-http" \
      org.opencontainers.image.description="puller's HTTP API: a drop-in for cyber-dojo's puller service" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${SHA}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="BSD-2-Clause"
# The commit the image was built from: GET /sha answers it.
ENV SHA=${SHA}
ENTRYPOINT ["puller-http"]

# ---------------------------------------------------------------------------------
# worker: puller-worker, one per node, pulling through that node's Docker Engine.
#
# Why it needs the socket: pulling an image onto a node is asking that node's engine
# to pull it (POST /images/create), and the engine's API is its unix socket, mounted
# into the container (-v /var/run/docker.sock:/var/run/docker.sock). Whoever can
# write to that socket is root on the node, whatever user the container runs as: the
# socket is the privilege, the user id adds little. The image's default user is root
# because the socket is root:docker, mode 0660, and the docker group's id differs
# from host to host, so no fixed user can be written here.
#
# Where the host allows, run it as nobody with the socket's group instead of root:
#   docker run -d --name puller-worker --restart unless-stopped --stop-timeout 30 \
#     --user 65534:65534 --group-add "$(stat -c %g /var/run/docker.sock)" \
#     --read-only --tmpfs /tmp:size=16m --cap-drop ALL --security-opt no-new-privileges \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v puller-state:/var/lib/puller \
#     -e PULLER_AMQP_URL=amqp://... -e PULLER_NODE_NAME="$(hostname)" \
#     -p 8080:8080 cyberdojo/puller-worker
# The named volume starts as this image's /var/lib/puller, which nobody owns; a host
# directory mounted there instead must be writable by 65534 (chown 65534 DIR). Where
# the socket's group is root's (gid 0), giving it away is about the same as root, and
# some hosts refuse a user that is not root the socket whatever the group (a rootless
# or SELinux-labelled socket): run as root there, with the capabilities dropped.
# --stop-timeout: on SIGTERM the worker finishes pulls for PULLER_SHUTDOWN_GRACE (20)
# seconds and answers what it cancelled within 5 more; docker's default is 10.
# ---------------------------------------------------------------------------------
# ctr: containerd's client, for nodes without Docker (PULLER_IMAGE_STORE=containerd).
# Only the one binary goes on: the worker never runs containerd itself.
FROM ${BASE_IMAGE} AS ctr
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends containerd >/dev/null \
 && cp /usr/bin/ctr /ctr \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------
FROM runtime AS worker
COPY --from=ctr /ctr /usr/local/bin/ctr
RUN mkdir -p /var/lib/puller && chown 65534:65534 /var/lib/puller
ENV PULLER_STATE_DIR=/var/lib/puller \
    PULLER_HEALTH_PORT=8080
# How far the node has caught up on the history: keep it on the node's disk.
VOLUME /var/lib/puller
# GET /alive, /ready and /metrics
EXPOSE 8080
# GET /alive on the health port (passes when PULLER_HEALTH_PORT=0 turns the port off).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import http.client as h, os, sys; p = int(os.environ.get('PULLER_HEALTH_PORT') or 8080); c = p and h.HTTPConnection('127.0.0.1', p, timeout=4); c and c.request('GET', '/alive'); sys.exit(bool(c) and c.getresponse().status != 200)"]
ARG VERSION=dev
ARG SHA=
ARG SOURCE=https://github.com/cyber-dojo/puller
LABEL org.opencontainers.image.title="puller-worker" \
      org.opencontainers.image.description="puller's node daemon: pulls images through the node's Docker Engine or containerd" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${SHA}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="BSD-2-Clause"
ENV SHA=${SHA}
ENTRYPOINT ["puller-worker"]
