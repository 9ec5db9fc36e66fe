# A group of hardened hosts: a launch template (IMDSv2 only, no public address, encrypted
# volumes), an auto-scaling group across the given zones with rolling instance refresh, and an
# instance profile that may write the group's logs, use Session Manager, and what the caller adds.

data "aws_partition" "current" {}

# The AMI's own root device name, so the root volume mapping replaces the AMI's root disk
# (a wrong name would add a blank disk and leave the root unencrypted by our key).
#trivy:ignore:AVD-AWS-0344 looked up by its exact image id (given by the operator), not by name
data "aws_ami" "image" {
  #checkov:skip=CKV_AWS_386:looked up by its exact image id (given by the operator), not by a name pattern
  filter {
    name   = "image-id"
    values = [var.image_id]
  }
}

locals {
  partition  = data.aws_partition.current.partition
  log_group  = "${var.log_group_prefix}${var.name}"
  tags       = merge(var.tags, { "enclave:node-group" = var.name })
  use_lb     = length(var.target_group_arns) > 0
  data_disks = var.data_volume_size_gb > 0 ? { "/dev/sdf" = var.data_volume_size_gb } : {}
}

resource "aws_cloudwatch_log_group" "hosts" {
  name              = local.log_group
  retention_in_days = var.log_retention_days
  kms_key_id        = var.logs_kms_key_arn
  tags              = local.tags
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "base" {
  statement {
    sid       = "WriteThisGroupsLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.hosts.arn}:*"]
  }

  dynamic "statement" {
    for_each = length(var.ecr_repository_arns) > 0 ? [1] : []

    content {
      sid       = "PullTheseImages"
      actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
      resources = var.ecr_repository_arns
    }
  }

  dynamic "statement" {
    for_each = length(var.ecr_repository_arns) > 0 ? [1] : []

    content {
      # GetAuthorizationToken has no resource: AWS accepts only "*" here.
      sid       = "RegistryLogin"
      actions   = ["ecr:GetAuthorizationToken"]
      resources = ["*"]
    }
  }
}

resource "aws_iam_role" "hosts" {
  name               = "${var.name}-hosts"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "base" {
  name   = "logs-and-images"
  role   = aws_iam_role.hosts.id
  policy = data.aws_iam_policy_document.base.json
}

resource "aws_iam_role_policy" "extra" {
  count = var.attach_instance_policy ? 1 : 0

  name   = "role"
  role   = aws_iam_role.hosts.id
  policy = var.instance_policy_json
}

# Session Manager instead of ssh: no inbound port, every session logged.
resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.hosts.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "hosts" {
  name = "${var.name}-hosts"
  role = aws_iam_role.hosts.name
  tags = local.tags
}

resource "aws_launch_template" "hosts" {
  name_prefix            = "${var.name}-"
  description            = "Enclave ${var.name} hosts"
  image_id               = var.image_id
  instance_type          = var.instance_type
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64encode(var.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.hosts.arn
  }

  # IMDSv2 only (a token is required, so an SSRF that can only send GETs gets nothing);
  # the hop limit is explained in variables.tf.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = var.metadata_hop_limit
    http_protocol_ipv6          = "disabled"
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  network_interfaces {
    device_index                = 0
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.hosts.id]
  }

  block_device_mappings {
    device_name = data.aws_ami.image.root_device_name

    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_size_gb
      encrypted             = true
      kms_key_id            = var.volumes_kms_key_arn
      delete_on_termination = true
    }
  }

  dynamic "block_device_mappings" {
    for_each = local.data_disks

    content {
      device_name = block_device_mappings.key

      ebs {
        volume_type           = "gp3"
        volume_size           = block_device_mappings.value
        throughput            = 500
        iops                  = 6000
        encrypted             = true
        kms_key_id            = var.volumes_kms_key_arn
        delete_on_termination = true
      }
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = var.name })
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "hosts" {
  name                      = var.name
  vpc_zone_identifier       = var.subnet_ids
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  target_group_arns         = var.target_group_arns
  health_check_type         = local.use_lb ? "ELB" : "EC2"
  health_check_grace_period = var.health_check_grace_period
  default_instance_warmup   = var.instance_warmup
  termination_policies      = ["OldestLaunchTemplate", "OldestInstance"]
  enabled_metrics           = ["GroupInServiceInstances", "GroupPendingInstances", "GroupTerminatingInstances", "GroupDesiredCapacity"]

  launch_template {
    id      = aws_launch_template.hosts.id
    version = aws_launch_template.hosts.latest_version
  }

  # A new launch template version (image, user data, instance type) replaces the hosts a few
  # at a time; the load balancer's deregistration delay lets in-flight requests finish first.
  instance_refresh {
    strategy = "Rolling"

    preferences {
      min_healthy_percentage = var.refresh_min_healthy_percentage
      # new hosts launch before old ones go (a 2-host GPU fleet keeps 2 serving)
      max_healthy_percentage = min(var.refresh_min_healthy_percentage + 100, 200)
      instance_warmup        = var.instance_warmup
      skip_matching          = true
      # no auto_rollback: the provider sets the new template version on the group before the
      # refresh starts, so a rollback would return to it (terraform-provider-aws#34189)
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name })

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    ignore_changes = [desired_capacity]
  }
}
