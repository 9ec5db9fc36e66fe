variable "region" {
  description = "AWS region of the platform."
  type        = string
}

variable "name" {
  description = "Name of the environment (2 to 16 characters), e.g. enclave-prod."
  type        = string
  default     = "enclave-prod"
}

variable "cidr_block" {
  description = "IPv4 range of the private VPC."
  type        = string
  default     = "10.40.0.0/16"
}

variable "availability_zones" {
  description = "At least two availability zones of the region that offer the GPU instance type."
  type        = list(string)
}

variable "client_cidrs" {
  description = "Internal networks of the services that call the API."
  type        = list(string)
}

variable "monitoring_cidrs" {
  description = "Where Prometheus runs."
  type        = list(string)
}

variable "mirror_cidrs" {
  description = "Where the internal mirror answers (HTTPS), reached over the organisation's private connectivity."
  type        = list(string)
}

variable "mirror_url" {
  description = "HTTPS base URL of the internal mirror (see the README for what it must hold)."
  type        = string
}

variable "enclave_version" {
  description = "Enclave release to install."
  type        = string
}

variable "release_sha256" {
  description = "SHA-256 of that release's tarball on the mirror."
  type        = string
}

variable "gpu_image_id" {
  description = "AMI of the GPU hosts (hardened, with the pinned NVIDIA driver and the AWS CLI)."
  type        = string
}

variable "gateway_image_id" {
  description = "AMI of the gateway hosts (hardened, with the AWS CLI)."
  type        = string
}

variable "gpu_instance_type" {
  description = "GPU instance type of the engines."
  type        = string
  default     = "g6e.xlarge"
}

variable "gpu_hosts" {
  description = "GPU hosts to run (min, desired); max is one more, for rolling refreshes."
  type        = number
  default     = 2
}

variable "engine_ports" {
  description = "The engines' ports, as in models/*/manifest.yaml."
  type        = list(number)
  default     = [8101, 8102]
}

variable "weights_bucket_arn" {
  description = "ARN of the existing S3 bucket of the model weights."
  type        = string
}

variable "weights_prefix" {
  description = "This platform's prefix in the weights bucket, ending in '/'."
  type        = string
  default     = "enclave/prod/"
}

variable "weights_kms_key_arn" {
  description = "KMS key of the weights objects (SSE-KMS), or null for SSE-S3."
  type        = string
  default     = null
}

variable "certificate_arn" {
  description = "ACM certificate of the API's name, issued by the private CA."
  type        = string
}

variable "access_logs_bucket" {
  description = "Existing S3 bucket for the API load balancer's access logs."
  type        = string
}

variable "services" {
  description = "PostgreSQL and Redis the gateways share (description, cidr, port each)."
  type = list(object({
    description = string
    cidr        = string
    port        = number
  }))
  default = []
}

variable "tags" {
  description = "Tags on every resource (provider default tags)."
  type        = map(string)
  default     = { Project = "enclave" }
}

variable "transit_gateway_id" {
  description = "Transit gateway to the client, monitoring and mirror networks (their routes are added to the VPC)."
  type        = string
}
