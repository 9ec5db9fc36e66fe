output "api_dns_name" {
  description = "The API load balancer's name: point the API's private DNS record (the certificate's name) at it."
  value       = aws_lb.api.dns_name
}

output "api_zone_id" {
  description = "Hosted zone of the API load balancer, for an alias record."
  value       = aws_lb.api.zone_id
}

output "gateway_security_group_id" {
  description = "Security group of the gateway hosts (gpu-fleet admits it to the engines)."
  value       = module.hosts.security_group_id
}

output "secret_arns" {
  description = "The gateway's secrets (empty until their values are put): name => ARN."
  value       = { for k, s in aws_secretsmanager_secret.gateway : k => s.arn }
}

output "autoscaling_group_name" {
  description = "The gateway hosts' auto-scaling group: start an instance refresh on it to roll them."
  value       = module.hosts.autoscaling_group_name
}
