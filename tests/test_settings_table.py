"""One settings table: the native table (`_core.settings_table()`, from the `settings!` table in
rust/core/src/config.rs) and every place that repeats it must agree: `Broker.__init__` (names,
defaults, annotations, docstring), the CLI flags and variables, the table in docs/broker.md and
the `_core.pyi` stub. Also: the stub against the module and a running broker's `stats()`, and
one version from Cargo.toml to `pystrands.__version__`."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import pystrands
from pystrands import Broker, _core, cli
from pystrands.testing import running_broker

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "python" / "pystrands" / "_core.pyi"
TABLE: list[dict[str, Any]] = _core.settings_table()
NAMES = [s["name"] for s in TABLE]
BY_NAME = {s["name"]: s for s in TABLE}

# Flags and variables users already rely on: renaming one in the table must fail here.
PUBLISHED_FLAGS = {
    "--ws-host", "--ws-port", "--tcp-host", "--tcp-port", "--queue-size", "--request-timeout",
    "--heartbeat-interval", "--ping-interval", "--max-message-size", "--max-line-size",
    "--client-queue-size", "--slow-client-policy", "--allowed-origin", "--max-connections",
    "--handshake-timeout", "--workers", "--log-level", "--backend-secret", "--max-unacked",
    "--client-rate-limit", "--client-rate-burst", "--rate-limit-policy", "--redis-url",
    "--cluster-url", "--cluster-required", "--cluster-name", "--cluster-node-id",
}  # fmt: skip
PUBLISHED_ENVS = {"PYSTRANDS_" + n.upper() for n in NAMES} | {"PYSTRANDS_REDIS_URL"}

# Broker annotation (a string: `from __future__ import annotations`) for each kind of setting.
ANNOTATIONS = {
    "int": "int",
    "seconds": "float",
    "float": "float",
    "str": "str",
    "optional_str": "str | None",
    "secret": "str | None",
    "bool": "bool",
    "policy": "str",
    "list": "Iterable[str]",
}
# Stub (BrokerSettings) annotation for each kind.
STUB_TYPES = {**ANNOTATIONS, "policy": "Literal['close', 'drop']", "list": "list[str]"}


def load_script(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_rows():
    assert len(NAMES) == len(set(NAMES)) == 47
    assert _core.default_settings() == {s["name"]: s["default"] for s in TABLE}
    for s in TABLE:
        assert set(s) == {"name", "type", "kind", "default", "default_text", "help", "env", "envs", "flag", "flags", "secret"}
        assert s["env"] == s["envs"][0] and s["flag"] == s["flags"][0]
        assert s["help"] and s["secret"] == (s["name"] in ("backend_secret", "admin_token", "session_secret", "jwt_secret"))


def test_broker_signature_agrees_with_the_table():
    params = dict(inspect.signature(Broker.__init__).parameters)
    params.pop("self")
    host = params.pop("host")
    assert set(params) == set(NAMES), (
        f"Broker.__init__ lacks {sorted(set(NAMES) - set(params))}, has extra {sorted(set(params) - set(NAMES))}"
    )
    assert host.default == BY_NAME["ws_host"]["default"] == BY_NAME["tcp_host"]["default"]
    for name, p in params.items():
        s = BY_NAME[name]
        if name in ("ws_host", "tcp_host"):  # None: take `host`
            assert p.default is None and p.annotation == "str | None", name
            continue
        default = list(p.default) if s["kind"] == "list" else p.default
        assert default == s["default"] and type(default) is type(s["default"]), (
            f"{name}: Broker default {p.default!r} != table default {s['default']!r}"
        )
        assert p.annotation == ANNOTATIONS[s["kind"]], f"{name}: annotation {p.annotation!r} for a {s['type']} setting"
    # Every setting is documented in the docstring and passed on to the core.
    doc = inspect.getdoc(Broker) or ""
    missing = [n for n in NAMES if not re.search(rf"^\s*{n}:", doc, re.M)]
    assert not missing, f"Broker docstring Args lacks {missing}"
    assert list(Broker().settings) == NAMES


def test_cli_flags_agree_with_the_table():
    parser = cli.build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "version", "log_format", "host")}
    assert set(actions) == set(NAMES)
    for s in TABLE:
        a = actions[s["name"]]
        assert a.option_strings == s["flags"], s["name"]
        assert s["env"] in (a.help or ""), f"{s['name']}: help does not name {s['env']}"
        if s["kind"] == "list":
            assert isinstance(a, argparse._AppendAction)
        else:
            assert a.type is cli._PARSERS[s["kind"]]
    assert PUBLISHED_FLAGS <= {f for s in TABLE for f in s["flags"]}
    assert PUBLISHED_ENVS <= {e for s in TABLE for e in s["envs"]}


def test_cli_reads_flags_then_variables(monkeypatch):
    parser = cli.build_parser()
    monkeypatch.setenv("PYSTRANDS_ALLOWED_ORIGINS", "https://a, https://b,")
    monkeypatch.setenv("PYSTRANDS_CLUSTER_URL", "redis://h:1/0")
    monkeypatch.setenv("PYSTRANDS_CLUSTER_REQUIRED", "off")
    monkeypatch.setenv("PYSTRANDS_REQUEST_TIMEOUT", "2.5")
    monkeypatch.setenv("PYSTRANDS_WS_PORT", "1")
    got = cli._settings_from(parser.parse_args(["--ws-port", "2"]), parser)
    assert got == {
        "host": "0.0.0.0",
        "ws_port": 2,
        "request_timeout": 2.5,
        "allowed_origins": ["https://a", "https://b"],
        "cluster_url": "redis://h:1/0",
        "cluster_required": False,
    }
    monkeypatch.setenv("PYSTRANDS_REDIS_URL", "redis://first:1/0")
    got = cli._settings_from(parser.parse_args(["--allowed-origin", "https://c", "--allowed-origin", "https://d"]), parser)
    assert got["allowed_origins"] == ["https://c", "https://d"] and got["cluster_url"] == "redis://first:1/0"
    got = cli._settings_from(parser.parse_args(["--cluster-url", "redis://flag:1/0"]), parser)
    assert got["cluster_url"] == "redis://flag:1/0"


def test_docs_table_is_current():
    gen = load_script("gen_settings_doc")
    text = gen.DOC.read_text()
    section = gen.current_section(text)
    documented = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert documented == NAMES, "docs/broker.md settings differ from the table: run python scripts/gen_settings_doc.py"
    assert section == gen.render(TABLE), "docs/broker.md settings table is stale: run python scripts/gen_settings_doc.py"


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text())


def _typeddicts(tree: ast.Module) -> dict[str, dict[str, str]]:
    return {
        node.name: {f.target.id: ast.unparse(f.annotation) for f in node.body if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)}
        for node in tree.body
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "TypedDict" for b in node.bases)
    }


def test_stub_names_match_the_module():
    tree = _stub()
    typeddicts = _typeddicts(tree)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in typeddicts:
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    exported = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert names == exported
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NativeBroker"]
    methods = {f.name for f in cls.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}
    assert methods == {n for n in dir(_core.NativeBroker) if not n.startswith("_")}
    for node in ast.walk(tree):  # everything public has a docstring
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            assert ast.get_docstring(node), f"{node.name} has no docstring in _core.pyi"


def test_stub_settings_typeddict_matches_the_table():
    settings = _typeddicts(_stub())["BrokerSettings"]
    assert list(settings) == NAMES
    for s in TABLE:
        assert settings[s["name"]] == STUB_TYPES[s["kind"]], s["name"]
    info = _typeddicts(_stub())["SettingInfo"]
    assert set(info) == set(TABLE[0])


CLUSTER_ONLY = {"cluster_node_id", "cluster_connected", "cluster_nodes", "cluster_clients", "cluster_rooms"}


def test_stub_stats_typeddict_matches_a_running_broker():
    keys = set(_typeddicts(_stub())["BrokerStats"])
    with running_broker() as broker:
        stats = broker.stats()
    assert set(stats) == keys - CLUSTER_ONLY, (
        f"stats() has {sorted(set(stats) - keys)} not in BrokerStats; BrokerStats has {sorted(keys - CLUSTER_ONLY - set(stats))} not in stats()"
    )
    assert CLUSTER_ONLY <= keys


def test_one_version():
    if sys.version_info >= (3, 11):
        import tomllib

        cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    else:  # pragma: no cover
        cargo = re.search(r'\[workspace\.package\][^\[]*?version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text()).group(1)
    assert pystrands.__version__ == _core.__version__ == cargo
    assert "__version__" in dir(pystrands)
