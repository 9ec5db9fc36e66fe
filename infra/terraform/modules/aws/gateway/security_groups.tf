# clients --> API load balancer (443) --> gateways (gateway_port) --> engine load balancer
# (engine ports); gateways --> the services given (PostgreSQL, Redis). The rules every host has
# (endpoints, mirror, metrics from monitoring) come with node-group's security group.

resource "aws_security_group" "lb" {
  name        = "${var.name}-api-lb"
  description = "API load balancer: HTTPS from the client networks only"
  vpc_id      = var.network.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-api-lb" })
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
  referenced_security_group_id = module.hosts.security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "gateways_from_lb" {
  security_group_id            = module.hosts.security_group_id
  description                  = "The gateway port from the API load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.gateway_port
  to_port                      = var.gateway_port
  referenced_security_group_id = aws_security_group.lb.id
}

resource "aws_vpc_security_group_egress_rule" "gateways_to_engines" {
  for_each = local.engine_ports

  security_group_id            = module.hosts.security_group_id
  description                  = "Engine port ${each.key} on the engine load balancer"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = var.engine_lb_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "gateways_to_services" {
  for_each = { for s in var.services : "${s.cidr}:${s.port}" => s }

  security_group_id = module.hosts.security_group_id
  description       = each.value.description
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}
