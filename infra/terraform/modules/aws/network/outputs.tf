output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.this.id
}

output "vpc_cidr_block" {
  description = "IPv4 range of the VPC."
  value       = aws_vpc.this.cidr_block
}

output "private_subnet_ids" {
  description = "IDs of the private subnets, one per availability zone, in the order of availability_zones."
  value       = [for az in var.availability_zones : aws_subnet.private[az].id]
}

output "private_subnet_cidrs" {
  description = "IPv4 ranges of the private subnets, in the order of availability_zones."
  value       = [for az in var.availability_zones : aws_subnet.private[az].cidr_block]
}

output "endpoints_security_group_id" {
  description = "Security group of the interface endpoints; hosts need egress to it on 443."
  value       = aws_security_group.endpoints.id
}

output "s3_prefix_list_id" {
  description = "Prefix list of the S3 gateway endpoint; hosts that read weights need egress to it on 443."
  value       = aws_vpc_endpoint.s3.prefix_list_id
}

output "dns_resolver" {
  description = "The VPC's DNS resolver (the range's base plus two), for host firewalls."
  value       = cidrhost(var.cidr_block, 2)
}

output "flow_log_group_name" {
  description = "CloudWatch log group of the VPC flow logs."
  value       = aws_cloudwatch_log_group.flow_logs.name
}
