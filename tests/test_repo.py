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


#: docs/architecture.md's layers: a module imports only from its own layer or those below
LAYERS: dict[str, int] = {
    **dict.fromkeys(
        (
            "meshrelay",
            "errors",
            "envelope",
            "sigcheck",
            "protocol",
            "config",
            "fairness",
            "ratelimit",
            "replay",
            "fetchgate",
            "echo",
            "logs",
            "metrics",
            "files",
            "deferutil",
            "executor",
            "child",
            "childloop",
            "store.migrations",
            "policy",
            "contact",
            "peernet",
            "synblock",
        ),
        0,
    ),
    **dict.fromkeys(
        (
            "store.base",
            "store.settle",
            "store.sqlite_core",
            "store.emptiness",
            "store.sqlite",
            "store.writer_child",
            "store.writer_process",
            "store.postgres",
            "store.backup",
            "store",
            "verifier",
        ),
        1,
    ),
    **dict.fromkeys(("relay", "peers", "replication", "policy_sync"), 2),
    **dict.fromkeys(("web", "api", "peer_api", "cors", "inbox", "admin", "status"), 3),
    **dict.fromkeys(("node", "tap"), 4),
    **dict.fromkeys(("client", "cli", "demo", "migrate"), 5),
}
#: the upward imports docs/architecture.md names (function-local, on purpose)
ALLOWED_UP = {("config", "cors")}


def _imports(path: str) -> set[str]:
    import ast

    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "meshrelay":
            found.add(node.module)
            if node.module == "meshrelay":
                found.update(
                    f"meshrelay.{a.name}" for a in node.names if f"meshrelay.{a.name}" != "meshrelay.__version__"
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "meshrelay")
    return {"meshrelay" if m == "meshrelay" else m.removeprefix("meshrelay.") for m in found}


class ArchitectureTests(SynchronousTestCase):
    def test_imports_go_one_way(self) -> None:
        """Every meshrelay module is in a layer of docs/architecture.md and imports nothing from a higher layer."""
        package = os.path.join(REPO, "meshrelay")
        seen = set()
        for root, _, files in os.walk(package):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(root, name), package)[:-3].replace(os.sep, ".")
                module = "meshrelay" if rel == "__init__" else rel.removesuffix(".__init__")
                seen.add(module)
                self.assertIn(module, LAYERS, f"{module} is in no layer of docs/architecture.md")
                for dep in _imports(os.path.join(root, name)):
                    self.assertIn(dep, LAYERS, f"{module} imports {dep}, which is in no layer")
                    if LAYERS[dep] > LAYERS[module]:
                        self.assertIn((module, dep), ALLOWED_UP, f"{module} (layer {LAYERS[module]}) imports {dep}")
        self.assertEqual(seen, set(LAYERS), "docs/architecture.md lists a module that does not exist")
        doc = _read("docs", "architecture.md")
        for module in LAYERS:
            self.assertIn(f"`{module.removeprefix('meshrelay')}`" if module != "meshrelay" else "`__init__`", doc)
