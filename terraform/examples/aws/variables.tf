variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "availability_zones" {
  description = "Three availability zones of the region (subnets, RDS Multi-AZ, spread of the pods)."
  type        = list(string)
  default     = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]

  validation {
    condition     = length(var.availability_zones) == 3
    error_message = "availability_zones must list three zones."
  }
}

variable "name" {
  description = "Name of the cluster, the database and their network."
  type        = string
  default     = "crewmesh"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name must be 2-31 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.31"
}

variable "vpc_cidr" {
  description = "CIDR of the VPC."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be a CIDR block."
  }
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the EKS API endpoint (your office or CI runners)."
  type        = list(string)

  validation {
    condition     = length(var.api_allowed_cidrs) > 0 && alltrue([for c in var.api_allowed_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "api_allowed_cidrs must list CIDR blocks, and not 0.0.0.0/0."
  }
}

variable "node_instance_type" {
  description = "Instance type of the worker nodes."
  type        = string
  default     = "m6i.large"
}

variable "db_instance_class" {
  description = "RDS instance class of the Postgres database."
  type        = string
  default     = "db.m6g.large"
}

variable "crewmesh_image_tag" {
  description = "crewmesh image tag (empty: the chart's appVersion)."
  type        = string
  default     = ""
}

variable "ingress_host" {
  description = "Public host name of the gateway (an ingress-nginx controller must run in the cluster). Empty: no Ingress."
  type        = string
  default     = ""
}
