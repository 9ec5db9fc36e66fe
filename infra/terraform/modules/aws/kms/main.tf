# One customer-managed key for one purpose (logs, volumes, secrets), rotated yearly by KMS.
# Only the account (through IAM policies) and the AWS services named here may use it.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account   = data.aws_caller_identity.current.account_id
  partition = data.aws_partition.current.partition
  region    = data.aws_region.current.name
  asg_role  = "arn:${local.partition}:iam::${local.account}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"
}

data "aws_iam_policy_document" "key" {
  # The account administers the key through IAM; without this statement the key cannot be
  # managed at all. In a key policy, "*" as the resource means this key only.
  #checkov:skip=CKV_AWS_109:a key policy's resource "*" is the key itself; IAM decides who in the account may use it
  #checkov:skip=CKV_AWS_111:a key policy's resource "*" is the key itself; IAM decides who in the account may use it
  #checkov:skip=CKV_AWS_356:a key policy's resource "*" is the key itself
  statement {
    sid       = "AccountAdministersThroughIam"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account}:root"]
    }
  }

  dynamic "statement" {
    for_each = length(var.cloudwatch_log_group_prefixes) > 0 ? [1] : []

    content {
      sid       = "CloudWatchLogsForTheseGroups"
      actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
      resources = ["*"]

      principals {
        type        = "Service"
        identifiers = ["logs.${local.region}.amazonaws.com"]
      }

      condition {
        test     = "ArnLike"
        variable = "kms:EncryptionContext:aws:logs:arn"
        values   = [for p in var.cloudwatch_log_group_prefixes : "arn:${local.partition}:logs:${local.region}:${local.account}:log-group:${p}*"]
      }
    }
  }

  dynamic "statement" {
    for_each = var.allow_autoscaling ? [1] : []

    content {
      sid       = "AutoScalingUsesTheKeyForVolumes"
      actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
      resources = ["*"]

      principals {
        type        = "AWS"
        identifiers = [local.asg_role]
      }
    }
  }

  dynamic "statement" {
    for_each = var.allow_autoscaling ? [1] : []

    content {
      sid       = "AutoScalingGrantsForAttachedVolumes"
      actions   = ["kms:CreateGrant"]
      resources = ["*"]

      principals {
        type        = "AWS"
        identifiers = [local.asg_role]
      }

      condition {
        test     = "Bool"
        variable = "kms:GrantIsForAWSResource"
        values   = ["true"]
      }
    }
  }
}

resource "aws_kms_key" "this" {
  description             = var.description
  deletion_window_in_days = var.deletion_window_in_days
  enable_key_rotation     = true
  rotation_period_in_days = 365
  key_usage               = "ENCRYPT_DECRYPT"
  policy                  = data.aws_iam_policy_document.key.json
  tags                    = var.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}
