output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.this.id
}

output "flow_log_group_name" {
  description = "CloudWatch log group of the VPC flow logs."
  value       = aws_cloudwatch_log_group.flow_logs.name
}

output "hosts" {
  description = "What the gpu-fleet and gateway modules need to place hosts in this network, as one object (their `network` input)."
  value = {
    vpc_id                      = aws_vpc.this.id
    vpc_cidr_block              = aws_vpc.this.cidr_block
    subnet_ids                  = [for az in var.availability_zones : aws_subnet.private[az].id]
    subnet_cidrs                = [for az in var.availability_zones : aws_subnet.private[az].cidr_block]
    endpoints_security_group_id = aws_security_group.endpoints.id
    s3_prefix_list_id           = aws_vpc_endpoint.s3.prefix_list_id
    dns_resolver                = cidrhost(var.cidr_block, 2)
  }
}
