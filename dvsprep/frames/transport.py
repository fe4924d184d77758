"""Reading (and, for s3://, writing) remote objects: http(s) through urllib, s3:// through obstore.

One small interface for `remote` (the cache) and `share` (push/pull): `open_range(url, start)`
streams an object from byte `start` (a range request, so an interrupted download resumes
instead of restarting) and says which bytes it delivers; `with_retries` repeats a step on
transient failures (5xx, 429, resets, timeouts, a cut stream) with backoff and never on a
definite answer (4xx). Every failure is one line naming the URL, never a credential.

s3:// needs the optional extra (``pip install 'dvsgesture-kit[s3]'``: obstore, imported only
when an s3:// URL is used). Credentials, region and endpoint come from the standard
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
AWS_ENDPOINT_URL; AWS_PROFILE through boto3 when it is installed).
"""
from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterator, TypeVar

from .. import __version__
from ..errors import MissingFileError, StoreError, one_line

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0                          # no byte for this long: the try fails (and is retried)
RETRY_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # backoff between tries; tests set zeros
RETRY_ENV = "DVSPREP_RETRY_DELAYS"
CHUNK = 1 << 20
S3_PIECE = 64 << 10
S3_EXTRA = "pip install 'dvsgesture-kit[s3]'"
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
T = TypeVar("T")


class TransientError(StoreError):
    """A failure that may pass: a 5xx or 429 answer, a reset or refused connection, a timeout,
    a stream cut short. `with_retries` tries again; the last one is raised as is."""


class ObjectChangedError(StoreError):
    """The object changed on the server since the partial download began (ETag differs)."""


@dataclasses.dataclass
class Reply:
    """An open download: `chunks` yields the bytes from `start`; `total` is the object's size
    (None when the server does not say), `validator` its ETag (or Last-Modified)."""
    chunks: Iterator[bytes]
    start: int
    total: int | None
    validator: str | None
    close: Callable[[], None]


def scrub(text: object) -> str:
    """One line with every credential of the environment blanked out."""
    line = one_line(text)
    for var in _SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            line = line.replace(value, "***")
    return line


def retry_delays() -> tuple[float, ...]:
    """Seconds to wait before each further try: $DVSPREP_RETRY_DELAYS (e.g. ``1,2,4``; ``none``:
    no retry), else RETRY_DELAYS_S."""
    env = os.environ.get(RETRY_ENV)
    if env is None:
        return RETRY_DELAYS_S
    if env.strip().lower() in ("", "none"):
        return ()
    try:
        delays = tuple(float(x) for x in env.split(","))
    except ValueError:
        delays = ()
    if not delays or any(not (0 <= d <= 3600) for d in delays):
        raise StoreError(f"${RETRY_ENV}: {env!r} is not a list of seconds such as 1,2,4 (or none)")
    return delays


def with_retries(step: Callable[[], T], url: str, delays: tuple[float, ...] | None = None) -> T:
    """`step()`, tried again after each delay while it raises TransientError (one log line a try)."""
    delays = retry_delays() if delays is None else delays
    for attempt, delay in enumerate((*delays, None)):
        try:
            return step()
        except TransientError as exc:
            if delay is None:
                if not attempt:
                    raise
                raise TransientError(f"{exc} (gave up after {attempt + 1} tries)") from None
            log.info("%s; try %d of %d in %g s", exc, attempt + 2, len(delays) + 1, delay)
            if delay > 0:
                time.sleep(delay)
    raise AssertionError("unreachable")


def open_range(url: str, start: int = 0, validator: str | None = None) -> Reply:
    """Stream the object at `url` from byte `start`; with `validator`, ObjectChangedError when the
    object is no longer the one it names. A server that ignores the range answers from byte 0
    (`Reply.start` says so)."""
    if url.lower().startswith("s3://"):
        return _s3_open(url, start, validator)
    return _http_open(url, start, validator)


# -- http(s) --------------------------------------------------------------------------------------

class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow http(s) redirects only; anything else (file:, data:, ftp:) is refused by name."""

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001 - urllib's signature
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        scheme = urllib.parse.urlsplit(target).scheme.lower()
        if scheme not in ("http", "https"):
            fp.close()
            raise StoreError(f"{req.full_url}: redirect to a non-http(s) URL refused ({scheme}:)")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_Redirects)


def _http_open(url: str, start: int, validator: str | None) -> Reply:
    headers = {"User-Agent": f"dvsprep/{__version__}", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if validator:
            headers["If-Range"] = validator
    try:
        resp = _OPENER.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except StoreError:
        raise  # a refused redirect, already one line
    except urllib.error.HTTPError as exc:
        exc.close()
        if 300 <= exc.code < 400:
            raise StoreError(f"{url}: HTTP {exc.code}: redirect loop or too many redirects") from None
        if exc.code == 416 and start:
            raise ObjectChangedError(f"{url}: HTTP 416: the partial download is longer than the object") from None
        if exc.code >= 500 or exc.code in (408, 429):
            raise TransientError(f"{url}: HTTP {exc.code} {one_line(exc.reason)}") from None
        err = MissingFileError if exc.code == 404 else StoreError
        raise err(f"{url}: HTTP {exc.code} {one_line(exc.reason)}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):  # an unknown host does not come back by waiting
            raise StoreError(f"{url}: cannot download ({one_line(exc.reason)})") from None
        raise TransientError(f"{url}: cannot download ({one_line(exc.reason)})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise TransientError(f"{url}: cannot download ({one_line(exc) or type(exc).__name__})") from None
    except ValueError as exc:
        raise StoreError(f"{url}: cannot download ({one_line(exc)})") from None
    etag = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
    length = resp.headers.get("Content-Length")
    length_n = int(length) if length is not None and length.isdigit() else None
    got = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range") or "") if resp.status == 206 else None
    if got:
        first, total = int(got.group(1)), got.group(3)
        total_n = int(total) if total != "*" else None
    else:  # the whole object (no range support, or If-Range: it changed): the caller starts over
        first, total_n = 0, length_n
    return Reply(_http_chunks(resp, url, first), first, total_n, etag, resp.close)


def _http_chunks(resp: Any, url: str, first: int) -> Iterator[bytes]:
    n = first
    while True:
        try:
            chunk = resp.read1(CHUNK)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise TransientError(f"{url}: download failed after {n:,} bytes "
                                 f"({one_line(exc) or type(exc).__name__})") from None
        if not chunk:
            return
        n += len(chunk)
        yield chunk


# -- s3:// ------------------------------------------------------------------------------------------

def split_s3(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key`` (the key without a leading slash)."""
    parts = urllib.parse.urlsplit(url)
    return parts.netloc, urllib.parse.unquote(parts.path.lstrip("/"))


def obstore_module() -> Any:
    """obstore, or one line saying how to install it."""
    try:
        import obstore
    except ImportError:
        raise StoreError(f"s3:// URLs need the s3 extra: {S3_EXTRA}") from None
    return obstore


_stores: dict[tuple, Any] = {}


def s3_store(bucket: str) -> Any:
    """An obstore S3Store for `bucket`, configured from the environment (cached per settings)."""
    obstore_module()
    from obstore.store import S3Store

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    key = (bucket, endpoint, TIMEOUT_S, *(os.environ.get(v) for v in (*_SECRET_VARS, "AWS_REGION", "AWS_PROFILE")))
    if key not in _stores:
        # TIMEOUT_S bounds each wait for bytes, not the whole transfer (obstore's default would
        # stop any download longer than 30 s)
        options: dict[str, Any] = {"allow_http": endpoint.lower().startswith("http://"),
                                   "read_timeout": f"{TIMEOUT_S}s", "timeout": "1d",
                                   "connect_timeout": f"{min(TIMEOUT_S, 10.0)}s"}
        kwargs: dict[str, Any] = {}
        if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs["credential_provider"] = _profile_credentials()
        # Our own retries (with_retries) resume from the verified prefix; obstore's would not.
        _stores[key] = S3Store(bucket, client_options=options, retry_config={"max_retries": 0}, **kwargs)
    return _stores[key]


def _profile_credentials() -> Any:
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise StoreError("AWS_PROFILE needs boto3 (pip install boto3), or set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY") from None
    return Boto3CredentialProvider(boto3.Session())


def s3_error(url: str, exc: BaseException) -> StoreError:
    """obstore's exception as one of ours, in one line without credentials."""
    from obstore import exceptions as ox

    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, (ox.NotFoundError, FileNotFoundError)) or "NoSuchBucket" in text or "NoSuchKey" in text:
        what = "no such bucket" if "NoSuchBucket" in text else "no such object"
        return MissingFileError(f"{url}: {what}")
    if isinstance(exc, (ox.PermissionDeniedError, ox.UnauthenticatedError, PermissionError)) or \
            any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")):
        return StoreError(f"{url}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    if isinstance(exc, ox.PreconditionError):
        return ObjectChangedError(f"{url}: changed on the server since the partial download began")
    first = _s3_reason(text)
    if any(w in text for w in ("InvalidRange", "416")):
        return ObjectChangedError(f"{url}: the partial download is longer than the object")
    if isinstance(exc, ox.GenericError) or "timed out" in text or "connect" in text.lower() or \
            re.search(r"\b5\d\d\b", text):
        return TransientError(f"{url}: cannot download ({first or name})")
    return StoreError(f"{url}: {name}: {first}")


_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_HTTP_WORDS = {"Timeout": "timed out", "Interrupted": "connection cut short", "Connect": "cannot connect",
               "Request": "request failed", "Decode": "malformed answer"}


def _s3_reason(text: str) -> str:
    """What went wrong, in words, from obstore's message (its first line, plus the HTTP error's kind)."""
    first = scrub(text.split("\n", 1)[0])[:300]
    kind = _HTTP_KIND.search(text)
    if kind is None:
        return first
    return f"{_HTTP_WORDS.get(kind.group(1), kind.group(1))}: {first}"


def _s3_open(url: str, start: int, validator: str | None) -> Reply:
    obstore = obstore_module()
    bucket, key = split_s3(url)
    options: dict[str, Any] = {}
    if start:
        options["range"] = {"offset": start}
    if validator:
        options["if_match"] = validator
    try:
        result = obstore.get(s3_store(bucket), key, options=options)
        meta, (first, _end) = result.meta, result.range
    except Exception as exc:  # noqa: BLE001 - obstore's errors are mapped to ours
        raise s3_error(url, exc) from None
    return Reply(_s3_chunks(result, url, first), first, int(meta["size"]), meta.get("e_tag"), lambda: None)


def _s3_chunks(result: Any, url: str, first: int) -> Iterator[bytes]:
    n = first
    # small pieces: what arrived before a cut is written, and the retry resumes after it
    stream = iter(result.stream(min_chunk_size=S3_PIECE))
    while True:
        try:
            chunk = next(stream)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a cut stream, a timeout
            raise TransientError(f"{url}: download failed after {n:,} bytes ({_s3_reason(str(exc))})") from None
        n += len(chunk)
        yield bytes(chunk)
