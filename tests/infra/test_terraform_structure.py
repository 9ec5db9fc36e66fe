"""The Terraform tree, parsed (python-hcl2): the rules of issue 7 hold, and each rule catches a
planted violation (so a rule that checks nothing would fail here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.infra import hcl
from tests.infra.hcl import TERRAFORM, Tree

Rule = Callable[[Tree], list[str]]


@pytest.fixture(scope="module")
def tree() -> Tree:
    return hcl.load()


@pytest.mark.parametrize("rule", hcl.RULES, ids=lambda r: r.__name__)
def test_the_tree_follows_the_rule(tree: Tree, rule: Rule) -> None:
    assert rule(tree) == []


PLANTED: dict[str, str] = {
    "untyped_or_undescribed": '''
variable "a" { description = "typed? no" }
variable "b" { type = string }
output "c" { value = 1 }
''',
    "open_to_the_world": '''
resource "aws_vpc_security_group_ingress_rule" "ssh" {
  security_group_id = "sg-1"
  description       = "ssh"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = "0.0.0.0/0"
}
resource "aws_security_group" "inline" {
  egress {
    from_port        = 0
    to_port          = 0
    protocol         = "-1"
    ipv6_cidr_blocks = ["::/0"]
  }
}
''',
    "internet_paths": '''
resource "aws_internet_gateway" "igw" { vpc_id = "vpc-1" }
resource "aws_nat_gateway" "nat" { subnet_id = "subnet-1" }
resource "aws_route" "out" {
  route_table_id         = "rtb-1"
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.igw.id
}
resource "aws_subnet" "public" {
  vpc_id                  = "vpc-1"
  map_public_ip_on_launch = true
}
resource "aws_launch_template" "lt" {
  network_interfaces { associate_public_ip_address = true }
}
resource "aws_lb" "public" { internal = false }
''',
    "unencrypted": '''
resource "aws_launch_template" "lt" {
  block_device_mappings {
    device_name = "/dev/sda1"
    ebs { encrypted = true }
  }
}
resource "aws_cloudwatch_log_group" "logs" { name = "x" }
resource "aws_secretsmanager_secret" "s" { kms_key_id = "alias/aws/secretsmanager" }
resource "aws_kms_key" "k" { enable_key_rotation = false }
''',
    "imds_v1_allowed": '''
resource "aws_launch_template" "lt" {
  metadata_options { http_tokens = "optional" }
}
resource "aws_instance" "i" { ami = "ami-1" }
''',
    "unexplained_skips": '''
resource "aws_kms_key" "k" {
  #checkov:skip=CKV_AWS_7
  #trivy:ignore:AVD-AWS-0065
  enable_key_rotation = true
}
''',
}


@pytest.mark.parametrize("rule", hcl.RULES, ids=lambda r: r.__name__)
def test_the_rule_finds_a_planted_violation(tmp_path: Path, rule: Rule) -> None:
    (tmp_path / "bad.tf").write_text(PLANTED[rule.__name__])
    findings = rule(hcl.load(tmp_path))
    expected = {"untyped_or_undescribed": 3, "open_to_the_world": 2, "internet_paths": 7,
                "unencrypted": 4, "imds_v1_allowed": 2, "unexplained_skips": 2}
    assert len(findings) == expected[rule.__name__], findings


def test_every_module_is_wired_into_the_example(tree: Tree) -> None:
    modules = {p.parent for p in (TERRAFORM / "modules").rglob("main.tf")}
    used = set()
    for path, _, body in tree.blocks("module"):
        used.add((path.parent / body["source"]).resolve())
    assert modules - used == set()
    for module in modules:
        assert (module / "versions.tf").is_file(), module
        assert (module / "variables.tf").is_file(), module
        assert (module / "outputs.tf").is_file(), module


def test_the_example_tfvars_gives_every_required_input(tree: Tree) -> None:
    example = TERRAFORM / "examples" / "private-gpu-platform"
    required = {name for path, name, body in tree.blocks("variable")
                if path.parent == example and "default" not in body}
    given = {line.split("=", 1)[0].strip()
             for line in (example / "terraform.tfvars.example").read_text().splitlines()
             if "=" in line and not line.startswith((" ", "#", "]"))}
    assert required and required <= given, required - given


def test_the_network_has_the_endpoints_an_air_gapped_fleet_needs(tree: Tree) -> None:
    variables = {name: body for path, name, body in tree.blocks("variable")
                 if path.parent.name == "network"}
    services = set(variables["interface_endpoint_services"]["default"])
    assert {"ecr.api", "ecr.dkr", "ssm", "ssmmessages", "ec2messages", "logs", "kms",
            "sts"} <= services
    endpoints = list(tree.resources("aws_vpc_endpoint"))
    assert {e.body["vpc_endpoint_type"] for e in endpoints} == {"Interface", "Gateway"}
    for endpoint in endpoints:  # every one with a policy that binds it to this account
        assert "aws:PrincipalAccount" in str(endpoint.body.get("policy")), endpoint
        if endpoint.body["vpc_endpoint_type"] == "Interface":
            assert endpoint.body["private_dns_enabled"] is True, endpoint
    (default_sg,) = tree.resources("aws_default_security_group")
    assert "ingress" not in default_sg.body and "egress" not in default_sg.body
    (flow_log,) = tree.resources("aws_flow_log")
    assert flow_log.body["traffic_type"] == "ALL"
    for group in tree.resources("aws_cloudwatch_log_group"):
        assert group.body.get("retention_in_days"), group


def test_the_api_listener_speaks_tls_1_2_or_1_3_only(tree: Tree) -> None:
    tls = [r for r in tree.resources("aws_lb_listener") if r.body.get("protocol") == "TLS"]
    assert len(tls) == 1
    policy = tls[0].body["ssl_policy"]
    defaults = {name: body.get("default") for path, name, body in tree.blocks("variable")
                if path.parent.name == "gateway"}
    assert policy == "${var.ssl_policy}"
    assert defaults["ssl_policy"].startswith("ELBSecurityPolicy-TLS13-")


def test_the_metadata_hop_limit_defaults_to_one(tree: Tree) -> None:
    hop = {name: body for path, name, body in tree.blocks("variable")
           if path.parent.name == "node-group"}["metadata_hop_limit"]
    assert hop["default"] == 1 and "container" in hop["description"]
