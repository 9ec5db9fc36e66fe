variable "name" {
  description = "Name of the platform environment (e.g. enclave-prod); prefixes every resource name."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,15}$", var.name))
    error_message = "The name is 2 to 16 lower-case letters, digits and '-', starting with a letter (load balancer names are short)."
  }
}

variable "cidr_block" {
  description = "IPv4 range of the VPC (RFC 1918), e.g. 10.40.0.0/16."
  type        = string

  validation {
    condition     = can(cidrhost(var.cidr_block, 0)) && can(regex("^(10\\.|172\\.(1[6-9]|2[0-9]|3[01])\\.|192\\.168\\.)", var.cidr_block))
    error_message = "The VPC range must be a private (RFC 1918) IPv4 CIDR."
  }
}

variable "availability_zones" {
  description = "Availability zones for the private subnets, one subnet each; at least two so the fleet survives a zone's loss."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2 && length(distinct(var.availability_zones)) == length(var.availability_zones)
    error_message = "Give at least two distinct availability zones."
  }
}

variable "subnet_newbits" {
  description = "Bits added to the VPC prefix for each private subnet (4: a /16 gives /20 subnets)."
  type        = number
  default     = 4
}

variable "interface_endpoint_services" {
  description = "AWS services reached through interface endpoints. The defaults are what the fleet needs with no internet: image pulls (ecr.api, ecr.dkr), Session Manager (ssm, ssmmessages, ec2messages), logs, KMS, STS and Secrets Manager."
  type        = list(string)
  default     = ["ecr.api", "ecr.dkr", "ssm", "ssmmessages", "ec2messages", "logs", "kms", "sts", "secretsmanager"]

  validation {
    condition     = alltrue([for s in var.interface_endpoint_services : contains(["ecr.api", "ecr.dkr", "ssm", "ssmmessages", "ec2messages", "logs", "kms", "sts", "secretsmanager"], s)])
    error_message = "Each service must be one this module has an endpoint policy for: ecr.api, ecr.dkr, ssm, ssmmessages, ec2messages, logs, kms, sts, secretsmanager."
  }
}

variable "weights_bucket_arn" {
  description = "ARN of the S3 bucket that holds the model weights (arn:aws:s3:::name). The S3 endpoint lets the fleet read it and nothing else of this account's or anybody's buckets, besides the AWS-owned buckets ECR layers and the SSM agent come from."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:s3:::[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.weights_bucket_arn))
    error_message = "Give the bucket's ARN, e.g. arn:aws:s3:::acme-enclave-weights."
  }
}

variable "weights_prefix" {
  description = "Key prefix inside the weights bucket that the fleet may read (e.g. enclave/), empty for the whole bucket."
  type        = string
  default     = ""
}

variable "allow_ssm_agent_buckets" {
  description = "Let the S3 endpoint reach the AWS-owned buckets the SSM agent reads (its updates, documents, patch baselines)."
  type        = bool
  default     = true
}

variable "log_group_prefix" {
  description = "Prefix of the platform's CloudWatch log groups; the logs endpoint accepts writes to these groups only."
  type        = string
  default     = "/enclave/"
}

variable "logs_kms_key_arn" {
  description = "ARN of the customer-managed KMS key that encrypts the flow-log group (its policy must let CloudWatch Logs use it for this group)."
  type        = string
}

variable "flow_log_retention_days" {
  description = "Days the VPC flow logs are kept (a CloudWatch Logs retention value; 365 or more for most audit regimes)."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_days)
    error_message = "Use a retention CloudWatch Logs accepts (365, 400, 545, 731, ... days)."
  }
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

variable "transit_gateway_id" {
  description = "Transit gateway to the organisation's private networks (clients, monitoring, the mirror, shared services); null for none. Never a way out: the transit gateway's own route tables must hold no internet route."
  type        = string
  default     = null
}

variable "routed_cidrs" {
  description = "Private networks outside the VPC reached through the transit gateway (e.g. the client, monitoring and mirror networks). 0.0.0.0/0 is refused."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.routed_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0" && !startswith(c, "0.0.0.0/")])
    error_message = "Give private IPv4 CIDRs; a default route is refused."
  }
}
