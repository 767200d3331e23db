"""Packaging for meshrelay.

``twisted.plugins`` is listed explicitly so ``twistd`` finds the ``meshrelay``
plugin after a plain ``pip install .``; ``twisted/`` and ``twisted/plugins/``
must never get an ``__init__.py`` of their own.
"""

from setuptools import find_packages, setup

setup(
    name="meshrelay",
    version="0.1.0",
    description="Store-and-forward relay for end-to-end-encrypted direct messages, run as a mesh",
    python_requires=">=3.11",
    packages=find_packages(include=["meshrelay", "meshrelay.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["meshrelay_plugin.py"], "meshrelay": ["py.typed"]},
    install_requires=[
        "Twisted>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "cryptography>=42",
        "prometheus_client>=0.20",
        "PyNaCl>=1.5",
        # peers through a SOCKS5 proxy (its SOCKS client) and onion-service listeners (its endpoints)
        "txtorcon>=23.11",
    ],
    extras_require={
        # the PostgreSQL store backend (several processes sharing one database)
        "postgresql": ["psycopg[binary]>=3.2"],
        "test": [
            "psycopg[binary]>=3.2",
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            # schema fuzzing of a live node from docs/openapi.yaml (tests/test_fuzz_api.py)
            "schemathesis>=4.0",
            # docs/openapi.yaml is read by the tests (schemathesis depends on it too)
            "PyYAML>=6",
            "ruff>=0.6",
            "mypy>=1.11",
            # mypy understands zope.interface declarations (IReactorTime, IRequest) with it
            "mypy-zope>=1.0.9",
        ],
        # bench/deposit.py --profile (py-spy); bench/soak.py's plot (matplotlib); the deposit load
        # generator is wrk (apt-get install -y wrk)
        "bench": ["py-spy>=0.3", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["meshrelay = meshrelay.cli:main"]},
)
