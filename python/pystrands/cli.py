"""Command line: ``pystrands-broker`` and ``python -m pystrands server``.

Every broker setting is a flag (``--ws-port``) and an environment variable (``PYSTRANDS_WS_PORT``);
a flag wins over the variable, which wins over the default. Bad values exit with status 2 and a
message naming the flag or variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser"]

def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_bool.__name__ = "bool"

# (setting, type, help). The defaults come from the native core, so they cannot drift.
_SETTINGS: list[tuple[str, Callable[[str], Any], str]] = [
    ("ws_host", str, "interface of the WebSocket listener (default: --host)"),
    ("ws_port", int, "WebSocket port; 0 picks a free one"),
    ("tcp_host", str, "interface of the backend listener (default: --host)"),
    ("tcp_port", int, "backend (TCP) port; 0 picks a free one. Keep it private."),
    ("queue_size", int, "events kept while no backend is connected (drop-oldest; 0 disables)"),
    ("request_timeout", float, "seconds a connection request waits for a backend before HTTP 503"),
    ("heartbeat_interval", float, "seconds between heartbeats to backends"),
    ("ping_interval", float, "seconds between WebSocket pings (0 disables)"),
    ("max_message_size", int, "largest client message in bytes (close 1009 beyond it)"),
    ("max_line_size", int, "largest backend line in bytes"),
    ("client_queue_size", int, "messages that may wait for one client"),
    ("slow_client_policy", str, "'close' (close code 1013) or 'drop' when a client's queue is full"),
    ("max_connections", int, "most simultaneous clients (0: no limit)"),
    ("handshake_timeout", float, "seconds a client may take to send its upgrade request"),
    ("workers", int, "native worker threads (0: one per CPU)"),
    ("log_level", str, "error, warn, info, debug or trace"),
    ("backend_secret", str, "secret every backend must present in its v2 hello; prefer the env variable (flags show in ps)"),
    ("max_unacked", int, "unacknowledged events kept per v2 backend for redelivery"),
    ("client_rate_limit", float, "messages per second one WebSocket client may send (0: no limit)"),
    ("client_rate_burst", int, "burst allowed by the client rate limit (0: one second's worth)"),
    ("rate_limit_policy", str, "'drop' or 'close' (close code 1008) for a client over its rate limit"),
    ("cluster_url", str, "Redis URL of the cluster to join, e.g. redis://127.0.0.1:6379/0 (default: run alone)"),
    ("cluster_required", _bool, "true: exit if Redis is unreachable at start; false: start with local delivery only and keep retrying"),
    ("cluster_name", str, "prefix of the cluster's Redis keys and channel"),
    ("cluster_node_id", str, "this node's id in the cluster (default: random)"),
]

# Settings whose flag or variable has another name too (the first one is documented).
_FLAGS = {"cluster_url": ["--redis-url", "--cluster-url"]}
_ENVS = {"cluster_url": ["PYSTRANDS_REDIS_URL", "PYSTRANDS_CLUSTER_URL"]}


def _env_name(setting: str) -> str:
    return _env_names(setting)[0]


def _env_names(setting: str) -> list[str]:
    return _ENVS.get(setting, ["PYSTRANDS_" + setting.upper()])


def build_parser(prog: str = "pystrands-broker") -> argparse.ArgumentParser:
    """The argument parser of the broker command."""
    from . import _core

    defaults = _core.default_settings()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the PyStrands broker: WebSocket clients on --ws-port, Python backends on --tcp-port.",
        epilog="Every option can also be set with an environment variable, e.g. PYSTRANDS_WS_PORT=9000.",
    )
    parser.add_argument("--host", default=os.environ.get("PYSTRANDS_HOST", "0.0.0.0"), help="interface for both listeners (env PYSTRANDS_HOST; default %(default)s)")
    for setting, typ, help_text in _SETTINGS:
        default = None if setting in ("ws_host", "tcp_host") else defaults[setting]
        parser.add_argument(
            *_FLAGS.get(setting, ["--" + setting.replace("_", "-")]),
            dest=setting,
            type=typ,
            default=None,
            metavar=typ.__name__.upper(),
            help=f"{help_text} (env {_env_name(setting)}; default {default if default is not None else 'see --host'})",
        )
    parser.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="allow WebSocket connections from this Origin (repeatable; env PYSTRANDS_ALLOWED_ORIGINS, comma-separated; default: all)",
    )
    return parser


def _settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    settings: dict[str, Any] = {"host": args.host}
    for setting, typ, _ in _SETTINGS:
        value = getattr(args, setting)
        for env in _env_names(setting):
            if value is not None or env not in os.environ:
                continue
            raw = os.environ[env]
            try:
                value = typ(raw)
            except ValueError:
                parser.error(f"environment variable {env}={raw!r} is not a valid {typ.__name__}")
        if value is not None:
            settings[setting] = value
    origins = args.allowed_origins
    if origins is None and os.environ.get("PYSTRANDS_ALLOWED_ORIGINS"):
        origins = [o.strip() for o in os.environ["PYSTRANDS_ALLOWED_ORIGINS"].split(",") if o.strip()]
    if origins:
        settings["allowed_origins"] = origins
    return settings


def main(argv: Sequence[str] | None = None, prog: str = "pystrands-broker") -> int:
    """Run the broker until Ctrl-C or SIGTERM. Returns the process exit status."""
    from .broker import Broker

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    settings = _settings_from(args, parser)
    try:
        broker = Broker(**settings)
    except ValueError as e:
        parser.error(str(e))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        broker.serve()
    except OSError as e:
        parser.exit(1, f"{prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
