"""Preflight: everything a daemon will need later, checked before it serves anyone.

A mistake found at the first save or the first handshake costs a round and shows up as
a traceback or as clients failing far away; found here it is one line naming the file
or setting. `check_daemon` covers the files (TLS credentials for the daemon's purpose,
the state directory written and fsynced) and `check_ports` the listening sockets.
The Paillier public key is checked by `AggregatorConfig.load_public_key` and the
settings' consistency by the config classes themselves.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError
from protocol.tls_check import CredentialError, Purpose, check_credentials

__all__ = ["check_daemon", "check_listening", "check_ports"]


def check_daemon(cert: Path, key: Path, ca: Path, *, purpose: Purpose) -> None:
    """The TLS files can serve for ``purpose`` now; ConfigError naming the file if not."""
    try:
        check_credentials(cert, key, ca, purpose=purpose)
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None


def check_listening(config: Any) -> None:
    """A daemon config's client port and metrics port can be bound now (`check_ports`)."""
    check_ports(
        (config.host, config.port, "port"),
        (config.metrics_host, config.metrics_port, "metrics_port"),
    )


def check_ports(*endpoints: tuple[str, int | None, str]) -> None:
    """Each ``(host, port, setting)`` can be bound now (port 0 and None are skipped).

    The probe binds and closes at once, with SO_REUSEADDR as the servers use, so a
    socket left in TIME_WAIT by a previous run does not count as taken.
    """
    for host, port, setting in endpoints:
        if not port:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{setting} {port} on {host} is in use by another process: stop it or "
                    f"choose another --{setting.replace('_', '-')}"
                ) from None
            if exc.errno == errno.EACCES:
                raise ConfigError(
                    f"{setting} {port} on {host} needs privileges: choose a port above 1023"
                ) from None
            raise ConfigError(
                f"cannot listen on {host}:{port} ({setting}): {exc.strerror}; check "
                "--host/--metrics-host"
            ) from None
