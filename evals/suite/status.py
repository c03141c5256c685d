"""The state a suite ran in, torch-free (reports and `mor-bench report` read it without the
model code):

* the machine load each run trained under -- `LoadMeter` measures it over the training
  phase, `classify_load` decides whether the run was contended; the record keeps it as its
  top-level "load" field;
* the suite status marker, RUN_DIR/suite_status.json: "running" (with the suite process's
  pid), "finished" or "interrupted"; `suite_status` tells a running suite from one whose
  process is gone (killed by SIGKILL, a crashed node).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from evals.suite.record import read_json, utc_now, write_json_atomic

# --------------------------------------------------------------------------------------------
# machine load

MIN_CPU_UTIL = 0.75
"""A run whose process used less than this share of the CPU time its threads could have
used (cpu_s / (wall_s * threads)) was contended: something else ran on its cores, so its
timing figures (tokens/s, MFU) understate the model."""

LOADAVG_MARGIN = 0.5
"""A run is contended when the 1-minute load average at the start or the end of its
training exceeds os.cpu_count() + this margin: more runnable threads than cores. (Not
cpu_count - threads: the average at the end counts the run's own threads, and the one at
the start still counts the previous run of the suite -- it decays over about a minute.) The
suite-start warning (`busy_cores_warning`), taken before any run, uses cpu_count - threads
+ this margin."""


def loadavg() -> list[float] | None:
    """os.getloadavg() as a list (1, 5, 15 minutes); None where the platform has none."""
    try:
        return [float(x) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows; a /proc that cannot be read
        return None


def classify_load(cpu_util: float | None, loadavg_start: list[float] | None,
                  loadavg_end: list[float] | None, cpu_count: int | None = None
                  ) -> tuple[bool, str | None]:
    """(contended, why) for a run's load figures: contended when the process used less than
    `MIN_CPU_UTIL` of its threads' CPU time, or the 1-minute load average at the start or
    end exceeded `cpu_count` (default os.cpu_count()) + `LOADAVG_MARGIN`."""
    cores = cpu_count or os.cpu_count() or 1
    reasons = []
    if cpu_util is not None and cpu_util < MIN_CPU_UTIL:
        reasons.append(f"CPU utilisation {cpu_util:.2f} < {MIN_CPU_UTIL} of its threads")
    limit = cores + LOADAVG_MARGIN
    for when, avg in (("start", loadavg_start), ("end", loadavg_end)):
        if avg and avg[0] > limit:
            reasons.append(f"1-min load average {avg[0]:.2f} at the {when} > {limit:g} "
                           f"({cores} cores)")
    return bool(reasons), "; ".join(reasons) or None


class LoadMeter:
    """Measures the load a phase of this process ran under: `start()`, then `stop(threads)`
    returns the record's "load" field -- {"cpu_s", "wall_s", "threads", "cpu_util",
    "loadavg_start", "loadavg_end", "contended", "reason"}."""

    def __init__(self) -> None:
        self._cpu0 = self._wall0 = 0.0
        self._avg0: list[float] | None = None

    def start(self) -> LoadMeter:
        self._avg0 = loadavg()
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def stop(self, threads: int) -> dict[str, Any]:
        cpu_s = time.process_time() - self._cpu0
        wall_s = time.perf_counter() - self._wall0
        avg1 = loadavg()
        threads = max(1, int(threads))
        util = cpu_s / (wall_s * threads) if wall_s > 0 else None
        contended, reason = classify_load(util, self._avg0, avg1)
        return {"cpu_s": cpu_s, "wall_s": wall_s, "threads": threads, "cpu_util": util,
                "loadavg_start": self._avg0, "loadavg_end": avg1, "contended": contended,
                "reason": reason}


def busy_cores_warning(threads: int, cpu_count: int | None = None,
                       avg: list[float] | None = None) -> str | None:
    """The suite-start warning when the machine is already busy: the 1-minute load average
    exceeds os.cpu_count() - threads + `LOADAVG_MARGIN`, i.e. the cores the runs' threads
    need are not free. None otherwise."""
    cores = cpu_count or os.cpu_count() or 1
    avg = loadavg() if avg is None else avg
    if not avg:
        return None
    limit = cores - threads + LOADAVG_MARGIN
    if avg[0] <= limit:
        return None
    free = max(1, int(cores - avg[0] + LOADAVG_MARGIN))
    return (f"the machine is busy: 1-minute load average {avg[0]:.2f} on {cores} cores, and "
            f"each run trains with {threads} thread(s); timings will be contended (see "
            f"each record's \"load\"). Wait for the other work, or pass --threads {free}")


def peak_rss_bytes(pid: int) -> int | None:
    """Process `pid`'s peak resident memory so far (VmHWM in /proc/PID/status), in bytes;
    None once it is gone or where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024  # reported in kB
    return None


def total_memory_bytes() -> int | None:
    """This machine's physical memory; None where sysconf cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# --------------------------------------------------------------------------------------------
# the suite status marker

STATUS_FILE = "suite_status.json"
"""RUN_DIR/suite_status.json: {"status": "running" | "finished" | "interrupted" |
"failed", "pid", "host", "started", "updated"} of the suite process that last worked in the
directory (`mor-bench run`, or `--resume`)."""


def write_suite_status(run_dir: str | Path, status: str, **extra: Any) -> dict[str, Any]:
    """Write this process's suite status into RUN_DIR/suite_status.json (atomically);
    "started" is kept while the same process updates it."""
    path = Path(run_dir) / STATUS_FILE
    pid, started = os.getpid(), utc_now()
    if path.is_file():
        try:
            old = read_json(path)
        except (OSError, ValueError):  # a torn or foreign file: start afresh
            old = {}
        if isinstance(old, dict) and old.get("pid") == pid and old.get("started"):
            started = old["started"]
    doc = {"status": status, "pid": pid, "host": socket.gethostname(), "started": started,
           "updated": utc_now(), **extra}
    write_json_atomic(path, doc)
    return doc


def _pid_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie, dead but not yet reaped,
    does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): kill(0) said it exists
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def suite_status(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR's suite status, checked: a "running" suite whose process is gone (SIGKILL, a
    crashed node; checked on the same host only) reads "interrupted (process N gone)" with
    "stale": True. A directory without the marker (written before it existed, or not a run
    directory) reads {"status": "unknown"}."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return {"status": "unknown"}
    doc = read_json(path)
    if not isinstance(doc, dict):
        return {"status": "unknown"}
    pid = doc.get("pid")
    if (doc.get("status") == "running" and isinstance(pid, int)
            and doc.get("host") in (None, socket.gethostname()) and not _pid_running(pid)):
        doc = {**doc, "status": f"interrupted (process {pid} gone)", "stale": True}
    return doc
