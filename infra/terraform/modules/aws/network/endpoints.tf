# VPC endpoints: how the fleet reaches the AWS APIs it needs with no route out. Every policy
# admits only principals of this account (aws:PrincipalAccount) and, where the service has
# resources, only this account's resources, so nothing inside can copy data to another account.

locals {
  same_account = {
    test     = "StringEquals"
    variable = "aws:PrincipalAccount"
    values   = [local.account]
  }

  weights_objects = "${var.weights_bucket_arn}/${var.weights_prefix}*"

  ssm_agent_buckets = [
    "arn:${local.partition}:s3:::aws-ssm-${local.region}/*",
    "arn:${local.partition}:s3:::amazon-ssm-${local.region}/*",
    "arn:${local.partition}:s3:::amazon-ssm-packages-${local.region}/*",
    "arn:${local.partition}:s3:::${local.region}-birdwatcher-prod/*",
    "arn:${local.partition}:s3:::patch-baseline-snapshot-${local.region}/*",
  ]

  # service => the statements of its endpoint policy
  endpoint_statements = {
    "ecr.api" = [
      {
        Sid      = "PullOnlyFromThisAccount"
        Action   = ["ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability", "ecr:DescribeImages"]
        Resource = ["arn:${local.partition}:ecr:${local.region}:${local.account}:repository/*"]
      },
      {
        Sid      = "AuthorizationToken"
        Action   = ["ecr:GetAuthorizationToken"]
        Resource = ["*"]
      },
    ]
    "ecr.dkr" = [
      {
        Sid      = "PullOnlyFromThisAccount"
        Action   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
        Resource = ["arn:${local.partition}:ecr:${local.region}:${local.account}:repository/*"]
      },
    ]
    "ssm" = [
      {
        Sid      = "SsmAgent"
        Action   = ["ssm:UpdateInstanceInformation", "ssm:ListAssociations", "ssm:ListInstanceAssociations", "ssm:DescribeAssociation", "ssm:GetDeployablePatchSnapshotForInstance", "ssm:GetDocument", "ssm:DescribeDocument", "ssm:GetManifest", "ssm:GetParameter", "ssm:GetParameters", "ssm:PutInventory", "ssm:PutComplianceItems", "ssm:PutConfigurePackageResult", "ssm:UpdateAssociationStatus", "ssm:UpdateInstanceAssociationStatus"]
        Resource = ["*"]
      },
    ]
    "ssmmessages" = [
      {
        Sid      = "SessionManagerChannels"
        Action   = ["ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel"]
        Resource = ["*"]
      },
    ]
    "ec2messages" = [
      {
        Sid      = "RunCommandMessages"
        Action   = ["ec2messages:AcknowledgeMessage", "ec2messages:DeleteMessage", "ec2messages:FailMessage", "ec2messages:GetEndpoint", "ec2messages:GetMessages", "ec2messages:SendReply"]
        Resource = ["*"]
      },
    ]
    "logs" = [
      {
        Sid      = "WriteThePlatformsLogGroups"
        Action   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
        Resource = ["arn:${local.partition}:logs:${local.region}:${local.account}:log-group:${var.log_group_prefix}*"]
      },
    ]
    "kms" = [
      {
        Sid      = "UseThisAccountsKeys"
        Action   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:DescribeKey", "kms:CreateGrant"]
        Resource = ["arn:${local.partition}:kms:${local.region}:${local.account}:key/*"]
      },
    ]
    "sts" = [
      {
        Sid      = "AssumeThisAccountsRoles"
        Action   = ["sts:AssumeRole", "sts:TagSession"]
        Resource = ["arn:${local.partition}:iam::${local.account}:role/*"]
      },
      {
        Sid      = "WhoAmI"
        Action   = ["sts:GetCallerIdentity"]
        Resource = ["*"]
      },
    ]
    "secretsmanager" = [
      {
        Sid      = "ReadThisAccountsSecrets"
        Action   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
        Resource = ["arn:${local.partition}:secretsmanager:${local.region}:${local.account}:secret:*"]
      },
    ]
  }

  s3_statements = concat(
    [
      {
        Sid      = "ReadTheWeights"
        Action   = ["s3:GetObject", "s3:GetObjectVersion"]
        Resource = [local.weights_objects]
      },
      {
        Sid      = "WhereTheWeightsAre"
        Action   = ["s3:GetBucketLocation"]
        Resource = [var.weights_bucket_arn]
      },
      {
        Sid       = "ListTheWeights"
        Action    = ["s3:ListBucket"]
        Resource  = [var.weights_bucket_arn]
        Condition = var.weights_prefix == "" ? {} : { StringLike = { "s3:prefix" = ["${var.weights_prefix}*"] } }
      },
      {
        # ECR keeps image layers in this AWS-owned bucket.
        Sid      = "EcrImageLayers"
        Action   = ["s3:GetObject"]
        Resource = ["arn:${local.partition}:s3:::prod-${local.region}-starport-layer-bucket/*"]
      },
    ],
    var.allow_ssm_agent_buckets ? [
      {
        Sid      = "SsmAgentBuckets"
        Action   = ["s3:GetObject"]
        Resource = local.ssm_agent_buckets
      },
    ] : [],
  )
}

resource "aws_security_group" "endpoints" {
  name        = "${var.name}-vpc-endpoints"
  description = "Interface endpoints: HTTPS from inside the VPC only"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-vpc-endpoints" })
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_https" {
  security_group_id = aws_security_group.endpoints.id
  description       = "HTTPS to the AWS APIs from the VPC"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = aws_vpc.this.cidr_block
}

resource "aws_vpc_endpoint" "interface" {
  for_each = toset(var.interface_endpoint_services)

  vpc_id              = aws_vpc.this.id
  service_name        = "com.amazonaws.${local.region}.${each.key}"
  vpc_endpoint_type   = "Interface"
  private_dns_enabled = true
  subnet_ids          = [for s in aws_subnet.private : s.id]
  security_group_ids  = [aws_security_group.endpoints.id]
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      for st in local.endpoint_statements[each.key] : merge(st, {
        Effect    = "Allow"
        Principal = { AWS = "*" }
        Condition = { StringEquals = { "aws:PrincipalAccount" = local.account } }
      })
    ]
  })
  tags = merge(local.tags, { Name = "${var.name}-${each.key}" })
}

resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.this.id
  service_name      = "com.amazonaws.${local.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = [aws_route_table.private.id]
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      for st in local.s3_statements : merge(st, {
        Effect    = "Allow"
        Principal = { AWS = "*" }
        Condition = merge(lookup(st, "Condition", {}), { StringEquals = { "aws:PrincipalAccount" = local.account } })
      })
    ]
  })
  tags = merge(local.tags, { Name = "${var.name}-s3" })
}
