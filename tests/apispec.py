"""docs/openapi.yaml for the tests: loading, schema lookup, response validation, raw HTTP to a node.

Shared by ``tests/test_openapi.py`` (the spec stays true) and ``tests/test_fuzz_api.py``
(schemathesis against a live node).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jsonschema_rs
import yaml
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from meshrelay import envelope as E
from meshrelay.errors import STATUS_BY_CODE
from meshrelay.peers import H_HMAC, H_NONCE, H_TS, H_URL, compute_mac, derive_key
from tests.harness import REPO

SPEC_PATH = os.path.join(REPO, "docs", "openapi.yaml")
DRAFT = "https://json-schema.org/draft/2020-12/schema"


@functools.lru_cache(maxsize=1)
def _spec_text() -> str:
    with open(SPEC_PATH, encoding="utf-8") as fh:
        return fh.read()


def load_spec() -> dict[str, Any]:
    """A fresh copy of the parsed spec (callers may mutate it)."""
    spec = yaml.safe_load(_spec_text())
    assert isinstance(spec, dict)
    return spec


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow ``$ref`` (local, ``#/...``) until a non-reference node."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = spec
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, METHOD) -> operation object."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                out[(path, method.upper())] = op
    return out


def response_schema(spec: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any] | None:
    """The documented JSON schema of ``status`` for an operation, or None when undocumented."""
    op = operations(spec)[(path, method)]
    response = op["responses"].get(str(status))
    if response is None:
        return None
    response = resolve(spec, response)
    schema = response["content"]["application/json"]["schema"]
    assert isinstance(schema, dict)
    return schema


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A JSON Schema 2020-12 validator for ``schema``, its ``#/components/...`` refs resolvable."""
    root = dict(schema)
    root["$schema"] = DRAFT
    root["components"] = spec["components"]
    return jsonschema_rs.validator_for(root)


def schema_errors(spec: dict[str, Any], schema: dict[str, Any], instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator(spec, schema).iter_errors(instance)
    ]


def error_codes_of(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The ``error`` codes an error response schema allows (``allOf: [Error, {error: enum|const}]``)."""
    codes: set[str] | None = None
    for part in schema.get("allOf", [schema]):
        part = resolve(spec, part)
        prop = resolve(spec, part.get("properties", {}).get("error", {}))
        allowed = set(prop["enum"]) if "enum" in prop else {prop["const"]} if "const" in prop else None
        if allowed is not None:
            codes = allowed if codes is None else codes & allowed
    assert codes is not None, schema
    return codes


def documented_answers(spec: dict[str, Any], path: str, method: str) -> set[tuple[int, str | None]]:
    """Every (status, error code) an operation documents; success statuses carry None."""
    out: set[tuple[int, str | None]] = set()
    for status in operations(spec)[(path, method)]["responses"]:
        schema = response_schema(spec, path, method, int(status))
        assert schema is not None
        if int(status) < 400:
            out.add((int(status), None))
        else:
            out.update((int(status), code) for code in error_codes_of(spec, schema))
    return out


def documented_items(spec: dict[str, Any], name: str) -> set[tuple[str, str | None]]:
    """Every (status, error) a per-item result schema (``ReplicaResult``, ``AckItemResult``) allows."""
    out: set[tuple[str, str | None]] = set()
    for variant in spec["components"]["schemas"][name]["oneOf"]:
        props = variant["properties"]
        status = props["status"]
        statuses = status["enum"] if "enum" in status else [status["const"]]
        errors: list[str | None] = list(props["error"]["enum"]) if "error" in props else [None]
        out.update((s, e) for s in statuses for e in errors)
    return out


def error_shape_problems(status: int, body: Any) -> list[str]:
    """What is wrong with a refusal's body, judged by the protocol alone (not the spec)."""
    if not isinstance(body, dict):
        return [f"body is not a JSON object: {body!r:.200}"]
    problems = []
    if body.get("ok") is not False:
        problems.append("ok is not false")
    code = body.get("error")
    if code not in STATUS_BY_CODE:
        problems.append(f"unknown error code {code!r}")
    elif STATUS_BY_CODE[code] != status:
        problems.append(f"error {code!r} answered with status {status}, not {STATUS_BY_CODE[code]}")
    if not isinstance(body.get("detail"), str):
        problems.append("detail is not a string")
    extra = set(body) - {"ok", "error", "detail"}
    if code == "sender_cap":
        for key in ("pending", "limit"):
            if type(body.get(key)) is not int:
                problems.append(f"sender_cap without integer {key}")
        extra -= {"pending", "limit"}
    if code in ("stamp_required", "weak_stamp"):
        if type(body.get("difficulty")) is not int:
            problems.append(f"{code} without integer difficulty")
        extra -= {"difficulty"}
    if extra:
        problems.append(f"unexpected fields {sorted(extra)}")
    return problems


# --------------------------------------------------------------------------- raw HTTP to an in-memory node


def peer_headers(
    caller: str, secret: str, method: str, target: str, body: bytes, now: float, nonce: bytes | None = None
) -> dict[str, str]:
    """Valid X-Peer-* headers for a request from ``caller`` (signed with its link key)."""
    ts = int(now)
    nonce_text = E.b64u_encode(nonce if nonce is not None else os.urandom(16))
    key = derive_key(secret, caller)
    return {
        H_URL: caller,
        H_TS: str(ts),
        H_NONCE: nonce_text,
        H_HMAC: compute_mac(key, method, target, ts, nonce_text, body),
    }


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            return out
        out += data[:size]
        data = data[size + 2 :]


def exchange(
    site: Any, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One request through ``site`` (a real MeshSite) over a fake transport: (status, headers, JSON body)."""
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert proto is not None
    transport = StringTransport()
    proto.makeConnection(transport)
    lines = [f"{method} {target} HTTP/1.1", "Host: a.test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    try:
        proto.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        raw = transport.value()
    finally:
        proto.connectionLost(Failure(ConnectionDone()))
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    hdrs = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        hdrs[name.strip().lower()] = value.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    elif "content-length" in hdrs:
        payload = payload[: int(hdrs["content-length"])]
    return status, hdrs, json.loads(payload) if payload else None
