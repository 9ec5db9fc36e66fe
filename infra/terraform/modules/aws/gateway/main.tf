# The API: an internal network load balancer that ends TLS (TLS 1.2+/1.3, a certificate from
# the private CA) in front of gateway hosts in an auto-scaling group across zones. The gateways
# read their secrets from Secrets Manager at boot and reach the engines through gpu-fleet's
# engine load balancer.

data "aws_region" "current" {}

locals {
  tags         = merge(var.tags, { "enclave:environment" = var.name, "enclave:role" = "gateway" })
  region       = data.aws_region.current.name
  engine_ports = { for p in var.engine_ports : tostring(p) => p }
}

module "bootstrap" {
  source = "../../bootstrap"

  role            = "gateway"
  mirror_url      = var.bootstrap.mirror_url
  enclave_version = var.bootstrap.enclave_version
  release_sha256  = var.bootstrap.release_sha256
  firewall = {
    # the load balancer keeps the client's address, and its health checks come from its
    # own addresses in the subnets
    client_cidrs     = join(" ", concat(var.client_cidrs, var.network.subnet_cidrs))
    engine_addrs     = join(" ", var.network.subnet_cidrs)
    engine_ports     = join(" ", var.engine_ports)
    gateway_port     = tostring(var.gateway_port)
    monitoring_cidrs = join(" ", var.monitoring_cidrs)
    admin_cidrs      = "none" # Session Manager, not ssh
    dns              = var.network.dns_resolver
    ntp              = "169.254.169.123" # the Amazon Time Sync Service
    mirrors          = join(" ", var.mirror_cidrs)
    services = join(" ", concat(
      ["${var.network.vpc_cidr_block}:443", "169.254.169.254:80"],
      [for s in var.services : "${s.cidr}:${s.port}"],
    ))
  }
  environment = {
    ENCLAVE_HOST        = "0.0.0.0"
    ENCLAVE_PORT        = tostring(var.gateway_port)
    ENCLAVE_ENGINE_HOST = var.engine_host
  }
  secret_env           = { for k, s in local.secrets : s.env => aws_secretsmanager_secret.gateway[k].arn }
  secret_fetch_command = "aws --region ${local.region} secretsmanager get-secret-value --query SecretString --output text --secret-id"
}

data "aws_iam_policy_document" "gateways" {
  statement {
    sid       = "ReadTheGatewaySecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [for s in aws_secretsmanager_secret.gateway : s.arn]
  }

  statement {
    sid       = "DecryptThemThroughSecretsManager"
    actions   = ["kms:Decrypt"]
    resources = [var.secrets_kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${local.region}.amazonaws.com"]
    }
  }
}

module "hosts" {
  source = "../node-group"

  name                        = "${var.name}-gateways"
  subnet_ids                  = var.network.subnet_ids
  vpc_id                      = var.network.vpc_id
  endpoints_security_group_id = var.network.endpoints_security_group_id
  mirror_cidrs                = var.mirror_cidrs
  monitoring_cidrs            = var.monitoring_cidrs
  metrics_ports               = [var.gateway_port, 9100]
  image_id                    = var.image_id
  instance_type               = var.instance_type
  user_data                   = module.bootstrap.user_data
  volumes_kms_key_arn         = var.volumes_kms_key_arn
  logs_kms_key_arn            = var.logs_kms_key_arn
  root_volume_size_gb         = 30
  min_size                    = var.min_size
  max_size                    = var.max_size
  desired_capacity            = var.desired_capacity
  target_group_arns           = [aws_lb_target_group.gateways.arn]
  health_check_grace_period   = 300
  instance_warmup             = 120
  attach_instance_policy      = true
  instance_policy_json        = data.aws_iam_policy_document.gateways.json
  log_group_prefix            = "/enclave/"
  tags                        = local.tags
}

resource "aws_lb" "api" {
  name                             = "${var.name}-api"
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = var.network.subnet_ids
  security_groups                  = [aws_security_group.lb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = true

  access_logs {
    bucket  = var.access_logs_bucket
    prefix  = "${var.name}/api-lb"
    enabled = true
  }

  tags = local.tags
}

resource "aws_lb_target_group" "gateways" {
  name                 = "${var.name}-gateways"
  vpc_id               = var.network.vpc_id
  port                 = var.gateway_port
  protocol             = "TCP"
  target_type          = "instance"
  deregistration_delay = var.deregistration_delay

  health_check {
    protocol            = "HTTP"
    path                = "/readyz"
    port                = "traffic-port"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = local.tags
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "TLS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn
  alpn_policy       = "HTTP1Only"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.gateways.arn
  }

  tags = local.tags
}
