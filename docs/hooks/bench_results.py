"""mkdocs hook: the benchmark page links into benches/results/, outside the docs directory.

Plots (PNG) found there are published with the site under ``bench/`` and the page's links to
them rewritten, so the page shows them; links to the other result files (summaries, logs) go to
the repository on GitHub, where they live. Run by ``mkdocs build`` (``hooks:`` in mkdocs.yml).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benches" / "results"
REPO = "https://github.com/pystrands/pystrands/blob/main/benches/results/"
LINK = re.compile(r"\]\(\.\./benches/results/([^)\s]+)\)")


def on_files(files: Files, config: Any) -> Files:
    for png in sorted(RESULTS.rglob("*.png")):
        rel = png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, f"bench/{rel}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    def link(m: re.Match[str]) -> str:
        target = m.group(1)
        if target.endswith(".png"):
            return f"](bench/{target})"
        return f"]({REPO}{target})"

    return LINK.sub(link, markdown)
