# A VPC with private subnets only: no internet gateway, no NAT gateway, no public address, and
# route tables that hold nothing but the VPC's local route and the S3 gateway endpoint. AWS APIs
# are reached through VPC endpoints whose policies admit only this account's principals.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account   = data.aws_caller_identity.current.account_id
  partition = data.aws_partition.current.partition
  region    = data.aws_region.current.name
  tags      = merge(var.tags, { "enclave:environment" = var.name })
  subnets = {
    for i, az in var.availability_zones : az => cidrsubnet(var.cidr_block, var.subnet_newbits, i)
  }
}

resource "aws_vpc" "this" {
  cidr_block           = var.cidr_block
  enable_dns_support   = true # the endpoints' private DNS names need both
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = var.name })
}

resource "aws_subnet" "private" {
  for_each = local.subnets

  vpc_id                  = aws_vpc.this.id
  availability_zone       = each.key
  cidr_block              = each.value
  map_public_ip_on_launch = false
  tags                    = merge(local.tags, { Name = "${var.name}-private-${each.key}", "enclave:tier" = "private" })
}

# The VPC's main route table, taken over so that it holds the local route only.
resource "aws_default_route_table" "this" {
  default_route_table_id = aws_vpc.this.default_route_table_id
  route                  = []
  tags                   = merge(local.tags, { Name = "${var.name}-default" })
}

resource "aws_route_table" "private" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${var.name}-private" })
}

resource "aws_route_table_association" "private" {
  for_each = aws_subnet.private

  subnet_id      = each.value.id
  route_table_id = aws_route_table.private.id
}

# The default security group, emptied: anything launched without a group gets no traffic.
resource "aws_default_security_group" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${var.name}-default-closed" })
}
