variable "project_id" {
  description = "GCP project."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a GCP project id."
  }
}

variable "region" {
  description = "GCP region of the cluster and the database."
  type        = string
  default     = "europe-west1"
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

variable "master_authorized_cidrs" {
  description = "CIDRs allowed to reach the GKE control plane (your office or CI runners)."
  type        = list(string)

  validation {
    condition     = length(var.master_authorized_cidrs) > 0 && alltrue([for c in var.master_authorized_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "master_authorized_cidrs must list CIDR blocks, and not 0.0.0.0/0."
  }
}

variable "node_machine_type" {
  description = "Machine type of the worker nodes."
  type        = string
  default     = "e2-standard-4"
}

variable "db_tier" {
  description = "Cloud SQL machine tier."
  type        = string
  default     = "db-custom-2-7680"
}

variable "crewmesh_image_tag" {
  description = "crewmesh image tag (empty: the chart's appVersion)."
  type        = string
  default     = ""
}
