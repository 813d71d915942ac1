"""A short run of the soak in benches/soak.py (the long one is run by hand): clients churn while
backends are SIGKILLed and restarted; nothing may go missing."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))

import soak  # noqa: E402


def test_short_soak_loses_nothing():
    report = soak.main(["--seconds", "6", "--clients", "60", "--kill-every", "2", "--out", ""])
    assert report["backend_kills"] >= 2
    assert report["sessions"] > 60 and report["sent"] > 0
    assert report["missing"] == 0, report
    assert report["echoed_unique"] == report["sent"]
    counters = report["broker_counters"]
    assert counters["events_lost"] == 0 and counters["queue_dropped"] == 0
    assert report["duplicates"] <= counters["events_redelivered"]
