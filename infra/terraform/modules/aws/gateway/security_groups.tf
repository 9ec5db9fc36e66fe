# clients --> API load balancer (443) --> gateways (gateway_port) --> engine load balancer
# (engine ports); monitoring --> metrics; gateways --> the AWS endpoints, the mirror and the
# services given (PostgreSQL, Redis). Nothing else in or out.

resource "aws_security_group" "lb" {
  name        = "${var.name}-api-lb"
  description = "API load balancer: HTTPS from the client networks only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-api-lb" })
}

resource "aws_security_group" "gateways" {
  #checkov:skip=CKV2_AWS_5:attached to the hosts by the node-group module's launch template, through a module input the graph does not follow
  name        = "${var.name}-gateways"
  description = "Gateway hosts: the API port from the API load balancer, metrics from monitoring"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-gateways" })
}

resource "aws_vpc_security_group_ingress_rule" "lb_from_clients" {
  for_each = toset(var.client_cidrs)

  security_group_id = aws_security_group.lb.id
  description       = "HTTPS from client network ${each.value}"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "lb_to_gateways" {
  security_group_id            = aws_security_group.lb.id
  description                  = "The gateway port (traffic and health checks)"
  ip_protocol                  = "tcp"
  from_port                    = var.gateway_port
  to_port                      = var.gateway_port
  referenced_security_group_id = aws_security_group.gateways.id
}

resource "aws_vpc_security_group_ingress_rule" "gateways_from_lb" {
  security_group_id            = aws_security_group.gateways.id
  description                  = "The gateway port from the API load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.gateway_port
  to_port                      = var.gateway_port
  referenced_security_group_id = aws_security_group.lb.id
}

resource "aws_vpc_security_group_ingress_rule" "gateways_from_monitoring" {
  for_each = local.monitoring_rules

  security_group_id = aws_security_group.gateways.id
  description       = "Metrics port ${each.value.port} from monitoring"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "gateways_to_engines" {
  for_each = local.engine_ports

  security_group_id            = aws_security_group.gateways.id
  description                  = "Engine port ${each.key} on the engine load balancer"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = var.engine_lb_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "gateways_to_endpoints" {
  security_group_id            = aws_security_group.gateways.id
  description                  = "HTTPS to the VPC interface endpoints (Secrets Manager, logs, SSM, KMS)"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = var.endpoints_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "gateways_to_mirror" {
  for_each = toset(var.mirror_cidrs)

  security_group_id = aws_security_group.gateways.id
  description       = "HTTPS to the internal package mirror"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "gateways_to_services" {
  for_each = { for s in var.services : "${s.cidr}:${s.port}" => s }

  security_group_id = aws_security_group.gateways.id
  description       = each.value.description
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}
