variable "name" {
  description = "Name of the key; the alias is alias/<name>."
  type        = string

  validation {
    condition     = can(regex("^[a-zA-Z0-9/_-]{1,200}$", var.name)) && !startswith(var.name, "aws/")
    error_message = "The name is letters, digits, '/', '_' and '-', and may not start with aws/."
  }
}

variable "description" {
  description = "What the key protects, shown in the KMS console."
  type        = string
}

variable "deletion_window_in_days" {
  description = "Days between a deletion request and the key's destruction (7 to 30). Everything encrypted with it is lost after that."
  type        = number
  default     = 30

  validation {
    condition     = var.deletion_window_in_days >= 7 && var.deletion_window_in_days <= 30
    error_message = "The deletion window is 7 to 30 days."
  }
}

variable "cloudwatch_log_group_prefixes" {
  description = "CloudWatch Logs may use the key for log groups whose names start with one of these (e.g. /enclave/prod/). Empty: not for logs."
  type        = list(string)
  default     = []
}

variable "allow_autoscaling" {
  description = "Let the EC2 Auto Scaling service-linked role use the key, which it needs to launch instances whose EBS volumes are encrypted with it."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags for the key."
  type        = map(string)
  default     = {}
}
