#!/bin/sh
# Installs and starts the system services the test-suite talks to, when they are missing.
# Needs root for the installs; on a machine that already has them it changes nothing.
set -eu

need=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need="$need mosquitto mosquitto-clients"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$need postgresql"
# RabbitMQ (3.10+, its MQTT plugin included) for the cluster tests and `bench --broker rabbitmq-cluster`.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need="$need rabbitmq-server"
# Debian's chromium: tests/system/test_dashboard.py drives it with Playwright (which must never
# download a browser of its own).
[ -x /usr/bin/chromium ] || need="$need chromium"
# Redis for the benchmark's peer phase (bench/peer.py: Celery + Redis on the same tasks).
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need="$need redis-server"

if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup-system: missing:$need; install them (as root: apt-get install$need)" >&2
        exit 1
    fi
    echo "setup-system: installing$need"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    # The package starts its default node (rabbit@HOST) where it can. The tests and the bench
    # start their own (private epmd, node names, ports), so it would only take CPU and memory.
    case "$need" in *rabbitmq-server*)
        invoke-rc.d rabbitmq-server stop >/dev/null 2>&1 || service rabbitmq-server stop >/dev/null 2>&1 || true ;;
    esac
fi
# Debian starts the packaged mosquitto on 1883; the tests start their own on free ports.
# Docker for the container tests: installed and started when missing (root only; a laptop
# without Docker skips those tests). docker-compose validates docker-compose.yml in tests.
if [ "$(id -u)" = 0 ]; then
    sh "$(dirname "$0")/ensure-docker.sh"
    command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || {
        echo "setup-system: installing docker-compose"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    }
fi
