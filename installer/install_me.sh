#!/bin/sh
# dockercomp volunteer installer: the one file a volunteer runs, from a scientist's kit
# (`dockercomp coordinator kit build`; installer/README.md).
#
#   curl -fsSL https://example.org/kit/install_me.sh | sh -s -- --kit-sha256 HASH --broker mqtts://... --yes
#   curl -fsSL https://example.org/kit/install_me.sh | sh -s -- --uninstall
#
# Needs only sh, curl or wget, and Docker (it offers to install Docker when missing). Every file
# it downloads is checked against the kit's SHA256SUMS, itself checked against --kit-sha256.
# The installer logic itself runs from the kit's installer image (`dockercomp installer`, with
# the Docker socket mounted), so the volunteer's machine needs no Python. Running it again is
# safe: it converges to the same workers. Everything it adds lives in $HOME_DIR, in Docker
# images it loaded and in containers labelled with its instance; --uninstall removes exactly those.
#
# POSIX sh on purpose: a volunteer's machine may have no bash.
set -eu

# --- Baked in by `dockercomp coordinator kit build` ------------------------------------------
KIT_URL="${DOCKERCOMP_KIT_URL:-}"               # where this kit is served, e.g. https://example.org/kit
# -------------------------------------------------------------------------------------------

HOME_DIR="${DOCKERCOMP_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/dockercomp}"
INSTANCE="${DOCKERCOMP_INSTANCE:-default}"
BROKER="${DOCKERCOMP_BROKER:-}"
PASSWORD="${DOCKERCOMP_PASSWORD:-}"
KIT_SHA256=""
CA_FILE=""
USERNAME=""
ASSUME_YES=0
UNINSTALL=0
UP_OPTIONS=""   # options handed to `dockercomp installer up`, already checked to be single words
EXTRA=""
DOCKER_INSTALLED=""  # the package manager command that installed Docker, if this run did

say() { printf 'install_me: %s\n' "$*"; }
die() {  # die CODE MESSAGE [FIX]; CODE from the table of dockercomp/exits.py (README "Exit codes")
    code="$1"; shift
    printf 'install_me: error: %s\n' "$1" >&2
    [ $# -lt 2 ] || printf 'install_me: fix: %s\n' "$2" >&2
    exit "$code"
}

usage() {
    cat <<EOF
Usage: sh install_me.sh --broker URL [options] [-- extra \`dockercomp installer up\` options]

  --broker URL        the scientist's broker, e.g. mqtts://NAME:PASSWORD@host:8883
  --kit URL           where the kit is served${KIT_URL:+ (default $KIT_URL)}
  --kit-sha256 HASH   SHA-256 of the kit's SHA256SUMS (from the scientist's one line)
  --ca-file FILE      the broker's CA certificate, if the kit has none
  --username NAME     broker user name       --password PW   broker password
  --workers N         worker containers (default: as many as --cpus allows)
  --cpus X            CPUs all workers together may use (default: half of this machine)
  --memory SIZE       memory cap of each worker, e.g. 1g
  --priority P        low (default: workers yield the CPU to your programs) or normal
  --network MODE      bridge (default) or host (needed for a broker on 127.0.0.1)
  --yes               do not ask before installing Docker
  --uninstall         remove the workers, the images this script loaded and $HOME_DIR
  --help              this text
Files go to $HOME_DIR (override with DOCKERCOMP_HOME); DOCKERCOMP_INSTANCE names the installation.
EOF
}

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then die 2 "$1 needs a value" "see sh install_me.sh --help"; fi
}

# A value that goes into `installer up` unquoted must be one word of safe characters.
word() {
    case "$2" in
        *[!A-Za-z0-9._:-]*|"") die 2 "bad value for $1: $2" "see sh install_me.sh --help" ;;
    esac
    UP_OPTIONS="$UP_OPTIONS $1 $2"
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --broker) need_value "$@"; BROKER="$2"; shift 2 ;;
            --kit) need_value "$@"; KIT_URL="$2"; shift 2 ;;
            --kit-sha256) need_value "$@"; KIT_SHA256="$2"; shift 2 ;;
            --ca-file) need_value "$@"; CA_FILE="$2"; shift 2 ;;
            --username) need_value "$@"; USERNAME="$2"; shift 2 ;;
            --password) need_value "$@"; PASSWORD="$2"; shift 2 ;;
            --workers|--cpus|--memory|--priority|--network) need_value "$@"; word "$1" "$2"; shift 2 ;;
            --yes|-y) ASSUME_YES=1; shift ;;
            --uninstall) UNINSTALL=1; shift ;;
            --help|-h) usage; exit 0 ;;
            --) shift; EXTRA="$*"; break ;;
            *) die 2 "unknown option $1" "see sh install_me.sh --help" ;;
        esac
    done
    KIT_URL="${KIT_URL%/}"
}

# --- Helpers ----------------------------------------------------------------------------

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

install_docker() {
    if command -v apt-get >/dev/null 2>&1; then
        confirm "install Docker with apt-get (docker.io)?" || die 7 "Docker is needed" "install docker.io yourself"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
        DOCKER_INSTALLED="apt-get remove docker.io"
    elif command -v dnf >/dev/null 2>&1; then
        confirm "install Docker with dnf (moby-engine)?" || die 7 "Docker is needed" "install moby-engine yourself"
        as_root dnf install -y moby-engine >/dev/null
        DOCKER_INSTALLED="dnf remove moby-engine"
    elif command -v pacman >/dev/null 2>&1; then
        confirm "install Docker with pacman (docker)?" || die 7 "Docker is needed" "install docker yourself"
        as_root pacman -S --noconfirm --needed docker >/dev/null
        DOCKER_INSTALLED="pacman -R docker"
    elif command -v zypper >/dev/null 2>&1; then
        confirm "install Docker with zypper (docker)?" || die 7 "Docker is needed" "install docker yourself"
        as_root zypper --non-interactive install docker >/dev/null
        DOCKER_INSTALLED="zypper remove docker"
    elif command -v apk >/dev/null 2>&1; then
        confirm "install Docker with apk (docker)?" || die 7 "Docker is needed" "install docker yourself"
        as_root apk add docker >/dev/null
        DOCKER_INSTALLED="apk del docker"
    else
        die 7 "Docker is missing and no known package manager was found" \
            "install it by hand: https://docs.docker.com/engine/install/"
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
        install_docker
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

# The Docker socket, as the engine's host sees it: the installer container mounts it.
docker_socket() {
    case "${DOCKER_HOST:-}" in
        unix://*) printf '%s' "${DOCKER_HOST#unix://}" ;;
        "") printf '/var/run/docker.sock' ;;
        *) die 7 "DOCKER_HOST=$DOCKER_HOST is not a local socket" "unset DOCKER_HOST to use this machine's Docker" ;;
    esac
}

fetch() {  # fetch URL FILE
    if command -v curl >/dev/null 2>&1; then curl -fsSL -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then wget -q -O "$2" "$1"
    else die 1 "neither curl nor wget is installed" "install curl, then re-run"
    fi
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | cut -d' ' -f1
    elif command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 "$1" | sed 's/.*= *//'
    else die 1 "no SHA-256 tool (sha256sum, shasum or openssl) found" "install coreutils, then re-run"
    fi
}

# Refuses a file whose SHA-256 is not the expected one, and deletes it.
check_sum() {  # check_sum FILE EXPECTED
    actual="$(sha256_of "$1")"
    if [ "$actual" != "$2" ]; then
        # Nothing refused stays behind; a first install that stops here leaves no folder either.
        rm -rf "$KIT_DIR"
        rmdir "$HOME_DIR" 2>/dev/null || true
        die 13 "$(basename "$1") from $KIT_URL does not match the kit's checksum (got $actual, expected $2): refused" \
            "it was changed on its way or on the server; tell the scientist, and do not run it"
    fi
}

# Downloads NAME from the kit into $KIT_DIR and verifies it against SHA256SUMS.
kit_file() {
    expected="$(awk -v f="$1" '$2 == f || $2 == "*" f { print $1; exit }' "$KIT_DIR/SHA256SUMS")"
    [ -n "$expected" ] || die 13 "the kit's SHA256SUMS does not list $1" "tell the scientist the kit is incomplete"
    fetch "$KIT_URL/$1" "$KIT_DIR/$1" || die 5 "cannot download $KIT_URL/$1" "check your network; ask the scientist whether the kit is served"
    check_sum "$KIT_DIR/$1" "$expected"
}

# Reads kit.env: KEY=VALUE lines, only known keys, never executed.
read_kit_env() {
    KIT_WORKER_IMAGE=""; KIT_INSTALLER_IMAGE=""; KIT_ARCHIVE=""; KIT_CA=""; KIT_VERSION=""
    while IFS='=' read -r key value; do
        case "$key" in
            KIT_WORKER_IMAGE) KIT_WORKER_IMAGE="$value" ;;
            KIT_INSTALLER_IMAGE) KIT_INSTALLER_IMAGE="$value" ;;
            KIT_ARCHIVE) KIT_ARCHIVE="$value" ;;
            KIT_CA) KIT_CA="$value" ;;
            KIT_VERSION) KIT_VERSION="$value" ;;
        esac
    done <"$KIT_DIR/kit.env"
    [ -n "$KIT_WORKER_IMAGE" ] && [ -n "$KIT_INSTALLER_IMAGE" ] ||
        die 13 "the kit's kit.env names no images" "tell the scientist the kit is incomplete"
}

# A TCP connection to the broker, so a wrong URL fails here, before anything is installed.
# curl's telnet:// connects and then waits for the broker to talk (it never does) until
# --max-time; time_connect tells "connected" (above 0) from "refused / no route" (0). With
# only wget there is no way to try, and the installer container checks again anyway.
check_broker() {
    rest="${BROKER#*://}"; rest="${rest##*@}"; hostport="${rest%%[/?]*}"
    case "$BROKER" in mqtts://*|ssl://*) port=8883 ;; *) port=1883 ;; esac
    host="$hostport"
    case "$hostport" in *:*) host="${hostport%:*}"; port="${hostport##*:}" ;; esac
    [ -n "$host" ] || die 2 "the broker URL must look like mqtt://HOST:PORT" "use the URL from the scientist's line"
    command -v curl >/dev/null 2>&1 || return 0
    connected="$(curl -s --connect-timeout 3 --max-time 3 -o /dev/null -w '%{time_connect}' \
        "telnet://$host:$port" </dev/null 2>/dev/null || true)"
    case "$connected" in
        ""|0|0.000000) die 5 "cannot reach the broker at $host:$port" \
            "check the URL, your network and firewall; ask the scientist whether the broker is up" ;;
    esac
}

image_present() { docker image inspect "$1" >/dev/null 2>&1; }

# Remembers an image this script added, so --uninstall removes it (and nothing that was here).
remember_image() {
    grep -qx "$1" "$HOME_DIR/images" 2>/dev/null || printf '%s\n' "$1" >>"$HOME_DIR/images"
}

ensure_images() {
    missing=""
    for image in "$KIT_WORKER_IMAGE" "$KIT_INSTALLER_IMAGE"; do
        image_present "$image" || missing="$missing $image"
    done
    [ -n "$missing" ] || { say "the kit's images are here already"; return 0; }
    if [ -n "$KIT_ARCHIVE" ]; then
        say "downloading the worker image ($KIT_ARCHIVE)"
        kit_file "$KIT_ARCHIVE"
        docker load -q -i "$KIT_DIR/$KIT_ARCHIVE" >/dev/null || die 8 "docker could not load $KIT_ARCHIVE" "tell the scientist"
        rm -f "$KIT_DIR/$KIT_ARCHIVE"  # loaded: the copy would only take disk space
    else
        # Registry references pinned by digest (NAME@sha256:...): Docker verifies what it pulls.
        for image in $missing; do
            say "pulling $image"
            docker pull -q "$image" >/dev/null || die 8 "cannot pull $image" "check your network, then re-run"
        done
    fi
    for image in $missing; do
        image_present "$image" || die 8 "the kit did not provide $image" "tell the scientist the kit is incomplete"
        remember_image "$image"
    done
}

# `dockercomp` from the installer image, with this machine's Docker socket; $1.. its arguments.
write_wrapper() {
    mkdir -p "$HOME_DIR/bin"
    machine_id=""
    [ ! -r /etc/machine-id ] || machine_id="-v /etc/machine-id:/etc/machine-id:ro"
    cat >"$HOME_DIR/bin/dockercomp" <<EOF
#!/bin/sh
# Written by install_me.sh: \`dockercomp installer ...\` from the kit's installer image.
tty=""
[ ! -t 0 ] || [ ! -t 1 ] || tty="-t"
exec docker run --rm -i \$tty --network host -v $(docker_socket):/var/run/docker.sock $machine_id \\
    -e DOCKERCOMP_INSTANCE=$INSTANCE -e DOCKERCOMP_BROKER -e DOCKERCOMP_PASSWORD -e COLUMNS \\
    $KIT_INSTALLER_IMAGE "\$@"
EOF
    chmod 755 "$HOME_DIR/bin/dockercomp"
}

# --- Uninstall ----------------------------------------------------------------------------

do_uninstall() {
    [ -d "$HOME_DIR" ] || { say "nothing to uninstall: $HOME_DIR does not exist"; return 0; }
    ensure_docker
    if [ -x "$HOME_DIR/bin/dockercomp" ]; then
        say "stopping and removing the worker containers"
        "$HOME_DIR/bin/dockercomp" installer down || die 1 "could not remove the workers" "see the message above, then re-run"
    fi
    if [ -f "$HOME_DIR/images" ]; then
        while read -r image; do
            [ -n "$image" ] || continue
            if docker image rm "$image" >/dev/null 2>&1; then say "removed the image $image"
            else say "kept the image $image (a container that is not ours uses it)"
            fi
        done <"$HOME_DIR/images"
    fi
    # Docker stays even when this script installed it: by now other programs may use it.
    if [ -f "$HOME_DIR/docker-installed" ]; then
        say "this script installed Docker; if nothing else uses it: sudo $(cat "$HOME_DIR/docker-installed")"
    fi
    rm -rf "$HOME_DIR"
    say "uninstalled: no worker, image or file of this installation is left ($HOME_DIR removed)"
}

# --- Install ------------------------------------------------------------------------------

do_install() {
    [ -n "$BROKER" ] || die 2 "no broker given" "pass --broker URL (the scientist's one line has it)"
    check_broker
    [ -n "$KIT_URL" ] || die 2 "no kit URL given" "pass --kit URL (the scientist's one line has it)"
    ensure_docker
    umask 077  # the state and the CA copy are this user's alone
    KIT_DIR="$HOME_DIR/kit"
    mkdir -p "$KIT_DIR"

    say "fetching the kit from $KIT_URL"
    fetch "$KIT_URL/SHA256SUMS" "$KIT_DIR/SHA256SUMS" ||
        die 5 "cannot download $KIT_URL/SHA256SUMS" "check your network; ask the scientist whether the kit is served"
    if [ -n "$KIT_SHA256" ]; then
        check_sum "$KIT_DIR/SHA256SUMS" "$KIT_SHA256"
    else
        say "warning: no --kit-sha256 given; trusting SHA256SUMS as $KIT_URL serves it"
    fi
    kit_file kit.env
    read_kit_env
    ca_in_container=""
    if [ -n "$KIT_CA" ]; then kit_file "$KIT_CA"; CA_FILE="$KIT_DIR/$KIT_CA"; fi
    if [ -n "$CA_FILE" ]; then
        [ -r "$CA_FILE" ] || die 2 "cannot read the CA file $CA_FILE" "pass the ca.crt the scientist sent with --ca-file"
        ca_in_container="--ca-file /tmp/ca.crt"
    else
        CA_FILE=/dev/null
    fi
    ensure_images
    printf 'INSTANCE=%s\nINSTALLER_IMAGE=%s\n' "$INSTANCE" "$KIT_INSTALLER_IMAGE" >"$HOME_DIR/state"
    [ -z "$DOCKER_INSTALLED" ] || printf '%s\n' "$DOCKER_INSTALLED" >"$HOME_DIR/docker-installed"
    write_wrapper

    # The broker URL and password travel in the environment, never on a command line `ps` shows.
    export DOCKERCOMP_BROKER="$BROKER"
    [ -z "$PASSWORD" ] || export DOCKERCOMP_PASSWORD="$PASSWORD"
    [ -z "$USERNAME" ] || word --username "$USERNAME"
    say "starting the workers (image $KIT_WORKER_IMAGE)"
    # The CA reaches the installer container on stdin: a bind mount would name a path on the
    # engine's host, which is not this shell's filesystem when Docker is remote or nested.
    # shellcheck disable=SC2086  # UP_OPTIONS and EXTRA are words on purpose
    docker run --rm -i --network host -v "$(docker_socket):/var/run/docker.sock" \
        $( [ ! -r /etc/machine-id ] || echo "-v /etc/machine-id:/etc/machine-id:ro" ) \
        -e DOCKERCOMP_INSTANCE="$INSTANCE" -e DOCKERCOMP_BROKER -e DOCKERCOMP_PASSWORD \
        --entrypoint sh "$KIT_INSTALLER_IMAGE" \
        -c 'cat >/tmp/ca.crt && exec dockercomp installer up "$@"' up \
        --image "$KIT_WORKER_IMAGE" $ca_in_container $UP_OPTIONS $EXTRA <"$CA_FILE" ||
        die $? "dockercomp installer up failed (see the message above)"

    cli="$HOME_DIR/bin/dockercomp"
    say "done. Your machine now computes for the scientist's project."
    say "  see the workers:   $cli installer status"
    say "  see their tasks:   $cli installer logs"
    say "  stop them:         $cli installer down"
    say "  uninstall:         curl -fsSL $KIT_URL/install_me.sh | sh -s -- --uninstall"
}

# --- Main ---------------------------------------------------------------------------------

# Everything runs from here, at the very end: with `curl ... | sh` the shell has then read the
# whole script before any command can read from (and swallow part of) the pipe.
main() {
    parse_args "$@"
    if [ "$UNINSTALL" = 1 ]; then do_uninstall; else do_install; fi
}

main "$@"
