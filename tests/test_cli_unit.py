"""The meshrelay command's plumbing, in process: dispatch, usage errors, terminal-safe printing."""

from __future__ import annotations

import contextlib
import io
import json

from twisted.trial.unittest import SynchronousTestCase

from meshrelay import cli
from meshrelay.client import Message


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


class DispatchTests(SynchronousTestCase):
    def test_raw_commands_get_their_own_argv(self) -> None:
        """A RAW_COMMANDS entry (like the planned migrate-store) receives the rest of argv untouched."""
        seen: list[list[str]] = []

        def tool(argv: list[str]) -> int:
            seen.append(argv)
            return 7

        self.patch(cli, "RAW_COMMANDS", {"migrate-store": ("copy a store", tool)})
        code, _, _ = run(["migrate-store", "--from", "a", "--to", "b", "-x"])
        self.assertEqual((code, seen), (7, [["--from", "a", "--to", "b", "-x"]]))
        code, _, _ = run(["--help"])
        self.assertEqual(code, 0)

    def test_usage_error_is_one_line(self) -> None:
        """A usage mistake is one line on stderr and exit 2."""
        code, out, err = run(["send", "--node", "http://x"])
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("--to", err)
        code, _, err = run(["no-such-command"])
        self.assertEqual(code, 2)
        self.assertEqual(len(err.splitlines()), 1)

    def test_no_command_prints_help(self) -> None:
        """Without a subcommand the command prints its help and exits 2."""
        code, _, err = run([])
        self.assertEqual(code, 2)
        self.assertIn("keygen", err)


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class PrinterTests(SynchronousTestCase):
    msg = Message(msg_id="ab" * 32, sender="S" * 43, ts=1795000000, ttl=60, text=b"hi\x1b[2J\x07 there\n\tok")

    def test_terminal_output_escapes_control_characters(self) -> None:
        """On a terminal, escape sequences in a message are shown, not executed; tab and newline stay."""
        out = _TTY()
        cli.Printer(False, out).show(self.msg)
        text = out.getvalue()
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\x07", text)
        self.assertIn("hi\\x1b[2J\\x07 there\n\tok", text)
        self.assertIn("from " + "S" * 43, text)

    def test_json_lines(self) -> None:
        """--json prints one object per message; non-UTF-8 text travels as b64u data."""
        out = io.StringIO()
        printer = cli.Printer(True, out)
        printer.show(self.msg)
        printer.show(Message(msg_id="cd" * 32, sender="S" * 43, ts=1, ttl=60, text=b"\xff\xfe"))
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual(first["text"], "hi\x1b[2J\x07 there\n\tok")
        self.assertEqual(second["data_b64u"], "__4")


class MigrateStoreDispatchTests(SynchronousTestCase):
    def test_migrate_store_is_a_subcommand(self) -> None:
        """`meshrelay migrate-store` hands its argv to meshrelay.migrate.main."""
        import meshrelay.migrate as migrate
        from meshrelay import cli

        seen: list[list[str]] = []
        self.patch(migrate, "main", lambda argv: seen.append(argv) or 0)
        self.assertEqual(cli.main(["migrate-store", "--from", "d", "--to", "postgresql://x/y"]), 0)
        self.assertEqual(seen, [["--from", "d", "--to", "postgresql://x/y"]])
