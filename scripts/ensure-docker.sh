#!/bin/sh
# Makes sure a Docker engine answers: installs Debian's docker.io and starts dockerd when
# missing (root only), otherwise says exactly what to do. No-op when `docker info` works.
# Used by `make system`/`make image` and CI, where the machine is fresh and has no systemd.
set -eu

engine_up() { docker info >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && engine_up; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    if command -v docker >/dev/null 2>&1; then
        echo "ensure-docker: the Docker engine does not answer; start it (sudo systemctl start docker)" \
             "or add yourself to the docker group (sudo usermod -aG docker \$USER, then log in again)" >&2
    else
        echo "ensure-docker: Docker is not installed; install it (as root: apt-get install docker.io)" >&2
    fi
    exit 1
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    echo "ensure-docker: installing docker.io"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi

# The package's systemd unit starts the engine on a normal machine; containers and CI
# runners have no systemd, so fall back to starting dockerd in the background ourselves.
if ! engine_up && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl start docker >/dev/null 2>&1 || true
fi
if ! engine_up; then
    log=/var/log/dockerd.log
    echo "ensure-docker: starting dockerd (log: $log)"
    nohup dockerd >"$log" 2>&1 </dev/null &
    tries=0
    until engine_up; do
        tries=$((tries + 1))
        if [ "$tries" -ge 60 ]; then
            tail -n 20 "$log" >&2
            echo "ensure-docker: dockerd did not come up within 60 s; see $log" >&2
            exit 1
        fi
        sleep 1
    done
fi
echo "ensure-docker: Docker engine is up ($(docker version --format '{{.Server.Version}}'))"
