"""Command line: ``pystrands-broker`` and ``python -m pystrands server``.

Every broker setting is a flag (``--ws-port``) and an environment variable (``PYSTRANDS_WS_PORT``),
both built from the native settings table (``pystrands._core.settings_table()``); a flag wins over
the variable, which wins over the default. Bad values exit with status 2 and a message naming the
flag, variable or setting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._protocol import secret_from_env

__all__ = ["main", "build_parser"]

def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_bool.__name__ = "bool"

# How a flag or variable of each kind of setting (`_core.settings_table()`, "kind") is parsed;
# lists ("list") are a repeatable flag or a comma-separated variable. Ranges, policies and every
# other rule are checked by the native core, with the same messages as for `Broker(...)`.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "seconds": float,
    "float": float,
    "str": str,
    "optional_str": str,
    "policy": str,
    "secret": str,
    "bool": _bool,
}

# Settings whose default the CLI takes from --host.
_FROM_HOST = ("ws_host", "tcp_host")


def _table() -> list[dict[str, Any]]:
    """Every broker setting (name, kind, default, help, env, flags, ...) from the native core."""
    from . import _core

    return [dict(row) for row in _core.settings_table()]


def build_parser(prog: str = "pystrands-broker") -> argparse.ArgumentParser:
    """The argument parser of the broker command: one flag per row of the settings table."""
    table = _table()
    default_host = next(s["default"] for s in table if s["name"] == "ws_host")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the PyStrands broker: WebSocket clients on --ws-port, Python backends on --tcp-port.",
        epilog="Every option can also be set with an environment variable, e.g. PYSTRANDS_WS_PORT=9000.",
    )
    from . import _core

    parser.add_argument("--version", action="version", version=f"%(prog)s {_core.__version__}")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("PYSTRANDS_LOG_FORMAT", "text"),
        help="log lines as text, or as one JSON object per line with time, level, logger, message and "
        "fields (env PYSTRANDS_LOG_FORMAT; default %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("PYSTRANDS_HOST", default_host),
        help="interface for both listeners (env PYSTRANDS_HOST; default %(default)s)",
    )
    for s in table:
        name, kind = s["name"], s["kind"]
        default = "see --host" if name in _FROM_HOST else s["default_text"]
        env = s["env"] + (", comma-separated" if kind == "list" else "") + (f" or a file named by {s['env']}_FILE" if s["secret"] else "")
        help_text = f"{s['help'].rstrip('.')} (env {env}; default {default})".replace("%", "%%")
        if kind == "list":
            metavar = s["flag"].rsplit("-", 1)[-1].upper()
            parser.add_argument(*s["flags"], dest=name, action="append", default=None, metavar=metavar, help=help_text)
        else:
            typ = _PARSERS[kind]
            parser.add_argument(*s["flags"], dest=name, type=typ, default=None, metavar=typ.__name__.upper(), help=help_text)
    return parser


def _settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Broker keyword arguments: a flag wins over its environment variables (first one set)."""
    settings: dict[str, Any] = {"host": args.host}
    for s in _table():
        name, kind = s["name"], s["kind"]
        value = getattr(args, name)
        for env in s["envs"]:
            if value is None and s["secret"]:
                # Secrets also come from a file: PYSTRANDS_JWT_SECRET_FILE=/run/secrets/jwt.
                try:
                    value = secret_from_env(env)
                except ValueError as e:
                    parser.error(str(e))
                continue
            if value is not None or env not in os.environ:
                continue
            raw = os.environ[env]
            if kind == "list":
                value = [item.strip() for item in raw.split(",") if item.strip()] or None
                continue
            typ = _PARSERS[kind]
            try:
                value = typ(raw)
            except ValueError:
                parser.error(f"environment variable {env}={raw!r} is not a valid {typ.__name__}")
        if value is not None:
            settings[name] = value
    return settings


_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG, "trace": 5}


def _python_level(log_level: str) -> int:
    """The Python level of a ``log_level`` setting (a custom directive: INFO)."""
    return _LEVELS.get(log_level.lower(), logging.INFO)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``fields`` (a native record's structured fields) and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": getattr(record, "pystrands_message", None) or record.getMessage(),
        }
        fields = getattr(record, "pystrands_fields", None)
        if fields:
            out["fields"] = fields
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


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
    if args.log_format not in ("text", "json"):
        parser.error(f"PYSTRANDS_LOG_FORMAT={args.log_format!r}: use text or json")
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            JsonFormatter() if args.log_format == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.basicConfig(level=_python_level(str(settings.get("log_level") or "info")), handlers=[handler])
    try:
        broker.serve()
    except OSError as e:
        parser.exit(1, f"{prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
