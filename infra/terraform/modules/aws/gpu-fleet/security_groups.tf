# gateways --> engine load balancer --> engines; monitoring --> metrics ports; engines --> the
# AWS endpoints, the weights (S3) and the mirror over HTTPS. Nothing else in or out.

resource "aws_security_group" "engine_lb" {
  name        = "${var.name}-engine-lb"
  description = "Engine load balancer: engine ports from the gateways only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-engine-lb" })
}

resource "aws_security_group" "engines" {
  #checkov:skip=CKV2_AWS_5:attached to the hosts by the node-group module's launch template, through a module input the graph does not follow
  name        = "${var.name}-engines"
  description = "GPU hosts: engine ports from the engine load balancer, metrics from monitoring"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-engines" })
}

resource "aws_vpc_security_group_ingress_rule" "lb_from_gateways" {
  for_each = local.ports

  security_group_id            = aws_security_group.engine_lb.id
  description                  = "Engine port ${each.key} from the gateways"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = var.gateway_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "lb_to_engines" {
  for_each = local.ports

  security_group_id            = aws_security_group.engine_lb.id
  description                  = "Engine port ${each.key} to the GPU hosts (traffic and health checks)"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.engines.id
}

resource "aws_vpc_security_group_ingress_rule" "engines_from_lb" {
  for_each = local.ports

  security_group_id            = aws_security_group.engines.id
  description                  = "Engine port ${each.key} from the engine load balancer"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.engine_lb.id
}

resource "aws_vpc_security_group_ingress_rule" "engines_from_monitoring" {
  for_each = local.monitoring_rules

  security_group_id = aws_security_group.engines.id
  description       = "Metrics port ${each.value.port} from monitoring"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "engines_to_endpoints" {
  security_group_id            = aws_security_group.engines.id
  description                  = "HTTPS to the VPC interface endpoints (logs, SSM, KMS, STS, ECR)"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = var.endpoints_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "engines_to_s3" {
  security_group_id = aws_security_group.engines.id
  description       = "HTTPS to S3 through the gateway endpoint (the weights)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_id    = var.s3_prefix_list_id
}

resource "aws_vpc_security_group_egress_rule" "engines_to_mirror" {
  for_each = toset(var.mirror_cidrs)

  security_group_id = aws_security_group.engines.id
  description       = "HTTPS to the internal package mirror"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}
