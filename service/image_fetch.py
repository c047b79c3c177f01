"""Fetching an image URL without becoming a proxy into the server's own network.

With `LORAMUX_ALLOW_IMAGE_URLS` on, a client names a URL and the server fetches it from inside its
network: without care, `http://169.254.169.254/...` reads the cloud's metadata service and
`http://10.0.0.5:6379/` probes a private host (SSRF). So a fetch:

- resolves the host once and refuses unless every address is public (`is_public`: not loopback,
  private, link-local, shared, reserved, multicast or unspecified, IPv4-mapped, 6to4 and Teredo IPv6
  forms unwrapped first), and, with `LORAMUX_IMAGE_URL_HOSTS` set, unless the host is listed;
- connects to the address it checked (the URL is rewritten to the IP literal, with the original
  `Host` header and TLS server name), so a second DNS answer cannot point it elsewhere (rebinding);
- follows no redirects, runs under one total timeout (resolution, connection and body together),
  stops reading at the size limit, and waits for one of `LORAMUX_IMAGE_FETCH_CONCURRENCY` slots;
- fails with one message whatever went wrong, so a client learns nothing about the remote side
  (which hosts exist, answer, or what they answer); the reason goes to the server log.

A cancelled request (its client went away) cancels its fetch: everything here is awaited in the
request's own task.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

from service.errors import BadRequestError
from service.settings import Settings

log = logging.getLogger(__name__)

UNFETCHABLE = "the image URL could not be fetched (it must be a public http(s) URL answering 200 with an image)"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


class Refused(Exception):
    """Why a fetch was refused or failed: logged, never sent to the client."""


def is_public(address: Address) -> bool:
    """A globally routable unicast address, looking through the IPv6 forms that carry an IPv4 one."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if inner is not None:
            return is_public(inner)
    return address.is_global and not address.is_multicast


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`allowed` empty: any host; else an exact name, or `.example.com` for it and its subdomains."""
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    for entry in (a.lower().rstrip(".") for a in allowed):
        if host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:])):
            return True
    return False


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class ImageFetcher:
    """The one way the service fetches image URLs (one per process: it holds the concurrency slots)."""

    def __init__(self, settings: Settings, resolver: Resolver = system_resolver):
        self.settings = settings
        self.resolver = resolver
        self.slots = asyncio.Semaphore(settings.image_fetch_concurrency)

    async def fetch(self, url: str, param: str) -> bytes:
        try:
            async with asyncio.timeout(self.settings.image_fetch_timeout_s):
                async with self.slots:
                    return await self._fetch(url)
        except (Refused, TimeoutError, httpx.HTTPError, OSError, ValueError, UnicodeError) as exc:
            log.info("image URL refused: %s: %s", type(exc).__name__, exc)
            raise BadRequestError(UNFETCHABLE, param=param) from None

    async def _fetch(self, url: str) -> bytes:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise Refused(f"not an http(s) URL with a host: {parts.scheme!r}")
        if parts.username or parts.password:
            raise Refused("credentials in the URL")
        if not host_allowed(host, self.settings.image_url_hosts):
            raise Refused(f"host {host!r} is not in LORAMUX_IMAGE_URL_HOSTS")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = await self._checked_address(host, port)
        literal = f"[{address}]" if address.version == 6 else str(address)
        target = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
        headers = {"Host": parts.netloc.rpartition("@")[2], "Accept": "image/*"}
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        limit = self.settings.max_image_bytes
        async with (httpx.AsyncClient(timeout=self.settings.image_fetch_timeout_s, follow_redirects=False,
                                      trust_env=False) as client,
                    client.stream("GET", target, headers=headers, extensions=extensions) as response):
            if response.status_code != 200:
                raise Refused(f"HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise Refused(f"declared {declared} bytes, limit {limit}")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise Refused(f"more than {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

    async def _checked_address(self, host: str, port: int) -> Address:
        try:
            addresses = [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            try:
                answers = await self.resolver(host, port)
            except OSError as exc:
                raise Refused(f"cannot resolve {host!r}: {exc}") from None
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in answers]
        if not addresses:
            raise Refused(f"{host!r} has no address")
        if not self.settings.image_url_allow_private:
            private = [str(a) for a in addresses if not is_public(a)]
            if private:
                raise Refused(f"{host!r} resolves to non-public {', '.join(private)}")
        return addresses[0]
