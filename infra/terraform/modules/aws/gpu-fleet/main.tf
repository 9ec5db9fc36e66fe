# The GPU fleet: hosts running the engine supervisor (vLLM) and the GPU exporter in an
# auto-scaling group across zones, behind an internal network load balancer that gives the
# gateways one name for all engines (one listener per engine port).

data "aws_region" "current" {}

locals {
  tags   = merge(var.tags, { "enclave:environment" = var.name, "enclave:role" = "engine" })
  ports  = { for p in var.engine_ports : tostring(p) => p }
  region = data.aws_region.current.name
}

module "bootstrap" {
  source = "../../bootstrap"

  role            = "engine"
  mirror_url      = var.bootstrap.mirror_url
  enclave_version = var.bootstrap.enclave_version
  release_sha256  = var.bootstrap.release_sha256
  firewall = {
    gateway_addrs      = join(" ", var.network.subnet_cidrs)
    engine_ports       = join(" ", var.engine_ports)
    exporter_port      = tostring(var.exporter_port)
    node_exporter_port = tostring(var.node_exporter_port)
    monitoring_cidrs   = join(" ", var.monitoring_cidrs)
    admin_cidrs        = "none" # Session Manager, not ssh
    dns                = var.network.dns_resolver
    ntp                = "169.254.169.123" # the Amazon Time Sync Service
    mirrors            = join(" ", var.mirror_cidrs)
    # the interface endpoints, and the instance metadata service (IMDSv2) for the role's credentials
    services = "${var.network.vpc_cidr_block}:443 169.254.169.254:80"
  }
  environment = {
    ENCLAVE_LOG_LEVEL = "INFO"
  }
  data_disk_model      = "Amazon Elastic Block Store" # not an instance-store NVMe disk
  weights_sync_command = "aws --region ${local.region} s3 sync --only-show-errors s3://${element(split(":::", var.weights_bucket_arn), 1)}/${var.weights_prefix}"
}

data "aws_iam_policy_document" "engines" {
  statement {
    sid       = "ReadTheWeights"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${var.weights_bucket_arn}/${var.weights_prefix}*"]
  }

  statement {
    sid       = "ListTheWeights"
    actions   = ["s3:ListBucket"]
    resources = [var.weights_bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.weights_prefix}*"]
    }
  }

  dynamic "statement" {
    for_each = var.weights_kms_key_arn == null ? [] : [1]

    content {
      sid       = "DecryptTheWeightsThroughS3"
      actions   = ["kms:Decrypt"]
      resources = [var.weights_kms_key_arn]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["s3.${local.region}.amazonaws.com"]
      }
    }
  }
}

module "hosts" {
  source = "../node-group"

  name                        = "${var.name}-engines"
  subnet_ids                  = var.network.subnet_ids
  vpc_id                      = var.network.vpc_id
  endpoints_security_group_id = var.network.endpoints_security_group_id
  mirror_cidrs                = var.mirror_cidrs
  monitoring_cidrs            = var.monitoring_cidrs
  metrics_ports               = concat(var.engine_ports, [var.exporter_port, var.node_exporter_port])
  image_id                    = var.image_id
  instance_type               = var.instance_type
  user_data                   = module.bootstrap.user_data
  volumes_kms_key_arn         = var.volumes_kms_key_arn
  logs_kms_key_arn            = var.logs_kms_key_arn
  root_volume_size_gb         = var.root_volume_size_gb
  data_volume_size_gb         = var.data_volume_size_gb
  min_size                    = var.min_size
  max_size                    = var.max_size
  desired_capacity            = var.desired_capacity
  target_group_arns           = [for tg in aws_lb_target_group.engines : tg.arn]
  # one host at a time out of a small GPU fleet: with 2 hosts, 50% keeps one serving
  refresh_min_healthy_percentage = 50
  instance_warmup                = 900
  # bootstrap installs vLLM's CUDA wheels, syncs the weights, then the engines load them
  health_check_grace_period = 2400
  attach_instance_policy    = true
  instance_policy_json      = data.aws_iam_policy_document.engines.json
  ecr_repository_arns       = var.ecr_repository_arns
  log_group_prefix          = "/enclave/"
  tags                      = local.tags
}

resource "aws_lb" "engines" {
  #checkov:skip=CKV_AWS_91:NLB access logs record TLS listeners only; these are TCP, and VPC flow logs record every connection
  name                             = "${var.name}-engines"
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = var.network.subnet_ids
  security_groups                  = [aws_security_group.engine_lb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = true
  tags                             = local.tags
}

resource "aws_lb_target_group" "engines" {
  for_each = local.ports

  name                 = "${var.name}-engine-${each.key}"
  vpc_id               = var.network.vpc_id
  port                 = each.value
  protocol             = "TCP"
  target_type          = "instance"
  deregistration_delay = var.deregistration_delay

  # vLLM's /health answers 200 once the model is loaded
  health_check {
    protocol            = "HTTP"
    path                = "/health"
    port                = "traffic-port"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  tags = local.tags
}

resource "aws_lb_listener" "engines" {
  for_each = local.ports

  load_balancer_arn = aws_lb.engines.arn
  port              = each.value
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.engines[each.key].arn
  }

  tags = local.tags
}
