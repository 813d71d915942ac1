"""The shell blocks of the README and the docs site, run as written by bash: `pip install` into a
fresh virtual environment (from the wheel .ci/run built, or from this checkout for the README's
`pip install .`), the upgrade from PyStrands 1.0 (from PyPI), and the `pystrands-broker` command
lines of the TLS, mutual TLS, signed token, cluster and Redis-over-TLS sections, each started for
real and checked from outside. Only ports change (free ones, in the text or through
PYSTRANDS_WS_PORT / PYSTRANDS_TCP_PORT), and absolute paths such as /etc/pystrands/ point into the
test's directory, where the test made those files (certificates with openssl, keys, a secret).

The benchmark commands take minutes each and are run by hand: here their arguments go through each
script's own parser, so a documented flag or system that does not exist fails. The fuzzing
commands are run by .ci/run (`scripts/fuzz.sh 20`); here their targets are checked to exist."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets

from docblocks import (
    REDIS,
    ROOT,
    background,
    base_env,
    broker_ports,
    commands,
    http_get,
    metric,
    redis_answers,
    run,
    stops_cleanly,
    texts,
    wait_http,
    wait_until,
    with_ports,
)
from procinfo import free_port
from pystrands.testing import running_broker, ws_url
from tls_util import TLSFiles, client_context
from v1peer import DEADLINE, wait_for

needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")


def shell_blocks(page: str) -> list[str]:
    return texts(page, "bash", "sh")


def fresh_venv(where: Path) -> dict[str, str]:
    """A new virtual environment (no PyStrands in it) and the environment of a shell that activated it."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSTRANDS_", "PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(VIRTUAL_ENV=str(where), PATH=f"{where / 'bin'}{os.pathsep}{env.get('PATH', '')}", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def installed_version(env: dict[str, str], cwd: Path) -> str:
    """The distribution's version (PyStrands 1.0 has no `__version__`); 2.0 also checks that the
    module says the same."""
    version = run("python -c \"import importlib.metadata as m; print(m.version('pystrands'))\"", cwd, env).strip()
    if not version.startswith("1."):
        assert run('python -c "import pystrands; print(pystrands.__version__)"', cwd, env).strip() == version
    return version


def native_core_record(record: str) -> str:
    """The RECORD line (path, hash, size) of the native core in a wheel's or install's RECORD."""
    [line] = [line for line in record.splitlines() if re.match(r"pystrands/_core[^,/]*\.so,", line)]
    return line


def assert_installed_from(wheel: Path, env: dict[str, str], cwd: Path) -> None:
    """The environment's pystrands is that wheel's: the same native core, byte for byte (hash)."""
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        expected = native_core_record(archive.read(name).decode())
    code = "import importlib.metadata as m; print(m.distribution('pystrands').read_text('RECORD'))"
    assert native_core_record(run(f'python -c "{code}"', cwd, env)) == expected


async def refused_status(url: str, **kwargs: Any) -> int:
    """The HTTP status a WebSocket upgrade to `url` is refused with."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, open_timeout=DEADLINE, **kwargs)
    return refused.value.response.status_code


# ------------------------------------------------------------------------------ installing


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel under test, alone in a directory (PYSTRANDS_WHEEL, which .ci/run sets), for
    `PIP_FIND_LINKS`: pip then prefers our 2.0.0 over PyStrands 1.0.0 on PyPI, whose index still
    serves the dependencies (orjson)."""
    wheel = os.environ.get("PYSTRANDS_WHEEL")
    if not wheel:
        if os.environ.get("CI"):
            raise RuntimeError("PYSTRANDS_WHEEL must name the built wheel in CI (.ci/run sets it)")
        pytest.skip("set PYSTRANDS_WHEEL to a wheel from `bash scripts/build-wheels.sh` to run the install blocks")
    path = Path(wheel) if Path(wheel).is_absolute() else ROOT / wheel
    house = tmp_path_factory.mktemp("wheelhouse")
    shutil.copy(path, house)
    return house / path.name


@pytest.mark.parametrize("page", ["getting-started.md", "index.md"])
def test_pip_install_blocks_in_a_fresh_venv(page: str, wheelhouse: Path, tmp_path: Path):
    """`pip install pystrands` gives 2.0.0; on the home page the broker command then serves."""
    from pystrands import __version__

    [block] = shell_blocks(page)
    install, *rest = commands(block)
    assert install == "pip install pystrands"
    env = fresh_venv(tmp_path / "venv")
    run(install, tmp_path, {**env, "PIP_FIND_LINKS": str(wheelhouse.parent)})
    assert installed_version(env, tmp_path) == __version__
    assert_installed_from(wheelhouse, env, tmp_path)
    if page == "getting-started.md":
        assert rest == []
        return
    [serve] = rest
    ws, tcp, _ = broker_ports()
    with background(with_ports(serve, ws, tcp), tmp_path, env) as proc:
        assert wait_http(f"http://127.0.0.1:{ws}/health", proc)[0] == 200
        assert asyncio.run(refused_status(f"ws://127.0.0.1:{ws}/lobby")) == 503  # no backend yet
        stops_cleanly(proc)


def test_upgrade_block_from_1_0(wheelhouse: Path, tmp_path: Path):
    """migration.md: over an environment with PyStrands 1.0.0 from PyPI, `pip install --upgrade
    pystrands` brings 2.0.0, whose broker command and 1.0 class names are there."""
    [block] = shell_blocks("migration.md")
    [upgrade] = commands(block)
    assert upgrade == "pip install --upgrade pystrands"
    env = fresh_venv(tmp_path / "venv")
    run("pip install -q 'pystrands==1.0.0'", tmp_path, env)
    assert installed_version(env, tmp_path) == "1.0.0"
    run(upgrade, tmp_path, {**env, "PIP_FIND_LINKS": str(wheelhouse.parent)})
    from pystrands import __version__

    assert installed_version(env, tmp_path) == __version__
    assert_installed_from(wheelhouse, env, tmp_path)
    assert run("pystrands-broker --version", tmp_path, env).split()[-1] == __version__
    run('python -c "from pystrands import PyStrandsClient, AsyncPyStrandsClient, PyStrands"', tmp_path, env)


def test_readme_install_block_builds_and_serves(tmp_path: Path):
    """The README's first command, from this checkout into a fresh environment: pip builds the
    native core with cargo (maturin from PyPI), then the broker serves. Minutes on a cold cache."""
    [block] = [b for b in shell_blocks("README.md") if "pip install" in b]
    [command] = commands(block)
    assert command.startswith("pip install . && pystrands-broker ")
    if shutil.which("cargo") is None:
        if os.environ.get("CI"):
            raise RuntimeError("cargo is required in CI to build the README's `pip install .`")
        pytest.skip("no cargo on PATH: `pip install .` cannot build the native core")
    env = fresh_venv(tmp_path / "venv")
    ws, tcp, _ = broker_ports()
    with background(with_ports(command, ws, tcp), ROOT, env) as proc:
        assert wait_http(f"http://127.0.0.1:{ws}/health", proc, deadline=1800)[0] == 200
        assert asyncio.run(refused_status(f"ws://127.0.0.1:{ws}/lobby")) == 503
        stops_cleanly(proc)
    from pystrands import __version__

    assert installed_version(env, tmp_path) == __version__


def test_ci_runs_the_readme_test_command():
    """The README's second command is the one .ci/run runs (the suite cannot run itself)."""
    [block] = [b for b in shell_blocks("README.md") if "run_all" in b]
    assert commands(block) == ["bash tests/run_all.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^[^#\n]*bash tests/run_all\.sh", ci, re.M), ".ci/run must call the README's test command"


# ------------------------------------------------------------------------------ TLS and tokens


def security_block(n: int) -> str:
    return shell_blocks("security.md")[n]


def into(command: str, directory: Path) -> str:
    """Points the block's absolute /etc/pystrands/ and /run/secrets/ paths into `directory`."""
    return command.replace("/etc/pystrands/", f"{directory}/").replace("/run/secrets/", f"{directory}/")


def test_tls_block_serves_wss_only(tls_files: TLSFiles, tmp_path: Path):
    [command] = commands(security_block(0))
    shutil.copy(tls_files.server_cert, tmp_path / "fullchain.pem")
    shutil.copy(tls_files.server_key, tmp_path / "privkey.pem")
    ws, _, ports = broker_ports()
    with background(into(command, tmp_path), tmp_path, base_env(**ports)) as proc:
        trusted = client_context(tls_files.ca)
        assert wait_http(f"https://localhost:{ws}/health", proc, trusted)[0] == 200
        status, body = http_get(f"http://127.0.0.1:{ws}/health")
        assert status == 400 and "wss://" in body

        async def chat() -> None:
            assert await refused_status(f"wss://localhost:{ws}/lobby", ssl=trusted) == 503  # TLS up, no backend yet
            with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
                await websockets.connect(f"wss://localhost:{ws}/lobby", ssl=ssl.create_default_context(), open_timeout=DEADLINE)

        asyncio.run(chat())
        stops_cleanly(proc)


def test_backend_mutual_tls_block(tls_files: TLSFiles, tmp_path: Path):
    """The backend port under TLS, requiring client certificates signed by backends-ca.pem."""
    from pystrands import AsyncPyStrandsClient

    [command] = commands(security_block(1))
    shutil.copy(tls_files.server_cert, tmp_path / "backend.pem")
    shutil.copy(tls_files.server_key, tmp_path / "backend.key")
    shutil.copy(tls_files.ca, tmp_path / "backends-ca.pem")
    ws, tcp, ports = broker_ports()
    with background(command, tmp_path, base_env(**ports)) as proc:
        wait_http(f"http://127.0.0.1:{ws}/health", proc)

        async def backends() -> None:
            # TLS 1.3 ends the client's handshake before the broker checks its certificate, so the
            # broker's metrics tell who got in: backends (gauge), tls_handshakes_failed (counter).
            for cert, key, admitted in (
                (tls_files.client_cert, tls_files.client_key, True),  # signed by backends-ca.pem
                (tls_files.rogue_client_cert, tls_files.rogue_client_key, False),  # another CA
                (None, None, False),  # no certificate
            ):
                failed = metric(ws, "pystrands_tls_handshakes_failed_total") or 0
                client = AsyncPyStrandsClient("localhost", tcp, ssl=client_context(tls_files.ca, cert, key))
                task = asyncio.create_task(client.run_forever())
                if admitted:
                    await wait_for(lambda: metric(ws, "pystrands_backends") == 1, what="the backend admitted")
                else:
                    await wait_for(lambda f=failed: (metric(ws, "pystrands_tls_handshakes_failed_total") or 0) > f, what="a refused handshake")
                    assert metric(ws, "pystrands_backends") == 0
                await client.disconnect()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await wait_for(lambda: metric(ws, "pystrands_backends") == 0, what="the backend gone")

        asyncio.run(backends())
        stops_cleanly(proc)


def ec_key_pair(directory: Path) -> tuple[str, str]:
    """An ES256 key pair made with openssl: (private PEM text, public PEM path)."""
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "jwt-private.pem"], cwd=directory, check=True)
    subprocess.run(["openssl", "ec", "-in", "jwt-private.pem", "-pubout", "-out", "jwt-public.pem"], cwd=directory, check=True, capture_output=True)
    return (directory / "jwt-private.pem").read_text(), str(directory / "jwt-public.pem")


def test_token_block_both_key_kinds(tmp_path: Path):
    """HS256 with the secret read from PYSTRANDS_JWT_SECRET_FILE, then ES256 with --jwt-public-key:
    a token signed with the right key is accepted (no backend needed), a wrong one refused (401)."""
    with_secret, with_public_key = commands(security_block(2))
    secret = "s3cret-" * 6
    (tmp_path / "jwt").write_text(secret + "\n")
    private, _ = ec_key_pair(tmp_path)
    (tmp_path / "other").mkdir()
    other_private, _ = ec_key_pair(tmp_path / "other")  # a key the broker does not know
    claims = {"sub": "ann", "room": "lobby", "exp": time.time() + 60}
    cases = [
        (with_secret, jwt.encode(claims, secret, algorithm="HS256"), jwt.encode(claims, "not-" + secret, algorithm="HS256")),
        (with_public_key, jwt.encode(claims, private, algorithm="ES256"), jwt.encode(claims, other_private, algorithm="ES256")),
    ]
    for command, good, bad in cases:
        ws, _, ports = broker_ports()
        with background(into(command, tmp_path), tmp_path, base_env(**ports)) as proc:
            wait_http(f"http://127.0.0.1:{ws}/health", proc)

            async def connect(good: str = good, bad: str = bad, ws: int = ws) -> None:
                async with websockets.connect(f"ws://127.0.0.1:{ws}/x?token={good}", open_timeout=DEADLINE) as client:
                    assert client.response is not None and client.response.status_code == 101
                assert await refused_status(f"ws://127.0.0.1:{ws}/x?token={bad}") == 401

            asyncio.run(connect())
            stops_cleanly(proc)


def test_fuzz_block_names_real_targets():
    """`scripts/fuzz.sh SECONDS [TARGET]`: every named target exists; .ci/run runs the script."""
    targets = {p.stem for p in (ROOT / "fuzz" / "fuzz_targets").glob("*.rs")}
    lines = commands(security_block(4))
    assert lines, "the fuzzing block lists commands"
    for line in lines:
        words = line.split("#")[0].split()
        assert words[:2] == ["bash", "scripts/fuzz.sh"] and words[2].isdigit(), line
        assert set(words[3:]) <= targets, f"{line}: unknown target (targets: {sorted(targets)})"
    assert "scripts/fuzz.sh" in (ROOT / ".ci" / "run").read_text()
    # A target that does not exist is refused at once, naming the ones that do.
    done = subprocess.run(["bash", "scripts/fuzz.sh", "1", "no_such_target"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no_such_target" in done.stderr and "jwt" in done.stderr, done.stderr


# ------------------------------------------------------------------------------ clusters


def wait_metric(ws: int, name: str, value: float, proc: Any) -> None:
    def reached() -> bool:
        assert proc.poll() is None, proc.output()[-4000:]
        return metric(ws, name) == value

    wait_until(reached, f"{name} to reach {value}")


@needs_redis
def test_deployment_block_runs_a_cluster_node(tmp_path: Path):
    """deployment.md: the redis-server line and the broker line, then a second node with the
    commented environment variant: the two nodes see each other."""
    [block] = shell_blocks("deployment.md")
    start_redis, start_broker = commands(block)
    [env_variant] = [line.lstrip("# ").split(": ", 1)[1] for line in block.splitlines() if "PYSTRANDS_REDIS_URL=" in line]
    redis_port = free_port()
    assert "--port 6379" in start_redis and "redis://redis.internal:6379/0" in start_broker
    url = f"redis://127.0.0.1:{redis_port}/0"
    with background(start_redis.replace("--port 6379", f"--port {redis_port}"), tmp_path, base_env()) as redis:
        wait_until(lambda: redis_answers(redis_port), "redis-server to answer PING")
        ws, tcp, _ = broker_ports()
        first = with_ports(start_broker, ws, tcp).replace("redis://redis.internal:6379/0", url)
        second = env_variant.replace("redis://redis.internal:6379/0", url)
        ws2, _, ports2 = broker_ports()
        with background(first, tmp_path, base_env()) as a, background(second, tmp_path, base_env(**ports2)) as b:
            wait_http(f"http://127.0.0.1:{ws}/health", a)
            wait_http(f"http://127.0.0.1:{ws2}/health", b)
            wait_metric(ws, "pystrands_cluster_nodes", 2, a)
            wait_metric(ws2, "pystrands_cluster_nodes", 2, b)
        assert redis.poll() is None


@needs_redis
def test_redis_over_tls_block(tls_files: TLSFiles, tmp_path: Path):
    """`rediss://:password@…` with --redis-tls-ca, against a redis-server that speaks only TLS and
    wants that password."""
    [command] = commands(security_block(3))
    assert "redis.internal:6380" in command
    port = free_port()
    redis_args = [
        REDIS, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--requirepass", "password",
        "--tls-cert-file", tls_files.server_cert, "--tls-key-file", tls_files.server_key,
        "--tls-ca-cert-file", tls_files.ca, "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
    ]  # fmt: skip
    shutil.copy(tls_files.ca, tmp_path / "redis-ca.pem")
    with background(shlex.join(redis_args), tmp_path, base_env()):
        wait_until(lambda: redis_answers(port, client_context(tls_files.ca), "password"), "redis-server to answer over TLS")
        ws, _, ports = broker_ports()
        with background(into(command, tmp_path).replace("redis.internal:6380", f"localhost:{port}"), tmp_path, base_env(**ports)) as proc:
            wait_http(f"http://127.0.0.1:{ws}/health", proc)
            wait_metric(ws, "pystrands_cluster_connected", 1, proc)
            stops_cleanly(proc)


# ------------------------------------------------------------------------------ benchmarks


def bench_script(name: str) -> Any:
    benches = str(ROOT / "benches")
    if benches not in sys.path:
        sys.path.insert(0, benches)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benches" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_commands_parse():
    """The benchmark commands take minutes each and wait for a quiet machine: they are run by hand
    (docs/benchmarks.md says when and what they gave). Here every documented command must name a
    script of benches/ whose own parser takes the documented arguments, and whose `check_args`
    takes the named systems and workloads."""
    lines = [line for block in shell_blocks("benchmarks.md") for line in commands(block)]
    assert len(lines) >= 8
    for line in lines:
        words = line.split("#")[0].split()
        while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
            words.pop(0)
        assert words[0] in ("python", "python3", ".venv/bin/python"), line
        script = Path(words[1])
        assert script.parent == Path("benches") and (ROOT / script).exists(), line
        argv = [w for w in words[2:] if not (w.startswith("[") or w.endswith("]"))]  # optional parts shown as [--flag N]
        optional = re.findall(r"\[([^\]]+)\]", line)
        argv += [w for part in optional for w in part.split()]
        module = bench_script(script.stem)
        args = module.parser().parse_args(argv)
        if hasattr(module, "check_args"):
            module.check_args(args)


def test_bench_scripts_refuse_unknown_systems_and_workloads():
    run_py = bench_script("run")
    with pytest.raises(SystemExit, match="pystrands\\+nope"):
        run_py.check_args(run_py.parser().parse_args(["--systems", "pystrands,pystrands+nope"]))
    with pytest.raises(SystemExit, match="fanout2"):
        run_py.check_args(run_py.parser().parse_args(["--workloads", "echo,fanout2"]))
    for name in ("rooms", "recovery"):
        script = bench_script(name)
        script.check_args(script.parser().parse_args([]))  # the defaults are known
        with pytest.raises(SystemExit, match="centrifugo2"):
            script.check_args(script.parser().parse_args(["--systems", "pystrands,centrifugo2"]))


# ------------------------------------------------------------------------------ Django


def test_django_guide_commands_run_the_example(tmp_path: Path):
    """flask-django.md: the token export, `python manage.py runserver` in examples/django_notify
    (with its file-watching parent process: exactly one client connects) and the guide's curl
    POST, which reaches a WebSocket client in room "orders"; without the token the view says 401."""
    [block] = shell_blocks("guides/flask-django.md")
    export, serve, post = commands(block)
    assert export.startswith("export NOTIFY_API_TOKEN=") and "runserver" in serve and "http://localhost:8000/" in post
    api_token = run(f'{export} && printf %s "$NOTIFY_API_TOKEN"', tmp_path, base_env())
    assert len(api_token) >= 32
    http_port = free_port()
    with running_broker() as broker:
        env = base_env(PYSTRANDS_BROKER_HOST="127.0.0.1", PYSTRANDS_BROKER_PORT=str(broker.tcp_port), NOTIFY_API_TOKEN=api_token)
        serve = serve.split("#")[0].strip()
        with background(f"{serve} 127.0.0.1:{http_port}", ROOT, env) as proc:
            url = f"http://127.0.0.1:{http_port}/rooms/orders/notify"

            async def scenario() -> None:
                await wait_for(lambda: broker.stats()["backends"] == 1, what="the Django process's client")
                async with websockets.connect(ws_url(broker, "/orders"), open_timeout=DEADLINE) as ws:
                    await asyncio.to_thread(wait_http, f"http://127.0.0.1:{http_port}/", proc)  # runserver listens
                    unauthorized = await asyncio.to_thread(run, f"curl -s -o /dev/null -w '%{{http_code}}' -X POST -d x {url}", tmp_path, env)
                    assert unauthorized == "401"
                    out = await asyncio.to_thread(run, post.replace("http://localhost:8000", f"http://127.0.0.1:{http_port}"), tmp_path, env)
                    assert out.strip() == '{"queued": true}'
                    assert await asyncio.wait_for(ws.recv(), DEADLINE) == "order 7 shipped"
                assert broker.stats()["backends"] == 1, "the file-watching process must not connect a second client"

            asyncio.run(scenario())
            stops_cleanly(proc)
