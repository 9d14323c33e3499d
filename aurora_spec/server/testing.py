"""Helpers for tests and scripts: run an app on a loopback port in a background thread; render
a page in headless Chromium."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Poll ``url``/health until it answers 200; RuntimeError if ``proc`` (the server process,
    when there is one) exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"aurora serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05 if proc is None else 0.5)
    raise RuntimeError(f"the server at {url} did not become healthy in {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``with ServerThread(app) as url: ...`` serves ``app`` at ``url`` until the block ends
    (the exit runs the app's shutdown, as SIGTERM would)."""

    def __init__(self, app, port: int | None = None, startup_timeout: float = 60.0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)  # installs no signal handlers off the main thread
        self.thread = threading.Thread(target=self.server.run, name="aurora-server", daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> str:
        self.thread.start()
        wait_healthy(self.url, timeout=self.startup_timeout)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_render(url: str, png: Path | None = None, budget_ms: int = 6000,
                    size: str = "1280,900", timeout: float = 120.0) -> str:
    """Load ``url`` in headless Chromium, let its scripts run for ``budget_ms`` of virtual time;
    write a screenshot to ``png`` when given. Returns the rendered DOM (after the scripts ran)."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no chromium binary (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="aurora-chromium-") as profile:
        base = [binary, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                f"--window-size={size}", "--hide-scrollbars"]
        if png is not None:
            subprocess.run([*base, f"--screenshot={png}", url], check=True, timeout=timeout,
                           capture_output=True)
        dom = subprocess.run([*base, "--dump-dom", url], check=True, timeout=timeout,
                             capture_output=True, text=True)
    return dom.stdout
