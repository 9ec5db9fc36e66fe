output "api_dns_name" {
  description = "Point the API's private DNS name (the certificate's) at this load balancer."
  value       = module.gateway.api_dns_name
}

output "gateway_secret_arns" {
  description = "Put a value in each before the gateways can start (README: Secrets)."
  value       = module.gateway.secret_arns
}

output "gpu_autoscaling_group" {
  description = "Start an instance refresh here to roll a new image, driver or release onto the GPU hosts."
  value       = module.gpu_fleet.autoscaling_group_name
}

output "gateway_autoscaling_group" {
  description = "Start an instance refresh here to roll the gateways."
  value       = module.gateway.autoscaling_group_name
}

output "vpc_id" {
  description = "The private VPC."
  value       = module.network.vpc_id
}
