"""Who a request comes from, for fair shares: the address key, and the keys that replace it.

Every per-client limit (connections, request rate, deposit bytes, waiting
long-polls) is keyed by a *share key* rather than the raw address string:

- An IPv4 client counts as its ``/ipv4_prefix`` network (default ``/32``, the
  address itself), an IPv6 client as its ``/ipv6_prefix`` network (default
  ``/64``: one customer's LAN, which anyone given one address can fill with
  fresh addresses).  An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a
  dual-stack socket reports) counts as the IPv4 address.
- ``X-Forwarded-For`` is believed only on a connection from a trusted proxy
  (an address or network of ``limits.trusted_proxies``), read right to left:
  the trusted proxies are skipped, and the right-most hop that is not one of
  them is the client, if it parses as an IP address.  If it does not (junk,
  a port, an obfuscated name), nothing left of it can be believed either, and
  the request counts as coming from the hop that wrote it (a trusted proxy):
  junk cannot pick itself a fresh bucket.
- On a listener whose connecting address means nothing (the target of a Tor
  onion service: every client is 127.0.0.1), there is no address key at all
  (:meth:`AddressPolicy.key` answers None) and the callers fall back to keys
  that do mean something: the sender key and mailbox of a deposit, the mailbox
  of a poll or count, the listener's own cap for connections.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.web.iweb import IRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: connecting hosts whose share key an AddressPolicy remembers (a dict of short strings: under 1 MB)
HOST_KEYS = 4096


def parse_proxies(text: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.1, 192.168.0.0/16, ::1"`` -> networks; ``ValueError`` naming the first bad entry."""
    out: list[IPNetwork] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(out)


def parse_ip(text: str) -> IPAddress | None:
    """An IP address (IPv4-mapped IPv6 as IPv4, no zone id), or None when ``text`` is not one."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(int(ip))
    return ip


class AddressPolicy:
    """Turns a connecting address (and, behind a trusted proxy, ``X-Forwarded-For``) into a share key."""

    def __init__(
        self,
        trusted_proxies: str | tuple[IPNetwork, ...] = (),
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
        address_means_nothing: bool = False,
    ) -> None:
        self.proxies = parse_proxies(trusted_proxies) if isinstance(trusted_proxies, str) else trusted_proxies
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.address_means_nothing = address_means_nothing
        #: connecting host -> its share key, for requests without X-Forwarded-For, and for the
        #: connection cap (None: the cap does not apply): every request and connection needs its
        #: key, and parsing the address each time was a tenth of what the node spent on a refused
        #: request (issue 10's floods).  Bounded: each is emptied when it reaches HOST_KEYS.
        self._host_keys: dict[str, str] = {}
        self._connection_keys: dict[str, str | None] = {}

    def reconfigure(self, trusted_proxies: str, ipv4_prefix: int, ipv6_prefix: int) -> None:
        """A reloaded config's proxies and prefixes (whether the address means anything stays)."""
        self.proxies = parse_proxies(trusted_proxies)
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self._host_keys = {}
        self._connection_keys = {}

    def with_address_meaning_nothing(self, flag: bool) -> AddressPolicy:
        """The same policy for a listener whose connecting address does (not) mean anything."""
        return AddressPolicy(self.proxies, self.ipv4_prefix, self.ipv6_prefix, flag)

    def trusted(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.proxies)

    def network_key(self, ip: IPAddress) -> str:
        """The share key of one address: its network at the configured prefix, e.g. ``2001:db8:1:2::/64``."""
        prefix = self.ipv4_prefix if ip.version == 4 else self.ipv6_prefix
        return str(ipaddress.ip_network((ip, prefix), strict=False))

    def client(self, host: str, forwarded_for: bytes | None) -> IPAddress | str:
        """The client's address: the connecting host, or behind a trusted proxy the X-Forwarded-For hop.

        A host that is not an IP address (a UNIX socket, a test transport) is returned as it is.
        """
        ip = parse_ip(host)
        if ip is None:
            return host
        if not forwarded_for or not self.trusted(ip):
            return ip
        for hop in reversed(forwarded_for.decode("latin-1").split(",")):
            hop_ip = parse_ip(hop)
            if hop_ip is None:
                # Junk: not believed, nor anything left of it.  The request counts as the
                # hop that wrote the junk (a trusted proxy).
                return ip
            if not self.trusted(hop_ip):
                return hop_ip
            ip = hop_ip
        return ip

    def key(self, host: str, forwarded_for: bytes | None = None) -> str | None:
        """The share key of a request; None on a listener whose address means nothing."""
        if self.address_means_nothing:
            return None
        if not forwarded_for:
            key = self._host_keys.get(host)
            if key is None:
                if len(self._host_keys) >= HOST_KEYS:
                    self._host_keys = {}
                key = self._host_keys[host] = self._key(host, None)
            return key
        return self._key(host, forwarded_for)

    def _key(self, host: str, forwarded_for: bytes | None) -> str:
        client = self.client(host, forwarded_for)
        return client if isinstance(client, str) else self.network_key(client)

    def connection_key(self, addr: Any) -> str | None:
        """The share key for the per-address connection cap; None when the cap does not apply.

        It does not apply on a listener whose address means nothing, nor to a
        connection that has no IP address (a UNIX socket: a local reverse proxy,
        as a rule), nor to a trusted proxy (it carries many clients; its requests
        are counted per client).
        """
        if self.address_means_nothing:
            return None
        host = str(getattr(addr, "host", ""))
        if host in self._connection_keys:
            return self._connection_keys[host]
        if len(self._connection_keys) >= HOST_KEYS:
            self._connection_keys = {}
        ip = parse_ip(host)
        key = None if ip is None or self.trusted(ip) else self.network_key(ip)
        self._connection_keys[host] = key
        return key


def request_host(request: IRequest) -> str:
    addr = request.getClientAddress()
    return str(getattr(addr, "host", addr))


def request_key(request: IRequest, policy: AddressPolicy) -> str | None:
    """The share key of an HTTP request under ``policy`` (None: the address means nothing)."""
    if policy.address_means_nothing:
        return None
    return policy.key(request_host(request), request.getHeader(b"x-forwarded-for"))
