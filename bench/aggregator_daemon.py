"""The scale benchmark's daemons: `fedcore aggregator` and `fedcore relay` as sampled subprocesses.

Writes a daemon's TOML settings, starts it, reads its ports and round timings from
its log, samples its process tree's RSS and CPU, scrapes ``/metrics``, reaps it with
its rusage (peak RSS, CPU), and optionally profiles it with py-spy; plus the host's
TCP memory counters, which a thousand connections on one machine can exhaust. A
daemon is a black box here: everything is read from outside (log, metrics, rusage),
never from its objects. This module knows nothing of the load generator.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

from fedcore.contracts import FederationParams

__all__ = [
    "AggregatorDaemon",
    "RelayDaemon",
    "committee_log_seconds",
    "federation_of",
    "fold_engine",
    "fold_workers_supported",
    "log_stamp",
    "log_times",
    "start_profiler",
    "tcp_counters",
    "top_frames",
    "vm_hwm_mb",
    "write_config",
]

_LISTEN_RE = re.compile(r"aggregator listening on \S+:(\d+) \(.*metrics port (\w+)\)")
_RELAY_LISTEN_RE = re.compile(r"relay listening on \S+:(\d+) for federation")
_METRICS_RE = re.compile(r"metrics on http://\S+:(\d+)/metrics")
_STAMP_FORMAT = "%Y-%m-%d %H:%M:%S,%f"
# "client-7 joined" or "client-7 joined (committee member)"
_JOINED_RE = re.compile(r" \S+ joined(?: \([^)]*\))?$", re.MULTILINE)
_COMMITTEE_RE = re.compile(
    r"shards decrypted by \d+ committee members and unmasked by .* in ([\d.]+) s"
)


# ---------------------------------------------------------------------------- settings
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def fold_engine() -> str:
    """Which engine the aggregator folds with (it inherits this environment)."""
    try:
        from fedcore.crypto.folding import native_available
    except ImportError:  # an aggregator from before the native engine
        return "gmpy2"
    return "native" if native_available() else "gmpy2"


def fold_workers_supported() -> bool:
    """Whether this aggregator has the ``fold_workers`` setting."""
    from fedcore.aggregator import AggregatorConfig

    return any(f.name == "fold_workers" for f in fields(AggregatorConfig))


def write_config(values: dict[str, Any], path: Path, table: str = "aggregator") -> Path:
    """Write ``values`` as the daemon's ``[aggregator]`` (or ``[relay]``) TOML table."""
    lines = [f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def federation_of(values: dict[str, Any]) -> FederationParams:
    """The federation the daemon derives from these settings (what clients pin)."""
    from fedcore.aggregator import AggregatorConfig

    config = AggregatorConfig.from_mapping(values)
    return config.federation(config.load_public_key())


# ---------------------------------------------------------------------------- the daemon
class AggregatorDaemon:
    """`fedcore aggregator --config` as a subprocess, sampled until it exits."""

    command = "aggregator"

    def __init__(self, config: Path, log: Path) -> None:
        import psutil

        script = Path(sys.executable).parent / "fedcore"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "fedcore.cli"]
        self.log = log
        self._log_file = log.open("ab")
        self.popen = subprocess.Popen(
            [*command, self.command, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.process = psutil.Process(self.popen.pid)
        self.port = 0
        self.metrics_port = 0
        self.rusage: Any = None
        self.samples: list[tuple[float, float, float]] = []  # (time, tree RSS MB, CPU s)
        self.metrics: dict[str, float] = {}
        self.tcp_mem_peak_mb = 0.0
        self.hwm_mb = 0.0  # the daemon's own VmHWM, as last read while it ran

    def _ports(self, log: str) -> tuple[int, int] | None:
        """(port, metrics port) from the daemon's log, once it has logged them."""
        match = _LISTEN_RE.search(log)
        return (int(match[1]), int(match[2])) if match else None

    def wait_listening(self, timeout: float = 180.0) -> None:
        """Read the bound ports from the daemon's log lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = self._ports(self.log.read_text(errors="replace"))
            if ports is not None:
                self.port, self.metrics_port = ports
                return
            if self.poll_exit():  # not popen.poll(): it would reap the pid before wait4
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.command} did not start (exit code {self.popen.returncode}): {self.tail()}"
        )

    def tail(self, chars: int = 3000) -> str:
        """The end of the daemon's log."""
        return self.log.read_text(errors="replace")[-chars:]

    def joins_logged(self) -> int:
        """How many clients the daemon's log says joined (it logs every join)."""
        return len(_JOINED_RE.findall(self.log.read_text(errors="replace")))

    def sample(self) -> tuple[float, float]:
        """Tree RSS (MB) and CPU seconds of the daemon and its children, now."""
        import psutil

        rss = cpu = 0.0
        with contextlib.suppress(psutil.Error):
            for proc in [self.process, *self.process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    cpu += times.user + times.system
        self.samples.append((time.time(), rss / 2**20, cpu))
        self.tcp_mem_peak_mb = max(self.tcp_mem_peak_mb, tcp_mem_mb())
        self.hwm_mb = max(self.hwm_mb, vm_hwm_mb(self.popen.pid))
        return rss / 2**20, cpu

    @property
    def peak_rss_mb(self) -> float | None:
        """The daemon's peak RSS: its VmHWM, else (never sampled) its rusage.

        rusage's ru_maxrss is no good alone: exec keeps the forking parent's high-water
        mark, so a daemon started by a large bench process reports at least that one's.
        VmHWM belongs to the daemon's own address space; read every sample, it misses
        at most the last sampling interval.
        """
        if self.hwm_mb > 0:
            return self.hwm_mb
        return self.rusage.ru_maxrss / 1024 if self.rusage is not None else None

    def scrape(self, path: str = "/metrics") -> str | None:
        """GET an endpoint of the metrics server (no proxy), or None if it does not answer."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as reply:
                text: str = reply.read().decode()
                return text
        except (OSError, ValueError):
            return None

    def scrape_metrics(self) -> None:
        """Keep the latest /metrics values (the daemon exits right after its last round)."""
        text = self.scrape()
        if text is None:
            return
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        self.metrics = values

    def poll_exit(self) -> bool:
        """Reap the daemon if it has exited, keeping its rusage (peak RSS, CPU)."""
        if self.rusage is not None:
            return True
        pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.rusage = usage
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self._log_file.close()
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; always reaped."""
        if not self.poll_exit():
            self.popen.terminate()
            deadline = time.monotonic() + timeout
            while not self.poll_exit() and time.monotonic() < deadline:
                time.sleep(0.1)
        if not self.poll_exit():
            self.popen.kill()
            while not self.poll_exit():
                time.sleep(0.1)


class RelayDaemon(AggregatorDaemon):
    """`fedcore relay --config` as a subprocess: it listens once it has joined its upstream."""

    command = "relay"

    def _ports(self, log: str) -> tuple[int, int] | None:
        listening, metrics = _RELAY_LISTEN_RE.search(log), _METRICS_RE.search(log)
        return (int(listening[1]), int(metrics[1])) if listening and metrics else None


# ---------------------------------------------------------------------------- observing it
def tcp_counters() -> dict[str, int]:
    """Machine-wide TcpExt counters that show kernel TCP memory pressure."""
    wanted = ("TCPMemoryPressures", "TCPRcvQDrop", "TCPTimeouts", "PruneCalled", "TCPAbortOnMemory")
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(table[k]) for k in wanted if k in table}
    return {}


def vm_hwm_mb(pid: int) -> float:
    """A process's peak resident set (VmHWM of /proc/<pid>/status), MB; 0 if unreadable."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tcp_mem_mb() -> float:
    """Memory in every TCP socket buffer of this host now (/proc/net/sockstat), MB."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                fields_ = line.split()
                pages = int(fields_[fields_.index("mem") + 1])
                return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return 0.0


def log_times(log: Path) -> dict[str, float]:
    """Seconds between the daemon's round log lines (select -> collected -> complete)."""
    stamps: dict[str, float] = {}
    marks = {
        "selected": "round 1: selected",
        "collected": "round 1: collected",
        "complete": "complete (",
    }
    for line in log.read_text(errors="replace").splitlines():
        for name, text in marks.items():
            if text in line and name not in stamps:
                with contextlib.suppress(ValueError):
                    stamps[name] = datetime.strptime(line[:23], _STAMP_FORMAT).timestamp()
    out: dict[str, float] = {}
    if "selected" in stamps and "complete" in stamps:
        out["round_seconds_log"] = stamps["complete"] - stamps["selected"]
    if "selected" in stamps and "collected" in stamps:
        out["collect_seconds_log"] = stamps["collected"] - stamps["selected"]
    return out


def log_stamp(log: Path, text: str) -> float | None:
    """The time (epoch seconds) of the first line of a daemon's log that contains ``text``."""
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if text in line:
                with contextlib.suppress(ValueError):
                    return datetime.strptime(line[:23], _STAMP_FORMAT).timestamp()
    return None


def committee_log_seconds(log: Path) -> float | None:
    """The committee's wall seconds for the round, from the aggregator's log line."""
    match = _COMMITTEE_RE.search(log.read_text(errors="replace"))
    return float(match[1]) if match else None


# ---------------------------------------------------------------------------- profiling
def start_profiler(pid: int, path: Path) -> subprocess.Popen[bytes] | None:
    """py-spy recording ``pid`` and its children to ``path``; None without py-spy."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [py_spy, "record", "--format", "raw", "--rate", "50", "--nonblocking"]
    command += ["--nolineno", "--subprocesses", "--pid", str(pid), "-o", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(raw: Path, limit: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            re.sub(r"\(.*?([^/]+/[^/]+\.py)\)", r"(\1)", f)
            for f in stack.split(";")
            if not f.startswith("process ")  # --subprocesses adds one root frame per pid
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share: dict[str, Any] = {"samples": total}
    if total:
        share["self"] = [[f, round(100 * n / total, 1)] for f, n in own.most_common(limit)]
        share["inclusive"] = [
            [f, round(100 * n / total, 1)] for f, n in inclusive.most_common(limit)
        ]
    return share
