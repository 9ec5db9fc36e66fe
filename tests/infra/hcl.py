"""The Terraform tree as plain Python data (python-hcl2), and the rules the issue sets for it.

Each rule returns findings (strings naming the file and resource); the tests assert there are
none in infra/terraform and that each rule does find a planted violation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "infra" / "terraform"
OPEN_CIDRS = ("0.0.0.0/0", "::/0")
FORBIDDEN_TYPES = ("aws_internet_gateway", "aws_egress_only_internet_gateway", "aws_nat_gateway",
                   "aws_eip", "aws_eip_association", "aws_default_vpc", "aws_default_subnet")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _key(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


def _value(value: Any) -> Any:
    """Unquote string literals; blocks and lists recursively; dynamic blocks become blocks."""
    if isinstance(value, str):
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if isinstance(value, list):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in ("__is_block__", "__comments__", "__inline_comments__"):
                continue
            if k == "dynamic":
                for dyn in v:
                    for name, spec in dyn.items():
                        out.setdefault(_key(name), []).extend(_value(spec.get("content", [])))
                continue
            out[_key(k)] = _value(v)
        return out
    return value


@dataclass(frozen=True)
class Resource:
    file: Path
    type: str
    name: str
    body: dict[str, Any]

    def __str__(self) -> str:
        return f"{_rel(self.file)}: {self.type}.{self.name}"


@dataclass
class Tree:
    files: dict[Path, dict[str, Any]]
    texts: dict[Path, str]

    def blocks(self, kind: str) -> Iterator[tuple[Path, str, dict[str, Any]]]:
        for path, doc in self.files.items():
            for entry in doc.get(kind, []):
                for name, body in entry.items():
                    yield path, _key(name), _value(body)

    def resources(self, *types: str) -> Iterator[Resource]:
        for path, doc in self.files.items():
            for entry in doc.get("resource", []):
                for rtype, named in entry.items():
                    rtype = _key(rtype)
                    if types and rtype not in types:
                        continue
                    for name, body in named.items():
                        yield Resource(path, rtype, _key(name), _value(body))


def load(root: Path = TERRAFORM) -> Tree:
    files, texts = {}, {}
    for path in sorted(root.rglob("*.tf")):
        if ".terraform" in path.parts:
            continue
        texts[path] = path.read_text()
        with path.open() as f:
            files[path] = hcl2.load(f)
    return Tree(files, texts)


def nested(body: dict[str, Any], *path: str) -> Iterator[dict[str, Any]]:
    """Every block at that path (blocks are lists of dicts)."""
    if not path:
        yield body
        return
    for block in body.get(path[0], []) or []:
        if isinstance(block, dict):
            yield from nested(block, *path[1:])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


# ---- the rules ----------------------------------------------------------------------------

def untyped_or_undescribed(tree: Tree) -> list[str]:
    out = []
    for path, name, body in tree.blocks("variable"):
        if "type" not in body:
            out.append(f"{_rel(path)}: variable {name} has no type")
        if not str(body.get("description", "")).strip():
            out.append(f"{_rel(path)}: variable {name} has no description")
    for path, name, body in tree.blocks("output"):
        if not str(body.get("description", "")).strip():
            out.append(f"{_rel(path)}: output {name} has no description")
    return out


def open_to_the_world(tree: Tree) -> list[str]:
    """Security group rules (in every form the provider has) open to 0.0.0.0/0 or ::/0."""
    out = []
    for r in tree.resources("aws_vpc_security_group_ingress_rule",
                            "aws_vpc_security_group_egress_rule", "aws_security_group_rule",
                            "aws_security_group", "aws_default_security_group",
                            "aws_network_acl_rule", "aws_network_acl"):
        for s in _strings(r.body):
            if any(c in s for c in OPEN_CIDRS):
                out.append(f"{r}: open to {s}")
    return out


def internet_paths(tree: Tree) -> list[str]:
    out = [f"{r}: {r.type} is forbidden" for r in tree.resources(*FORBIDDEN_TYPES)]
    for r in tree.resources("aws_route", "aws_route_table", "aws_default_route_table"):
        routes = [r.body] if r.type == "aws_route" else list(r.body.get("route", []) or [])
        for route in routes:
            if not isinstance(route, dict):
                continue
            for key in ("gateway_id", "nat_gateway_id", "egress_only_gateway_id"):
                if route.get(key):
                    out.append(f"{r}: route through {key}")
            if route.get("destination_cidr_block") in OPEN_CIDRS:
                out.append(f"{r}: default route")
    for r in tree.resources("aws_subnet"):
        if r.body.get("map_public_ip_on_launch") is not False:
            out.append(f"{r}: map_public_ip_on_launch is not false")
    for r in tree.resources("aws_launch_template"):
        for nic in nested(r.body, "network_interfaces"):
            if nic.get("associate_public_ip_address") is not False:
                out.append(f"{r}: a network interface may get a public address")
        if not list(nested(r.body, "network_interfaces")):
            out.append(f"{r}: no network_interfaces block denying a public address")
    for r in tree.resources("aws_instance"):
        if r.body.get("associate_public_ip_address") is not False:
            out.append(f"{r}: associate_public_ip_address is not false")
    for r in tree.resources("aws_lb"):
        if r.body.get("internal") is not True:
            out.append(f"{r}: load balancer is not internal")
    return out


def _cmk(value: Any) -> bool:
    """A customer key: a reference to a variable, module output or aws_kms_key, never an AWS
    managed alias (alias/aws/...) or nothing."""
    return isinstance(value, str) and value.startswith("${") and "alias/aws/" not in value


def unencrypted(tree: Tree) -> list[str]:
    out = []
    for r in tree.resources("aws_launch_template", "aws_instance"):
        for ebs in [*nested(r.body, "block_device_mappings", "ebs"),
                    *nested(r.body, "root_block_device"), *nested(r.body, "ebs_block_device")]:
            if ebs.get("encrypted") is not True or not _cmk(ebs.get("kms_key_id")):
                out.append(f"{r}: a volume is not encrypted with a customer key")
    for r in tree.resources("aws_ebs_volume"):
        if r.body.get("encrypted") is not True or not _cmk(r.body.get("kms_key_id")):
            out.append(f"{r}: not encrypted with a customer key")
    for r in tree.resources("aws_cloudwatch_log_group", "aws_secretsmanager_secret"):
        if not _cmk(r.body.get("kms_key_id")):
            out.append(f"{r}: not encrypted with a customer key")
    for r in tree.resources("aws_kms_key"):
        if r.body.get("enable_key_rotation") is not True:
            out.append(f"{r}: key rotation is off")
    return out


def imds_v1_allowed(tree: Tree) -> list[str]:
    out = []
    for r in tree.resources("aws_launch_template", "aws_instance"):
        options = list(nested(r.body, "metadata_options"))
        if not options or any(o.get("http_tokens") != "required" for o in options):
            out.append(f"{r}: IMDSv2 is not required (metadata_options.http_tokens)")
    return out


SKIP = re.compile(r"#\s*(checkov:skip|trivy:ignore)[=:](\S+)(.*)")


def unexplained_skips(tree: Tree) -> list[str]:
    """Every scanner skip is inline, names one check and gives a reason."""
    out = []
    for path, text in tree.texts.items():
        for n, line in enumerate(text.splitlines(), 1):
            m = SKIP.search(line)
            if not m:
                continue
            check, reason = m.group(2), m.group(3)
            if m.group(1) == "checkov:skip":
                check, _, reason = check.partition(":")
                reason = reason + m.group(3)
            if not re.fullmatch(r"[A-Z0-9_-]+", check) or len(reason.strip(" :")) < 15:
                out.append(f"{_rel(path)}:{n}: skip without a check id and reason")
    return out


RULES = (untyped_or_undescribed, open_to_the_world, internet_paths, unencrypted,
         imds_v1_allowed, unexplained_skips)
