"""Images named by an http(s) URL: downloaded into memory with a deadline and a size limit.

    data = download("https://example.com/photo.jpg")          # bytes, or a one-line CaptionerError

Only http and https are fetched, redirects included (at most 5); no read waits more than `timeout`
seconds and the download is abandoned once it has taken longer than that, and a body over `max_bytes` is refused as soon as it passes the limit (or at
once when its Content-Length says so). What comes back is checked by captioner.vision.images like any file.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from captioner.errors import CaptionerError

DOWNLOAD_TIMEOUT = 30.0      # seconds for the whole download
DOWNLOAD_MAX_BYTES = 20_000_000  # as `captioner serve`'s upload limit
_CHUNK = 64 * 1024
_SCHEMES = ("http://", "https://")


def is_url(text: str) -> bool:
    return text[:8].lower().startswith(_SCHEMES)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_url(newurl):
            raise urllib.error.URLError(f"redirected to a non-http(s) address {newurl[:80]!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, timeout: float = DOWNLOAD_TIMEOUT, max_bytes: int = DOWNLOAD_MAX_BYTES) -> bytes:
    """The body at `url`; CaptionerError naming the URL on a bad address, an HTTP error, a timeout or a
    body over `max_bytes`."""
    if not is_url(url):
        raise CaptionerError(f"{url}: not an http(s) URL")
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "captioner", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=timeout) as answer:
            declared = answer.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise CaptionerError(f"{url}: the image is {int(declared):,} bytes, over the "
                                     f"{max_bytes:,}-byte limit")
            kind = (answer.headers.get_content_type() or "").lower()
            if kind.startswith("text/"):
                raise CaptionerError(f"{url}: the server sent {kind}, not an image")
            body = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                chunk = answer.read1(_CHUNK)  # one network read: a trickling server meets the deadline
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > max_bytes:
                    raise CaptionerError(f"{url}: the image is over the {max_bytes:,}-byte limit")
    except CaptionerError:
        raise
    except urllib.error.HTTPError as err:
        raise CaptionerError(f"{url}: the server answered {err.code} {err.reason}") from None
    except (TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(err, TimeoutError) or isinstance(reason, TimeoutError):
            raise CaptionerError(f"{url}: download took longer than {timeout:g} s") from None
        raise CaptionerError(f"{url}: cannot download ({_one_line(reason)})") from None
    except ValueError as err:  # a malformed URL
        raise CaptionerError(f"{url}: not a valid URL ({_one_line(err)})") from None


def _one_line(error) -> str:
    return " ".join(str(error).split()) or type(error).__name__
