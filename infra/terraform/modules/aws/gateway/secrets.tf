# The gateway's secrets, encrypted with a customer key. Terraform creates them empty: a value
# set here would sit in the state file. Put each value once with the CLI (README: "Secrets").
#
# Rotation is a procedure, not a Lambda: the pepper is mixed into every stored key hash and
# seals the token signing keys, so rotating it means re-issuing keys (README); the database
# and Redis credentials rotate in their own services, then the new URL is put here and the
# gateways are rolled (instance refresh). Token signing keys rotate with
# `enclave oauth rotate-key`, sealed in the database, never leaving it.

locals {
  secrets = {
    pepper       = { env = "ENCLAVE_PEPPER", description = "Pepper of the gateway's key hashes; seals the token signing keys" }
    database-url = { env = "ENCLAVE_DATABASE_URL", description = "PostgreSQL URL (with its password) of the gateways' shared state" }
    redis-url    = { env = "ENCLAVE_REDIS_URL", description = "Redis URL (with its password) of the gateways' shared rate limits" }
  }
}

resource "aws_secretsmanager_secret" "gateway" {
  #checkov:skip=CKV2_AWS_57:rotation is a documented procedure (the pepper re-keys every API key); see the comment above and the README
  for_each = local.secrets

  name                    = "${var.name}/gateway/${each.key}"
  description             = each.value.description
  kms_key_id              = var.secrets_kms_key_arn
  recovery_window_in_days = 30
  tags                    = local.tags
}
