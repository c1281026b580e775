"""Getting image bytes from a URI (file://, s3://, http(s)://) without letting an
upload event turn modstream into an SSRF proxy, a file reader for the whole disk
or a victim of slow or endless responses.

Every failure is a LoadError whose reason is a DeadLetter reason. This module
does not know about images (no Pillow); decoding lives in common.decode.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args
from urllib.parse import quote, urljoin, urlsplit
from urllib.request import url2pathname

from common.loaderrors import LoadError

__all__ = ["EVERYDAY_FORMATS", "IMAGE_FORMATS", "ImageFormat", "LoadError", "LoadLimits", "fetch_bytes"]

_CHUNK_BYTES = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "modstream-fetch/1"
_NOT_ALLOWED = "not allowed"  # the whole answer to a refused file://: nothing about the file itself

ImageFormat = Literal["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"]
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)
"""Every format decode can be allowed to open (Pillow opens more; not worth the exposure)."""
EVERYDAY_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")
"""What users upload, and what decode opens unless told otherwise."""

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IANA's special-purpose address registries (IPv4 and IPv6, 2025 editions), refused whether or not
# ipaddress calls them global: no image host lives there, and several reach this machine or its
# neighbours (::7f00:1 is 127.0.0.1 to some stacks). Embedded IPv4 (mapped, NAT64 64:ff9b::/96,
# 6to4) is judged as the IPv4 address it carries, in _embedded_ipv4.
_SPECIAL_PURPOSE: tuple[IpNetwork, ...] = tuple(ipaddress.ip_network(cidr) for cidr in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24",
    "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4",
    "::/8",  # unspecified, loopback, IPv4-compatible (::a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d)
    "64:ff9b:1::/48", "100::/64", "100:0:0:1::/64", "2001::/23", "2001:db8::/32", "2620:4f:8000::/48",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


@dataclass(frozen=True)
class LoadLimits:
    """Caps on what one image may cost us to fetch and decode.

    allow_hosts / allow_networks are the only way to reach addresses that are
    refused by default (loopback, private, link-local, ...), e.g. an internal CDN;
    http_ports the only ports. file:// reads only below the folders in file_roots
    (none by default). formats and the decode_* budgets are common.decode's.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[str, ...] = ()
    max_redirects: int = 3
    file_roots: tuple[str, ...] = ()
    http_ports: tuple[int, ...] = (80, 443)
    formats: tuple[str, ...] = EVERYDAY_FORMATS
    decode_cpu_s: float = 2.0
    decode_memory_bytes: int = 384 * 1024 * 1024
    decode_workers: int = 2
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("max_bytes and max_pixels must be positive")
        if self.fetch_timeout_s <= 0:
            raise ValueError("fetch_timeout_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must not be negative")
        if self.decode_cpu_s <= 0 or self.decode_memory_bytes <= 0 or self.decode_workers < 1:
            raise ValueError("decode_cpu_s, decode_memory_bytes and decode_workers must be positive")
        unknown = set(self.formats) - set(IMAGE_FORMATS)
        if unknown:
            raise ValueError(f"unknown image formats {sorted(unknown)}; known: {', '.join(IMAGE_FORMATS)}")
        # Normalised here so that limits built from config lists stay hashable and comparable.
        object.__setattr__(self, "allow_hosts", frozenset(_normalise_host(h) for h in self.allow_hosts))
        object.__setattr__(self, "allow_networks", tuple(self.allow_networks))
        object.__setattr__(self, "file_roots", tuple(os.path.abspath(root) for root in self.file_roots))
        object.__setattr__(self, "http_ports", tuple(self.http_ports))
        object.__setattr__(self, "formats", tuple(self.formats))
        networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.allow_networks)
        object.__setattr__(self, "_networks", networks)

    def permits_address(self, address: IpAddress) -> bool:
        """Whether a connection to this resolved address is allowed (host allowances aside)."""
        if any(address in network for network in self._networks):
            return True
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return self.permits_address(embedded)
        return not _is_forbidden(address)


def fetch_bytes(uri: str, limits: LoadLimits) -> bytes:
    """Return the bytes behind `uri`, never more than limits.max_bytes.

    Raises LoadError, and nothing else, whatever the URI: too_large when the
    object exceeds max_bytes, fetch_failed for everything else (refused address,
    port or path, missing object, timeout, HTTP error, a URI that does not parse).
    """
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    try:
        if scheme == "file":
            return _fetch_file(uri, limits)
        if scheme == "s3":
            return _fetch_s3(uri, limits)
        if scheme in ("http", "https"):
            return _fetch_http(uri, limits)
    except LoadError:
        raise
    except (ValueError, UnicodeError, OSError, http.client.HTTPException) as exc:
        # The URI and everything a server answers are producer data: a URI or answer the
        # standard library cannot parse (malformed IPv6 literal, bad percent-escape,
        # header it rejects) is a failed fetch of that one record, never a crash.
        raise LoadError("fetch_failed", f"{_shown(uri)}: {type(exc).__name__}: {exc}") from exc
    raise LoadError("fetch_failed", f"unsupported URI scheme {scheme[:20]!r}")


class _Deadline:
    """Wall-clock budget shared by every step of one fetch (DNS, connects, redirects, reads)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def timeout_error(self, what: str) -> LoadError:
        return LoadError("fetch_failed", f"timed out after {self.seconds:g}s fetching {what}")


def _read_capped(
    read_chunk: Callable[[int], bytes], limits: LoadLimits, deadline: _Deadline, what: str
) -> bytes:
    """Drain a chunk reader, failing as soon as the data outgrows max_bytes or the deadline."""
    data = bytearray()
    while chunk := read_chunk(_CHUNK_BYTES):
        data += chunk
        if len(data) > limits.max_bytes:
            raise LoadError("too_large", f"{what} exceeds {limits.max_bytes} bytes")
        if deadline.remaining() <= 0:
            raise deadline.timeout_error(what)
    return bytes(data)


# --- file:// ---------------------------------------------------------------


def _fetch_file(uri: str, limits: LoadLimits) -> bytes:
    """Read a file below one of limits.file_roots, never through a symbolic link.

    Every refusal (no roots configured, outside them, missing, a link, not a
    regular file, unreadable) says only "not allowed", so an event cannot probe
    the disk. The path is opened component by component relative to the root
    with O_NOFOLLOW, so swapping a component for a link mid-read cannot escape.
    """
    shown = _shown(uri)
    located = _locate_in_roots(uri, limits.file_roots)
    if located is None:
        raise LoadError("fetch_failed", f"{shown}: {_NOT_ALLOWED}")
    fd = _open_below(*located)
    if fd is None:
        raise LoadError("fetch_failed", f"{shown}: {_NOT_ALLOWED}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LoadError("fetch_failed", f"{shown}: {_NOT_ALLOWED}")
        if info.st_size > limits.max_bytes:
            raise LoadError("too_large", f"{shown} exceeds {limits.max_bytes} bytes")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limits.max_bytes + 1)  # +1: notice a file that grew since fstat
    except OSError as exc:
        raise LoadError("fetch_failed", f"{shown}: {_NOT_ALLOWED}") from exc
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise LoadError("too_large", f"{shown} exceeds {limits.max_bytes} bytes")
    return data


def _locate_in_roots(uri: str, roots: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """(root, path components below it) for a file:// URI inside a root, else None.

    Lexical only: '..' anywhere is refused outright, so no component can climb out
    of the root; links are dealt with when opening.
    """
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        return None
    path = url2pathname(parts.path)
    if "\x00" in path or not path.startswith("/"):
        return None
    components = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in components:
        return None
    for root in roots:
        for prefix in dict.fromkeys((root, os.path.realpath(root))):
            root_parts = [part for part in prefix.split("/") if part]
            if components[: len(root_parts)] == root_parts and len(components) > len(root_parts):
                return prefix, components[len(root_parts):]
    return None


def _open_below(root: str, components: list[str]) -> int | None:
    """A read-only descriptor of root/components, opened without following any link below
    root (the root itself is the operator's and may be one); None if that is impossible."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    opened: list[int] = []
    try:
        opened.append(os.open(root, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY))
        for directory in components[:-1]:
            opened.append(os.open(directory, flags | os.O_DIRECTORY, dir_fd=opened[-1]))
        # O_NONBLOCK: a FIFO planted at the path cannot block us in open() (fstat refuses it next).
        return os.open(components[-1], flags | os.O_NONBLOCK, dir_fd=opened[-1])
    except OSError:
        return None
    finally:
        for fd in opened:
            os.close(fd)


# --- s3:// -----------------------------------------------------------------


def _fetch_s3(uri: str, limits: LoadLimits) -> bytes:
    # Keys are taken verbatim: '#' and '?' are legal in S3 keys, so no URL parsing here.
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise LoadError("fetch_failed", f"s3 URI needs a bucket and a key: {uri}")
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        client = _s3_client(limits.fetch_timeout_s)
    except ImportError as exc:
        raise LoadError("fetch_failed", "s3:// URIs need boto3: install modstream[s3]") from exc
    deadline = _Deadline(limits.fetch_timeout_s)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            size = response.get("ContentLength")
            if size is not None and size > limits.max_bytes:
                raise LoadError("too_large", f"{uri} has {size} bytes, limit {limits.max_bytes}")
            return _read_capped(body.read, limits, deadline, uri)
        finally:
            body.close()
    except (BotoCoreError, ClientError, OSError) as exc:
        raise LoadError("fetch_failed", f"{uri}: {exc}") from exc


@functools.lru_cache(maxsize=4)
def _s3_client(timeout_s: float) -> Any:
    """One client per timeout: building a client costs milliseconds and clients are thread-safe."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2})
    # A fresh Session per client: boto3's default session is not thread-safe.
    return boto3.session.Session().client("s3", config=config)


# --- http:// and https:// --------------------------------------------------


def _fetch_http(uri: str, limits: LoadLimits) -> bytes:
    deadline = _Deadline(limits.fetch_timeout_s)
    url = uri
    for _ in range(limits.max_redirects + 1):
        result = _http_get_once(url, limits, deadline)
        if isinstance(result, bytes):
            return result
        url = result
    raise LoadError("fetch_failed", f"more than {limits.max_redirects} redirects from {_redact(uri)}")


def _http_get_once(url: str, limits: LoadLimits, deadline: _Deadline) -> bytes | str:
    """One request; returns the body, or the next URL when the server redirects."""
    parts = urlsplit(url)
    shown = _redact(url)
    if parts.scheme not in ("http", "https"):
        raise LoadError("fetch_failed", f"refusing redirect to {parts.scheme!r} URL {shown}")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise LoadError("fetch_failed", f"invalid port in {shown}") from exc
    if not host:
        raise LoadError("fetch_failed", f"URL has no host: {shown}")
    if port not in limits.http_ports:
        raise LoadError("fetch_failed", f"refusing {shown}: port {port} is not allowed")
    addresses = _vetted_addresses(host, port, limits, deadline)
    if deadline.remaining() <= 0:
        raise deadline.timeout_error(shown)
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    connection = connection_class(host, port, addresses, deadline.remaining())
    watchdog = _Watchdog(connection, deadline.remaining())
    try:
        with watchdog:
            target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~") + (
                f"?{parts.query}" if parts.query else ""
            )
            connection.request("GET", target, headers={"User-Agent": _USER_AGENT, "Connection": "close"})
            response = connection.getresponse()
            if response.status in _REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise LoadError("fetch_failed", f"HTTP {response.status} without Location from {shown}")
                return urljoin(url, location.strip())
            if not 200 <= response.status < 300:
                raise LoadError("fetch_failed", f"HTTP {response.status} {response.reason} from {shown}")
            if _declares_more_than(response.getheader("Content-Length", ""), limits.max_bytes):
                raise LoadError("too_large", f"{shown} declares more than {limits.max_bytes} bytes")
            body = _read_capped(response.read1, limits, deadline, shown)
    except (OSError, http.client.HTTPException) as exc:
        if watchdog.fired.is_set() or deadline.remaining() <= 0:
            raise deadline.timeout_error(shown) from exc
        raise LoadError("fetch_failed", f"{shown}: {type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()
    if watchdog.fired.is_set():  # the socket was cut mid-body, so what we read may be truncated
        raise deadline.timeout_error(shown)
    return body


def _declares_more_than(declared: str, limit: int) -> bool:
    """Whether a Content-Length is a number above limit; a header that is no number is ignored
    (the capped read still holds). By length first: int() refuses 4,300+ digits."""
    digits = declared.strip()
    if not (digits.isascii() and digits.isdigit()):
        return False
    digits = digits.lstrip("0") or "0"
    return len(digits) > len(str(limit)) or int(digits) > limit


def _vetted_addresses(host: str, port: int, limits: LoadLimits, deadline: _Deadline) -> list[str]:
    """Resolve once and check every address; the caller connects only to these (no rebinding)."""
    addresses = _resolve(host, port, deadline)
    if _normalise_host(host) in limits.allow_hosts:
        return addresses
    for address in addresses:
        if not limits.permits_address(ipaddress.ip_address(address.split("%", 1)[0])):
            raise LoadError("fetch_failed", f"refusing {host}: it resolves to non-public address {address}")
    return addresses


def _resolve(host: str, port: int, deadline: _Deadline) -> list[str]:
    """getaddrinfo bounded by the deadline (the system resolver has its own, longer, timeouts)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass  # a name, not a literal address
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            outcome.append(exc)

    resolver = threading.Thread(target=lookup, name="modstream-resolve", daemon=True)
    resolver.start()
    resolver.join(deadline.remaining())
    if not outcome:
        raise deadline.timeout_error(f"address of {host}")
    if isinstance(outcome[0], Exception):
        raise LoadError("fetch_failed", f"cannot resolve {host}: {outcome[0]}")
    return list(dict.fromkeys(info[4][0] for info in outcome[0]))


def _is_forbidden(address: IpAddress) -> bool:
    """Not globally routable, or in a special-purpose range (IANA), multicast included."""
    return not address.is_global or address.is_multicast or any(address in net for net in _SPECIAL_PURPOSE)


def _embedded_ipv4(address: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 IPv6 address reaches."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in _IPV4_MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    return None


def _normalise_host(host: str) -> str:
    return host.lower().rstrip(".")


def _redact(url: str) -> str:
    """The URL without user:password, for error details that end up in dead letters and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _shown(uri: str, limit: int = 300) -> str:
    """A URI as an error detail may show it: no credentials, printable, bounded."""
    try:
        uri = _redact(uri)
    except ValueError:  # unparsable: cut any userinfo by hand
        scheme, sep, rest = uri.partition("://")
        uri = scheme + sep + rest.rsplit("@", 1)[-1] if sep else uri
    shown = uri.encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _connect_pinned(addresses: list[str], port: int, timeout: float) -> socket.socket:
    """Connect to the first reachable vetted address, never to a fresh DNS answer."""
    last_error: OSError = OSError("no address to connect to")
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout=timeout)
        except OSError as exc:
            last_error = exc
    raise last_error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection that keeps the hostname for the Host header but connects to vetted IPs."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses
        self.connect_timeout = timeout
        self.pinned_socket: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.pinned_socket = _connect_pinned(self.addresses, self.port, self.connect_timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As _PinnedHTTPConnection; TLS SNI and certificate checks still use the hostname."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=_tls_context())
        self.addresses = addresses
        self.connect_timeout = timeout
        self.pinned_socket: socket.socket | None = None

    def connect(self) -> None:
        raw = _connect_pinned(self.addresses, self.port, self.connect_timeout)
        try:
            self.sock = self.pinned_socket = _tls_context().wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Loading the CA store takes milliseconds: do it once; SSLContext is thread-safe to share."""
    return ssl.create_default_context()


class _Watchdog:
    """Cuts the connection at the deadline. Socket timeouts alone cannot: they restart on
    every received byte, so a server dripping headers or body would never time out."""

    def __init__(self, connection: _PinnedHTTPConnection | _PinnedHTTPSConnection, seconds: float) -> None:
        self.fired = threading.Event()
        self._connection = connection
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        # Held while cutting, so that once __exit__ returns the socket is ours to close
        # and its descriptor number can be reused safely.
        self._lock = threading.Lock()
        self._finished = False

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.fired.set()
            sock = self._connection.pinned_socket
            if sock is None:
                return
            # The plain socket's shutdown, also for TLS: it wakes the blocked reader
            # without touching the SSL object that the reading thread is using.
            # OSError: already closed, nothing left to cut.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._finished = True
