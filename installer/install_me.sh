#!/bin/sh
# dockercomp volunteer installer: the one file a volunteer runs.
#
#   sh install_me.sh --broker mqtt://scientist.example.org:1883
#   curl -fsSL https://example.org/install_me.sh | sh -s -- --yes --broker mqtt://...
#   sh install_me.sh --uninstall
#
# It makes sure Docker works (offering to install it with the distribution's package manager),
# puts dockercomp in a private virtual environment, and starts worker containers with
# `dockercomp installer up`. Running it again is safe: it converges to the same state.
#
# POSIX sh on purpose: a volunteer's machine may have no bash.
set -eu

# --- Baked in by the scientist (edit these lines before handing the file out) -------------
BROKER="${DOCKERCOMP_BROKER:-}"                 # e.g. mqtt://scientist.example.org:1883
USERNAME="${DOCKERCOMP_USERNAME:-}"
PASSWORD="${DOCKERCOMP_PASSWORD:-}"
IMAGE="${DOCKERCOMP_WORKER_IMAGE:-}"            # empty: the installer's default image
CA_FILE="${DOCKERCOMP_CA_FILE:-}"               # the broker's private CA (ca.crt), if it has one
PACKAGE="${DOCKERCOMP_PACKAGE:-dockercomp[installer]}"  # pip requirement with the installer's extra
# -------------------------------------------------------------------------------------------

HOME_DIR="${DOCKERCOMP_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/dockercomp}"
VENV="$HOME_DIR/venv"
ASSUME_YES=0
UNINSTALL=0
WORKERS=""
NETWORK=""
SELF="$0"

say() { printf 'install_me: %s\n' "$*"; }
die() {  # die CODE MESSAGE [FIX]; CODE from the table of dockercomp/exits.py (README "Exit codes")
    code="$1"; shift
    printf 'install_me: error: %s\n' "$1" >&2
    [ $# -lt 2 ] || printf 'install_me: fix: %s\n' "$2" >&2
    exit "$code"
}

usage() {
    cat <<EOF
Usage: sh install_me.sh [--broker URL] [options] [-- extra dockercomp installer up options]

  --broker URL      the scientist's broker, e.g. mqtt://host:1883${BROKER:+ (default $BROKER)}
  --ca-file FILE    the broker's CA certificate (ca.crt, sent by the scientist)
  --username NAME   broker user name       --password PW   broker password
  --workers N       worker containers (default: one per CPU)
  --network MODE    bridge (default) or host (needed for a broker on 127.0.0.1)
  --image IMAGE     worker image${IMAGE:+ (default $IMAGE)}
  --yes             do not ask before installing packages (Docker, python3-venv)
  --uninstall       stop and remove the workers and this installation
  --help            this text
Files go to $HOME_DIR (override with DOCKERCOMP_HOME).
EOF
}

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then die 2 "$1 needs a value" "see sh install_me.sh --help"; fi
}

parse_args() {
    EXTRA=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --broker) need_value "$@"; BROKER="$2"; shift 2 ;;
            --broker=*) BROKER="${1#*=}"; shift ;;
            --ca-file) need_value "$@"; CA_FILE="$2"; shift 2 ;;
            --username) need_value "$@"; USERNAME="$2"; shift 2 ;;
            --password) need_value "$@"; PASSWORD="$2"; shift 2 ;;
            --workers) need_value "$@"; WORKERS="$2"; shift 2 ;;
            --network) need_value "$@"; NETWORK="$2"; shift 2 ;;
            --image) need_value "$@"; IMAGE="$2"; shift 2 ;;
            --yes|-y) ASSUME_YES=1; shift ;;
            --uninstall) UNINSTALL=1; shift ;;
            --help|-h) usage; exit 0 ;;
            --) shift; EXTRA="$*"; break ;;
            *) die 2 "unknown option $1" "see sh install_me.sh --help" ;;
        esac
    done
}

# --- Helpers ----------------------------------------------------------------------------

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die 1 "root is needed to run: $*" "run this script as root, or install sudo"
    fi
}

# Asks a yes/no question on the terminal, also when the script itself arrives on stdin.
confirm() {
    [ "$ASSUME_YES" = 1 ] && return 0
    if [ ! -r /dev/tty ]; then
        die 1 "$1 - but there is no terminal to ask on" "run again with --yes to agree"
    fi
    printf 'install_me: %s [y/N] ' "$1" >/dev/tty
    read -r answer </dev/tty || answer=""
    case "$answer" in y|Y|yes|YES|Yes) return 0 ;; *) return 1 ;; esac
}

# Installs distribution packages: install_packages WHAT APT DNF PACMAN ZYPPER APK, where each
# package manager's argument is a space-separated list (split on purpose below).
# shellcheck disable=SC2086
install_packages() {
    what="$1"; apt="$2"; dnf="$3"; pacman="$4"; zypper="$5"; apk="$6"
    if command -v apt-get >/dev/null 2>&1; then
        confirm "install $what with apt-get ($apt)?" || die 1 "$what is needed" "install $apt yourself"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $apt >/dev/null
    elif command -v dnf >/dev/null 2>&1; then
        confirm "install $what with dnf ($dnf)?" || die 1 "$what is needed" "install $dnf yourself"
        as_root dnf install -y $dnf >/dev/null
    elif command -v pacman >/dev/null 2>&1; then
        confirm "install $what with pacman ($pacman)?" || die 1 "$what is needed" "install $pacman yourself"
        as_root pacman -S --noconfirm --needed $pacman >/dev/null
    elif command -v zypper >/dev/null 2>&1; then
        confirm "install $what with zypper ($zypper)?" || die 1 "$what is needed" "install $zypper yourself"
        as_root zypper --non-interactive install $zypper >/dev/null
    elif command -v apk >/dev/null 2>&1; then
        confirm "install $what with apk ($apk)?" || die 1 "$what is needed" "install $apk yourself"
        as_root apk add $apk >/dev/null
    else
        die 1 "$what is missing and no known package manager was found" \
            "install it by hand (Docker: https://docs.docker.com/engine/install/)"
    fi
}

docker_answers() { docker info >/dev/null 2>&1; }

start_docker() {
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        as_root systemctl enable --now docker >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
        as_root service docker start >/dev/null 2>&1 || true
    fi
    if ! docker_answers && [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null 2>&1; then
        # No init system (a container, WSL): run the engine in the background ourselves.
        nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null &
    fi
    tries=0
    while ! docker_answers && [ "$tries" -lt 30 ]; do sleep 1; tries=$((tries + 1)); done
}

ensure_docker() {
    if ! command -v docker >/dev/null 2>&1; then
        say "Docker is not installed"
        install_packages "Docker" docker.io "moby-engine" docker docker "docker"
        start_docker
    fi
    docker_answers && return 0
    # Tell "no permission" from "not running": the fixes differ.
    if docker info 2>&1 | grep -qi 'permission denied'; then
        die 7 "you have no permission to use Docker" \
            "sudo usermod -aG docker $(id -un), log out and in again, then re-run this script"
    fi
    say "the Docker engine is not running; starting it"
    start_docker
    docker_answers || die 7 "the Docker engine does not start" \
        "see 'sudo journalctl -u docker' (or /var/log/dockerd.log), fix it, then re-run"
}

ensure_python() {
    command -v python3 >/dev/null 2>&1 || install_packages "Python 3" "python3 python3-venv" python3 python python3 python3
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        install_packages "Python's venv module" python3-venv python3 python python3 py3-virtualenv
    fi
}

# A TCP connection to the broker, so a wrong URL fails here and not in every container.
check_broker() {
    python3 - "$BROKER" <<'PY' || die 5 "cannot reach the broker $BROKER" \
        "check the URL, your network and firewall; ask the scientist whether the broker is up"
import socket, sys
from urllib.parse import urlsplit
try:
    url = urlsplit(sys.argv[1])
    if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not url.hostname:
        sys.exit("install_me: the broker URL must look like mqtt://HOST:PORT")
    port = url.port or (8883 if url.scheme in ("mqtts", "ssl") else 1883)
    socket.create_connection((url.hostname, port), timeout=5).close()
except (OSError, ValueError) as exc:
    sys.exit(f"install_me: {exc}")
PY
}

ensure_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "updating dockercomp in $VENV"
    else
        say "creating a private Python environment in $VENV"
        rm -rf "$VENV"
        mkdir -p "$HOME_DIR"
        python3 -m venv "$VENV" || die 1 "could not create $VENV" "install python3-venv, then re-run"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$PACKAGE" ||
        die 1 "could not install $PACKAGE into $VENV" "check your network (pip needs PyPI), then re-run"
}

# --- Uninstall ----------------------------------------------------------------------------

do_uninstall() {
    if [ -x "$VENV/bin/dockercomp" ] && docker_answers; then
        say "stopping and removing the worker containers"
        "$VENV/bin/dockercomp" installer down
    elif [ -x "$VENV/bin/dockercomp" ]; then
        say "Docker does not answer; remove any dockercomp-worker-* containers later with docker rm -f"
    fi
    rm -rf "$VENV"
    rmdir "$HOME_DIR" 2>/dev/null || true
    say "uninstalled: removed $VENV"
    say "Docker itself and the worker image stay; remove the image with: docker image rm ${IMAGE:-dockercomp/worker:latest}"
}

# --- Install ------------------------------------------------------------------------------

do_install() {
    [ -n "$BROKER" ] || die 2 "no broker given" "pass --broker mqtt://HOST:PORT (the scientist tells you which)"
    if [ -n "$CA_FILE" ]; then
        [ -r "$CA_FILE" ] || die 2 "cannot read the CA file $CA_FILE" \
            "save the ca.crt the scientist sent next to this script, or pass its path with --ca-file"
        # Absolute: `installer` may run from another directory.
        CA_FILE="$(cd "$(dirname "$CA_FILE")" && pwd)/$(basename "$CA_FILE")"
    fi
    ensure_python
    check_broker
    ensure_docker
    ensure_venv

    set -- "$VENV/bin/dockercomp" installer up --broker "$BROKER"
    [ -z "$WORKERS" ] || set -- "$@" --workers "$WORKERS"
    [ -z "$NETWORK" ] || set -- "$@" --network "$NETWORK"
    [ -z "$IMAGE" ] || set -- "$@" --image "$IMAGE"
    [ -z "$CA_FILE" ] || set -- "$@" --ca-file "$CA_FILE"
    [ -z "$USERNAME" ] || set -- "$@" --username "$USERNAME"
    # The password goes through the environment, not the command line that `ps` shows.
    [ -z "$PASSWORD" ] || export DOCKERCOMP_PASSWORD="$PASSWORD"
    # EXTRA holds options passed after `--`; split on spaces on purpose.
    # shellcheck disable=SC2086
    "$@" $EXTRA || die $? "dockercomp installer up failed (see the message above)"

    say "done. Your machine now computes for the scientist at $BROKER."
    say "  see the workers:   $VENV/bin/dockercomp installer status"
    say "  see their output:  $VENV/bin/dockercomp installer logs"
    say "  stop them:         $VENV/bin/dockercomp installer down"
    # Piped through `curl | sh` there is no file to name; the volunteer downloads it again.
    if [ -f "$SELF" ]; then again="sh $SELF"; else again="sh install_me.sh"; fi
    say "  uninstall:         $again --uninstall"
}

# --- Main ---------------------------------------------------------------------------------

# Everything runs from here, at the very end: with `curl ... | sh` the shell has then read the
# whole script before any command can read from (and swallow part of) the pipe.
main() {
    parse_args "$@"
    if [ "$UNINSTALL" = 1 ]; then do_uninstall; else do_install; fi
}

main "$@"
