"""The ``meshrelay`` command: keys, end-to-end-encrypted messages, config checks, a local mesh.

::

    meshrelay keygen [--key FILE] [--force]
    meshrelay address [--key FILE]
    meshrelay send --node URL --to ADDRESS [--ttl S] [--permit TOKEN] [TEXT | -]
    meshrelay policy show --node URL [--mailbox ADDRESS] [--json]
    meshrelay policy set --node URL --mode open|stamps|contacts [--difficulty N] [--stranger-cap N]
                         [--epoch N | --revoke-permits] [--version N]
    meshrelay permit issue --for SENDER [--days N] [--epoch N | --node URL]
    meshrelay permit add TOKEN
    meshrelay permit list
    meshrelay poll --node URL [--wait S] [--ack] [--json]
    meshrelay watch --node URL
    meshrelay gen-secret [--out FILE]
    meshrelay check-config FILE [--diff OLD | --diff-running [--admin URL]]
    meshrelay backup (--data-dir DIR | --config FILE) OUT [--force] [--step-pages N] [--quick]
    meshrelay restore BACKUP (--data-dir DIR | --config FILE) [--force] [--quick]
    meshrelay restore BACKUP --check
    meshrelay restore --postgres (--config FILE | --dsn-file PATH)
    meshrelay demo-mesh [--dir DIR] [--base-port PORT]

Every user mistake (bad key file, unreachable node, a refusal by the node, a
bad address, a bad config) is one line on stderr and a non-zero exit code:
1 for errors, 2 for bad usage, 130 when interrupted.

Subcommands live in :data:`COMMANDS` (parsed here with argparse) and
:data:`RAW_COMMANDS` (handed their own argv, for tools with their own parser).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from meshrelay import __version__
from meshrelay import envelope as E
from meshrelay import policy as P
from meshrelay.client import (
    DEFAULT_TTL,
    ERROR_CLASSES,
    ClientError,
    Identity,
    MessageError,
    NodeClient,
    NodeUnreachable,
    check_permit_token,
    first_contact,
    parse_address,
)
from meshrelay.config import new_peer_secret
from meshrelay.files import PrivateFileError, write_private_file

#: exit codes
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: control characters other than tab and newline, shown escaped on a terminal
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def default_key_path() -> str:
    """``$MESHRELAY_KEY``, else ``$XDG_CONFIG_HOME/meshrelay/identity.key`` (``~/.config``)."""
    env = os.environ.get("MESHRELAY_KEY")
    if env:
        return env
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "meshrelay", "identity.key")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see: {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def _fail(message: str) -> int:
    _say(sys.stderr, f"meshrelay: {message}")
    return EXIT_ERROR


# --------------------------------------------------------------------------- keys


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new identity key file (mode 0600) and print its address."""
    ident = Identity.generate()
    ident.save(args.key, force=args.force)
    _say(sys.stderr, f"wrote {args.key}")
    _say(sys.stdout, ident.address)
    return EXIT_OK


def cmd_address(args: argparse.Namespace) -> int:
    """Print the mailbox address of the key file."""
    _say(sys.stdout, Identity.load(args.key).address)
    return EXIT_OK


def cmd_gen_secret(args: argparse.Namespace) -> int:
    """Print (or write, mode 0600) a new random peer secret."""
    secret = new_peer_secret()
    if not args.out:
        _say(sys.stdout, secret)
        return EXIT_OK
    try:
        write_private_file(args.out, secret + "\n", force=args.force)
    except PrivateFileError as e:
        raise ClientError(str(e)) from None
    _say(sys.stderr, f"wrote {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------- messages


def cmd_send(args: argparse.Namespace) -> int:
    """Encrypt TEXT (or stdin) to ADDRESS, sign the envelope, deposit it at the node."""
    parse_address(args.to)
    ident = Identity.load(args.key)
    client = NodeClient(args.node, timeout=args.timeout)
    if args.text is None or args.text == "-":
        if args.text is None and sys.stdin.isatty():
            return _fail("give the message TEXT, or - to read it from stdin")
        text = sys.stdin.buffer.read()
    else:
        text = args.text.encode("utf-8")
    env = ident.envelope(args.to, ident.seal_text(args.to, text), ttl=args.ttl)
    permit = check_permit_token(args.permit, ident.address) if args.permit else kept_permit(args, ident.address)
    # A permit makes it contact mail; without one, the mailbox's policy says whether a stamp is needed.
    policy = None if permit is not None else client.get_policy(args.to)
    progress = Progress(sys.stderr)
    try:
        try:
            result = client.send(first_contact(env, permit, policy, progress))
        except ERROR_CLASSES["bad_envelope"]:
            if permit is None:
                raise
            # A node before protocol v3 refuses the unknown permit field: it takes the v1 envelope.
            result = client.send(env)
    except (ERROR_CLASSES["stamp_required"], ERROR_CLASSES["weak_stamp"]) as e:
        # The policy changed since we read it (or another node of the mesh has a newer one): once more.
        difficulty = e.body.get("difficulty")
        if type(difficulty) is not int:
            raise
        stricter = {"mode": P.STAMPS, "difficulty": difficulty}
        result = client.send(first_contact(env, None, stricter, progress))
    finally:
        progress.done()
    msg_id = result.get("msg_id", env["msg_id"])
    _say(sys.stdout, f"{msg_id}{' (duplicate: already stored)' if result.get('duplicate') else ''}")
    return EXIT_OK


class Progress:
    """The progress line while a stamp is computed (stderr; rewritten in place on a terminal)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, tries: int, difficulty: int) -> None:
        elapsed = time.monotonic() - self.started
        line = (
            f"computing a stamp for this first contact ({difficulty} bits): {tries / 1e6:.1f} M tries, "
            f"{elapsed:.1f} s (about {2**difficulty / 1e6:.1f} M expected)"
        )
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.stream.write(("\r" + line) if tty else (line + "\n"))
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown and bool(getattr(self.stream, "isatty", lambda: False)()):
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- policies and permits


def permits_path(args: argparse.Namespace) -> str:
    """``--permits``, else ``permits.json`` beside the key file."""
    explicit: str | None = getattr(args, "permits", None)
    return explicit or os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(args.key))), "permits.json")


def load_permits(path: str) -> dict[str, str]:
    """mailbox address -> permit token, from the permits file (empty when there is none)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ClientError(f"cannot read the permits file {path}: {e}") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise ClientError(f"{path} is not a permits file (an object of address -> token)")
    return doc


def kept_permit(args: argparse.Namespace, sender: str) -> P.Permit | None:
    """The kept permit for ``--to`` from this key, if the permits file has a usable one.

    A permits file may sit beside several keys: a permit for another sender
    key, or one that no longer checks out, is not this send's business.
    """
    token = load_permits(permits_path(args)).get(E.b64u_encode(parse_address(args.to)))
    if not token:
        return None
    try:
        return check_permit_token(token, sender)
    except ClientError as e:
        _say(sys.stderr, f"meshrelay: not using the kept permit for this mailbox: {e}")
        return None


def cmd_policy(args: argparse.Namespace) -> int:
    """Show a mailbox's policy at a node, or sign and store a new one for your mailbox."""
    client = NodeClient(args.node, timeout=args.timeout)
    if args.action == "show":
        mailbox = args.mailbox or Identity.load(args.key).address
        policy = client.get_policy(mailbox)
        if args.json:
            _say(sys.stdout, json.dumps(policy))
        elif policy is None:
            _say(sys.stdout, "no policy: open (anyone may send; v1 behaviour)")
        else:
            _say(
                sys.stdout,
                f"version {policy.get('version')}: mode {policy.get('mode')}, difficulty {policy.get('difficulty')}, "
                f"stranger cap {policy.get('stranger_cap')}, permit epoch {policy.get('epoch')}, "
                f"signed {_utc(policy['ts']) if type(policy.get('ts')) is int else '?'}",
            )
        return EXIT_OK
    ident = Identity.load(args.key)
    current = client.get_policy(ident.address)
    version = args.version if args.version is not None else (current["version"] + 1 if current else 1)
    epoch = args.epoch if args.epoch is not None else (current["epoch"] if current else 0)
    if args.revoke_permits:
        epoch += 1
    difficulty = (
        args.difficulty if args.difficulty is not None else (P.DEFAULT_DIFFICULTY if args.mode == P.STAMPS else 0)
    )
    policy = ident.policy(version, args.mode, difficulty, args.stranger_cap, epoch)
    result = client.set_policy(policy)
    _say(sys.stdout, f"policy version {version} stored{' (already stored)' if result.get('duplicate') else ''}")
    if args.revoke_permits:
        _say(sys.stderr, f"permits of epochs below {epoch} are revoked; issue new ones with --epoch {epoch}")
    return EXIT_OK


def cmd_permit(args: argparse.Namespace) -> int:
    """Issue a permit for a contact (printed as a token), or keep one you were given for sending."""
    if args.action == "issue":
        if not args.sender:
            return _fail("give the contact's sender address with --for SENDER")
        parse_address(args.sender)
        ident = Identity.load(args.key)
        epoch = args.epoch
        if epoch is None:
            node = args.node or os.environ.get("MESHRELAY_NODE")
            policy = NodeClient(node, timeout=args.timeout).get_policy(ident.address) if node else None
            epoch = policy["epoch"] if policy else 0
        expires = int(time.time()) + int(args.days * 86400)
        _say(sys.stdout, ident.permit(args.sender, expires, epoch))
        _say(sys.stderr, f"permit for {args.sender} to {ident.address}, epoch {epoch}, expires {_utc(expires)}")
        return EXIT_OK
    path = permits_path(args)
    permits = load_permits(path)
    if args.action == "list":
        for mailbox, token in sorted(permits.items()):
            try:
                exp = _utc(P.parse_permit_token(token).expires)
            except Exception:
                exp = "unreadable"
            _say(sys.stdout, f"{mailbox}  expires {exp}")
        return EXIT_OK
    if not args.token:
        return _fail("give the permit TOKEN to add")
    permit = check_permit_token(args.token, Identity.load(args.key).address)
    permits[permit.mailbox] = args.token.strip()
    try:
        write_private_file(path, json.dumps(permits, indent=2) + "\n", force=True)
    except PrivateFileError as e:
        raise ClientError(str(e)) from None
    _say(sys.stderr, f"kept the permit for mailbox {permit.mailbox} in {path}; send uses it from now on")
    return EXIT_OK


def _utc(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _for_terminal(text: str) -> str:
    """Escape control characters so a message cannot drive the user's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Printer:
    """Writes verified messages to stdout, as text or as JSON lines."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def show(self, msg: Any) -> None:
        if self.as_json:
            try:
                body: dict[str, Any] = {"text": msg.text.decode("utf-8")}
            except UnicodeDecodeError:
                body = {"data_b64u": E.b64u_encode(msg.text)}
            line = {"msg_id": msg.msg_id, "from": msg.sender, "ts": msg.ts, **body}
            self.stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        else:
            text = msg.text.decode("utf-8", errors="replace")
            if self.tty:
                text = _for_terminal(text)
            header = f"--- from {msg.sender} at {_utc(msg.ts)} [{msg.msg_id[:12]}]"
            self.stream.write(header + "\n" + text + ("" if text.endswith("\n") else "\n"))
        self.stream.flush()


class Reader:
    """Verifies, decrypts and prints envelopes, remembering what it printed."""

    def __init__(self, ident: Identity, printer: Printer, discard_bad: bool, remember: int = 10000) -> None:
        self.ident = ident
        self.printer = printer
        self.discard_bad = discard_bad
        self.remember = remember
        #: msg_ids handled (printed, or reported as bad), oldest first
        self.seen: OrderedDict[str, bool] = OrderedDict()
        self.bad = 0

    def handle(self, envelopes: list[Any]) -> tuple[list[str], int]:
        """Process one page; returns (msg_ids to ack, number of envelopes not seen before)."""
        to_ack: list[str] = []
        fresh = 0
        for obj in envelopes:
            msg_id = obj.get("msg_id") if isinstance(obj, dict) else None
            key = msg_id if isinstance(msg_id, str) else repr(obj)[:80]
            if key in self.seen:
                # Printed (or reported) before: at-least-once delivery; ack again, do not reprint.
                if (self.seen[key] or self.discard_bad) and isinstance(msg_id, str):
                    to_ack.append(msg_id)
                continue
            fresh += 1
            try:
                msg = self.ident.open_envelope(obj)
            except MessageError as e:
                self.bad += 1
                what = "acked and dropped" if self.discard_bad else "not acked (--discard-bad drops it)"
                _say(sys.stderr, f"meshrelay: {e}; {what}")
                self._remember(key, False)
                if self.discard_bad and isinstance(msg_id, str):
                    to_ack.append(msg_id)
                continue
            self.printer.show(msg)
            self._remember(key, True)
            to_ack.append(msg.msg_id)
        return to_ack, fresh

    def _remember(self, key: str, printed: bool) -> None:
        self.seen[key] = printed
        while len(self.seen) > self.remember:
            self.seen.popitem(last=False)


#: how many pages one ``poll --ack`` reads at most
MAX_POLL_PAGES = 100


def cmd_poll(args: argparse.Namespace) -> int:
    """Fetch pending messages, verify, decrypt and print them; with --ack, ack what was printed."""
    ident = Identity.load(args.key)
    client = NodeClient(args.node, timeout=args.timeout)
    reader = Reader(ident, Printer(args.json), args.discard_bad)
    acks: list[str] = []
    for page in range(MAX_POLL_PAGES):
        result = client.poll(
            ident, ack=acks, limit=args.limit, wait=args.wait if page == 0 else 0, fetch_remote=args.fetch_remote
        )
        acks = []
        to_ack, fresh = reader.handle(result.messages)
        if args.ack:
            acks = to_ack
        if not (args.ack and result.has_more and fresh):
            break
    if acks:
        client.ack(ident, acks)
    # Each unreadable message was reported on its own line; the exit code says so too.
    return EXIT_ERROR if reader.bad else EXIT_OK


class _Stop(Exception):
    """SIGTERM during watch."""


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow the mailbox with long-polls until Ctrl-C, printing and acking each new message."""
    ident = Identity.load(args.key)
    client = NodeClient(args.node, timeout=args.timeout)
    reader = Reader(ident, Printer(args.json), args.discard_bad)

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    acks: list[str] = []
    backoff = 1.0
    try:
        while True:
            try:
                result = client.poll(ident, ack=acks, limit=args.limit, wait=args.wait, fetch_remote=args.fetch_remote)
            except (NodeUnreachable, ERROR_CLASSES["unavailable"], ERROR_CLASSES["rate_limited"]) as e:
                _say(sys.stderr, f"meshrelay: {e}; retrying in {backoff:.0f}s")
                time.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = 1.0
            acks, fresh = reader.handle(result.messages)
            if result.messages and not fresh and not acks:
                # Only messages already reported as bad are pending: a long-poll
                # would return at once, so wait before asking again.
                time.sleep(args.idle_interval)
    except (KeyboardInterrupt, _Stop):
        if acks:
            try:
                NodeClient(args.node, timeout=5.0).ack(ident, acks)
            except ClientError as e:
                _say(sys.stderr, f"meshrelay: could not ack the last {len(acks)} message(s): {e}")
        return EXIT_OK
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- operators


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file; print the effective values with secrets masked."""
    from meshrelay.config import (
        ConfigError,
        diff_configs,
        diff_flat,
        effective_values,
        flat_values,
        load_config,
        to_toml,
    )

    try:
        cfg = load_config(args.file)
        check_endpoints(cfg)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    if args.diff is not None:
        try:
            old = load_config(args.diff)
        except ConfigError as e:
            return _fail(f"config error in {args.diff}: {e}")
        _say(sys.stdout, f"# {args.file}: OK; what changes from {args.diff} (secrets masked)")
        _print_changes(diff_configs(old, cfg))
        return EXIT_OK
    if args.diff_running:
        admin = args.admin or _admin_url(cfg.node.admin_listen)
        salt = os.urandom(16)
        try:
            running = _fetch_running_config(admin, salt)
        except ValueError as e:
            return _fail(f"cannot read the running config from {admin}: {e}")
        _say(
            sys.stdout,
            f"# {args.file}: OK; what a reload of the node at {admin} would change "
            f"(running generation {running.get('generation')}, from {running.get('source') or 'defaults'}; "
            "secrets masked)",
        )
        _print_changes(diff_flat(running["values"], flat_values(cfg, salt)))
        return EXIT_OK
    _say(sys.stdout, f"# {args.file}: OK; effective values (secrets masked)")
    sys.stdout.write(to_toml(effective_values(cfg)))
    sys.stdout.flush()
    return EXIT_OK


def _print_changes(changes: list[Any]) -> None:
    for c in changes:
        _say(sys.stdout, f"{c.key}: {c.old} -> {c.new}  ({'applies on reload' if c.live else 'needs a restart'})")
    live = sum(1 for c in changes if c.live)
    if not changes:
        _say(sys.stdout, "# no changes")
    else:
        _say(sys.stdout, f"# {len(changes)} changes: {live} apply on reload, {len(changes) - live} need a restart")


def _admin_url(admin_listen: str) -> str:
    """The http URL of an admin listener endpoint string (``tcp:9090:interface=...``) on this machine."""
    from meshrelay.admin import endpoint_interface

    parts = admin_listen.split(":")
    port = next((p for p in parts[1:] if p.isdigit()), None)
    if parts[0] not in ("tcp", "tcp6") or port is None:
        raise SystemExit(f"meshrelay: cannot reach node.admin_listen {admin_listen!r} over TCP: give --admin URL")
    host = endpoint_interface(admin_listen) or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _fetch_running_config(admin: str, salt: bytes) -> dict[str, Any]:
    """``GET ADMIN/api/mesh/config?salt=...``: the running node's values (ValueError on any failure)."""
    import urllib.error
    import urllib.request

    url = admin.rstrip("/") + "/api/mesh/config?salt=" + salt.hex()
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read(8 << 20))
    except urllib.error.HTTPError as e:
        raise ValueError(f"HTTP {e.code}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(str(getattr(e, "reason", e))) from None
    if not isinstance(body, dict) or body.get("ok") is not True or not isinstance(body.get("values"), dict):
        raise ValueError("not a meshrelay admin listener (no running config in the answer)")
    return body


def check_endpoints(cfg: Any) -> None:
    """Raise ConfigError for a listen/admin_listen that is not a Twisted endpoint string."""
    from twisted.internet.testing import MemoryReactor

    from meshrelay.tap import check_endpoints as tap_check

    tap_check(cfg, MemoryReactor())


def _store_location(args: argparse.Namespace) -> tuple[str, Any]:
    """``--data-dir`` or ``--config``'s ``node.data_dir``, and the config (None without ``--config``)."""
    from meshrelay.config import ConfigError, load_config

    if args.config is None:
        return args.data_dir, None
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise _CommandError(f"config error: {e}") from None
    return cfg.node.data_dir, cfg


class _CommandError(Exception):
    """A one-line failure of an operator command."""


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy a serving SQLite node's store to OUT (0600) with SQLite's online backup, and verify it."""
    from meshrelay.store.backup import STEP_PAGES, BackupError, backup_sqlite

    try:
        data_dir, cfg = _store_location(args)
        if cfg is not None and cfg.store.backend != "sqlite":
            raise _CommandError(
                f"store.backend is {cfg.store.backend!r}: back it up with pg_dump (docs/postgresql.md, "
                "'Backup and restore')"
            )
        report = backup_sqlite(
            data_dir, args.out, force=args.force, step_pages=args.step_pages or STEP_PAGES, quick=args.quick
        )
    except (_CommandError, BackupError) as e:
        return _fail(f"backup: {e}")
    s = report.summary
    _say(
        sys.stdout,
        f"backed up store {s.feed_id} (schema {s.schema_version}) to {report.path}: {s.describe()}; "
        f"{report.file_bytes} bytes in {report.steps} steps, {report.seconds:.1f}s; {s.checked} ok",
    )
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    """Bring a backup up as a node's store, with a new feed identity (or finish a pg_restore)."""
    from meshrelay.store.backup import BackupError, check_backup, restore_postgres, restore_sqlite

    try:
        if args.postgres:
            return _restore_postgres(args, restore_postgres)
        if args.backup is None:
            raise _CommandError("give the BACKUP file (or --postgres after a pg_restore)")
        if args.check:
            if args.data_dir is not None or args.config is not None or args.force:
                raise _CommandError("--check reads the backup only: give no --data-dir, --config or --force")
            s = check_backup(args.backup, quick=args.quick)
            _say(
                sys.stdout,
                f"{args.backup}: a good backup of store {s.feed_id} (schema {s.schema_version}): "
                f"{s.describe()}; {s.checked} ok",
            )
            return EXIT_OK
        if args.data_dir is None and args.config is None:
            raise _CommandError("give --data-dir DIR or --config FILE: where the node's store goes")
        data_dir, cfg = _store_location(args)
        if cfg is not None and cfg.store.backend != "sqlite":
            raise _CommandError(f"store.backend is {cfg.store.backend!r}: use pg_restore, then restore --postgres")
        report = restore_sqlite(args.backup, data_dir, force=args.force, quick=args.quick)
    except (_CommandError, BackupError) as e:
        return _fail(f"restore: {e}")
    s = report.summary
    _say(
        sys.stdout,
        f"restored {report.path} from store {report.old_feed_id} (schema {s.schema_version}): {s.describe()}; "
        f"{s.checked} ok; new feed id {report.new_feed_id}: peers read this node's feed again from the start. "
        "Start the node with the same public_url and peers.",
    )
    return EXIT_OK


def _restore_postgres(args: argparse.Namespace, restore: Callable[..., Any]) -> int:
    from meshrelay.config import ConfigError, read_secret_file

    if args.backup is not None or args.data_dir is not None or args.check or args.force:
        raise _CommandError("--postgres works on the database pg_restore filled: give --config or --dsn-file only")
    if args.dsn_file is not None:
        try:
            # Same rule as store.dsn_file: refused when group or others may access it.
            dsn = read_secret_file("--dsn-file", args.dsn_file, ".")
        except ConfigError as e:
            raise _CommandError(str(e)) from None
    elif args.config is not None:
        _, cfg = _store_location(args)
        if cfg.store.backend != "postgresql" or not cfg.store.dsn:
            raise _CommandError(f"{args.config}: store.backend is not 'postgresql' with a dsn or dsn_file")
        dsn = cfg.store.dsn
    else:
        raise _CommandError("--postgres needs --config FILE or --dsn-file PATH")
    try:
        report = restore(dsn)
    except ImportError as e:
        raise _CommandError(f"--postgres needs psycopg 3 ({e}): pip install 'meshrelay[postgresql]'") from None
    s = report.summary
    _say(
        sys.stdout,
        f"restored PostgreSQL store at {report.path} from store {report.old_feed_id} (schema {s.schema_version}): "
        f"{s.describe()}; counters ok; new feed id {report.new_feed_id}. Start the processes.",
    )
    return EXIT_OK


def cmd_demo_mesh(args: argparse.Namespace) -> int:
    """Run three peered nodes on loopback until Ctrl-C (see meshrelay.demo)."""
    from meshrelay.demo import run_demo

    return run_demo(args.dir, args.base_port)


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", default=default_key_path(), metavar="FILE", help="identity key file (default: %(default)s)")


def _node_options(p: argparse.ArgumentParser) -> None:
    _key_option(p)
    p.add_argument(
        "--node",
        default=os.environ.get("MESHRELAY_NODE"),
        required="MESHRELAY_NODE" not in os.environ,
        metavar="URL",
        help="the node's public URL, e.g. http://127.0.0.1:8080 (default: $MESHRELAY_NODE)",
    )
    p.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S", help="HTTP timeout (default 30)")


def _reader_options(p: argparse.ArgumentParser, wait_default: int) -> None:
    _node_options(p)
    p.add_argument(
        "--wait",
        type=_int_range(0, E.MAX_WAIT),
        default=wait_default,
        metavar="S",
        help=f"long-poll up to S seconds (0-{E.MAX_WAIT})",
    )
    p.add_argument(
        "--limit",
        type=_int_range(1, E.MAX_POLL_LIMIT),
        default=E.MAX_POLL_LIMIT,
        metavar="N",
        help=f"messages per request (1-{E.MAX_POLL_LIMIT})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per message")
    p.add_argument("--fetch-remote", action="store_true", help="ask the node to pull this mailbox from its peers first")
    p.add_argument(
        "--discard-bad", action="store_true", help="ack messages that fail verification or decryption (drop them)"
    )


def _conf_keygen(p: argparse.ArgumentParser) -> None:
    _key_option(p)
    p.add_argument("--force", action="store_true", help="replace an existing key file (the old identity is lost)")


def _conf_send(p: argparse.ArgumentParser) -> None:
    _node_options(p)
    p.add_argument("--to", required=True, metavar="ADDRESS", help="the recipient's mailbox address")
    p.add_argument("--ttl", type=_int_range(1, 2**31), default=DEFAULT_TTL, metavar="S", help="seconds to keep it")
    p.add_argument("--permit", metavar="TOKEN", help="a permit token for this mailbox (default: the permits file)")
    p.add_argument("--permits", metavar="FILE", help="the permits file (default: permits.json beside the key)")
    p.add_argument("text", nargs="?", metavar="TEXT", help="the message, or - to read it from stdin")


def _conf_policy(p: argparse.ArgumentParser) -> None:
    _node_options(p)
    p.add_argument("action", choices=("show", "set"), help="show a policy, or set yours")
    p.add_argument("--mailbox", metavar="ADDRESS", help="show: whose policy (default: your own)")
    p.add_argument("--json", action="store_true", help="show: print the signed policy as JSON")
    p.add_argument("--mode", choices=P.MODES, default=P.OPEN, help="set: open, stamps or contacts")
    p.add_argument(
        "--difficulty",
        type=_int_range(1, P.MAX_DIFFICULTY),
        metavar="BITS",
        help=f"set: stamp difficulty in bits (default {P.DEFAULT_DIFFICULTY} in stamps mode)",
    )
    p.add_argument(
        "--stranger-cap", type=_int_range(0, E.MAX_INT), default=P.DEFAULT_STRANGER_CAP, metavar="N", help="set"
    )
    p.add_argument("--epoch", type=_int_range(0, E.MAX_INT), metavar="N", help="set: permit epoch (default: kept)")
    p.add_argument("--revoke-permits", action="store_true", help="set: bump the epoch, revoking every permit")
    p.add_argument("--version", type=_int_range(0, E.MAX_INT), metavar="N", help="set: default current + 1")


def _conf_permit(p: argparse.ArgumentParser) -> None:
    _key_option(p)
    p.add_argument("action", choices=("issue", "add", "list"), help="issue one, keep one (add), list kept ones")
    p.add_argument("token", nargs="?", metavar="TOKEN", help="add: the permit token you were given")
    p.add_argument("--for", dest="sender", metavar="SENDER", help="issue: the contact's sender address")
    p.add_argument("--days", type=_positive_float, default=365.0, metavar="N", help="issue: valid for N days")
    p.add_argument("--epoch", type=_int_range(0, E.MAX_INT), metavar="N", help="issue: default the policy's")
    p.add_argument("--node", metavar="URL", help="issue: read the epoch from this node (default $MESHRELAY_NODE)")
    p.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--permits", metavar="FILE", help="the permits file (default: permits.json beside the key)")


def _conf_poll(p: argparse.ArgumentParser) -> None:
    _reader_options(p, wait_default=0)
    p.add_argument("--ack", action="store_true", help="ack the messages that were printed (deletes them mesh-wide)")


def _conf_watch(p: argparse.ArgumentParser) -> None:
    _reader_options(p, wait_default=30)
    p.add_argument("--idle-interval", type=_positive_float, default=5.0, help=argparse.SUPPRESS)


def _conf_gen_secret(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="FILE", help="write it to FILE (mode 0600) instead of printing it")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")


def _conf_check_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="TOML config file")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--diff", metavar="OLD", help="say what changes from the config file OLD to FILE, key by key (secrets masked)"
    )
    which.add_argument(
        "--diff-running",
        action="store_true",
        help="say what a reload (SIGHUP) of the running node would change, and what needs a restart",
    )
    p.add_argument(
        "--admin", metavar="URL", help="the running node's admin listener (default: from FILE's node.admin_listen)"
    )


def _store_options(p: argparse.ArgumentParser, required: bool) -> None:
    where = p.add_mutually_exclusive_group(required=required)
    where.add_argument("--data-dir", metavar="DIR", help="the node's data directory")
    where.add_argument("--config", metavar="FILE", help="the node's config file (its node.data_dir, or [store])")


def _conf_backup(p: argparse.ArgumentParser) -> None:
    _store_options(p, required=True)
    p.add_argument("out", metavar="OUT", help="the backup file to write (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--step-pages",
        type=_int_range(1, 2**31 - 1),
        default=None,
        metavar="N",
        help="pages (4 KiB) copied per step (default 1024: 4 MiB)",
    )
    p.add_argument("--quick", action="store_true", help="verify the copy with quick_check, not integrity_check")


def _conf_restore(p: argparse.ArgumentParser) -> None:
    p.add_argument("backup", nargs="?", metavar="BACKUP", help="a file made by meshrelay backup")
    _store_options(p, required=False)
    p.add_argument("--force", action="store_true", help="replace the store in a non-empty DIR (node stopped)")
    p.add_argument("--quick", action="store_true", help="verify with quick_check, not integrity_check")
    p.add_argument("--check", action="store_true", help="only verify BACKUP and print what it holds")
    p.add_argument(
        "--postgres",
        action="store_true",
        help="after pg_restore: verify the PostgreSQL store and give it a new feed identity",
    )
    p.add_argument("--dsn-file", metavar="PATH", help="--postgres: a file holding the DSN (mode 0600)")


def _conf_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", metavar="DIR", help="where to write configs, keys and data (default: a new temp dir)")
    p.add_argument(
        "--base-port",
        type=_int_range(0, 65500),
        default=18080,
        metavar="PORT",
        help="public ports PORT..PORT+2, admin ports PORT+10..PORT+12 (0: any free ports; default 18080)",
    )


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


COMMANDS: dict[str, Command] = {
    "keygen": Command("create an identity key file (mode 0600)", _conf_keygen, cmd_keygen),
    "address": Command("print the mailbox address of a key file", _key_option, cmd_address),
    "send": Command("encrypt, sign and deposit a message", _conf_send, cmd_send),
    "poll": Command("fetch, verify, decrypt and print messages", _conf_poll, cmd_poll),
    "policy": Command("show or set a mailbox's first-contact policy", _conf_policy, cmd_policy),
    "permit": Command("issue a send permit for a contact, or keep one you were given", _conf_permit, cmd_permit),
    "watch": Command("follow the mailbox with long-polls until Ctrl-C", _conf_watch, cmd_watch),
    "gen-secret": Command("print a new peer secret", _conf_gen_secret, cmd_gen_secret),
    "check-config": Command(
        "validate a node config and print its effective values", _conf_check_config, cmd_check_config
    ),
    "demo-mesh": Command("run three peered nodes on loopback until Ctrl-C", _conf_demo, cmd_demo_mesh),
    "backup": Command("copy a serving SQLite node's store to a verified file", _conf_backup, cmd_backup),
    "restore": Command("bring a backup up as a node's store, with a new feed identity", _conf_restore, cmd_restore),
}


#: subcommands with their own argument parsing: name -> (help, main(argv) -> exit code)
def _migrate_store(argv: list[str]) -> int:
    from meshrelay import migrate

    return migrate.main(argv)


RAW_COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "migrate-store": ("copy a SQLite node's store into PostgreSQL (resumable)", _migrate_store),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meshrelay",
        description="meshrelay client and operator tools. Run a node with: twistd -n meshrelay",
    )
    parser.add_argument("--version", action="version", version=f"meshrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.configure(p)
        p.set_defaults(run=command.run)
    for name, (help_text, _) in RAW_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


#: options whose value may start with "-": a mailbox address is b64u, and 1 in 64 of them do
DASH_VALUE_OPTIONS = frozenset(("--to", "--for", "--mailbox"))


def attach_dash_values(argv: list[str]) -> list[str]:
    """``--to -Xy...`` -> ``--to=-Xy...``: argparse would take such a value for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return out + argv[i:]
        if word in DASH_VALUE_OPTIONS and i + 1 < len(argv):
            out.append(f"{word}={argv[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in RAW_COMMANDS:
            return RAW_COMMANDS[argv[0]][1](argv[1:])
        parser = build_parser()
        args = parser.parse_args(attach_dash_values(argv))
        if not getattr(args, "run", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        result: int = args.run(args)
        return result
    except ClientError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        _say(sys.stderr, "meshrelay: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (| head): not an error worth a traceback.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_ERROR


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    run()
