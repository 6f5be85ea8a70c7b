# dockercomp images, one stage per role: `worker` (dockercomp/worker:latest, the agent,
# configured entirely by environment variables) and `coordinator` (dockercomp/coordinator:latest,
# the engine that docker-compose.yml runs).
#
# Built by `make image` (scripts/build-image.sh), which first builds wheels for dockercomp and
# each role's dependencies on the host into build/wheels/ROLE/. Installing from those wheels
# means the build itself never reaches a package index, so it works offline and behind TLS
# proxies.
#
# BASE_IMAGE must provide python3 (3.11, the same minor version as the host that built the
# wheels) with the venv module. Elsewhere the official slim image is pulled; where no image
# registry is reachable, build-image.sh makes a debootstrap'd Debian base locally instead.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS base

# A fixed uid/gid, so file ownership is predictable in volumes; not root, because the agent
# runs code from a scientist's task packages on a volunteer's machine.
ARG WORKER_UID=10001
RUN groupadd --system --gid "${WORKER_UID}" dockercomp \
 && useradd --system --uid "${WORKER_UID}" --gid dockercomp --create-home \
    --home-dir /home/dockercomp --shell /usr/sbin/nologin dockercomp

ENV PATH=/opt/dockercomp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/dockercomp

# --- the worker: what volunteers run -----------------------------------------------------------
# Stages are built with --target (scripts/build-image.sh). The worker comes before the
# coordinator because Docker's classic builder builds every stage up to the target: building
# the worker then never needs the coordinator's wheels.
FROM base AS worker

# A private venv: Debian's system Python refuses pip installs (PEP 668), and a venv keeps
# dockercomp's dependencies apart from whatever the base image ships. Only the base install
# (the agent: paho-mqtt and click), no other role's packages, since this runs on volunteers'
# machines. setuptools and wheel let task packages be installed later without reaching a
# package index (see ONBUILD).
COPY build/wheels/worker/ /tmp/wheels/
RUN python3 -m venv /opt/dockercomp \
 && /opt/dockercomp/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
    --disable-pip-version-check --quiet dockercomp setuptools wheel \
 && rm -rf /tmp/wheels

# Configuration is the agent's environment, left unset here so the agent's own defaults
# apply: DOCKERCOMP_BROKER, DOCKERCOMP_WORKER_ID, DOCKERCOMP_VOLUNTEER,
# DOCKERCOMP_CONCURRENCY, DOCKERCOMP_USERNAME, DOCKERCOMP_PASSWORD.
USER dockercomp

# `dockercomp agent check` exits 0 only while this container's agent is connected and healthy. The
# start period covers connecting to a remote broker; three misses mark it unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["dockercomp", "agent", "check"]

# Task packages: an image built FROM this one, from a directory holding a Python package that
# registers functions in the entry-point group `dockercomp.tasks`, gets that package installed
# into the agent's venv by these triggers, so its Dockerfile needs only the FROM line (see
# examples/custom-tasks/). No build isolation: setuptools is already here, no index needed.
ONBUILD USER root
ONBUILD COPY . /tmp/tasks/
ONBUILD RUN /opt/dockercomp/bin/pip install --no-cache-dir --no-build-isolation \
    --disable-pip-version-check --quiet /tmp/tasks/ && rm -rf /tmp/tasks
ONBUILD USER dockercomp

# The agent drains on the first SIGTERM (what `docker stop` sends) and stops on the second.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dockercomp", "agent", "run"]

# --- the installer: `dockercomp installer` with the Docker SDK, run by install_me.sh ------------
# Volunteers' hosts need no Python: install_me.sh runs this image with the Docker socket mounted
# (installer/README.md says why). FROM base, not FROM worker: the worker's ONBUILD triggers would
# fire here. Root, because it talks to the volunteer's own Docker socket; it computes nothing.
FROM base AS installer

COPY build/wheels/installer/ /tmp/wheels/
RUN python3 -m venv /opt/dockercomp \
 && /opt/dockercomp/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
    --disable-pip-version-check --quiet "dockercomp[installer]" \
 && rm -rf /tmp/wheels

ENTRYPOINT ["dockercomp"]

# --- the coordinator: the scientist's engine, for docker-compose.yml ----------------------------
FROM base AS coordinator

# The coordinator with its database drivers (SQLite built in, PostgreSQL by psycopg2) and the
# broker's administration; /var/lib/dockercomp is where it keeps its database: a named volume
# mounted there inherits this owner, so the non-root user can write to it.
COPY build/wheels/coordinator/ /tmp/wheels/
RUN python3 -m venv /opt/dockercomp \
 && /opt/dockercomp/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
    --disable-pip-version-check --quiet "dockercomp[coordinator,broker,postgres]" \
 && rm -rf /tmp/wheels \
 && install -d -o dockercomp -g dockercomp /var/lib/dockercomp

USER dockercomp
STOPSIGNAL SIGTERM
ENTRYPOINT ["dockercomp", "coordinator", "serve"]
