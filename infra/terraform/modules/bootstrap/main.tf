# Renders a host's user data: a header that writes the host's configuration (never a secret)
# under /etc/enclave, then bootstrap.sh, the same on every host, which installs Enclave from
# the internal mirror only and applies hardening/. Nothing here is provider-specific.

locals {
  service = var.role == "gateway" ? "gateway" : "engines"

  bootstrap_env = {
    ROLE                 = var.role
    MIRROR_URL           = var.mirror_url
    ENCLAVE_VERSION      = var.enclave_version
    RELEASE_SHA256       = var.release_sha256
    SECRET_FETCH_COMMAND = var.secret_fetch_command
    WEIGHTS_SYNC_COMMAND = var.weights_sync_command
    DATA_DISK_MODEL      = var.data_disk_model
    SECRET_ENV           = join(" ", [for k in sort(keys(var.secret_env)) : "${k}=${var.secret_env[k]}"])
  }

  firewall = merge(var.firewall, { role = var.role })

  # Quoted heredocs: the shell expands nothing inside them.
  header = join("\n", concat(
    [
      "#!/usr/bin/env bash",
      "# Enclave ${var.role} host: written by Terraform (infra/terraform/modules/bootstrap).",
      "set -euo pipefail",
      "umask 027",
      "conf=\"$${ENCLAVE_BOOTSTRAP_ROOT:-}/etc/enclave\"", # a test renders it under a directory
      "install -d -m 0755 \"$conf\"",                      # the services read models/ and policies.yaml here
      "cat > \"$conf/bootstrap.env\" <<'ENCLAVE_END'",
    ],
    [for k in sort(keys(local.bootstrap_env)) : "${k}='${local.bootstrap_env[k]}'"],
    [
      "ENCLAVE_END",
      "cat > \"$conf/firewall.conf\" <<'ENCLAVE_END'",
    ],
    [for k in sort(keys(local.firewall)) : "${k}=${local.firewall[k]}"],
    [
      "ENCLAVE_END",
      "cat > \"$conf/${local.service}.env\" <<'ENCLAVE_END'",
    ],
    [for k in sort(keys(var.environment)) : "${k}=${var.environment[k]}"],
    ["ENCLAVE_END", ""],
  ))

  user_data = "${local.header}\n${file("${path.module}/bootstrap.sh")}"
}
