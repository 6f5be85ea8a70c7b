"""The broker processes the tests run; they ship as dockercomp.broker.processes (bench/ uses them
too). Re-exported here so fixtures and tests have one place in tests/support to import from."""

from __future__ import annotations

from dockercomp.broker.processes import (
    MOSQUITTO_CONF,
    AmqttProcess,
    BrokerProcess,
    BrokerStartError,
    MosquittoProcess,
    find_mosquitto,
    mosquitto_test_config,
)

__all__ = [
    "MOSQUITTO_CONF",
    "AmqttProcess",
    "BrokerProcess",
    "BrokerStartError",
    "MosquittoProcess",
    "find_mosquitto",
    "mosquitto_test_config",
]
