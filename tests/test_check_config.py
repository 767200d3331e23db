"""``meshrelay check-config``: every kind of bad config is one line naming the key; good ones print masked values."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tomllib

import pytest
from twisted.trial.unittest import SynchronousTestCase

from meshrelay import cli
from tests.harness import REPO

GOOD = """
[node]
public_url = "http://127.0.0.1:8080"
[[peers]]
url = "http://127.0.0.1:8081"
secret = "a-peer-secret-of-some-length"
"""

P = '[[peers]]\nurl = "http://b.test"\nsecret = "0123456789abcdef"\n'

#: (config text, the key the error line must name)
BAD = [
    ('[node]\ncolour = "blue"\n', "node.colour: unknown key"),
    ('[nodes]\nlisten = "tcp:1"\n', "nodes: unknown key"),
    ('[limits]\nclock_skew = "five"\n', "limits.clock_skew: expected an integer"),
    ("[limits]\nmax_message_bytes = 0\n", "limits.max_message_bytes: must be at least"),
    ("[sync]\npage_limit = 501\n", "sync.page_limit: must be at most 500"),
    ('[node]\ndurability = "fast"\n', "node.durability: expected 'normal' or 'full'"),
    ('[node]\nlog_format = "xml"\n', "node.log_format"),
    ("[node]\naccess_log = 1\n", "node.access_log: expected true or false"),
    ("[limits]\nmin_ttl = 100\nmax_ttl = 50\n", "limits.min_ttl: must not exceed"),
    ('[node]\npublic_url = "ftp://x"\n', "node.public_url"),
    ('[node]\nlisten = "carrier-pigeon:8080"\n', "node.listen: not a valid endpoint"),
    ('[node]\nadmin_listen = "tcp:notaport"\n', "node.admin_listen: not a valid endpoint"),
    ('[[peers]]\nurl = "http://b.test"\n', "peers[0].secret: missing"),
    ('[[peers]]\nurl = "http://b.test"\nsecret = "short"\n', "peers[0].secret: the secret must be at least 16"),
    ('[[peers]]\nurl = "http://b.test"\nsecret_file = "does-not-exist.secret"\n', "peers[0].secret_file: cannot read"),
    ('[[peers]]\nurl = "http://b.test"\nsecret = "0123456789abcdef"\nsecret_file = "x"\n', "peers[0].secret: give"),
    ('[[peers]]\nsecret = "0123456789abcdef"\n', "peers[0].url: missing"),
    ('[[peers]]\nurl = "b.test"\nsecret = "0123456789abcdef"\n', "peers[0].url: not an http(s) URL"),
    ('[[peers]]\nurl = "http://b.test"\nsecret = "0123456789abcdef"\ncolour = "x"\n', "peers[0].colour: unknown key"),
    ('[[peers]]\nurl = "http://b.test"\nsecret = "0123456789abcdef"\nconnect = "b:1"\n', "peers[0].connect"),
    (
        '[[peers]]\nurl = "http://b.test"\nsecret = "0123456789abcdef"\n'
        '[[peers]]\nurl = "http://B.test/"\nsecret = "0123456789abcdef"\n',
        "peers[1].url: http://b.test is listed twice",
    ),
    (
        '[node]\npublic_url = "http://a.test"\n[[peers]]\nurl = "http://a.test"\nsecret = "0123456789abcdef"\n',
        "peers[0].url: is this node's own node.public_url",
    ),
    (P + 'proxy = "socks5://127.0.0.1:9050"\n', "peers[0].proxy: 'socks5://127.0.0.1:9050': use socks5h://"),
    (P + 'proxy = "http://127.0.0.1:8118"\n', "peers[0].proxy: expected socks5h://host:port"),
    (P + 'proxy = "socks5h://127.0.0.1"\n', "peers[0].proxy: 'socks5h://127.0.0.1': give the proxy's host and port"),
    (P + 'proxy = "socks5h://u:p@127.0.0.1:9050"\n', "peers[0].proxy: 'socks5h://u:p@127.0.0.1:9050': proxy user"),
    ('[node]\npeer_proxy = "tor"\n', "node.peer_proxy: expected socks5h://host:port or 'none'"),
    (P + 'ca_file = "no-such-ca.pem"\n', "peers[0].ca_file: cannot read"),
    (P + 'ca_file = "node.toml"\n', "node.toml holds no PEM certificate"),
    ('[[listeners]]\nendpoint = "onion:80"\n', "listeners[0].endpoint: an onion: endpoint needs controlPort=PORT"),
    (
        '[[listeners]]\nendpoint = "onion:80:controlPort=9051"\naddress_means_nothing = false\n',
        "listeners[0].address_means_nothing: must not be false for an onion: endpoint",
    ),
    ('[node]\nlisten = "onion:80:localPort=8081"\n', "node.listen: an onion: endpoint needs controlPort"),
    ('[store]\nbackend = "postgresql"\n', "store.dsn: required"),
    ('[store]\ndsn = "x"\ndsn_file = "y"\n', "store.dsn: give dsn or dsn_file"),
    ("peers = 3\n", "peers: expected an array"),
    ("[node\n", "is not valid TOML"),
]


def check(path: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["check-config", path])
    return code, out.getvalue(), err.getvalue()


class CheckConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, text: str, name: str = "node.toml") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def test_each_bad_config_names_its_key(self) -> None:
        """Each kind of bad config exits 1 with one stderr line naming the key, and prints nothing."""
        for text, needle in BAD:
            code, out, err = check(self.write(text))
            self.assertEqual(code, 1, text)
            self.assertEqual(out, "", text)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith("meshrelay: config error: "), err)
            self.assertIn(needle, err, text)

    def test_missing_file(self) -> None:
        """A config file that cannot be read is one line naming the path."""
        code, _, err = check(os.path.join(self.dir, "nope.toml"))
        self.assertEqual(code, 1)
        self.assertIn("config: cannot read", err)
        self.assertIn("nope.toml", err)

    def test_good_config_prints_effective_values_masked(self) -> None:
        """A good config exits 0 and prints every effective value as TOML, secrets masked."""
        code, out, err = check(self.write(GOOD))
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("a-peer-secret-of-some-length", out)
        doc = tomllib.loads(out)
        self.assertEqual(doc["peers"], [{"url": "http://127.0.0.1:8081", "secret": "***"}])
        self.assertEqual(doc["limits"]["clock_skew"], 300)
        self.assertEqual(doc["node"]["log_format"], "text")
        self.assertEqual(doc["sync"]["page_limit"], 500)

    def test_secret_file_relative_to_config(self) -> None:
        """A secret_file is read relative to the config file and never printed."""
        os.chmod(self.write("s3cret-from-a-file-0123\n", "b.secret"), 0o600)
        path = self.write('[[peers]]\nurl = "http://b.test"\nsecret_file = "b.secret"\n')
        code, out, _ = check(path)
        self.assertEqual(code, 0)
        self.assertNotIn("s3cret", out)

    def test_group_or_world_readable_secret_files_are_refused(self) -> None:
        """check-config refuses a secret_file or dsn_file that group or others may read, in one line, as ssh does."""
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        secret = self.write("s3cret-from-a-file-0123\n", "b.secret")
        dsn = self.write("postgresql://u:pw@db/x\n", "dsn")
        cases = [
            ('[[peers]]\nurl = "http://b.test"\nsecret_file = "b.secret"\n', secret, "peers[0].secret_file"),
            ('[store]\nbackend = "postgresql"\ndsn_file = "dsn"\n', dsn, "store.dsn_file"),
        ]
        for text, file, key in cases:
            path = self.write(text)
            for mode in (0o644, 0o640, 0o604, 0o660):
                os.chmod(file, mode)
                code, out, err = check(path)
                self.assertEqual((code, out), (1, ""), mode)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn(key, err)
                self.assertIn(f"mode {mode:04o}", err)
                self.assertIn(f"chmod 600 {os.path.abspath(file)}", err)
                self.assertNotIn("s3cret", err)
                self.assertNotIn("pw@", err)
            os.chmod(file, 0o600)
            self.assertEqual(check(path)[0], 0, key)

    @pytest.mark.integration
    def test_real_command(self) -> None:
        """The installed-style command (python -m meshrelay.cli) gives the same one-line error and exit code."""
        path = self.write("[limits]\nclock_skew = -1\n")
        r = subprocess.run(
            [sys.executable, "-m", "meshrelay.cli", "check-config", path],
            capture_output=True,
            env=dict(os.environ, PYTHONPATH=REPO),
            timeout=60,
        )
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr.decode(), "meshrelay: config error: limits.clock_skew: must be at least 1, got -1\n")
