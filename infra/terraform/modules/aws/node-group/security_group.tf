# The hosts' security group with what every host needs: HTTPS to the VPC endpoints and the
# mirror, its metrics ports from monitoring. The caller adds its role's rules to it.

locals {
  monitoring_rules = {
    for pair in setproduct(var.monitoring_cidrs, var.metrics_ports) :
    "${pair[0]}:${pair[1]}" => { cidr = pair[0], port = pair[1] }
  }
}

resource "aws_security_group" "hosts" {
  name        = var.name
  description = "Enclave ${var.name} hosts"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = var.name })
}

resource "aws_vpc_security_group_ingress_rule" "from_monitoring" {
  for_each = local.monitoring_rules

  security_group_id = aws_security_group.hosts.id
  description       = "Metrics port ${each.value.port} from monitoring"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "to_endpoints" {
  security_group_id            = aws_security_group.hosts.id
  description                  = "HTTPS to the VPC interface endpoints (logs, SSM, KMS, STS, ECR, Secrets Manager)"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = var.endpoints_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "to_mirror" {
  for_each = toset(var.mirror_cidrs)

  security_group_id = aws_security_group.hosts.id
  description       = "HTTPS to the internal package mirror"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}
