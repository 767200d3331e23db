"""Addresses at their connection cap: their new connections are dropped by the kernel, not refused.

A connection over ``limits.max_connections_per_address`` is accepted and
closed at once (:class:`meshrelay.web.MeshSite`).  That costs the node about
65-100 us of CPU each, half of it or more in the kernel (accept, close, the FIN
exchange), and a client that reconnects the moment it is closed makes the
node do it hundreds of times a second (issue 10's ``idle`` attacker: about 350
refusals a second per node).  So once an address's share key has been refused
for being at its cap, the listening sockets get a classic BPF socket filter
(``SO_ATTACH_FILTER``) that drops the packets of that network before the
kernel answers them: its new connections are never accepted (its client's SYN
is retried by its own kernel after 1, 2, 4... seconds), and they cost the node
nothing.  When that key holds half its cap or fewer connections again, it is
taken out of the filter and its next connections are accepted as before (not
at the first close: the SYNs its client had waiting would then all complete
at once and be refused in one burst, each time one of its connections ended).
Connections already open, from that address or any other, are not touched: a
filter applies to the listening socket, and the sockets it accepts only drop
packets from networks that were blocked when they were accepted (never their
own peer's, which was not).

Bounded: at most :data:`MAX_BLOCKED` networks (past that, connections are
refused as before), IPv6 networks only down to /64 (a longer prefix is refused
as before).  Linux only: where the option does not exist or is refused, the
node refuses connections exactly as before and says so once in its log.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

#: Linux's SOL_SOCKET options (asm-generic/socket.h); Python's socket module does not name them
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
#: classic BPF: loads at this negative offset read the network (IP) header
SKF_NET_OFF = -0x100000
#: networks blocked at most (each costs 4-7 filter instructions; the kernel takes 4,096)
MAX_BLOCKED = 256

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_LD_B_ABS = 0x30
_ALU_RSH_K = 0x74
_ALU_AND_K = 0x54
_JMP_JA = 0x05
_JMP_JEQ_K = 0x15
_RET_K = 0x06
_TAX = 0x07
_TXA = 0x87

Insn = tuple[int, int, int, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _mask(prefix: int) -> int:
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0


def _word(value: int) -> int:
    """A constant as the 32-bit ``k`` of an instruction (negative offsets wrap)."""
    return value & 0xFFFFFFFF


def filter_program(networks: Iterable[Network]) -> list[Insn]:
    """A socket filter that drops packets from ``networks`` and keeps every other packet.

    IPv4 packets (also those a dual-stack IPv6 socket receives) are matched on
    their source address under each IPv4 network's mask; IPv6 packets on the
    first 64 bits of theirs, for IPv6 networks of /64 or shorter.  The
    version is read from the IP header, so one program serves both kinds of
    listener.
    """
    v4 = [n for n in networks if n.version == 4]
    v6 = [n for n in networks if n.version == 6 and n.prefixlen <= 64]
    keep: Insn = (_RET_K, 0, 0, 0xFFFFFFFF)
    drop: Insn = (_RET_K, 0, 0, 0)
    v4_code: list[Insn] = [(_LD_W_ABS, 0, 0, _word(SKF_NET_OFF + 12)), (_TAX, 0, 0, 0)]
    for n in v4:
        # A = source & mask; equal: the next instruction (drop); else skip it
        v4_code += [(_TXA, 0, 0, 0), (_ALU_AND_K, 0, 0, _mask(n.prefixlen))]
        v4_code += [(_JMP_JEQ_K, 0, 1, int(n.network_address) & _mask(n.prefixlen)), drop]
    v4_code.append(keep)
    v6_code: list[Insn] = []
    for net in v6:
        high = int(net.network_address) >> 64
        w0, w1 = high >> 32, high & 0xFFFFFFFF
        m0, m1 = _mask(min(32, net.prefixlen)), _mask(max(0, net.prefixlen - 32))
        v6_code += [(_LD_W_ABS, 0, 0, _word(SKF_NET_OFF + 8)), (_ALU_AND_K, 0, 0, m0)]
        v6_code += [(_JMP_JEQ_K, 0, 4, w0 & m0)]
        v6_code += [(_LD_W_ABS, 0, 0, _word(SKF_NET_OFF + 12)), (_ALU_AND_K, 0, 0, m1)]
        v6_code += [(_JMP_JEQ_K, 0, 1, w1 & m1), drop]
    v6_code.append(keep)
    head: list[Insn] = [
        (_LD_B_ABS, 0, 0, _word(SKF_NET_OFF)),  # the first byte of the IP header
        (_ALU_RSH_K, 0, 0, 4),  # its version
        (_JMP_JEQ_K, 1, 0, 4),  # IPv4: skip the jump to the IPv6 code
        (_JMP_JA, 0, 0, len(v4_code)),  # anything else: over the IPv4 code
    ]
    return head + v4_code + v6_code


def attach(sock: socket.socket, program: Sequence[Insn]) -> None:
    """Attach ``program`` to ``sock`` (replacing any filter it had); raises OSError where refused."""
    if not sys.platform.startswith("linux"):
        raise OSError("socket filters are a Linux feature")
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    """Take ``sock``'s filter off (nothing when it had none)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass


def parse_key(key: str) -> Network | None:
    """The network of a share key (``meshrelay.fairness``: ``192.0.2.7/32``, ``2001:db8::/64``), or None."""
    try:
        net = ipaddress.ip_network(key, strict=False)
    except ValueError:
        return None
    if net.version == 6 and net.prefixlen > 64:
        return None
    return net


class SynBlock:
    """The share keys of one site whose new connections its listening sockets drop.

    ``sockets()`` gives the site's listening sockets (looked up when the
    filter changes); ``gauge`` (optional) is set to the number of keys blocked;
    ``failed(reason)`` is called once if the kernel refuses the filter, after
    which nothing more is tried.
    """

    def __init__(
        self,
        sockets: Callable[[], list[socket.socket]],
        gauge: Any = None,
        failed: Callable[[str], None] | None = None,
        enabled: bool = True,
    ) -> None:
        self.sockets = sockets
        self.gauge = gauge
        self.failed = failed
        #: the operator's choice (limits.drop_at_connection_cap)
        self.enabled = enabled
        #: the kernel refused a filter once: nothing more is tried
        self.broken = False
        #: key -> its network, in the order blocked
        self.blocked: dict[str, Network] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.blocked

    def block(self, key: str) -> bool:
        """Drop ``key``'s new connections from now on; False when it cannot be (bounds, no support)."""
        if not self.enabled or self.broken or key in self.blocked or len(self.blocked) >= MAX_BLOCKED:
            return False
        net = parse_key(key)
        if net is None:
            return False
        self.blocked[key] = net
        if not self._install():
            self.blocked.pop(key, None)
            return False
        return True

    def unblock(self, key: str) -> None:
        """Accept ``key``'s connections again."""
        if self.blocked.pop(key, None) is not None:
            self._install()

    def clear(self) -> None:
        """Unblock every key (a reload changed the caps)."""
        if self.blocked:
            self.blocked.clear()
            self._install()

    def _install(self) -> bool:
        program = filter_program(self.blocked.values()) if self.blocked else None
        try:
            for sock in self.sockets():
                if program is None:
                    detach(sock)
                else:
                    attach(sock, program)
        except OSError as e:
            self.broken = True
            self.blocked.clear()
            for sock in self.sockets():
                detach(sock)
            if self.failed is not None:
                self.failed(str(e))
            return False
        finally:
            if self.gauge is not None:
                self.gauge.set(len(self.blocked))
        return True


def listening_sockets(reactor: Any, factory: Any) -> list[socket.socket]:
    """The sockets of the TCP (or TLS) ports ``reactor`` reads for ``factory``: its listeners.

    None on a test clock, which reads nothing.
    """
    readers = getattr(reactor, "getReaders", None)
    out: list[socket.socket] = []
    if readers is None:
        return out
    for reader in readers():
        sock = getattr(reader, "socket", None)
        owner = getattr(reader, "factory", None)
        # a TLS listener's port holds the TLS factory, which wraps the site
        if factory in (owner, getattr(owner, "wrappedFactory", None)) and isinstance(sock, socket.socket):
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                out.append(sock)
    return out
