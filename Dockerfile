# syntax=docker/dockerfile:1
#
# fastaphlict container image: a drop-in replacement for Phorge's Aphlict.
#
#   docker build -t fastaphlict .
#   docker run -d --name fastaphlict \
#       -p 22280:22280 -p 127.0.0.1:22281:22281 \
#       --ulimit nofile=65536:65536 --stop-timeout 15 \
#       fastaphlict
#
# With an Aphlict config file instead of the environment variables:
#
#   docker run ... -v /etc/fastaphlict/aphlict.json:/etc/fastaphlict/aphlict.json:ro \
#       fastaphlict --config=/etc/fastaphlict/aphlict.json
#
# A file replaces CLIENT_PORT/ADMIN_PORT/LISTEN_ADDR: give its admin server
# "listen": "0.0.0.0" to reach it from outside the container (the same warning
# as below applies), and point its "logs" at a writable path or leave them out
# (logs go to stderr, i.e. `docker logs`, in any case). The healthcheck asks
# 127.0.0.1:$ADMIN_PORT, so pass `-e ADMIN_PORT=...` if the file's admin port
# is not 22281.

ARG PYTHON_VERSION=3.11

# -- builder: compile the Cython fan-out module into a wheel -------------------
FROM python:${PYTHON_VERSION}-slim AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src/ src/
# fastaphlict's own wheel (with the compiled _fanout module) plus wheels of
# all its dependencies, so the runtime stage needs neither a compiler nor an index.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- runtime -------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim

RUN groupadd --system --gid 10001 fastaphlict \
    && useradd --system --uid 10001 --gid fastaphlict --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin fastaphlict

ENV VIRTUAL_ENV=/opt/fastaphlict/venv
# BuildKit (Docker >= 23's default builder, or Podman/Buildah): the wheels are
# bind-mounted from the builder, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --no-index --find-links=/wheels fastaphlict \
    && "$VIRTUAL_ENV/bin/python" -c "import fastaphlict._fanout as f; assert f.COMPILED"

ENV PATH="/opt/fastaphlict/venv/bin:$PATH" \
    CLIENT_PORT=22280 \
    ADMIN_PORT=22281

# !!! WARNING: the admin port is UNAUTHENTICATED. Anyone who reaches it can push
# !!! notifications to every connected browser and read /status/. It binds all
# !!! interfaces here only so that Docker can forward it: publish it to trusted
# !!! networks only, e.g. `-p 127.0.0.1:22281:22281` (Phorge on the same host) or
# !!! a private interface, never a bare `-p 22281:22281` on a public host.
ENV LISTEN_ADDR=0.0.0.0

# 22280: client (WebSocket, browsers). 22281: admin (HTTP, Phorge; see above).
EXPOSE 22280 22281

# No curl in the slim image: the standard library does the request. A non-2xx
# answer or no answer raises, and the non-zero exit marks the container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('ADMIN_PORT') or '22281'), timeout=3)"]

USER fastaphlict

# SIGTERM drains within 10 s (the --shutdown-timeout default); Docker's default
# grace is exactly 10 s, so run with `--stop-timeout 15` (Compose:
# `stop_grace_period: 15s`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastaphlict"]
