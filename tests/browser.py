"""Headless Chromium driven over the DevTools protocol through a pipe (--remote-debugging-pipe): no
websocket library, no browser download, only Debian's `chromium` (tests skip with a reason without it).

    with Browser(tmp_path) as b:
        b.open("file:///.../page.html")
        b.evaluate("document.title")
        b.screenshot(tmp_path / "shot.png")

Messages are JSON objects separated by NUL bytes: we write to the browser's fd 3 and read its fd 4.
Every wait is bounded.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def need_chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium; .ci/run does)")
    return path


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, profile_dir: Path, width: int = 1200, height: int = 900, timeout: float = 60.0):
        chromium = need_chromium()
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--remote-debugging-pipe", f"--user-data-dir={profile_dir}",
                f"--window-size={width},{height}", "--hide-scrollbars", "about:blank"]
        # The browser expects the pipe on fds 3 (commands in) and 4 (answers out).
        fds = {3: to_browser_r, 4: from_browser_w}

        def place_fds():
            # Out of the way first (above 10), so that neither pipe end is overwritten by the other.
            high = {target: fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for target, fd in fds.items()}
            for target, fd in high.items():
                os.dup2(fd, target)

        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(3, 4), preexec_fn=place_fds)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank", session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True, session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    # ---- protocol ----------------------------------------------------------------------------------
    def call(self, method: str, session: bool = True, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("the browser did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError("the browser closed its pipe")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    # ---- conveniences ------------------------------------------------------------------------------
    def open(self, url: str) -> None:
        """Navigate and wait (bounded) until the document has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}...: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None):
        """Poll `expression` until it is truthy (at most `timeout` seconds); returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise BrowserError(f"timed out waiting for {expression}")

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Pick files in an <input type=file>, as a person using the page's own form does."""
        found = self.call("Runtime.evaluate", expression=f"document.querySelector({json.dumps(selector)})")
        object_id = found["result"].get("objectId")
        if object_id is None:
            raise BrowserError(f"no element {selector}")
        self.call("DOM.setFileInputFiles", files=[str(p) for p in paths], objectId=object_id)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What "on screen" means for the tests: an element is laid out with a size, inside the viewport, not
# hidden, and is what the browser finds at its own centre (nothing covers it).
VISIBLE_JS = """
(el) => {
  if (!el) return false;
  const r = el.getBoundingClientRect();
  if (r.width < 2 || r.height < 2) return false;
  if (r.bottom <= 0 || r.right <= 0 || r.top >= innerHeight || r.left >= innerWidth) return false;
  const style = getComputedStyle(el);
  if (style.visibility === 'hidden' || style.display === 'none' || style.opacity === '0') return false;
  const x = Math.min(Math.max(r.left + r.width / 2, 0), innerWidth - 1);
  const y = Math.min(Math.max(r.top + r.height / 2, 0), innerHeight - 1);
  const hit = document.elementFromPoint(x, y);
  return hit === el || el.contains(hit) || (hit && hit.contains(el) && hit.tagName === 'A');
}
"""
