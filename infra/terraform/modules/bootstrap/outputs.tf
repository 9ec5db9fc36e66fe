output "user_data" {
  description = "The host's user data (a shell script), in clear; base64-encode it for a launch template."
  value       = local.user_data
}

output "service" {
  description = "The systemd unit the host runs: enclave-gateway or enclave-engines."
  value       = "enclave-${local.service}"
}
