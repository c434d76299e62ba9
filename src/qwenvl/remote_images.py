"""Fetch an http(s) URL without letting the request reach addresses that are not public.

Each hop (the URL, then every redirect target) is checked before anything is sent: the scheme,
the absence of credentials, the host against an optional domain list, then every address the host
resolves to. The connection goes to one of exactly those checked addresses, so a DNS answer that
changes between the check and the connection cannot redirect it (DNS rebinding); https still
verifies the certificate against the host name. Environment proxies are not used: a proxy would
resolve the name itself, after our check. Every failure raises :class:`FetchError`, whose message
is detailed enough for a server log and may name internal addresses, so it is not for clients.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
# Characters kept as they are in the request target; anything else (spaces, non-ASCII) is escaped.
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"

# Destinations that are not the public internet, from the IANA IPv4 and IPv6 Special-Purpose
# Address Registries, plus multicast. Written out because ipaddress's is_global and is_private
# changed their answers across Python versions (and call IPv4 multicast global).
_NON_PUBLIC_IPV4 = tuple(
    ipaddress.IPv4Network(network)
    for network in (
        "0.0.0.0/8",  # "this network", includes the unspecified 0.0.0.0
        "10.0.0.0/8",  # private (RFC 1918)
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, includes cloud metadata at 169.254.169.254
        "172.16.0.0/12",  # private (RFC 1918)
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private (RFC 1918)
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes the limited broadcast 255.255.255.255
    )
)
_NON_PUBLIC_IPV6 = tuple(
    ipaddress.IPv6Network(network)
    for network in (
        "::/128",  # unspecified
        "::1/128",  # loopback
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b:1::/48",  # local-use NAT64: translates to whatever the site routes
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, includes Teredo
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing (SRv6) SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
# IPv6 forms that carry an IPv4 address, which is the real destination to judge.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST_IPV6 = ipaddress.IPv6Network("2000::/3")  # the only block allocated for it


class FetchError(Exception):
    """Any failure to fetch: refused destination, network error, HTTP status, too large, timeout,
    too many redirects. The message is for the server log and may name internal addresses."""


def is_public_address(address: IPAddress) -> bool:
    """Whether ``address`` is a public internet destination (IPv6 forms embedding IPv4 unwrapped)."""
    if address.version == 6:
        if any(address in network for network in _NON_PUBLIC_IPV6):
            return False
        embedded = _embedded_ipv4(address)
        if embedded is None:
            return address in _GLOBAL_UNICAST_IPV6 and address.is_global
        address = embedded
    # is_global is a second opinion: it can only refuse more than the table.
    return not any(address in network for network in _NON_PUBLIC_IPV4) and address.is_global


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def parse_domain_patterns(text: str) -> tuple[str, ...]:
    """``"a.com, *.Example.org"`` -> ``("a.com", "*.example.org")``; ValueError names a bad entry."""
    return tuple(_parse_pattern(entry.strip(), text) for entry in text.split(","))


def _parse_pattern(entry: str, text: str) -> str:
    if not entry:
        raise ValueError(f"empty entry in the domain list {text!r}")
    problem = ""
    if any(character.isspace() for character in entry):
        problem = "contains spaces"
    elif "://" in entry:
        problem = "has a scheme; give the host name alone"
    elif "/" in entry:
        problem = "has a path; give the host name alone"
    elif "*" in entry.removeprefix("*."):
        problem = "may use '*' only as a leading '*.'"
    if problem:
        raise ValueError(f"domain pattern {entry!r} {problem}")
    wildcard = entry.startswith("*.")
    try:
        host = _canonical_host(entry.removeprefix("*."))
    except ValueError:
        detail = "has a port" if ":" in entry else "is not a valid host name"
        raise ValueError(f"domain pattern {entry!r} {detail}") from None
    if wildcard and _ip_literal(host) is not None:
        raise ValueError(f"domain pattern {entry!r}: an IP address matches only itself, without '*.'")
    return "*." + host if wildcard else host


def domain_allowed(host: str, patterns: Sequence[str]) -> bool:
    """Whether ``host`` matches a pattern: the same name, or ``*.example.org`` for any name ending in
    ``.example.org`` (not ``example.org`` itself). An IP literal matches only the same literal."""
    try:
        host = _canonical_host(host)
    except ValueError:
        return False
    literal = _ip_literal(host) is not None
    for pattern in patterns:
        wildcard = pattern.startswith("*.")
        try:
            name = _canonical_host(pattern.removeprefix("*."))
        except ValueError:
            continue
        if (host == name and not wildcard) or (wildcard and not literal and host.endswith("." + name)):
            return True
    return False


def _canonical_host(host: str) -> str:
    """Lowercase, no trailing dot, IDNA-encoded, IP literals as ipaddress spells them; or ValueError."""
    host = host.removesuffix(".")
    literal = _ip_literal(host)
    if literal is not None:
        return str(literal)
    host = host.lower()
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    if not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError(f"invalid host name {host!r}")
    return host


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class _Hop:
    """One request of a fetch, from a URL that passed the checks that need no network."""

    url: str
    scheme: str
    host: str  # canonical, see _canonical_host
    port: int
    target: str  # path and query, as sent in the request line

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def fetch(
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    allow_private: bool = False,
    allowed_domains: Sequence[str] | None = None,
    max_redirects: int = 5,
    user_agent: str = "qwenvl",
) -> bytes:
    """GET ``url`` and return its body, following redirects; raise :class:`FetchError` otherwise.

    ``timeout`` bounds the whole fetch (every hop, connecting and reading); ``max_bytes`` the body.
    ``allow_private`` lets hosts resolve to any address; ``allowed_domains`` (None: any host) holds
    patterns for :func:`domain_allowed`, checked before the host name is resolved.
    """
    # The deadline cannot interrupt a DNS lookup; a slow one is caught at the next connect.
    deadline = time.monotonic() + timeout
    for _ in range(max_redirects + 1):
        hop = _check_url(url, allowed_domains)
        addresses = _resolve(hop, allow_private)
        try:
            location, body = _get(hop, addresses, deadline, max_bytes, user_agent)
        except TimeoutError as error:
            raise FetchError(f"fetching {hop.url!r} timed out (the fetch may take {timeout:g}s)") from error
        except (OSError, http.client.HTTPException) as error:
            raise FetchError(f"fetching {hop.url!r} failed: {type(error).__name__}: {error}") from error
        if location is None:
            return body
        url = urllib.parse.urljoin(url, location)
    raise FetchError(f"more than {max_redirects} redirects, the last to {url!r}")


def _check_url(url: str, allowed_domains: Sequence[str] | None) -> _Hop:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:
        raise FetchError(f"invalid URL {url!r}: {error}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise FetchError(f"scheme {parts.scheme!r} of {url!r} is refused: only http and https are fetched")
    if "@" in parts.netloc:  # the URL is not repeated: it holds credentials
        raise FetchError(f"a URL with user information (host {parts.hostname!r}) is refused")
    try:
        host = _canonical_host(parts.hostname or "")
        port = parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
    except ValueError as error:
        raise FetchError(f"invalid host or port in {url!r}: {error}") from None
    if allowed_domains is not None and not domain_allowed(host, allowed_domains):
        raise FetchError(f"host {host!r} of {url!r} is not in the allowed domains")
    target = urllib.parse.quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        target += "?" + urllib.parse.quote(parts.query, safe=_TARGET_SAFE)
    return _Hop(url, parts.scheme, host, port, target)


def _resolve(hop: _Hop, allow_private: bool) -> list[IPAddress]:
    """The host's addresses, resolved once; refused if any one of them is not public."""
    try:
        answers = socket.getaddrinfo(hop.host, hop.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise FetchError(f"cannot resolve {hop.host!r} of {hop.url!r}: {error}") from None
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in answers:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = ipaddress.ip_address(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise FetchError(f"{hop.host!r} of {hop.url!r} has no IP address")
    refused = [str(address) for address in addresses if not is_public_address(address)]
    if refused and not allow_private:
        # One private answer refuses the host, whichever address a connection would have used.
        raise FetchError(f"{hop.host!r} of {hop.url!r} resolves to non-public {', '.join(refused)}")
    return addresses


def _get(
    hop: _Hop, addresses: list[IPAddress], deadline: float, max_bytes: int, user_agent: str
) -> tuple[str | None, bytes]:
    """One GET: ``(location, b"")`` for a redirect, else ``(None, body)``."""
    sock = _connect(hop, addresses, deadline)
    try:
        connection = _OpenedConnection(_DeadlineSocket(sock, deadline), hop)
        headers = {"Host": hop.host_header, "User-Agent": user_agent, "Connection": "close"}
        connection.request("GET", hop.target, headers=headers)
        response = connection.getresponse()
        if response.status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise FetchError(f"HTTP {response.status} without a Location from {hop.url!r}")
            return location, b""
        if not 200 <= response.status < 300:
            raise FetchError(f"HTTP {response.status} {response.reason} from {hop.url!r}")
        return None, _read_body(response, hop, max_bytes)
    finally:
        sock.close()


def _connect(hop: _Hop, addresses: list[IPAddress], deadline: float) -> socket.socket:
    """A socket to the first checked address that accepts, with TLS for https."""
    errors = []
    for address in addresses:
        try:
            sock = socket.create_connection((str(address), hop.port), timeout=_time_left(deadline))
            break
        except TimeoutError:  # the socket timeout is the time left: there is none for the next one
            raise
        except OSError as error:
            errors.append(f"{address}: {error}")
    else:
        raise FetchError(f"cannot connect to {hop.host!r} port {hop.port} ({'; '.join(errors)})")
    if hop.scheme == "http":
        return sock
    try:
        sock.settimeout(_time_left(deadline))
        return ssl.create_default_context().wrap_socket(sock, server_hostname=hop.host)
    except BaseException:
        sock.close()
        raise


def _read_body(response: http.client.HTTPResponse, hop: _Hop, max_bytes: int) -> bytes:
    too_large = f"body of {hop.url!r} is larger than max_bytes={max_bytes}"
    if response.length is not None and response.length > max_bytes:  # the declared Content-Length
        raise FetchError(f"{too_large} (Content-Length {response.length})")
    chunks = []
    received = 0
    while received <= max_bytes:
        chunk = response.read1(max_bytes + 1 - received)
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
    if received > max_bytes:
        raise FetchError(too_large)
    return b"".join(chunks)


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the fetch's deadline has passed")
    return left


class _DeadlineSocket(io.RawIOBase):
    """A connected socket as http.client uses it (sendall, makefile, close), where no send or read
    waits past the deadline: a server that trickles bytes, headers included, is cut off there.

    close() leaves the real socket open: http.client closes the connection once the headers say
    ``Connection: close``, with the body still to be read; the caller closes the socket.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_time_left(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # the signature is io.RawIOBase's
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        pass


class _OpenedConnection(http.client.HTTPConnection):
    """http.client over a socket opened to a checked address; it never connects by itself."""

    def __init__(self, sock: _DeadlineSocket, hop: _Hop) -> None:
        super().__init__(hop.host, hop.port)
        self.sock = sock

    def connect(self) -> None:
        # http.client reconnects by host name when asked for a second request; we send one.
        raise http.client.NotConnected("the connection was already used")
