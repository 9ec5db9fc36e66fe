variable "name" {
  description = "Name of the platform environment (e.g. enclave-prod)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,15}$", var.name))
    error_message = "The name is 2 to 16 lower-case letters, digits and '-', starting with a letter (load balancer names are short)."
  }
}

variable "network" {
  description = "Where the hosts go: the network module's `hosts` output (VPC, private subnets and their ranges, the endpoints' security group, the S3 prefix list, the DNS resolver)."
  type = object({
    vpc_id                      = string
    vpc_cidr_block              = string
    subnet_ids                  = list(string)
    subnet_cidrs                = list(string)
    endpoints_security_group_id = string
    s3_prefix_list_id           = string
    dns_resolver                = string
  })
}

variable "client_cidrs" {
  description = "Internal networks whose services call the API (the openai SDK's base_url is https://<api_name>/v1). Never 0.0.0.0/0."
  type        = list(string)

  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for c in var.client_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "Give the clients' IPv4 CIDRs; 0.0.0.0/0 is refused."
  }
}

variable "certificate_arn" {
  description = "ACM certificate for the API's name, issued by the organisation's private CA (ACM Private CA), for the TLS listener."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate/[0-9a-f-]+$", var.certificate_arn))
    error_message = "Give an ACM certificate ARN."
  }
}

variable "ssl_policy" {
  description = "TLS policy of the listener: TLS 1.3 and 1.2 with forward-secret AEAD ciphers only."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-Res-2021-06"

  validation {
    condition     = contains(["ELBSecurityPolicy-TLS13-1-2-Res-2021-06", "ELBSecurityPolicy-TLS13-1-3-2021-06", "ELBSecurityPolicy-TLS13-1-2-2021-06"], var.ssl_policy)
    error_message = "Use a TLS 1.2+/1.3 policy: ELBSecurityPolicy-TLS13-1-2-Res-2021-06, -TLS13-1-2-2021-06 or -TLS13-1-3-2021-06."
  }
}

variable "access_logs_bucket" {
  description = "Name of an existing S3 bucket for the load balancer's TLS access logs (the organisation's log bucket; its policy must admit the ELB log delivery)."
  type        = string
}

variable "gateway_port" {
  description = "Port the gateway listens on (ENCLAVE_PORT)."
  type        = number
  default     = 8000
}

variable "engine_host" {
  description = "Where the gateways reach the engines (gpu-fleet's engine_host)."
  type        = string
}

variable "engine_ports" {
  description = "The engines' ports (as given to gpu-fleet)."
  type        = list(number)
}

variable "engine_lb_security_group_id" {
  description = "Security group of the engine load balancer (gpu-fleet)."
  type        = string
}

variable "services" {
  description = "Other internal services the gateways call (PostgreSQL, Redis): description, CIDR and port each. Several gateways need a shared PostgreSQL and Redis."
  type = list(object({
    description = string
    cidr        = string
    port        = number
  }))
  default = []

  validation {
    condition     = alltrue([for s in var.services : can(cidrhost(s.cidr, 0)) && s.cidr != "0.0.0.0/0"])
    error_message = "Each service is an IPv4 CIDR, not 0.0.0.0/0."
  }
}

variable "monitoring_cidrs" {
  description = "Where Prometheus runs: may scrape the gateway's /metrics and the node exporter."
  type        = list(string)
}

variable "mirror_cidrs" {
  description = "Where the internal package mirror answers (HTTPS)."
  type        = list(string)
}

variable "image_id" {
  description = "AMI of the gateway hosts (the organisation's hardened image with the AWS CLI)."
  type        = string
}

variable "instance_type" {
  description = "Instance type of the gateway hosts (no GPU)."
  type        = string
  default     = "c7i.large"
}

variable "min_size" {
  description = "Fewest gateway hosts."
  type        = number
  default     = 2
}

variable "max_size" {
  description = "Most gateway hosts."
  type        = number
  default     = 4
}

variable "desired_capacity" {
  description = "Gateway hosts to run."
  type        = number
  default     = 2
}

variable "volumes_kms_key_arn" {
  description = "Customer-managed KMS key for the gateway hosts' volumes."
  type        = string
}

variable "logs_kms_key_arn" {
  description = "Customer-managed KMS key for the gateway hosts' log group."
  type        = string
}

variable "secrets_kms_key_arn" {
  description = "Customer-managed KMS key that encrypts the gateway's secrets in Secrets Manager."
  type        = string
}

variable "bootstrap" {
  description = "Where the hosts install Enclave from: mirror_url (https), enclave_version and release_sha256 of the release tarball."
  type = object({
    mirror_url      = string
    enclave_version = string
    release_sha256  = string
  })
}

variable "deregistration_delay" {
  description = "Seconds a leaving gateway keeps its open connections (streams) before they are closed."
  type        = number
  default     = 300
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
