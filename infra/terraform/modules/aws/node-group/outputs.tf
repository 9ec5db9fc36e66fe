output "autoscaling_group_name" {
  description = "Name of the auto-scaling group (start an instance refresh on it to roll the hosts)."
  value       = aws_autoscaling_group.hosts.name
}

output "launch_template_id" {
  description = "ID of the launch template."
  value       = aws_launch_template.hosts.id
}

output "role_name" {
  description = "Name of the hosts' IAM role."
  value       = aws_iam_role.hosts.name
}

output "role_arn" {
  description = "ARN of the hosts' IAM role."
  value       = aws_iam_role.hosts.arn
}

output "log_group_name" {
  description = "The hosts' CloudWatch log group."
  value       = aws_cloudwatch_log_group.hosts.name
}

output "security_group_id" {
  description = "The hosts' security group: add the role's own rules to it."
  value       = aws_security_group.hosts.id
}
