"""TOML configuration -> a frozen, validated :class:`Config`.

Every key has a default (docs/protocol.md section 9 and docs/operator.md list them) and a
type; a bad file raises :class:`ConfigError` whose message is one line naming
the key, e.g. ``limits.clock_skew: expected an integer, got 'five'``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from meshrelay.fairness import parse_proxies
from meshrelay.peernet import parse_proxy, read_ca_file

MIN_SECRET_LEN = 16
#: secrets one peer link may hold at once (the signing one and those still accepted: a rotation)
MAX_PEER_SECRETS = 3
#: a key id (``[[peers]] secrets[].id``, sent as ``X-Peer-Key-Id``)
KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_peer_secret() -> str:
    """A fresh random peer secret (256 bits, base64url)."""
    return secrets.token_urlsafe(32)


class ConfigError(Exception):
    """A configuration problem; ``str(e)`` is one line that names the key."""


def normalize_url(url: str) -> str:
    """Normalise a node URL as the protocol says (section 4).

    Lower-case scheme and host, drop the default port, strip a trailing ``/``,
    drop query and fragment.  Raises ``ValueError`` for a URL that is not
    ``http``/``https`` with a host.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port  # raises ValueError for a bad port
    default = 80 if scheme == "http" else 443
    netloc = host if port in (None, default) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"lo": lo, "hi": hi}


def _choice(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class NodeConfig:
    public_url: str = "http://127.0.0.1:8080"
    listen: str = "tcp:8080:interface=127.0.0.1"
    admin_listen: str = "tcp:9090:interface=127.0.0.1"
    data_dir: str = "./meshrelay-data"
    durability: str = field(default="normal", metadata=_choice("normal", "full"))
    access_log: bool = False
    log_format: str = field(default="text", metadata=_choice("text", "json"))
    #: seconds between expiry sweeps
    sweep_interval: int = field(default=60, metadata=_range(1, 86400))
    #: where Ed25519 signatures are verified off the reactor: a child process (its own
    #: interpreter lock) or worker threads of the node's process (``verify_threads``)
    verifier: str = field(default="process", metadata=_choice("process", "thread"))
    #: with ``verifier = "thread"``: worker threads that verify (0 = on the reactor)
    verify_threads: int = field(default=1, metadata=_range(0, 64))
    #: where SQLite writes (and deposit signature checks) run: a child process
    #: (uses a second core) or a thread of the node's process
    store_writer: str = field(default="process", metadata=_choice("process", "thread"))
    #: true when the public listener's connecting address says nothing about the client (the
    #: target of a Tor onion service): per-address limits then use the body's keys instead
    listen_address_means_nothing: bool = False
    #: extra Host names the admin listener answers to (a list, or comma-separated); loopback
    #: names and addresses and admin_listen's interface always are (DNS-rebinding guard)
    admin_hosts: str = field(default="", metadata={"list": True})
    #: the SOCKS5 proxy every peer is dialled through unless its [[peers]] entry names its own
    #: (``socks5h://host:port``, e.g. Tor's SocksPort ``socks5h://127.0.0.1:9050``); "" = direct
    peer_proxy: str = ""


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = field(default=8192, metadata=_range(1, 16 * 1024 * 1024))
    max_body_bytes: int = field(default=65536, metadata=_range(256, 64 * 1024 * 1024))
    max_replicate_body_bytes: int = field(default=65536, metadata=_range(256, 64 * 1024 * 1024))
    min_ttl: int = field(default=60, metadata=_range(1))
    max_ttl: int = field(default=259200, metadata=_range(1))
    clock_skew: int = field(default=300, metadata=_range(1, 86400))
    per_sender_pending: int = field(default=8, metadata=_range(1))
    per_mailbox_pending: int = field(default=256, metadata=_range(1))
    max_stored_bytes: int = field(default=1073741824, metadata=_range(1))
    #: protocol v3: mailboxes with a stored policy; a policy for one more is refused storage_full
    max_policies: int = field(default=1000000, metadata=_range(1))
    max_waiting_polls: int = field(default=10000, metadata=_range(0))
    #: bound on poll/peer nonces remembered in memory (each cache); when full the
    #: oldest are forgotten (the store's durable claim still refuses their replays)
    max_nonces: int = field(default=200000, metadata=_range(100))
    #: open connections on the public listener; more are closed at once
    max_connections: int = field(default=10240, metadata=_range(1))
    #: seconds a connection may sit idle between requests
    idle_timeout: int = field(default=60, metadata=_range(1, 3600))
    #: seconds from a request's first byte to its last (headers and body): slowloris guard
    read_timeout: int = field(default=20, metadata=_range(1, 3600))
    #: client API requests per second per client IP (0 = unlimited), and the burst allowed
    client_rate: int = field(default=100, metadata=_range(0))
    client_burst: int = field(default=200, metadata=_range(1))
    #: peer API requests per second per authenticated peer (0 = unlimited), and the burst
    peer_rate: int = field(default=1000, metadata=_range(0))
    peer_burst: int = field(default=2000, metadata=_range(1))
    #: comma-separated addresses (or networks) of reverse proxies whose X-Forwarded-For names the client
    trusted_proxies: str = ""
    #: fair shares: one address (IPv4 /ipv4_prefix, IPv6 /ipv6_prefix) counts as one client
    ipv4_prefix: int = field(default=32, metadata=_range(8, 32))
    ipv6_prefix: int = field(default=64, metadata=_range(16, 128))
    #: open connections one address may hold on a listener (0 = no per-address cap)
    max_connections_per_address: int = field(default=64, metadata=_range(0))
    #: an address refused at that cap has its new connections dropped by the kernel (a socket
    #: filter on the listeners, Linux) until it holds half its cap or fewer: meshrelay.synblock
    drop_at_connection_cap: bool = True
    #: long-polls one address may have waiting (0 = no per-address cap)
    max_waiting_polls_per_address: int = field(default=32, metadata=_range(0))
    #: seconds a long-poll over its address's share is held before its 429 (at most its own
    #: ``wait``; 0 = answer at once): a client that re-sends such polls as soon as they are
    #: refused gets a few answers a minute per connection instead of hundreds a second
    over_share_hold: int = field(default=10, metadata=_range(0, 30))
    #: deposit body bytes per second per address (0 = unlimited), and the burst allowed
    deposit_bytes_rate: int = field(default=32768, metadata=_range(0))
    deposit_bytes_burst: int = field(default=262144, metadata=_range(256))
    #: mailbox-filtered changes requests (a peer's fetch_remote) per second per peer, and the
    #: burst: a budget of their own, so they cannot use up the one replication needs (0 = unlimited)
    peer_fetch_rate: int = field(default=50, metadata=_range(0))
    peer_fetch_burst: int = field(default=100, metadata=_range(1))


@dataclass(frozen=True)
class StoreConfig:
    backend: str = field(default="sqlite", metadata=_choice("sqlite", "postgresql"))
    dsn: str = ""
    dsn_file: str = ""


@dataclass(frozen=True)
class SyncConfig:
    interval: int = field(default=30, metadata=_range(1, 86400))
    push_timeout: int = field(default=10, metadata=_range(1, 3600))
    #: items waiting per peer before the queue is dropped (sync repairs)
    push_queue_max: int = field(default=10000, metadata=_range(1))
    #: bytes waiting per peer before the queue is dropped (sync repairs)
    push_queue_bytes: int = field(default=16 * 1024 * 1024, metadata=_range(65536, 1 << 30))
    #: concurrent push requests per peer
    push_inflight_max: int = field(default=4, metadata=_range(1, 256))
    #: milliseconds between the starts of two push requests to a peer that are not full batches
    push_linger_ms: int = field(default=0, metadata=_range(0, 1000))
    #: items per changes page requested by the puller (protocol max 500)
    page_limit: int = field(default=500, metadata=_range(1, 500))
    #: seconds a poll with fetch_remote waits for peers
    fetch_remote_timeout: int = field(default=2, metadata=_range(1, 30))
    #: remote fetches in flight at once; past it a fetch_remote poll is served from local data
    fetch_remote_max_concurrent: int = field(default=8, metadata=_range(1, 1024))
    #: seconds before the same mailbox is fetched from the peers again (polls in between use local data)
    fetch_remote_min_interval: int = field(default=5, metadata=_range(0, 3600))
    #: bytes of item bodies per changes/bodies page this node serves (the first item always goes)
    page_bytes: int = field(default=1048576, metadata=_range(65536, 16777216))
    #: replicas refused at a cap remembered in all, to be obtained again when space frees
    max_refused: int = field(default=100000, metadata=_range(0))


@dataclass(frozen=True)
class WebConfig:
    """What web pages get from the public listener: CORS on the client API, the browser inbox."""

    #: origins whose pages may call the client API: "*" (any), comma-separated origins, or "" (none)
    cors_origins: str = "*"
    #: a directory holding the built browser inbox (clients/web/dist), served at /inbox/; "" = off
    inbox_dir: str = ""


@dataclass(frozen=True)
class PeerSecret:
    """One secret of a peer link and its key id ("" for a link configured with a single ``secret``)."""

    id: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class PeerConfig:
    url: str
    #: the secret this node signs its requests to the peer with
    secret: str = field(default="", repr=False)
    connect: str = ""
    #: ``socks5h://host:port`` to dial this peer through; "none" = direct; "" = ``node.peer_proxy``
    proxy: str = ""
    #: a PEM file of the CA(s) this peer's TLS certificate must chain to (absolute); "" = system roots
    ca_file: str = ""
    #: the key id of ``secret`` ("" when the link has a single secret without an id)
    key_id: str = ""
    #: every secret accepted from the peer, the signing one first (``[[peers]] secrets``, a
    #: rotation); () means ``secret`` alone
    secrets: tuple[PeerSecret, ...] = field(default=(), repr=False)

    def accepted(self) -> tuple[PeerSecret, ...]:
        """The secrets a request from this peer may be signed with, the signing one first."""
        return self.secrets or (PeerSecret(self.key_id, self.secret),)


@dataclass(frozen=True)
class ListenerConfig:
    """A further public listener (client + peer API) besides ``node.listen``: ``[[listeners]]``."""

    endpoint: str
    #: true when the connecting address says nothing about the client (a Tor onion service's target)
    address_means_nothing: bool = False
    #: open connections on this listener (0 = limits.max_connections)
    max_connections: int = field(default=0, metadata=_range(0))


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    web: WebConfig = field(default_factory=WebConfig)
    peers: tuple[PeerConfig, ...] = ()
    #: public listeners besides node.listen
    listeners: tuple[ListenerConfig, ...] = ()
    #: the path the file was read from, or "" for the embedded defaults
    source: str = ""

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "limits": LimitsConfig,
    "store": StoreConfig,
    "sync": SyncConfig,
    "web": WebConfig,
}

#: command-line option -> (section, key)
CLI_OVERRIDES = {
    "listen": ("node", "listen"),
    "admin-listen": ("node", "admin_listen"),
    "data-dir": ("node", "data_dir"),
    "public-url": ("node", "public_url"),
}

_TYPE_NAMES = {int: "an integer", bool: "true or false", str: "a string"}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_value(where: str, f: dataclasses.Field[Any], value: Any) -> Any:
    want = {"int": int, "bool": bool, "str": str}[str(f.type)]
    if f.metadata.get("list") and isinstance(value, list):
        # A list of strings, kept as one comma-separated string.
        if not all(isinstance(v, str) and "," not in v for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {_describe(value)}")
        value = ",".join(v.strip() for v in value)
    if type(value) is not want:
        raise ConfigError(f"{where}: expected {_TYPE_NAMES[want]}, got {_describe(value)}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = " or ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{where}: expected {allowed}, got {_describe(value)}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: must be at most {hi}, got {value}")
    return value


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key")
        values[key] = _check_value(f"{name}.{key}", fields[key], value)
    return cls(**values)


def read_secret_file(where: str, path: str, base_dir: str) -> str:
    """A secret file's stripped text; refused, as ssh refuses a key, when group or others may access it."""
    full = os.path.join(base_dir, os.path.expanduser(path))
    try:
        with open(full, encoding="utf-8") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"{where}: {full} is accessible by group or others (mode {mode:04o}); "
                    f"make it private to the node's user: chmod 600 {full}"
                )
            return fh.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"{where}: cannot read {full}: {reason}") from None


def _peer_secret(where: str, raw: dict[str, Any], base_dir: str) -> tuple[str, str]:
    """``secret`` or ``secret_file`` of a table: (the secret, the key that gave it)."""
    if "secret" in raw and "secret_file" in raw:
        raise ConfigError(f"{where}.secret: give secret or secret_file, not both")
    if "secret" in raw:
        secret = raw["secret"]
        key = "secret"
    elif "secret_file" in raw:
        secret = read_secret_file(f"{where}.secret_file", raw["secret_file"], base_dir)
        key = "secret_file"
    else:
        raise ConfigError(f"{where}.secret: missing (give secret or secret_file)")
    if len(secret) < MIN_SECRET_LEN:
        raise ConfigError(f"{where}.{key}: the secret must be at least {MIN_SECRET_LEN} characters")
    return secret, key


def _build_secrets(where: str, raw: Any, base_dir: str) -> tuple[PeerSecret, ...]:
    """``[[peers]] secrets = [{id, secret | secret_file}, ...]``: 1 to MAX_PEER_SECRETS, the signing one first."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty array of tables ({{id = ..., secret_file = ...}})")
    if len(raw) > MAX_PEER_SECRETS:
        raise ConfigError(f"{where}: at most {MAX_PEER_SECRETS} secrets (the new one and those still accepted)")
    out: list[PeerSecret] = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: expected a table ({{id = ..., secret_file = ...}})")
        for key, value in item.items():
            if key not in ("id", "secret", "secret_file"):
                raise ConfigError(f"{at}.{key}: unknown key")
            if not isinstance(value, str):
                raise ConfigError(f"{at}.{key}: expected a string, got {_describe(value)}")
        key_id = item.get("id")
        if key_id is None:
            raise ConfigError(f'{at}.id: missing (a short name for this secret, e.g. "2026-12")')
        if KEY_ID_RE.fullmatch(key_id) is None:
            raise ConfigError(f"{at}.id: expected 1-64 characters of A-Z a-z 0-9 . _ -, got {_describe(key_id)}")
        if any(s.id == key_id for s in out):
            raise ConfigError(f"{at}.id: {key_id!r} is listed twice")
        secret, _ = _peer_secret(at, item, base_dir)
        out.append(PeerSecret(key_id, secret))
    return tuple(out)


def _build_peer(index: int, raw: Any, base_dir: str) -> PeerConfig:
    where = f"peers[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    allowed = {"url", "secret", "secret_file", "connect", "secrets", "proxy", "ca_file"}
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key")
        if key != "secrets" and not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: expected a string, got {_describe(value)}")
    if "url" not in raw:
        raise ConfigError(f"{where}.url: missing")
    try:
        url = normalize_url(raw["url"])
    except ValueError as e:
        raise ConfigError(f"{where}.url: {e}") from None
    connect = raw.get("connect", "")
    if connect:
        try:
            normalize_url(connect)
        except ValueError:
            raise ConfigError(f"{where}.connect: expected http(s)://host[:port], got {_describe(connect)}") from None
    proxy = raw.get("proxy", "")
    try:
        parse_proxy(proxy)
    except ValueError as e:
        raise ConfigError(f"{where}.proxy: {e}") from None
    ca_file = raw.get("ca_file", "")
    if ca_file:
        ca_file = os.path.abspath(os.path.join(base_dir, os.path.expanduser(ca_file)))
        try:
            read_ca_file(ca_file)
        except OSError as e:
            raise ConfigError(f"{where}.ca_file: cannot read {ca_file}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(f"{where}.ca_file: {e}") from None
    network = {"proxy": proxy.strip(), "ca_file": ca_file}
    if "secrets" in raw:
        if "secret" in raw or "secret_file" in raw:
            raise ConfigError(f"{where}.secrets: give secrets, or secret / secret_file, not both")
        accepted = _build_secrets(f"{where}.secrets", raw["secrets"], base_dir)
        first = accepted[0]
        return PeerConfig(url=url, secret=first.secret, connect=connect, key_id=first.id, secrets=accepted, **network)
    secret, _ = _peer_secret(where, raw, base_dir)
    return PeerConfig(url=url, secret=secret, connect=connect, **network)


def is_onion_endpoint(endpoint: str) -> bool:
    """True for txtorcon's ``onion:`` server endpoint string (a Tor onion service)."""
    return endpoint.strip().lower().startswith("onion:")


def _check_onion(where: str, endpoint: str, means_nothing_key: str, raw_means_nothing: Any) -> None:
    """An ``onion:`` listener names a running tor (``controlPort=``) and never says its address means something.

    Every client of an onion service arrives from tor's own address, so the per-address limits
    must use the request's keys; and without ``controlPort`` txtorcon launches a tor of its own
    the moment the string is parsed (even by ``check-config``).
    """
    options = endpoint.split(":")[1:]
    if not any(option.split("=", 1)[0] == "controlPort" for option in options):
        raise ConfigError(
            f"{where}: an onion: endpoint needs controlPort=PORT (a running tor's ControlPort, "
            "e.g. onion:80:controlPort=9051:localPort=8081); meshrelay does not launch tor"
        )
    if raw_means_nothing is False:
        raise ConfigError(
            f"{means_nothing_key}: must not be false for an onion: endpoint (every client "
            "arrives from tor's address); leave it out"
        )


def _build_listener(index: int, raw: Any) -> ListenerConfig:
    where = f"listeners[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(ListenerConfig)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key")
        values[key] = _check_value(f"{where}.{key}", fields[key], value)
    if "endpoint" not in values:
        raise ConfigError(f"{where}.endpoint: missing")
    if is_onion_endpoint(values["endpoint"]):
        _check_onion(
            f"{where}.endpoint",
            values["endpoint"],
            f"{where}.address_means_nothing",
            raw.get("address_means_nothing"),
        )
        values["address_means_nothing"] = True
    return ListenerConfig(**values)


def build_config(raw: dict[str, Any], source: str = "", base_dir: str = ".") -> Config:
    """Validate a parsed TOML document and return the :class:`Config`."""
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            sections[key] = _build_section(key, _SECTIONS[key], value)
        elif key == "peers":
            if not isinstance(value, list):
                raise ConfigError("peers: expected an array of tables ([[peers]])")
            sections["peers"] = tuple(_build_peer(i, p, base_dir) for i, p in enumerate(value))
        elif key == "listeners":
            if not isinstance(value, list):
                raise ConfigError("listeners: expected an array of tables ([[listeners]])")
            sections["listeners"] = tuple(_build_listener(i, v) for i, v in enumerate(value))
        else:
            raise ConfigError(f"{key}: unknown key")
    cfg = Config(source=source, **sections)
    if is_onion_endpoint(cfg.node.listen):
        raw_node = raw.get("node", {})
        _check_onion(
            "node.listen",
            cfg.node.listen,
            "node.listen_address_means_nothing",
            raw_node.get("listen_address_means_nothing"),
        )
        cfg = cfg.replace(node=dataclasses.replace(cfg.node, listen_address_means_nothing=True))
    return _cross_check(cfg, base_dir)


def _cross_check(cfg: Config, base_dir: str) -> Config:
    try:
        public_url = normalize_url(cfg.node.public_url)
    except ValueError as e:
        raise ConfigError(f"node.public_url: {e}") from None
    cfg = cfg.replace(node=dataclasses.replace(cfg.node, public_url=public_url))
    lim = cfg.limits
    if lim.min_ttl > lim.max_ttl:
        raise ConfigError(f"limits.min_ttl: must not exceed limits.max_ttl ({lim.max_ttl})")
    try:
        parse_proxies(lim.trusted_proxies)
    except ValueError as e:
        raise ConfigError(f"limits.trusted_proxies: {e}") from None
    if lim.deposit_bytes_rate and lim.deposit_bytes_burst < lim.max_body_bytes:
        raise ConfigError(
            f"limits.deposit_bytes_burst: must be at least limits.max_body_bytes ({lim.max_body_bytes}), "
            "or a deposit of that size could never pass"
        )
    try:
        parse_proxy(cfg.node.peer_proxy)
    except ValueError as e:
        raise ConfigError(f"node.peer_proxy: {e}") from None
    seen: set[str] = set()
    for i, peer in enumerate(cfg.peers):
        if peer.url == public_url:
            raise ConfigError(f"peers[{i}].url: is this node's own node.public_url")
        if peer.url in seen:
            raise ConfigError(f"peers[{i}].url: {peer.url} is listed twice")
        seen.add(peer.url)
    store = cfg.store
    if store.dsn and store.dsn_file:
        raise ConfigError("store.dsn: give dsn or dsn_file, not both")
    if store.dsn_file:
        dsn = read_secret_file("store.dsn_file", store.dsn_file, base_dir)
        cfg = cfg.replace(store=dataclasses.replace(store, dsn=dsn, dsn_file=""))
    if cfg.store.backend == "postgresql" and not cfg.store.dsn:
        raise ConfigError("store.dsn: required when store.backend is 'postgresql'")
    return _check_web(cfg, base_dir)


def _check_web(cfg: Config, base_dir: str) -> Config:
    """``[web]``: the origins parse; ``inbox_dir`` is a directory with an index.html (made absolute)."""
    from meshrelay.cors import CorsPolicy

    try:
        CorsPolicy(cfg.web.cors_origins)
    except ValueError as e:
        raise ConfigError(f"web.cors_origins: {e}") from None
    if not cfg.web.inbox_dir:
        return cfg
    path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(cfg.web.inbox_dir)))
    if not os.path.isfile(os.path.join(path, "index.html")):
        raise ConfigError(
            f"web.inbox_dir: no index.html in {path} (build the inbox: cd clients/web && npm ci && npm run build)"
        )
    return cfg.replace(web=dataclasses.replace(cfg.web, inbox_dir=path))


def load_config(path: str | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Read ``path`` (or the embedded defaults when None), apply CLI ``overrides``.

    ``overrides`` maps command-line option names (``listen``, ``data-dir``...)
    to values; they win over the file.
    """
    raw: dict[str, Any] = {}
    base_dir = "."
    if path:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(f"config: cannot read {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config: {path} is not UTF-8") from None
        base_dir = os.path.dirname(os.path.abspath(path))
    for option, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = CLI_OVERRIDES[option]
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        table[key] = value
    return build_config(raw, source=path or "", base_dir=base_dir)


def effective_values(cfg: Config) -> dict[str, Any]:
    """The config as plain data with secrets masked (for ``check-config`` and logs)."""
    out: dict[str, Any] = {}
    for name in _SECTIONS:
        out[name] = dataclasses.asdict(getattr(cfg, name))
    if out["store"].get("dsn"):
        out["store"]["dsn"] = "***"
    out["peers"] = [_masked_peer(p) for p in cfg.peers]
    if cfg.listeners:
        out["listeners"] = [dataclasses.asdict(listener) for listener in cfg.listeners]
    return out


def _masked_peer(peer: PeerConfig) -> dict[str, Any]:
    """A peer as plain data: each secret masked, with its key id."""
    out: dict[str, Any] = {"url": peer.url}
    if peer.secrets:
        out["secrets"] = [{"id": s.id, "secret": "***"} for s in peer.secrets]
    else:
        out["secret"] = "***"
    for key in ("connect", "proxy", "ca_file"):
        if getattr(peer, key):
            out[key] = getattr(peer, key)
    return out


@dataclass(frozen=True)
class ConfigChange:
    """One key that differs between two configs, as ``check-config --diff`` and a reload report it."""

    key: str
    #: display values, secrets masked ("(none)" when the key is absent on that side)
    old: str
    new: str
    #: True: a reload applies it; False: it needs a restart (a reload keeps the running value)
    live: bool


#: what a running node cannot change: a reload reports these and keeps the running values
RESTART_KEYS = frozenset(
    {
        "node.public_url",
        "node.listen",
        "node.admin_listen",
        "node.admin_hosts",
        "node.data_dir",
        "node.durability",
        "node.log_format",
        "node.verifier",
        "node.verify_threads",
        "node.store_writer",
        "node.listen_address_means_nothing",
        "node.peer_proxy",
        "store.backend",
        "store.dsn",
        "store.dsn_file",
        "web.inbox_dir",
        "listeners",
    }
)

_NONE = "(none)"


def _secret_tag(secret: str, salt: bytes) -> str:
    """A stand-in for comparing secrets without showing them: HMAC-SHA256 under a caller's salt."""
    if not secret:
        return ""
    return hmac.new(b"meshrelay-config-diff\n" + salt, secret.encode("utf-8"), hashlib.sha256).hexdigest()


def flat_values(cfg: Config, salt: bytes = b"") -> dict[str, tuple[Any, str]]:
    """key -> (comparable value, display text with secrets masked), JSON-shaped.

    Secrets are compared through :func:`_secret_tag` under ``salt``: two sides
    compare equal only when both used the same salt (``check-config
    --diff-running`` sends a fresh one to the node).
    """
    out: dict[str, tuple[Any, str]] = {}
    for name, cls in _SECTIONS.items():
        section = getattr(cfg, name)
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            if name == "store" and f.name == "dsn":
                out[f"{name}.{f.name}"] = (_secret_tag(value, salt), "***" if value else '""')
            else:
                out[f"{name}.{f.name}"] = (value, _toml_value(value))
    for peer in cfg.peers:
        where = f"peers[{peer.url}]"
        out[where] = ("present", "present")
        for f in dataclasses.fields(PeerConfig):
            if f.name == "url":
                continue
            value = getattr(peer, f.name)
            if f.name == "secrets":
                shown = "[" + ", ".join(f"{s.id}=***" for s in value) + "]"
                out[f"{where}.{f.name}"] = ([[s.id, _secret_tag(s.secret, salt)] for s in value], shown)
            elif not f.repr:
                # A secret (repr=False): compared through its tag, never shown.
                out[f"{where}.{f.name}"] = (_secret_tag(str(value), salt), "***")
            else:
                out[f"{where}.{f.name}"] = (value, _toml_value(value))
    listeners = [dataclasses.asdict(x) for x in cfg.listeners]
    out["listeners"] = (listeners, _toml_value(listeners) if listeners else "[]")
    # JSON-shaped (tuples as lists), so a side that went through JSON compares equal.
    return {k: (json.loads(json.dumps(v)), text) for k, (v, text) in out.items()}


def diff_configs(old: Config, new: Config) -> list[ConfigChange]:
    """What changes from ``old`` to ``new``, key by key, secrets masked, each marked live or restart."""
    return diff_flat(flat_values(old), flat_values(new))


def diff_flat(a: dict[str, Any], b: dict[str, Any]) -> list[ConfigChange]:
    """What changes from ``a`` to ``b`` (two :func:`flat_values`).

    A peer added or removed is one change ``peers[URL]``; a peer in both is compared key by key.
    """
    changes: list[ConfigChange] = []
    gone_peers = {k for k in a if k.startswith("peers[") and k.endswith("]") and k not in b}
    new_peers = {k for k in b if k.startswith("peers[") and k.endswith("]") and k not in a}
    for key in list(a) + [k for k in b if k not in a]:
        if any(key.startswith(p + ".") for p in gone_peers | new_peers):
            continue
        if key in gone_peers:
            changes.append(ConfigChange(key, "present", "removed", True))
            continue
        if key in new_peers:
            changes.append(ConfigChange(key, _NONE, "added", True))
            continue
        va, vb = a.get(key), b.get(key)
        if va is not None and vb is not None and list(va)[0] == list(vb)[0]:
            continue
        old_text = va[1] if va is not None else _NONE
        new_text = vb[1] if vb is not None else _NONE
        if old_text == new_text == "***":
            new_text = "*** (changed)"
        changes.append(ConfigChange(key, old_text, new_text, key not in RESTART_KEYS))
    return changes


def keep_restart_values(running: Config, new: Config) -> Config:
    """``new`` with the running values of every :data:`RESTART_KEYS` key (what a reload applies)."""
    node = dataclasses.replace(
        new.node,
        **{
            k.split(".", 1)[1]: getattr(running.node, k.split(".", 1)[1]) for k in RESTART_KEYS if k.startswith("node.")
        },
    )
    web = dataclasses.replace(new.web, inbox_dir=running.web.inbox_dir)
    return new.replace(node=node, store=running.store, web=web, listeners=running.listeners)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


#: the arrays of tables of a config
_ARRAYS = ("peers", "listeners")


def to_toml(raw: dict[str, Any]) -> str:
    """Write a config-shaped dict (tables of scalars, plus ``peers``/``listeners`` arrays of tables) as TOML."""
    lines: list[str] = []
    for section, table in raw.items():
        if section in _ARRAYS:
            continue
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    for section in _ARRAYS:
        for item in raw.get(section, ()):
            lines.append(f"[[{section}]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
            lines.append("")
    return "\n".join(lines)
