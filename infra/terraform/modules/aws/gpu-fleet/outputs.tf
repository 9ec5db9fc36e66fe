output "engine_host" {
  description = "Where the gateways reach the engines (ENCLAVE_ENGINE_HOST): the engine load balancer's name, which resolves to private addresses only."
  value       = aws_lb.engines.dns_name
}

output "engine_security_group_id" {
  description = "Security group of the GPU hosts."
  value       = module.hosts.security_group_id
}

output "engine_lb_security_group_id" {
  description = "Security group of the engine load balancer (the gateways need egress to it)."
  value       = aws_security_group.engine_lb.id
}

output "autoscaling_group_name" {
  description = "The GPU hosts' auto-scaling group: start an instance refresh on it to roll a new image or driver."
  value       = module.hosts.autoscaling_group_name
}

output "role_name" {
  description = "The GPU hosts' IAM role."
  value       = module.hosts.role_name
}
