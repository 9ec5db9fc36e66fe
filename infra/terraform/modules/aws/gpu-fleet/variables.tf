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

variable "gateway_security_group_id" {
  description = "Security group of the gateway hosts (gateway module): the only source the engine load balancer admits."
  type        = string
}

variable "engine_ports" {
  description = "Ports of the engines, one per deployment (the ports in models/*/manifest.yaml)."
  type        = list(number)

  validation {
    condition     = length(var.engine_ports) > 0 && alltrue([for p in var.engine_ports : p >= 1024 && p <= 65535])
    error_message = "Give at least one engine port, each 1024 to 65535."
  }
}

variable "exporter_port" {
  description = "Port of the GPU exporter (monitoring scrapes it)."
  type        = number
  default     = 9400
}

variable "node_exporter_port" {
  description = "Port of the Prometheus node exporter."
  type        = number
  default     = 9100
}

variable "monitoring_cidrs" {
  description = "Where Prometheus runs: may scrape the engines' /metrics, the GPU exporter and the node exporter, nothing else."
  type        = list(string)
}

variable "mirror_cidrs" {
  description = "Where the internal package mirror answers (HTTPS)."
  type        = list(string)
}

variable "image_id" {
  description = "AMI of the GPU hosts: the organisation's hardened image with the pinned NVIDIA driver and the AWS CLI."
  type        = string
}

variable "instance_type" {
  description = "GPU instance type (g5, g6, g6e, gr6, p4d, p4de, p5, p5e, p5en or p6 families)."
  type        = string
  default     = "g6e.xlarge"

  validation {
    condition     = can(regex("^(g5|g5g|g6|g6e|gr6|p4d|p4de|p5|p5e|p5en|p6-b200)\\.[0-9a-z]+$", var.instance_type))
    error_message = "Choose an NVIDIA GPU instance type (g5, g6, g6e, gr6, p4d, p4de, p5, p5e, p5en, p6-b200)."
  }
}

variable "min_size" {
  description = "Fewest GPU hosts."
  type        = number
  default     = 2
}

variable "max_size" {
  description = "Most GPU hosts (keep one above the desired count so a rolling refresh can add a host first)."
  type        = number
  default     = 4
}

variable "desired_capacity" {
  description = "GPU hosts to run."
  type        = number
  default     = 2
}

variable "root_volume_size_gb" {
  description = "Root volume size in GiB."
  type        = number
  default     = 100
}

variable "data_volume_size_gb" {
  description = "Data volume for the weights, the engine environment and caches, in GiB."
  type        = number
  default     = 500
}

variable "weights_bucket_arn" {
  description = "ARN of the S3 bucket of the model weights."
  type        = string
}

variable "weights_prefix" {
  description = "Key prefix of this platform's weights in that bucket (e.g. enclave/prod/); the hosts may read nothing else."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/$", var.weights_prefix))
    error_message = "Give a prefix ending in '/', e.g. enclave/prod/."
  }
}

variable "weights_kms_key_arn" {
  description = "KMS key that encrypts the weights objects (SSE-KMS); the hosts may decrypt with it through S3 only. Null if the bucket uses SSE-S3."
  type        = string
  default     = null
}

variable "ecr_repository_arns" {
  description = "ECR repositories the hosts may pull from (the Dockerfile.gpu image); empty for none."
  type        = list(string)
  default     = []
}

variable "volumes_kms_key_arn" {
  description = "Customer-managed KMS key for the root and data volumes."
  type        = string
}

variable "logs_kms_key_arn" {
  description = "Customer-managed KMS key for the hosts' log group."
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
  description = "Seconds the engine load balancer keeps sending a leaving host's open connections before closing them (a long generation may take this long)."
  type        = number
  default     = 300
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
