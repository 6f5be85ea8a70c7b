#!/bin/sh
# Builds a dockercomp image (Dockerfile at the repo root), also with no image registry.
# Usage: build-image.sh [IMAGE]          (default dockercomp/ROLE:latest)
# Environment:
#   ROLE        the Dockerfile stage: worker (default; the agent alone, for volunteers),
#               installer (`dockercomp installer` with the Docker SDK, which install_me.sh runs)
#               or coordinator (the engine with its database drivers, for docker-compose.yml).
#   BASE_IMAGE  base to build FROM; default python:3.11-slim when it is present or pullable,
#               else a Debian base made locally by build-base-image.sh (once per machine).
#   PYTHON      interpreter with pip that builds the wheels (default .venv/bin/python).
#   FORCE=1     rebuild even when the image already matches the sources.
# The image carries a hash of the sources it was built from; when the existing image has the
# same hash nothing is rebuilt, so tests and `make image` cost nothing on the second run.
set -eu
cd "$(dirname "$0")/.."

role="${ROLE:-worker}"
# What each stage installs from its wheels, as the Dockerfile does ("." is this checkout).
requirements() {
    case "$1" in
        worker) echo ". setuptools wheel" ;;
        installer) echo ".[installer]" ;;
        coordinator) echo ".[coordinator,broker,postgres]" ;;
    esac
}
if [ -z "$(requirements "$role")" ]; then
    echo "build-image: ROLE must be worker, installer or coordinator, not $role" >&2
    exit 2
fi
image="${1:-${IMAGE:-dockercomp/$role:latest}}"
label=org.dockercomp.source-hash
local_base=dockercomp-base:bookworm
official_base=python:3.11-slim
wheels=build/wheels

sh scripts/ensure-docker.sh

# Everything that ends up in the image; bytecode caches would change the hash for nothing.
source_hash="$(
    find dockercomp agent broker coordinator installer setup.cfg pyproject.toml README.md Dockerfile \
        -type f ! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort |
        xargs sha256sum | sha256sum | cut -c1-16
)"
current="$(docker image inspect --format "{{index .Config.Labels \"$label\"}}" "$image" 2>/dev/null || true)"
if [ -z "${FORCE:-}" ] && [ "$current" = "$source_hash" ]; then
    echo "build-image: $image is up to date with the sources ($source_hash)"
    exit 0
fi

if [ -z "${BASE_IMAGE:-}" ]; then
    # Prefer what is already here, so a machine without a registry never waits on a pull.
    if docker image inspect "$official_base" >/dev/null 2>&1; then
        BASE_IMAGE="$official_base"
    elif docker image inspect "$local_base" >/dev/null 2>&1; then
        BASE_IMAGE="$local_base"
    elif docker pull -q "$official_base" >/dev/null 2>&1; then
        BASE_IMAGE="$official_base"
    else
        echo "build-image: cannot pull $official_base (no registry?); building a local Debian base"
        sh scripts/build-base-image.sh "$local_base"
        BASE_IMAGE="$local_base"
    fi
fi

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "build-image: $PYTHON has no pip; run \`make venv\` or set PYTHON to a Python with pip" >&2
    exit 1
fi
# Wheels with compiled code only install into the Python minor version they were built for.
host_py="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
image_py="$(docker run --rm --entrypoint python3 "$BASE_IMAGE" \
    -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$host_py" != "$image_py" ]; then
    echo "build-image: $PYTHON is Python $host_py but $BASE_IMAGE has Python $image_py;" \
         "set PYTHON to a python$image_py with pip (the wheels must match the image)" >&2
    exit 1
fi

# Each stage gets only its own role's wheels. The classic builder builds every stage before the
# target, in the Dockerfile's order (worker, installer, coordinator), so a later stage's build
# needs the earlier stages' wheels too.
rm -rf "$wheels" build/lib  # setuptools never prunes build/lib: a deleted module would linger
case "$role" in
    worker) stages=worker ;;
    installer) stages="worker installer" ;;
    *) stages="worker installer $role" ;;
esac
for stage in $stages; do
    echo "build-image: building wheels for the $stage with $PYTHON into $wheels/$stage"
    # shellcheck disable=SC2046  # the requirements are words
    "$PYTHON" -m pip wheel -qq --disable-pip-version-check --wheel-dir "$wheels/$stage" $(requirements "$stage")
done

echo "build-image: building $image FROM $BASE_IMAGE"
previous="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
docker build --quiet --target "$role" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --label "$label=$source_hash" \
    --tag "$image" . >/dev/null
# Each rebuild would otherwise leave the previous image behind, untagged (~250 MB each).
# It stays when a container still uses it; `docker image rm` then refuses, which is fine.
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect --format '{{.Id}}' "$image")" ]; then
    docker image rm "$previous" >/dev/null 2>&1 || true
fi
echo "build-image: built $image ($source_hash)"
