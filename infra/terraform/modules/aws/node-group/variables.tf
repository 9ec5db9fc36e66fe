variable "name" {
  description = "Name of the node group (e.g. enclave-prod-engines); prefixes its resources."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,40}$", var.name))
    error_message = "The name is 2 to 41 lower-case letters, digits and '-', starting with a letter."
  }
}

variable "subnet_ids" {
  description = "Private subnets to launch into, in several availability zones."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "Give subnets in at least two availability zones."
  }
}

variable "vpc_id" {
  description = "The VPC of the hosts' security group."
  type        = string
}

variable "endpoints_security_group_id" {
  description = "Security group of the VPC interface endpoints: every host may reach them on 443."
  type        = string
}

variable "mirror_cidrs" {
  description = "Where the internal package mirror answers: every host may reach it on 443."
  type        = list(string)

  validation {
    condition     = length(var.mirror_cidrs) > 0 && alltrue([for c in var.mirror_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "Give the mirror's IPv4 CIDRs, not 0.0.0.0/0."
  }
}

variable "monitoring_cidrs" {
  description = "Where Prometheus runs: may reach metrics_ports on the hosts, nothing else."
  type        = list(string)

  validation {
    condition     = alltrue([for c in var.monitoring_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "Give IPv4 CIDRs, not 0.0.0.0/0."
  }
}

variable "metrics_ports" {
  description = "The hosts' metrics ports (the node exporter's, and the role's own)."
  type        = list(number)
}

variable "image_id" {
  description = "AMI the hosts boot (the organisation's hardened image; for engines, one with the pinned NVIDIA driver)."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.image_id))
    error_message = "Give an AMI id (ami-...)."
  }
}

variable "instance_type" {
  description = "EC2 instance type of the hosts."
  type        = string
}

variable "user_data" {
  description = "The hosts' user data, in clear (the bootstrap module's output); encoded here."
  type        = string
}

variable "volumes_kms_key_arn" {
  description = "Customer-managed KMS key that encrypts the root and data volumes (its policy must admit the Auto Scaling service-linked role)."
  type        = string
}

variable "root_volume_size_gb" {
  description = "Size of the root volume in GiB (the OS, the virtualenvs and vLLM's wheels)."
  type        = number
  default     = 100
}

variable "data_volume_size_gb" {
  description = "Size in GiB of a second volume for model weights and caches (/dev/sdf); 0 for none."
  type        = number
  default     = 0
}

variable "metadata_hop_limit" {
  description = "IMDSv2 response hop limit. 1 (the default): only processes of the host itself get the instance's credentials; a container behind a bridge network (one hop more) gets none. Enclave runs its services as host processes, so it needs no more."
  type        = number
  default     = 1

  validation {
    condition     = var.metadata_hop_limit >= 1 && var.metadata_hop_limit <= 2
    error_message = "The hop limit is 1 (host processes only) or 2 (containers too)."
  }
}

variable "min_size" {
  description = "Fewest hosts."
  type        = number
}

variable "max_size" {
  description = "Most hosts (an instance refresh may launch one more than the desired count)."
  type        = number
}

variable "desired_capacity" {
  description = "Hosts to run; null leaves it to scaling policies once created."
  type        = number
  default     = null
}

variable "target_group_arns" {
  description = "Load balancer target groups the hosts register with; their health checks then decide a host's health."
  type        = list(string)
  default     = []
}

variable "health_check_grace_period" {
  description = "Seconds after launch before health checks count (bootstrap, and for engines loading the weights)."
  type        = number
  default     = 900
}

variable "refresh_min_healthy_percentage" {
  description = "During a rolling instance refresh (a new image or user data: the patch cycle), the share of hosts kept in service."
  type        = number
  default     = 90

  validation {
    condition     = var.refresh_min_healthy_percentage >= 50 && var.refresh_min_healthy_percentage <= 100
    error_message = "Keep 50 to 100 percent in service."
  }
}

variable "instance_warmup" {
  description = "Seconds a new host needs before it serves (the refresh waits that long before the next batch)."
  type        = number
  default     = 600
}

variable "attach_instance_policy" {
  description = "Attach instance_policy_json to the hosts' role (a separate flag: the policy's text may be unknown until apply)."
  type        = bool
  default     = false
}

variable "instance_policy_json" {
  description = "IAM policy (JSON) with what this group's hosts may do beyond writing their logs and Session Manager."
  type        = string
  default     = ""
}

variable "ecr_repository_arns" {
  description = "ECR repositories the hosts may pull images from; empty for none."
  type        = list(string)
  default     = []
}

variable "log_group_prefix" {
  description = "Prefix of the hosts' CloudWatch log group (<prefix><name>)."
  type        = string
  default     = "/enclave/"
}

variable "logs_kms_key_arn" {
  description = "Customer-managed KMS key that encrypts the hosts' log group."
  type        = string
}

variable "log_retention_days" {
  description = "Days the hosts' logs are kept."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags for every resource, propagated to the hosts and their volumes."
  type        = map(string)
  default     = {}
}
