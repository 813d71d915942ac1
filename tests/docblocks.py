"""The fenced code blocks of the documentation (README.md and every page of docs/), found one way
for every test that runs them and for the inventory in test_docs.py that proves each one is run.
Also the shell side of running them: a block's commands, and the long-running ones (a broker,
a redis-server) started in the background and stopped with their whole process group."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# An opening fence (possibly indented inside a list), its language, the body, the same fence closing.
FENCE = re.compile(r"^( *)```([\w+-]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    page: str
    """Relative to docs/ ("guides/testing.md"), or "README.md"."""
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.lang or 'no language'})"


def path_of(page: str) -> Path:
    return ROOT / page if page == "README.md" else DOCS / page


def pages() -> list[str]:
    return ["README.md", *sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))]


def blocks(page: str, lang: str | None = None) -> list[Block]:
    """The page's fenced blocks in order (all, or those of one language). A block whose body is a
    snippet include (`--8<--`) is a whole example file: it is run by tests/test_examples.py."""
    text = path_of(page).read_text()
    found = []
    for m in FENCE.finditer(text):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in m.group(3).splitlines()) + "\n"
        if body.lstrip().startswith("--8<--"):
            continue
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(2), body))
    return [b for b in found if lang is None or b.lang == lang]


def texts(page: str, *langs: str) -> list[str]:
    return [b.text for b in blocks(page) if b.lang in langs]


def commands(block: str) -> list[str]:
    """The commands of a shell block, one per logical line (backslash continuations joined; blank
    and comment-only lines dropped; a trailing comment is left to the shell)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run(command: str, cwd: Path, env: Mapping[str, str], timeout: float = 600) -> str:
    """Runs one command with bash and returns its standard output; a non-zero exit fails with
    everything it printed."""
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"`{command}` exited with {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


@contextmanager
def background(command: str, cwd: Path, env: Mapping[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Starts a long-running command (`bash -c`, in its own process group) and on exit sends the
    group SIGTERM, then SIGKILL if it has not ended within 10 s."""
    proc = subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def output_of(proc: subprocess.Popen[str]) -> str:
    """What an ended background command printed."""
    assert proc.poll() is not None
    return proc.stdout.read() if proc.stdout is not None else ""


def http_get(url: str, context: object = None, timeout: float = 2.0) -> tuple[int, str]:
    """GET → (status, body); an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:  # type: ignore[arg-type]
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_http(url: str, proc: subprocess.Popen[str], context: object = None, deadline: float = 20.0) -> tuple[int, str]:
    """Polls `url` until it answers; fails with the program's output if the program ends first."""
    end = time.monotonic() + deadline
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the command ended ({proc.returncode}) before serving {url}:\n{output_of(proc)[-4000:]}")
        try:
            return http_get(url, context)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
