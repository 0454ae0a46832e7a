"""One delivery attempt: the signed POST, to an address checked before it is connected to.

The URL's host is resolved here, at each attempt, and the connection goes to one of the
addresses that passed the check (the IP is pinned), while the Host header, TLS SNI and
certificate verification keep using the URL's host name. A name that resolves to a
forbidden address is refused however its text looks, and a DNS answer that changes
between the check and the connection cannot slip past it: there is no second lookup.
Redirects are not followed (a 3xx is a failure), so a receiver cannot send a delivery
elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Segments-Signature"
USER_AGENT = "Segments-Webhooks/1"
# Enough of a failed response's body to say what went wrong.
ERROR_BODY_BYTES = 200

Resolver = Callable[[str, int], Sequence[str]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The Segments-Signature header: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "t.body")>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to the same host (mapped, 6to4, Teredo)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return None


def address_problem(raw: str, allow_private: bool) -> str | None:
    """Why deliveries may not go to this IP address, or None. Link-local addresses (cloud
    metadata services live there), unspecified, multicast and reserved ones are always
    refused; loopback and private ones unless `allow_private`."""
    try:
        ip: IPAddress = ipaddress.ip_address(raw.split("%", 1)[0])
    except ValueError:
        return f"{raw} is not an IP address"
    inner = _embedded_ipv4(ip)
    if inner is not None:
        problem = address_problem(str(inner), allow_private)
        if problem is not None:
            return problem
    if ip.is_link_local:
        return f"{raw} is a link-local address"
    if ip.is_loopback:
        if allow_private:
            return None
        return f"{raw} is a loopback address (SEGMENTS_WEBHOOK_ALLOW_PRIVATE=1 allows it)"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return f"{raw} is not a unicast address"
    if allow_private:
        return None
    if not ip.is_global:
        return f"{raw} is a private address (SEGMENTS_WEBHOOK_ALLOW_PRIVATE=1 allows it)"
    return None


def literal_address(host: str) -> str | None:
    """The host of a URL when it is an IP address literal, else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[str]:
    """The addresses of `host`, in the resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


@dataclass(frozen=True)
class Outcome:
    """What an attempt came to: delivered (2xx), or why not."""

    delivered: bool
    error: str | None = None
    status: int | None = None


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a checked address; Host stays the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; Host, SNI and certificate verification use the URL's host."""

    def __init__(
        self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        try:
            self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class Sender:
    """Makes delivery attempts under one policy: private addresses or not, the timeout."""

    def __init__(
        self,
        allow_private: bool,
        timeout: float,
        resolver: Resolver = resolve,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.timeout = timeout
        self.resolver = resolver
        self.tls = tls or ssl.create_default_context()

    def post(self, url: str, secret: str, body: bytes) -> Outcome:
        """POST `body` to `url`, signed with `secret`; never raises for the receiver's sake."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "https"
        try:
            port = parts.port or (443 if secure else 80)
        except ValueError:
            return Outcome(False, "the URL's port is invalid")
        deadline = time.monotonic() + self.timeout
        try:
            addresses = list(self.resolver(host, port))
        except (OSError, UnicodeError) as exc:
            return Outcome(False, f"could not resolve {host}: {exc}")
        permitted = [a for a in addresses if address_problem(a, self.allow_private) is None]
        if not permitted:
            problems = "; ".join(address_problem(a, self.allow_private) or a for a in addresses[:3])
            return Outcome(False, f"refused: {host} resolves to no permitted address ({problems})")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        failure = Outcome(False, "no address could be connected to")
        for address in permitted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Outcome(False, f"timed out after {self.timeout:g} s")
            connection: http.client.HTTPConnection = (
                _PinnedHTTPS(host, port, address, remaining, self.tls)
                if secure
                else _PinnedHTTP(host, port, address, remaining)
            )
            try:
                return self._attempt(connection, path, secret, body, deadline)
            except ConnectionRefusedError:
                failure = Outcome(False, f"connection refused by {address}")
            except TimeoutError:
                return Outcome(False, f"timed out after {self.timeout:g} s")
            except (OSError, http.client.HTTPException) as exc:
                failure = Outcome(False, f"{type(exc).__name__}: {exc}"[:ERROR_BODY_BYTES])
            finally:
                connection.close()
        return failure

    def _attempt(
        self,
        connection: http.client.HTTPConnection,
        path: str,
        secret: str,
        body: bytes,
        deadline: float,
    ) -> Outcome:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: signature(secret, int(time.time()), body),
        }
        connection.request("POST", path, body=body, headers=headers)
        if connection.sock is not None:
            # The whole attempt has one limit, not one per socket operation.
            connection.sock.settimeout(max(0.001, deadline - time.monotonic()))
        response = connection.getresponse()
        if 200 <= response.status < 300:
            return Outcome(True, status=response.status)
        text = response.read(ERROR_BODY_BYTES).decode("utf-8", "replace").strip()
        reason = f"HTTP {response.status}" + (f": {text}" if text else "")
        return Outcome(False, reason[:ERROR_BODY_BYTES], response.status)
