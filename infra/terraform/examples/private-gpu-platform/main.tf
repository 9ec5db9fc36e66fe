# The whole platform in one private VPC: customer keys, the network, the GPU fleet and the
# gateway. Apply it in one run; the README says what must exist first (mirror, AMIs,
# certificate, weights and log buckets) and what to do after (the secrets' values, DNS).

locals {
  bootstrap = {
    mirror_url      = var.mirror_url
    enclave_version = var.enclave_version
    release_sha256  = var.release_sha256
  }
}

module "logs_key" {
  source = "../../modules/aws/kms"

  name                          = "${var.name}/logs"
  description                   = "${var.name}: CloudWatch log groups (flow logs, host logs)"
  cloudwatch_log_group_prefixes = ["/enclave/"]
}

module "volumes_key" {
  source = "../../modules/aws/kms"

  name              = "${var.name}/volumes"
  description       = "${var.name}: EBS volumes of the gateway and GPU hosts"
  allow_autoscaling = true
}

module "secrets_key" {
  source = "../../modules/aws/kms"

  name        = "${var.name}/secrets"
  description = "${var.name}: the gateway's secrets in Secrets Manager"
}

module "network" {
  source = "../../modules/aws/network"

  name               = var.name
  cidr_block         = var.cidr_block
  availability_zones = var.availability_zones
  weights_bucket_arn = var.weights_bucket_arn
  weights_prefix     = var.weights_prefix
  logs_kms_key_arn   = module.logs_key.key_arn
  transit_gateway_id = var.transit_gateway_id
  routed_cidrs = distinct(concat(var.client_cidrs, var.monitoring_cidrs, var.mirror_cidrs,
  [for s in var.services : s.cidr]))
}

module "gpu_fleet" {
  source = "../../modules/aws/gpu-fleet"

  name                      = var.name
  network                   = module.network.hosts
  gateway_security_group_id = module.gateway.gateway_security_group_id
  engine_ports              = var.engine_ports
  monitoring_cidrs          = var.monitoring_cidrs
  mirror_cidrs              = var.mirror_cidrs
  image_id                  = var.gpu_image_id
  instance_type             = var.gpu_instance_type
  min_size                  = var.gpu_hosts
  desired_capacity          = var.gpu_hosts
  max_size                  = var.gpu_hosts + 1
  weights_bucket_arn        = var.weights_bucket_arn
  weights_prefix            = var.weights_prefix
  weights_kms_key_arn       = var.weights_kms_key_arn
  volumes_kms_key_arn       = module.volumes_key.key_arn
  logs_kms_key_arn          = module.logs_key.key_arn
  bootstrap                 = local.bootstrap
}

module "gateway" {
  source = "../../modules/aws/gateway"

  name                        = var.name
  network                     = module.network.hosts
  client_cidrs                = var.client_cidrs
  certificate_arn             = var.certificate_arn
  access_logs_bucket          = var.access_logs_bucket
  engine_host                 = module.gpu_fleet.engine_host
  engine_ports                = var.engine_ports
  engine_lb_security_group_id = module.gpu_fleet.engine_lb_security_group_id
  services                    = var.services
  monitoring_cidrs            = var.monitoring_cidrs
  mirror_cidrs                = var.mirror_cidrs
  image_id                    = var.gateway_image_id
  volumes_kms_key_arn         = module.volumes_key.key_arn
  logs_kms_key_arn            = module.logs_key.key_arn
  secrets_kms_key_arn         = module.secrets_key.key_arn
  bootstrap                   = local.bootstrap
}
