"""Config loading: defaults, types, one-line errors naming the key, CLI overrides."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from meshrelay.config import Config, ConfigError, build_config, load_config, normalize_url, to_toml


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def assertConfigError(self, text: str, key: str) -> None:
        with self.assertRaises(ConfigError) as cm:
            load_config(self.write(text))
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(key), message)

    def test_embedded_defaults(self) -> None:
        """With no file the protocol's embedded defaults apply."""
        cfg = load_config(None)
        self.assertEqual(cfg.node.listen, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(cfg.node.admin_listen, "tcp:9090:interface=127.0.0.1")
        self.assertEqual(cfg.node.data_dir, "./meshrelay-data")
        self.assertEqual(cfg.node.durability, "normal")
        self.assertIs(cfg.node.access_log, False)
        self.assertEqual(cfg.limits.max_ttl, 259200)
        self.assertEqual(cfg.limits.per_sender_pending, 8)
        self.assertEqual(cfg.peers, ())

    def test_example_file_loads(self) -> None:
        """etc/meshrelay.example.toml is a valid config."""
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cfg = load_config(os.path.join(here, "etc", "meshrelay.example.toml"))
        self.assertIsInstance(cfg, Config)

    def test_unknown_keys(self) -> None:
        """Unknown keys and sections are refused by name."""
        self.assertConfigError("[node]\nlisten_port = 5\n", "node.listen_port")
        self.assertConfigError("[nodes]\nlisten = 'x'\n", "nodes")
        self.assertConfigError('[[peers]]\nurl = "http://b"\nsecret = "0123456789abcdef"\nkey = 1\n', "peers[0].key")

    def test_wrong_types(self) -> None:
        """Wrong types are refused by name: strings for ints, ints for bools, floats."""
        self.assertConfigError('[limits]\nclock_skew = "five"\n', "limits.clock_skew")
        self.assertConfigError("[limits]\nclock_skew = 1.5\n", "limits.clock_skew")
        self.assertConfigError("[node]\naccess_log = 1\n", "node.access_log")
        self.assertConfigError("[limits]\nper_sender_pending = true\n", "limits.per_sender_pending")
        self.assertConfigError('[node]\ndurability = "sometimes"\n', "node.durability")
        self.assertConfigError("[limits]\nclock_skew = -1\n", "limits.clock_skew")
        self.assertConfigError("node = 5\n", "node")

    def test_unreadable_or_invalid_file(self) -> None:
        """A missing or non-TOML file is one line naming the file."""
        with self.assertRaises(ConfigError) as cm:
            load_config("/nonexistent/meshrelay.toml")
        self.assertIn("/nonexistent/meshrelay.toml", str(cm.exception))
        self.assertConfigError("[node\n", "config")

    def test_peer_secrets(self) -> None:
        """A peer needs a secret of at least 16 characters, inline or from a readable file."""
        self.assertConfigError('[[peers]]\nurl = "http://b.test"\n', "peers[0].secret")
        self.assertConfigError('[[peers]]\nurl = "http://b.test"\nsecret = "short"\n', "peers[0].secret")
        self.assertConfigError(
            '[[peers]]\nurl = "http://b.test"\nsecret_file = "/nonexistent/secret"\n', "peers[0].secret_file"
        )
        secret = os.path.abspath(self.write("0123456789abcdef0123\n"))
        os.chmod(secret, 0o600)
        cfg = load_config(self.write(f'[[peers]]\nurl = "HTTP://B.test:80/"\nsecret_file = "{secret}"\n'))
        self.assertEqual(cfg.peers[0].url, "http://b.test")
        self.assertEqual(cfg.peers[0].secret, "0123456789abcdef0123")
        self.assertNotIn("0123456789abcdef", repr(cfg.peers[0]))

    def test_peer_urls(self) -> None:
        """A peer URL must be http(s), unique, and not this node's own URL."""
        secret = 'secret = "0123456789abcdef"'
        self.assertConfigError(f'[[peers]]\nurl = "ftp://b"\n{secret}\n', "peers[0].url")
        self.assertConfigError(
            f'[[peers]]\nurl = "http://b"\n{secret}\n[[peers]]\nurl = "http://b/"\n{secret}\n', "peers[1].url"
        )
        self.assertConfigError(
            f'[node]\npublic_url = "http://a:8080"\n[[peers]]\nurl = "http://a:8080/"\n{secret}\n', "peers[0].url"
        )

    def test_overrides_win(self) -> None:
        """Command-line options override the file."""
        path = self.write('[node]\nlisten = "tcp:1"\ndata_dir = "/x"\n')
        cfg = load_config(path, {"listen": "tcp:2", "data-dir": None, "public-url": "http://Z.test:443"})
        self.assertEqual(
            (cfg.node.listen, cfg.node.data_dir, cfg.node.public_url), ("tcp:2", "/x", "http://z.test:443")
        )

    def test_normalize_url(self) -> None:
        """Lower-case scheme and host, no default port, no trailing slash, query or fragment."""
        self.assertEqual(normalize_url("HTTP://Node.Example:80/mesh/?q=1#f"), "http://node.example/mesh")
        self.assertEqual(normalize_url("https://n.example:443"), "https://n.example")
        self.assertEqual(normalize_url("https://n.example:8443/"), "https://n.example:8443")
        self.assertRaises(ValueError, normalize_url, "n.example")
        self.assertRaises(ValueError, normalize_url, "http://n.example:99999")

    def test_min_ttl_not_above_max(self) -> None:
        """min_ttl above max_ttl is refused."""
        self.assertConfigError("[limits]\nmin_ttl = 100\nmax_ttl = 50\n", "limits.min_ttl")

    def test_toml_writer_round_trips(self) -> None:
        """to_toml writes what load_config reads back."""
        raw = {
            "node": {"listen": "tcp:1:interface=127.0.0.1", "access_log": True, "public_url": "http://a.test"},
            "limits": {"clock_skew": 10},
            "peers": [{"url": "http://b.test", "secret": 'quote"d-0123456789'}],
        }
        cfg = load_config(self.write(to_toml(raw)))
        self.assertEqual(cfg, build_config(raw, source=cfg.source))
