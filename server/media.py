"""Where request images may come from. Default: only `data:` URIs, so a request can never make the server read a
local file or reach the network; `file://` needs an allow-listed directory, http(s) an allow-listed domain (no
redirects). Size limits give a 413 before anything is decoded."""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ecso.server.schemas import ApiError


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from. Default: only `data:` URIs, so a request can never make the server read a local
    file or reach the network. `file://` needs an allowed directory, http(s) an allowed domain."""

    max_image_bytes: int = 20 * 1024 * 1024
    allow_file_dirs: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()  # "example.com" matches that host; ".example.com" its subdomains too
    fetch_timeout: float = 10.0


def fetch_image(url: str, policy: MediaPolicy) -> bytes:
    """Image bytes from a `data:` URI, or from an allowed directory / domain; refuses everything else."""
    if url.startswith("data:"):
        return _data_uri(url, policy.max_image_bytes)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return _local_file(parts, policy)
    if parts.scheme in ("http", "https"):
        return _remote(url, parts, policy)
    raise ApiError(400, "image_url must be a data: URI (data:image/png;base64,...)", "image_url_not_allowed",
                   "messages")


def _too_large(n: int, limit: int) -> ApiError:
    return ApiError(413, f"the image is over {n / 1e6:.1f} MB, more than the limit of {limit / 1e6:.1f} MB",
                    "image_too_large", "messages")


def _data_uri(url: str, limit: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ApiError(400, "image data: URIs must be base64 (data:image/png;base64,...)", "invalid_image", "messages")
    if len(payload) > (limit + 2) // 3 * 4 + 4:
        raise _too_large(len(payload) * 3 // 4, limit)
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data: URI is not valid base64", "invalid_image", "messages") from None
    if len(data) > limit:
        raise _too_large(len(data), limit)
    return data


def _local_file(parts: urllib.parse.SplitResult, policy: MediaPolicy) -> bytes:
    if not policy.allow_file_dirs:
        raise ApiError(400, "file:// image URLs are refused; send a data: URI, or start the server with "
                       "--allow-file-dir DIR", "image_url_not_allowed", "messages")
    if parts.netloc not in ("", "localhost"):
        raise ApiError(400, "file:// URLs must name a local path", "image_url_not_allowed", "messages")
    path = Path(urllib.request.url2pathname(parts.path)).resolve()
    if not any(path.is_relative_to(Path(d).resolve()) for d in policy.allow_file_dirs):
        raise ApiError(400, "file:// image outside the allowed directories", "image_url_not_allowed", "messages")
    if not path.is_file():
        raise ApiError(400, f"image file not found: {path.name}", "invalid_image", "messages")
    size = path.stat().st_size
    if size > policy.max_image_bytes:
        raise _too_large(size, policy.max_image_bytes)
    return path.read_bytes()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could leave the allowed domains
        return None


def _remote(url: str, parts: urllib.parse.SplitResult, policy: MediaPolicy) -> bytes:
    host = (parts.hostname or "").lower()
    allowed = any(host == d.lower().lstrip(".") or (d.startswith(".") and host.endswith(d.lower()))
                  for d in policy.allow_domains)
    if not allowed:
        raise ApiError(400, f"remote image URLs are refused ({host or 'no host'} is not allowed); send a data: URI, "
                       "or start the server with --allow-domain HOST", "image_url_not_allowed", "messages")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "ecso"}),
                         timeout=policy.fetch_timeout) as r:
            data = r.read(policy.max_image_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ApiError(400, f"could not fetch the image: HTTP {e.code} from {host}", "invalid_image",
                       "messages") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"could not fetch the image from {host} ({e})", "invalid_image", "messages") from None
    if len(data) > policy.max_image_bytes:
        raise _too_large(len(data), policy.max_image_bytes)
    return data
