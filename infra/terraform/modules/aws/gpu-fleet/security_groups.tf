# gateways --> engine load balancer --> engines; engines --> S3 (the weights). The rules every
# host has (endpoints, mirror, metrics from monitoring) come with node-group's security group.

resource "aws_security_group" "engine_lb" {
  name        = "${var.name}-engine-lb"
  description = "Engine load balancer: engine ports from the gateways only"
  vpc_id      = var.network.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-engine-lb" })
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
  referenced_security_group_id = module.hosts.security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "engines_from_lb" {
  for_each = local.ports

  security_group_id            = module.hosts.security_group_id
  description                  = "Engine port ${each.key} from the engine load balancer"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.engine_lb.id
}

resource "aws_vpc_security_group_egress_rule" "engines_to_s3" {
  security_group_id = module.hosts.security_group_id
  description       = "HTTPS to S3 through the gateway endpoint (the weights)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_id    = var.network.s3_prefix_list_id
}
