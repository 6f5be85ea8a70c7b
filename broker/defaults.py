"""Defaults shared by every dockercomp component, gathered in one place (as rq's defaults.py)."""

from __future__ import annotations

# Wire protocol version carried in every payload's "v" field. 2: task messages carry an attempt
# nonce that results must echo (docs/protocol.md); a v1 agent cannot answer a v2 coordinator.
PROTOCOL_VERSION = 2

# Topic root; every dockercomp topic lives below it, so one broker can host several projects.
ROOT_TOPIC = "dockercomp"

# Volunteer name used when a worker runs without broker credentials (one topic level).
DEFAULT_VOLUNTEER = "local"

# Longest worker or volunteer name; keeps topics short and ACL patterns simple.
MAX_NAME_LENGTH = 64

# Largest payload any component accepts; larger ones are rejected before JSON parsing.
MAX_PAYLOAD_BYTES = 256 * 1024

# Deepest JSON nesting accepted in task arguments and result values.
MAX_JSON_DEPTH = 32

# Most tasks one TaskBatch (or results one ResultBatch) carries (broker/batches.py): bounds
# what one message makes a side do, and what a killed agent takes with it in one message; a
# worker announcing a larger batch is granted this many.
MAX_BATCH_ITEMS = 100

# Broker port when the URL names none (plain, TLS).
MQTT_PORT = 1883
MQTTS_PORT = 8883

# MQTT keepalive in seconds: a frozen worker's will fires within 2x this + 5 s (docs/protocol.md).
KEEPALIVE_SECONDS = 10

# Longest heartbeat interval a presence may announce, in seconds: beyond an hour a beat proves
# nothing a will would not (and the coordinator's bound, a few intervals, must stay finite).
MAX_HEARTBEAT_SECONDS = 3600

# Reconnect backoff: first delay, cap, and the jitter fraction added on each try.
RECONNECT_INITIAL_SECONDS = 0.25
RECONNECT_MAX_SECONDS = 30.0
RECONNECT_JITTER = 0.5

# QoS 1 publishes a client may have unacknowledged at once. paho 2.2 loses messages silently
# once more than 65,535 are unacked (16-bit message ids wrap), so every client stays far below.
MAX_UNACKED_PUBLISHES = 2000

# Messages of one publish_many queued before they are written. A bigger batch (a dispatch round
# to tens of thousands of workers) goes out part by part through the network thread, which
# reads the acks meanwhile, instead of being held whole in memory by its publisher.
PUBLISH_PART = 1000

# Seconds a stopping connection keeps going until close()'s DISCONNECT is written (by the
# network thread, or by an owner it is lent to), before it gives up on writing it.
DISCONNECT_GRACE_SECONDS = 2.0

# Environment variable holding the broker URL for every CLI.
BROKER_URL_ENV = "DOCKERCOMP_BROKER"

# Broker URL of every role when neither --broker nor $DOCKERCOMP_BROKER is given: a broker on
# this machine (`dockercomp broker serve`, or docker-compose's Mosquitto published on loopback).
DEFAULT_BROKER_URL = f"mqtt://127.0.0.1:{MQTT_PORT}"

# --- Running in public: accounts, ACL and TLS files (broker/accounts.py, broker/certs.py) ----------

# Directory holding passwd, acl, accounts.json and certs/; docker-compose mounts it into the
# broker at /mosquitto/security/ (the paths mosquitto.conf names).
BROKER_CONFIG_DIR = "broker-config"

# Environment variable overriding BROKER_CONFIG_DIR for `dockercomp coordinator volunteers` and
# `dockercomp broker certs`.
BROKER_CONFIG_ENV = "DOCKERCOMP_BROKER_CONFIG"

# Environment variables telling `dockercomp coordinator volunteers` how to make the broker reload its
# files: a pid file to SIGHUP, or a command to run (e.g. "docker-compose kill -s HUP mosquitto").
BROKER_PID_FILE_ENV = "DOCKERCOMP_BROKER_PID_FILE"
BROKER_RELOAD_ENV = "DOCKERCOMP_BROKER_RELOAD"

# Account name of the coordinator (a reserved name: no volunteer may take it).
COORDINATOR_ACCOUNT = "coordinator"

# Validity of the private CA and of the broker's server certificate, in days.
CA_DAYS = 3650
SERVER_CERT_DAYS = 825

# Seconds a reload command may take (docker-compose can be slow to start).
RELOAD_TIMEOUT = 60.0

# Host name of the broker inside docker-compose's network (the service name), written into
# coordinator.env / worker.env by `volunteers init`.
COMPOSE_BROKER_HOST = "mosquitto"

# The file docker-compose reads by itself from its project directory (the parent of
# broker-config/), and the variables of it that docker-compose.yml puts into DOCKERCOMP_BROKER:
# the broker URLs (with passwords) of the coordinator account and of the `local` volunteer's
# workers. Variables, not env_file: a missing env_file fails `docker-compose config` on a fresh clone.
COMPOSE_ENV_FILE = ".env"
COMPOSE_BROKER_VARIABLES = {"coordinator": "DOCKERCOMP_COORDINATOR_BROKER", "local": "DOCKERCOMP_WORKER_BROKER"}

# The script volunteers run; the scientist hands them installer/install_me.sh.
INSTALL_SCRIPT = "install_me.sh"
# Seconds a one-off probe of the broker's port may take (is it TLS? plain MQTT?), asked only
# after a first connection failed in a way a protocol mismatch explains.
PROBE_TIMEOUT_SECONDS = 2.0

# In a kit folder (`dockercomp coordinator kit build`): its URL and the SHA-256 of its SHA256SUMS,
# which `volunteers add` puts in the one line.
KIT_INFO_FILE = "kit.json"
