variable "role" {
  description = "What the host runs: gateway (the API, no GPU) or engine (vLLM engines on GPUs, the GPU exporter)."
  type        = string

  validation {
    condition     = contains(["gateway", "engine"], var.role)
    error_message = "The role is gateway or engine."
  }
}

variable "mirror_url" {
  description = "HTTPS base URL of the internal mirror (no trailing slash). It must hold apt/enclave.sources, apt/enclave-mirror.gpg, pypi/simple/ and enclave/enclave-<version>.tar.gz; see the README."
  type        = string

  validation {
    condition     = can(regex("^https://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~/-]*)?[^/]$", var.mirror_url))
    error_message = "The mirror is an https:// URL without a trailing slash."
  }
}

variable "enclave_version" {
  description = "Version of the Enclave release to install (the mirror's enclave/enclave-<version>.tar.gz)."
  type        = string

  validation {
    condition     = can(regex("^[0-9A-Za-z][0-9A-Za-z.+-]{0,63}$", var.enclave_version))
    error_message = "The version is letters, digits, '.', '+' and '-'."
  }
}

variable "release_sha256" {
  description = "SHA-256 of the release tarball; the host refuses a tarball that does not match."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.release_sha256))
    error_message = "Give the 64 lower-case hex digits of the tarball's SHA-256."
  }
}

variable "firewall" {
  description = "The host firewall's config (hardening/firewall/nft-policy.sh keys, e.g. client_cidrs, engine_addrs, monitoring_cidrs, admin_cidrs, dns, ntp, mirrors); role is set from var.role."
  type        = map(string)

  validation {
    condition     = alltrue([for k, v in var.firewall : can(regex("^[a-z_]+$", k)) && can(regex("^[0-9A-Za-z./: ]*$", v))]) && !contains(keys(var.firewall), "role")
    error_message = "Firewall keys are lower-case words; values are addresses, CIDRs, ports, 'none' or spaces; role is not given here."
  }
}

variable "environment" {
  description = "ENCLAVE_* settings for the role's service, written to /etc/enclave/<role>s.env. Never secrets: user data is readable by whoever may describe the instance; secrets come from secret_files."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.environment : can(regex("^ENCLAVE_[A-Z0-9_]+$", k)) && can(regex("^[^\\n'\"\\\\$`]*$", v))])
    error_message = "Keys are ENCLAVE_* names; values are one line without quotes, backslashes, '$' or backticks."
  }
}

variable "secret_env" {
  description = "Settings whose values are secrets, fetched at boot: ENCLAVE_* name => secret id. ENCLAVE_PEPPER becomes the file /var/lib/enclave/pepper (ENCLAVE_PEPPER_FILE); the others are appended to the service's env file (root only, 0600)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.secret_env : can(regex("^ENCLAVE_[A-Z0-9_]+$", k)) && can(regex("^[A-Za-z0-9:/_+=.@-]+$", v))])
    error_message = "Keys are ENCLAVE_* names; values are secret ids or ARNs."
  }
}

variable "secret_fetch_command" {
  description = "Command that prints a secret's value given its id as the last argument (the provider's CLI, from the image)."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^[A-Za-z0-9 ._/=-]*$", var.secret_fetch_command))
    error_message = "The command is words of letters, digits, '.', '_', '/', '=' and '-'."
  }
}

variable "weights_sync_command" {
  description = "Engine hosts: command that copies the model weights into the directory given as its last argument (e.g. the provider's CLI syncing a bucket prefix). Empty: weights are baked into the image."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^[A-Za-z0-9 ._/=:-]*$", var.weights_sync_command))
    error_message = "The command is words of letters, digits, '.', '_', '/', '=', ':' and '-'."
  }
}

variable "data_disk_model" {
  description = "Engine hosts: the model name of the data volume's disk as lsblk shows it (e.g. Amazon Elastic Block Store), so an instance-store disk is never taken for it. Empty: the first blank whole disk."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^[A-Za-z0-9 ._-]*$", var.data_disk_model))
    error_message = "The model is letters, digits, spaces, '.', '_' and '-'."
  }
}
