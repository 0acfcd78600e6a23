"""A small JSON-over-HTTP client for the inference servers and their router (stdlib only).

``call`` sends one request and decodes the answer; ``post_checked`` also turns SGLang's
``{"success": false}`` into ``EngineWeightError``; ``wait_healthy`` polls a server until it
serves. Every failure is an ``HTTPError`` (an ``EngineError``) naming the URL and the status.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from megatron_klear.console import Progress
from megatron_klear.errors import EngineError, EngineWeightError


class HTTPError(EngineError):
    def __init__(self, url: str, status: Optional[int], detail: str):
        super().__init__(f"{url}: {status or 'no response'}: {detail[:500]}")
        self.status = status


def call(url: str, body: Optional[dict] = None, *, method: Optional[str] = None, timeout: float = 60.0) -> Any:
    """Send one JSON request; returns the decoded JSON (or text). Raises ``HTTPError``."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        raise HTTPError(url, e.code, e.read().decode(errors="replace")) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise HTTPError(url, None, str(e)) from None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return text


def post_checked(url: str, body: dict, timeout: float) -> Any:
    """POST a weight or group request; a ``{"success": false}`` answer raises
    ``EngineWeightError`` (SGLang answers 400 with the same body, which ``call`` raises)."""
    resp = call(url, body, timeout=timeout)
    if isinstance(resp, dict) and resp.get("success") is False:
        raise EngineWeightError(f"{url}: {resp.get('message')}")
    return resp


def wait_healthy(url: str, timeout_s: float, alive=lambda: True, path: str = "/health_generate") -> None:
    """Poll ``url + path`` until 200; ``alive()`` False (process died) fails at once. Prints a
    progress line every ``MEGATRON_KLEAR_PROGRESS_S`` seconds while it waits (a large model
    takes minutes to load)."""
    start = time.time()
    deadline = start + timeout_s
    progress = Progress(f"waiting for {url} to become healthy (timeout {timeout_s:.0f} s)", unit="s")
    last = ""
    while time.time() < deadline:
        if not alive():
            raise EngineError(f"{url} exited before becoming healthy")
        try:
            call(url + path, timeout=10)
            return
        except HTTPError as e:
            last = str(e)
        time.sleep(1.0)
        progress.update(time.time() - start)
    raise EngineError(f"{url} not healthy after {timeout_s:.0f} s (last: {last})")
