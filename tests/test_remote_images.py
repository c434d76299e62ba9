"""remote_images.fetch: destinations refused before any connection, redirects checked hop by hop,
size and time limits, and the address and domain-pattern rules on their own.

Nothing here leaves the machine: a fake resolver answers every host name (numeric hosts go to the
real resolver in numeric-only mode, which never queries DNS), and every socket connect is recorded
and refused unless it goes to loopback.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qwenvl import remote_images
from qwenvl.remote_images import FetchError, domain_allowed, fetch, is_public_address, parse_domain_patterns

from .http_helpers import QuietHandler, start_http_server, stop_http_server

PNG = (Path(__file__).parent / "data" / "images" / "shapes.png").read_bytes()
# Loopback addresses the test servers listen on. The "public" one stands in for a host on the
# internet: the public_stand_in fixture makes is_public_address accept exactly that address.
PRIVATE_HOST = "127.0.0.1"
PUBLIC_HOST = "127.0.0.2"
LIMITS = {"timeout": 5, "max_bytes": 10**6}  # what a fetch here may take: far more than the PNG needs

_REAL_GETADDRINFO = socket.getaddrinfo
_REAL_CONNECT = socket.socket.connect

NAMES: dict[str, list[str]] = {
    "localhost": ["127.0.0.1", "::1"],
    "metadata.example": ["169.254.169.254"],
    "internal.example": ["10.0.0.5"],
    "internal6.example": ["fd00::5"],
    "mixed.example": ["8.8.8.8", "10.0.0.5"],  # one public answer, one private
    "xn--bcher-kva.example": ["10.0.0.6"],  # bücher.example
    "two.example": ["8.8.8.8", PUBLIC_HOST],  # the first refuses connections (see FakeNetwork)
    "images.example": [PUBLIC_HOST],
    "cdn.images.example": [PUBLIC_HOST],
    "a.b.images.example": [PUBLIC_HOST],
    "other.example": [PUBLIC_HOST],
}


@dataclass
class FakeNetwork:
    """A resolver that knows only NAMES (plus what a test adds), and a record of every connect."""

    names: dict[str, list[str] | Callable[[], list[str]]] = field(default_factory=lambda: dict(NAMES))
    lookups: list[str] = field(default_factory=list)
    connections: list[tuple[str, int]] = field(default_factory=list)

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        self.lookups.append(host)
        answer = self.names.get(host)
        if answer is None:
            try:
                return _REAL_GETADDRINFO(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            except socket.gaierror:
                raise socket.gaierror(socket.EAI_NONAME, f"the fake resolver does not know {host}") from None
        addresses = answer() if callable(answer) else answer
        return [_address_info(address, port) for address in addresses]

    def connect(self, sock: socket.socket, address: tuple) -> None:
        self.connections.append((address[0], address[1]))
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise ConnectionRefusedError(f"test: connections to {address[0]} are refused")
        _REAL_CONNECT(sock, address)


def _address_info(address: str, port: int) -> tuple:
    if ipaddress.ip_address(address).version == 4:
        return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
    return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0))


@pytest.fixture(autouse=True)
def network(monkeypatch) -> FakeNetwork:
    fake = FakeNetwork()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: fake.connect(sock, address))
    return fake


@pytest.fixture
def public_stand_in(monkeypatch) -> None:
    stand_in = ipaddress.ip_address(PUBLIC_HOST)
    real = remote_images.is_public_address
    monkeypatch.setattr(
        remote_images, "is_public_address", lambda address: address == stand_in or real(address)
    )


# --- test servers ------------------------------------------------------------------------------


class _Handler(QuietHandler):
    def do_GET(self) -> None:  # the name is fixed by http.server
        self.server.requests.append(self.path)
        path, _, query = self.path.partition("?")
        arguments = dict(urllib.parse.parse_qsl(query))
        if path == "/image.png":
            self.send(200, PNG)
        elif path == "/host":
            self.send(200, self.headers["Host"].encode())
        elif path == "/slow.png":  # nothing at all for 3 s
            time.sleep(3)
            self.send(200, PNG)
        elif path == "/stalled-body.png":  # headers and part of the body, then nothing for 3 s
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG[:100])
            self.wfile.flush()
            time.sleep(3)
        elif path == "/unsized.png":  # no Content-Length: the client can only stop at its own limit
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PNG)
        elif path == "/huge.png":  # claims a gigabyte, sends a few bytes, then waits
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            time.sleep(3)
        elif path == "/trickle.png":  # one byte every 0.1 s for 6 s
            self.send_response(200)
            self.end_headers()
            for _ in range(60):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/redirect":
            self.send_response(int(arguments.get("status", 302)))
            self.send_header("Location", arguments["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/redirect-nowhere":
            self.send(302, b"")
        elif path.startswith("/chain/"):  # /chain/N takes N redirects to reach the image
            left = int(path.removeprefix("/chain/"))
            if left == 0:
                self.send(200, PNG)
            else:
                self.send_response(302)
                self.send_header("Location", f"/chain/{left - 1}")
                self.send_header("Content-Length", "0")
                self.end_headers()
        else:
            self.send(404, b"not found")


@dataclass
class Server:
    host: str
    port: int
    requests: list[str]

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


def _serve(host: str) -> Iterator[Server]:
    try:
        httpd = start_http_server(_Handler, host)
    except OSError as error:  # only Linux routes all of 127.0.0.0/8 to loopback
        pytest.skip(f"cannot listen on {host}: {error}")
    httpd.requests = []
    yield Server(host, httpd.server_address[1], httpd.requests)
    stop_http_server(httpd)


@pytest.fixture(scope="module")
def private_server() -> Iterator[Server]:
    yield from _serve(PRIVATE_HOST)


@pytest.fixture(scope="module")
def public_server() -> Iterator[Server]:
    yield from _serve(PUBLIC_HOST)


def refused(url: str, reason: str, **options) -> FetchError:
    options = {**LIMITS, **options}
    with pytest.raises(FetchError) as caught:
        fetch(url, **options)
    assert reason in str(caught.value)
    return caught.value


# --- refused before any connection -------------------------------------------------------------


LOOPBACK_SPELLINGS = [
    "http://127.0.0.1/",
    "http://127.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://017700000001/",
    "http://0.0.0.0/",
    "http://localhost/",
    "http://LOCALHOST./",
    "http://[::1]/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
]


PRIVATE_DESTINATIONS = [
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://172.31.255.254/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://metadata.example/latest/meta-data/",
    "http://internal.example/",
    "http://internal6.example/",
    "http://mixed.example/",  # refused although one answer is public
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://[fec0::1]/",
    "http://[fd00:ec2::254]/",  # the IPv6 cloud metadata address
    # IPv6 forms that embed a private IPv4 address
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::10.0.0.1]/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[64:ff9b:1::808:808]/",
]


@pytest.mark.parametrize("url", LOOPBACK_SPELLINGS + PRIVATE_DESTINATIONS)
def test_loopback_and_private_destinations_are_refused_before_connecting(url, network):
    refused(url, "non-public")
    assert network.connections == []


def test_the_loopback_server_itself_is_refused_by_default(private_server, network):
    before = len(private_server.requests)
    refused(private_server.url("/image.png"), "non-public")
    assert network.connections == [] and len(private_server.requests) == before


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/a.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "data:image/png;base64,AA==",
        "x",
    ],
)
def test_only_http_and_https_are_fetched(url, network):
    refused(url, "only http and https")
    assert network.connections == [] and network.lookups == []


@pytest.mark.parametrize("url", ["http://user:secret@images.example/", "http://user@images.example/"])
def test_user_information_is_refused(url, network):
    error = refused(url, "user information", allow_private=True)
    assert "secret" not in str(error)  # the log does not get the credentials
    assert network.connections == [] and network.lookups == []


@pytest.mark.parametrize("url", ["http:///a.png", "http://exa%6dple.com/", "http://a..b/", "http://h:99999/"])
def test_malformed_hosts_are_refused(url, network):
    refused(url, "invalid host or port")
    assert network.connections == [] and network.lookups == []


def test_dns_rebinding_finds_no_second_lookup(private_server, network):
    # The first answer is public; any later one would be the loopback server.
    answers = iter([["8.8.8.8"]])
    network.names["rebind.example"] = lambda: next(answers, [PRIVATE_HOST])
    before = len(private_server.requests)
    refused(f"http://rebind.example:{private_server.port}/image.png", "cannot connect")
    assert network.lookups.count("rebind.example") == 1
    # The one attempt went to the checked address, which the test network refuses.
    assert network.connections == [("8.8.8.8", private_server.port)]
    assert len(private_server.requests) == before


def test_next_checked_address_is_tried_after_a_connection_error(public_server, public_stand_in, network):
    assert fetch(f"http://two.example:{public_server.port}/image.png", **LIMITS) == PNG
    assert network.connections == [("8.8.8.8", public_server.port), (PUBLIC_HOST, public_server.port)]
    assert network.lookups.count("two.example") == 1


def test_idna_host_is_encoded_before_lookup(network):
    refused("http://BÜCHER.example/", "non-public")
    assert "xn--bcher-kva.example" in network.lookups and network.connections == []


# --- allowed domains ---------------------------------------------------------------------------


def test_allowed_domains_exact_and_wildcard(public_server, public_stand_in):
    port = public_server.port
    assert (
        fetch(f"http://images.example:{port}/image.png", allowed_domains=["Images.Example"], **LIMITS) == PNG
    )
    for host in ("cdn.images.example", "a.b.images.example"):
        assert fetch(f"http://{host}:{port}/image.png", allowed_domains=["*.images.example"], **LIMITS) == PNG


@pytest.mark.parametrize(
    ("host", "patterns"),
    [
        ("cdn.images.example", ["images.example"]),
        ("images.example", ["*.images.example"]),  # the wildcard does not match the bare domain
        ("other.example", ["*.images.example", "images.example"]),
        ("metadata.example", []),
    ],
)
def test_hosts_outside_the_allowed_domains_are_refused_before_lookup(
    host, patterns, public_stand_in, network
):
    refused(f"http://{host}/image.png", "not in the allowed domains", allowed_domains=patterns)
    assert network.lookups == [] and network.connections == []


def test_ip_literal_host_needs_the_identical_literal_pattern(private_server, network):
    url = private_server.url("/image.png")
    refused(url, "not in the allowed domains", allowed_domains=["*.0.0.1", "localhost"], allow_private=True)
    assert network.connections == []
    assert fetch(url, **LIMITS, allow_private=True, allowed_domains=["127.0.0.1"]) == PNG


def test_redirect_out_of_the_allowed_domains_is_refused_before_lookup(
    public_server, public_stand_in, network
):
    target = f"http://other.example:{public_server.port}/image.png"
    url = f"http://cdn.images.example:{public_server.port}/redirect?to={urllib.parse.quote(target)}"
    refused(url, "not in the allowed domains", allowed_domains=["*.images.example"])
    assert "other.example" not in network.lookups
    assert network.connections == [(PUBLIC_HOST, public_server.port)]


def test_domain_allowed():
    assert domain_allowed("Example.COM.", ["example.com"])
    assert domain_allowed("a.b.example.org", ["*.example.org"])
    assert not domain_allowed("example.org", ["*.example.org"])
    assert not domain_allowed("notexample.org", ["*.example.org"])
    assert not domain_allowed("example.org.evil.com", ["example.org", "*.example.org"])
    assert domain_allowed("xn--bcher-kva.example", parse_domain_patterns("bücher.example"))
    assert domain_allowed("::1", ["[::1]"]) and domain_allowed("127.0.0.1", ["127.0.0.1"])
    assert not domain_allowed("127.0.0.1", ["*.0.0.1"])
    assert not domain_allowed("anything.com", [])


def test_parse_domain_patterns():
    assert parse_domain_patterns("a.com, *.example.org") == ("a.com", "*.example.org")
    assert parse_domain_patterns(" A.Com. ,bücher.example,[::1]") == ("a.com", "xn--bcher-kva.example", "::1")


@pytest.mark.parametrize(
    ("text", "culprit", "reason"),
    [
        ("", "''", "empty entry"),
        ("a.com,,b.com", "'a.com,,b.com'", "empty entry"),
        ("a.com, b .com", "'b .com'", "spaces"),
        ("*", "'*'", "'*' only as a leading '*.'"),
        ("*example.org", "'*example.org'", "'*' only"),
        ("a.*.org", "'a.*.org'", "'*' only"),
        ("*.*.org", "'*.*.org'", "'*' only"),
        ("https://a.com", "'https://a.com'", "scheme"),
        ("a.com:8080", "'a.com:8080'", "port"),
        ("a.com/images", "'a.com/images'", "path"),
        ("a.com, bad!name", "'bad!name'", "not a valid host name"),
    ],
)
def test_parse_domain_patterns_names_the_bad_entry(text, culprit, reason):
    with pytest.raises(ValueError) as caught:
        parse_domain_patterns(text)
    assert culprit in str(caught.value) and reason in str(caught.value)


# --- redirects ---------------------------------------------------------------------------------


FORBIDDEN_REDIRECTS = [
    ("http://127.0.0.1:{private_port}/image.png", "non-public"),
    ("http://169.254.169.254/latest/meta-data/", "non-public"),
    ("http://10.0.0.1/", "non-public"),
    ("http://[::1]:{private_port}/image.png", "non-public"),
    ("http://localhost/", "non-public"),
    ("http://localhost:{private_port}/image.png", "non-public"),
    ("http://metadata.example/", "non-public"),
    ("ftp://127.0.0.2/secret.png", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("http://user:pw@127.0.0.2:{public_port}/image.png", "user information"),
]


@pytest.mark.parametrize(("target", "reason"), FORBIDDEN_REDIRECTS)
def test_redirects_to_forbidden_destinations_are_refused(
    target, reason, public_server, private_server, public_stand_in, network
):
    target = target.format(private_port=private_server.port, public_port=public_server.port)
    before = len(private_server.requests)
    refused(public_server.url(f"/redirect?to={urllib.parse.quote(target)}"), reason)
    assert network.connections == [(PUBLIC_HOST, public_server.port)]
    assert len(private_server.requests) == before


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_followed(status, public_server, public_stand_in, network):
    url = public_server.url(f"/redirect?status={status}&to=/image.png")
    assert fetch(url, **LIMITS) == PNG
    assert network.connections == [(PUBLIC_HOST, public_server.port)] * 2


@pytest.mark.parametrize("status", [301, 307, 308])
def test_every_redirect_status_is_checked(status, public_server, public_stand_in, network):
    url = public_server.url(f"/redirect?status={status}&to=http://10.0.0.1/")
    refused(url, "non-public")
    assert network.connections == [(PUBLIC_HOST, public_server.port)]


def test_redirect_chain_longer_than_max_redirects(public_server, public_stand_in, network):
    assert fetch(public_server.url("/chain/3"), **LIMITS, max_redirects=3) == PNG
    network.connections.clear()
    refused(public_server.url("/chain/4"), "more than 3 redirects", max_redirects=3)
    assert len(network.connections) == 4  # the first request and three redirects
    refused(public_server.url("/chain/1"), "more than 0 redirects", max_redirects=0)


def test_redirect_without_location(public_server, public_stand_in):
    refused(public_server.url("/redirect-nowhere"), "without a Location")


# --- fetching from a loopback server (allow_private) -------------------------------------------


def test_fetch_from_loopback_with_allow_private(private_server):
    assert fetch(private_server.url("/image.png"), **LIMITS, allow_private=True) == PNG
    url = f"http://localhost:{private_server.port}/image.png"
    assert fetch(url, **LIMITS, allow_private=True) == PNG


def test_host_header_names_the_host_not_the_address(public_server, public_stand_in, network):
    url = f"http://cdn.images.example:{public_server.port}/host"
    assert fetch(url, timeout=5, max_bytes=1000) == f"cdn.images.example:{public_server.port}".encode()
    assert network.connections == [(PUBLIC_HOST, public_server.port)]


def test_environment_proxies_are_not_used(private_server, monkeypatch, network):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://10.1.2.3:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert fetch(private_server.url("/image.png"), **LIMITS, allow_private=True) == PNG
    assert network.connections == [(PRIVATE_HOST, private_server.port)]


def test_https_verifies_the_certificate_against_the_host_name(public_server, public_stand_in, monkeypatch):
    names = []

    class RefusingContext:
        def wrap_socket(self, sock, server_hostname):
            names.append(server_hostname)
            raise ssl.SSLCertVerificationError("certificate verify failed (test)")

    monkeypatch.setattr(ssl, "create_default_context", RefusingContext)
    refused(f"https://cdn.images.example:{public_server.port}/image.png", "SSLCertVerificationError")
    assert names == ["cdn.images.example"]


def test_https_to_a_plain_http_server_fails(private_server):
    refused(f"https://127.0.0.1:{private_server.port}/image.png", "SSL", allow_private=True)


def test_http_error_status(private_server):
    refused(private_server.url("/missing.png"), "HTTP 404", allow_private=True)


def test_connection_refused():
    # A bound socket that does not listen: connecting to its port is refused, and no other
    # program can take the port while the test holds it.
    with socket.socket() as unused:
        unused.bind((PRIVATE_HOST, 0))
        url = f"http://{PRIVATE_HOST}:{unused.getsockname()[1]}/a.png"
        refused(url, "cannot connect", allow_private=True)


def test_byte_limit(private_server):
    small = {"allow_private": True, "max_bytes": len(PNG) - 1}
    refused(private_server.url("/image.png"), "Content-Length", **small)
    refused(private_server.url("/unsized.png"), "larger than max_bytes", **small)
    exact = {"timeout": 5, "max_bytes": len(PNG), "allow_private": True}
    assert fetch(private_server.url("/image.png"), **exact) == PNG
    assert fetch(private_server.url("/unsized.png"), **exact) == PNG


def test_declared_length_is_refused_before_reading(private_server):
    # Reading the body would wait for bytes that never come and end in a timeout instead.
    refused(private_server.url("/huge.png"), "Content-Length 1000000000", allow_private=True, timeout=2)


@pytest.mark.parametrize("path", ["/slow.png", "/stalled-body.png"])
def test_a_silent_server_times_out(path, private_server):
    # The server stays silent for 3 s; an error, not the image, shows the client gave up first.
    refused(private_server.url(path), "timed out", allow_private=True, timeout=0.3)


def test_a_trickling_server_is_cut_at_the_total_deadline(private_server):
    # Each byte comes within the per-read timeout, so only the total deadline stops the 6-second
    # trickle. The bound is half the trickle, far above the 0.5 s deadline even on a busy machine.
    started = time.monotonic()
    refused(private_server.url("/trickle.png"), "timed out", allow_private=True, timeout=0.5)
    assert time.monotonic() - started < 3


def test_redirect_to_ftp_from_a_loopback_server(private_server, network):
    target = urllib.parse.quote("ftp://127.0.0.1/secret.png")
    refused(private_server.url(f"/redirect?to={target}"), "only http and https", allow_private=True)
    assert network.connections == [(PRIVATE_HOST, private_server.port)]


# --- is_public_address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("0.0.0.0", False),
        ("0.1.2.3", False),
        ("10.1.2.3", False),
        ("100.64.0.1", False),
        ("100.127.255.254", False),
        ("127.0.0.1", False),
        ("127.255.255.254", False),
        ("169.254.169.254", False),
        ("172.16.0.1", False),
        ("172.31.255.255", False),
        ("192.0.0.8", False),
        ("192.0.2.1", False),
        ("192.88.99.1", False),
        ("192.168.0.1", False),
        ("198.18.0.1", False),
        ("198.19.255.255", False),
        ("198.51.100.1", False),
        ("203.0.113.1", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::ffff:0:a00:1", False),  # IPv4-translated
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::", False),  # 6to4 of 169.254.169.254
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b:1::808:808", False),  # local-use NAT64
        ("100::1", False),
        ("2001::1", False),  # Teredo, in the IETF protocol assignments
        ("2001:1ff::1", False),
        ("2001:db8::1", False),
        ("3fff::1", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("fe80::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("4000::1", False),  # outside 2000::/3, the only block allocated for global unicast
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public
