"""Optional on-disk trace log (``aurora serve --trace-dir DIR``).

Without a trace directory, verify-step traces live only in the learner's memory. With one, a
``TraceLog`` wraps the learner's ``trace_sink`` and also appends one compact JSON line per verify
step to hourly files ``DIR/traces-YYYYMMDD-HH.jsonl`` (UTC hour of the step). A line holds token
ids and counters only -- request id, domain tag, context length, root token, proposal tokens and
parents, accepted nodes, next token, draft version, time -- never hidden states and never prompt
text. Requests that opted out of learning never reach ``trace_sink``, so they are never written.

The engine thread only copies those few integers into a bounded queue (``put_nowait``); a
background thread does the JSON and the disk I/O. When the queue is full the step is dropped and
counted. Files are created with mode 0600 in a 0700 directory.

Retention: at start, every ``sweep_interval_s`` and whenever the directory may have outgrown the
byte cap, files older than the retention window are deleted, then the oldest files while the
directory's total exceeds the cap. Only files named like ``traces-YYYYMMDD-HH.jsonl`` are touched.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from aurora_spec.types import StepTrace

log = logging.getLogger(__name__)

FILE_RE = re.compile(r"^traces-\d{8}-\d{2}\.jsonl$")
MAX_DOMAIN_CHARS = 64  # domain tags come from clients: bound what reaches the disk
Sink = Callable[[StepTrace], None]


def file_name(t: float) -> str:
    """The hourly file a step at Unix time ``t`` goes to (UTC)."""
    return time.strftime("traces-%Y%m%d-%H.jsonl", time.gmtime(t))


def step_record(trace: StepTrace, t: float) -> dict[str, Any]:
    """The JSON-able facts of one verify step: ints and short strings only, no tensors."""
    p, r = trace.proposal, trace.result
    domain = trace.domain[:MAX_DOMAIN_CHARS] if trace.domain else None
    return {"time": round(t, 3), "request_id": str(trace.request_id), "domain": domain,
            "context_len": int(trace.context_len), "root_token": int(trace.root_token),
            "proposal_tokens": [int(x) for x in p.tokens],
            "proposal_parents": [int(x) for x in p.parents],
            "accepted_nodes": [int(x) for x in r.accepted_nodes],
            "next_token": int(r.next_token), "bonus": bool(r.bonus),
            "draft_version": int(p.draft_version)}


class TraceLog:
    def __init__(self, directory: str | os.PathLike[str], retention_hours: float = 24.0,
                 max_bytes: int = 256 << 20, queue_size: int = 8192,
                 sweep_interval_s: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        if retention_hours <= 0 or max_bytes <= 0 or queue_size < 1:
            raise ValueError("retention_hours and max_bytes must be > 0, queue_size >= 1")
        self.dir = Path(directory)
        self.retention_s = retention_hours * 3600.0
        self.max_bytes = int(max_bytes)
        self.sweep_interval_s = sweep_interval_s
        self.clock = clock
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_size)
        self.written = 0  # lines written
        self.queue_dropped = 0  # steps dropped by a full queue (engine thread only: no lock)
        self.write_dropped = 0  # lines lost to a failed write (writer thread)
        self.bytes = 0  # bytes written
        self.files_deleted = 0
        self.errors = 0  # I/O errors (writer thread)
        self.record_errors = 0  # traces that could not be read (engine thread only)
        self.dir_bytes = 0  # the directory's trace files at the last sweep, plus writes since
        # Held by the writer (and sweeps) only, never by the engine thread: it guards the open
        # file against a sweep deleting it. Counters are plain ints read without it.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._fd_name = ""
        self._last_sweep = 0.0

    # ---- engine thread ------------------------------------------------------------------------
    def wrap(self, sink: Sink | None) -> Sink:
        """A trace sink that records the step and then hands it to ``sink`` (the learner's)."""
        def traced(trace: StepTrace) -> None:
            self.record(trace)
            if sink is not None:
                sink(trace)
        return traced

    def record(self, trace: StepTrace) -> None:
        """Queue one step for writing; never blocks (takes no lock), never raises."""
        try:
            self.queue.put_nowait(step_record(trace, self.clock()))
        except queue.Full:
            self.queue_dropped += 1
        except Exception:  # a malformed trace must never break serving
            self.record_errors += 1

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> TraceLog:
        if self._thread is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sweep()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="aurora-tracelog", daemon=True)
        self._thread.start()
        log.info("trace log: %s (retention %.1f h, cap %d MiB)", self.dir,
                 self.retention_s / 3600, self.max_bytes >> 20)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (bounded by ``timeout``), then close the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._close()

    @property
    def dropped(self) -> int:
        return self.queue_dropped + self.write_dropped

    def stats(self) -> dict[str, int]:
        """Counters (read without a lock: a scrape must not wait on disk I/O)."""
        return {"written": self.written, "dropped": self.dropped, "bytes": self.bytes,
                "files_deleted": self.files_deleted,
                "errors": self.errors + self.record_errors, "dir_bytes": self.dir_bytes,
                "queued": self.queue.qsize()}

    # ---- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                batch = [self.queue.get(timeout=0.5)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < 1024:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            now = self.clock()
            if now - self._last_sweep >= self.sweep_interval_s or self.dir_bytes > self.max_bytes:
                self.sweep()
            if self._stop.is_set() and self.queue.empty():
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        by_file: dict[str, list[str]] = {}
        for rec in batch:
            by_file.setdefault(file_name(rec["time"]), []).append(
                json.dumps(rec, separators=(",", ":")))
        for name, lines in by_file.items():
            data = ("\n".join(lines) + "\n").encode()
            try:
                with self._lock:
                    fd = self._open(name)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    self.written += len(lines)
                    self.bytes += len(data)
                    self.dir_bytes += len(data)
            except OSError:
                with self._lock:
                    self.errors += 1
                    self.write_dropped += len(lines)
                    self._close_locked()
                if self.errors == 1:
                    log.exception("trace log: writing %s failed (further failures are counted)",
                                  self.dir / name)

    def _open(self, name: str) -> int:
        if self._fd is not None and self._fd_name == name:
            return self._fd
        self._close_locked()
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a file left by an older run keeps no wider mode
        self._fd, self._fd_name = fd, name
        return fd

    def _close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd, self._fd_name = None, ""

    # ---- retention ----------------------------------------------------------------------------
    def files(self) -> list[tuple[float, int, Path]]:
        """The trace files as (mtime, size, path), oldest first."""
        out = []
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return []
        for e in entries:
            if not FILE_RE.match(e.name) or not e.is_file(follow_symlinks=False):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            out.append((st.st_mtime, st.st_size, Path(e.path)))
        out.sort(key=lambda f: (f[0], f[2].name))
        return out

    def sweep(self) -> int:
        """Delete files past the retention window, then the oldest while over the byte cap.
        Returns how many files were deleted."""
        with self._lock:
            now = self.clock()
            self._last_sweep = now
            files = self.files()
            total = sum(size for _, size, _ in files)
            cutoff = now - self.retention_s
            deleted = 0
            for mtime, size, path in files:
                if mtime >= cutoff and total <= self.max_bytes:
                    continue
                if path.name == self._fd_name:
                    self._close_locked()  # the next write starts the file anew
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    self.errors += 1
                    continue
                total -= size
                deleted += 1
            self.files_deleted += deleted
            self.dir_bytes = total
            return deleted

    # ---- /metrics -----------------------------------------------------------------------------
    def collector(self) -> TraceLogCollector:
        return TraceLogCollector(self)


class TraceLogCollector:
    """Prometheus families for the trace log (register on the app's metrics registry)."""

    COUNTERS = (("written", "aurora_trace_log_written", "trace lines written to the trace dir"),
                ("dropped", "aurora_trace_log_dropped", "trace lines dropped (queue full/error)"),
                ("bytes", "aurora_trace_log_bytes", "bytes written to the trace dir"),
                ("files_deleted", "aurora_trace_log_files_deleted",
                 "trace files deleted by retention"),
                ("errors", "aurora_trace_log_errors", "trace log I/O errors"))

    def __init__(self, tracelog: TraceLog) -> None:
        self.tracelog = tracelog

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.tracelog.stats()
        for key, name, doc in self.COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(s[key]))
        yield GaugeMetricFamily("aurora_trace_log_dir_bytes", "bytes of trace files kept",
                                value=float(s["dir_bytes"]))
        yield GaugeMetricFamily("aurora_trace_log_queued", "trace lines waiting to be written",
                                value=float(s["queued"]))
