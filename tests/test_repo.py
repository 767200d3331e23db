"""Repository conventions that CI and newcomers rely on."""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts)) as fh:
        return fh.read()


class RepoTests(SynchronousTestCase):
    def test_readme_opens_with_two_commands(self) -> None:
        """README.md opens with exactly two shell commands: run a node, run the tests."""
        readme = _read("README.md")
        blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
        self.assertGreaterEqual(len(blocks), 2)
        first, second = blocks[0].strip(), blocks[1].strip()
        self.assertNotIn("\n", first)
        self.assertNotIn("\n", second)
        self.assertIn("twistd -n meshrelay", first)
        self.assertIn("pytest", second)
        head = readme.split("```sh", 3)
        self.assertTrue(head[0].strip().startswith("# meshrelay"))

    def test_ci_runs_the_readme_test_command(self) -> None:
        """.ci/run runs the README's test command verbatim."""
        second = re.findall(r"```sh\n(.*?)\n```", _read("README.md"), re.S)[1].strip()
        self.assertIn(second, _read(".ci", "run"))

    def test_no_init_in_twisted_plugins(self) -> None:
        """twisted/ and twisted/plugins/ have no __init__.py (it would break the plugin scan)."""
        self.assertFalse(os.path.exists(os.path.join(REPO, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(REPO, "twisted", "plugins", "__init__.py")))

    def test_unmarked_tests_cannot_start_processes(self) -> None:
        """A test without the integration marker that starts a process fails, naming the marker."""
        import subprocess

        with self.assertRaises(AssertionError) as cm:
            subprocess.run(["true"], check=False)
        self.assertIn("pytest.mark.integration", str(cm.exception))
