# ---------------------------------------------------------------- release

variable "namespace" {
  description = "Kubernetes namespace of the release."
  type        = string
  default     = "crewmesh"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", var.namespace))
    error_message = "namespace must be a DNS label: lowercase letters, digits and '-', at most 63 characters."
  }
}

variable "create_namespace" {
  description = "Create the namespace (labelled for the `restricted` Pod Security Standard). Set false to use an existing one."
  type        = bool
  default     = true
}

variable "release_name" {
  description = "Helm release name. Object names are `<release>-<service>` unless the name already contains \"crewmesh\"."
  type        = string
  default     = "crewmesh"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.release_name)) && length(var.release_name) <= 40
    error_message = "release_name must be lowercase letters, digits and '-', at most 40 characters."
  }
}

variable "chart_path" {
  description = "Path of the crewmesh chart on disk. Null: the chart of this repository (helm/crewmesh). Ignored when chart_repository is set."
  type        = string
  default     = null
}

variable "chart_repository" {
  description = "Helm repository (https:// or oci://) to install the crewmesh chart from instead of a local path."
  type        = string
  default     = null

  validation {
    condition     = var.chart_repository == null || can(regex("^(https|oci)://", var.chart_repository))
    error_message = "chart_repository must start with https:// or oci://."
  }
}

variable "chart_version" {
  description = "Chart version to install from chart_repository (null: the latest)."
  type        = string
  default     = null
}

variable "helm_timeout_seconds" {
  description = "How long Helm waits for the release to become ready."
  type        = number
  default     = 600

  validation {
    condition     = var.helm_timeout_seconds >= 60 && var.helm_timeout_seconds <= 3600
    error_message = "helm_timeout_seconds must be between 60 and 3600."
  }
}

variable "atomic" {
  description = "Roll the release back when an install or upgrade fails."
  type        = bool
  default     = true
}

variable "labels" {
  description = "Labels added to the namespace and to every object of the chart."
  type        = map(string)
  default     = {}
}

variable "extra_values" {
  description = "Extra Helm values documents (YAML), applied after the ones this module builds."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for v in var.extra_values : can(yamldecode(v))])
    error_message = "every extra_values entry must be a YAML document."
  }
}

# ---------------------------------------------------------------- image and mesh

variable "image" {
  description = "crewmesh image. An empty tag means the chart's appVersion; a digest (sha256:...) wins over the tag."
  type = object({
    repository = optional(string, "ghcr.io/crewmesh/crewmesh")
    tag        = optional(string, "")
    digest     = optional(string, "")
  })
  default = {}

  validation {
    condition     = var.image.digest == "" || can(regex("^sha256:[a-f0-9]{64}$", var.image.digest))
    error_message = "image.digest must be empty or sha256:<64 hex digits>."
  }

  validation {
    condition     = length(var.image.repository) > 0 && !strcontains(var.image.repository, "@")
    error_message = "image.repository must be a repository without tag or digest."
  }
}

variable "trust_domain" {
  description = "SPIFFE trust domain of the mesh identities (spiffe://<trust_domain>/<service>)."
  type        = string
  default     = "crewmesh.local"

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$", var.trust_domain))
    error_message = "trust_domain must be a lowercase DNS-like name such as crewmesh.example.com."
  }
}

variable "log_level" {
  description = "Log level of the services."
  type        = string
  default     = "info"

  validation {
    condition     = contains(["trace", "debug", "info", "warn", "error"], var.log_level)
    error_message = "log_level must be one of trace, debug, info, warn, error."
  }
}

variable "otlp_endpoint" {
  description = "OTLP/gRPC endpoint for traces, e.g. http://otel-collector.observability:4317. Empty: no trace export."
  type        = string
  default     = ""

  validation {
    condition     = var.otlp_endpoint == "" || can(regex("^https?://[^/]+", var.otlp_endpoint))
    error_message = "otlp_endpoint must be empty or an http(s):// URL."
  }
}

# ---------------------------------------------------------------- certificates

variable "install_cert_manager" {
  description = "Install cert-manager (with its CRDs) from the Jetstack chart repository. Leave false when the cluster has it."
  type        = bool
  default     = false
}

variable "cert_manager_version" {
  description = "cert-manager chart version, when install_cert_manager is true."
  type        = string
  default     = "v1.18.2"

  validation {
    condition     = can(regex("^v[0-9]+\\.[0-9]+\\.[0-9]+$", var.cert_manager_version))
    error_message = "cert_manager_version must look like v1.18.2."
  }
}

variable "cert_manager_issuer" {
  description = "cert-manager issuer of the mesh certificates (a CA issuer: it must fill ca.crt). Null: the chart creates a self-signed CA for the release."
  type = object({
    name = string
    kind = optional(string, "ClusterIssuer")
  })
  default = null

  validation {
    condition     = var.cert_manager_issuer == null || contains(["Issuer", "ClusterIssuer"], try(var.cert_manager_issuer.kind, ""))
    error_message = "cert_manager_issuer.kind must be Issuer or ClusterIssuer."
  }
}

# ---------------------------------------------------------------- Postgres

variable "database" {
  description = "Postgres of the audit, metrics and agent-runtime services."
  type = object({
    host            = string
    port            = optional(number, 5432)
    name            = optional(string, "crewmesh")
    user            = optional(string, "crewmesh")
    ssl_mode        = optional(string, "require")
    max_connections = optional(number, 8)
  })

  validation {
    condition     = length(var.database.host) > 0 && var.database.port >= 1 && var.database.port <= 65535
    error_message = "database.host must be set and database.port must be a TCP port."
  }

  validation {
    condition     = contains(["disable", "allow", "prefer", "require", "verify-ca", "verify-full"], var.database.ssl_mode)
    error_message = "database.ssl_mode must be one of disable, allow, prefer, require, verify-ca, verify-full."
  }

  validation {
    condition     = var.database.max_connections >= 1 && var.database.max_connections <= 1000
    error_message = "database.max_connections must be between 1 and 1000."
  }
}

variable "database_password" {
  description = "Postgres password; the module stores it in a Secret. Leave null to use database_password_secret or password-less auth."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.database_password == null || length(coalesce(var.database_password, "x")) >= 12
    error_message = "database_password must be at least 12 characters."
  }
}

variable "database_password_secret" {
  description = "Name of an existing Secret (key `password`) in the namespace holding the Postgres password, instead of database_password."
  type        = string
  default     = null
}

# ---------------------------------------------------------------- etcd

variable "etcd" {
  description = "The config service's etcd: the chart's bundled StatefulSet (TLS with client certificates), or external endpoints (https)."
  type = object({
    bundled           = optional(bool, true)
    replicas          = optional(number, 3)
    storage_size      = optional(string, "8Gi")
    storage_class     = optional(string, "")
    endpoints         = optional(list(string), [])
    client_tls_secret = optional(string, "")
    username          = optional(string, "")
    password_secret   = optional(string, "")
    endpoint_cidrs    = optional(list(string), [])
  })
  default = {}

  validation {
    condition     = var.etcd.bundled || length(var.etcd.endpoints) > 0
    error_message = "etcd.endpoints is required when etcd.bundled is false."
  }

  validation {
    condition     = contains([1, 3, 5], var.etcd.replicas)
    error_message = "etcd.replicas must be 1, 3 or 5."
  }

  validation {
    condition     = alltrue([for e in var.etcd.endpoints : can(regex("^https://[^/]+$", e))])
    error_message = "etcd.endpoints must be https://host:port URLs (the module requires TLS to an external etcd)."
  }

  validation {
    condition     = alltrue([for c in var.etcd.endpoint_cidrs : can(cidrhost(c, 0))])
    error_message = "etcd.endpoint_cidrs must be CIDR blocks."
  }
}

# ---------------------------------------------------------------- scale

variable "replicas" {
  description = "Replicas of each service (the HPA minimum when autoscaling is enabled)."
  type        = number
  default     = 2

  validation {
    condition     = var.replicas >= 1 && var.replicas <= 50 && floor(var.replicas) == var.replicas
    error_message = "replicas must be a whole number between 1 and 50."
  }
}

variable "autoscaling" {
  description = "Horizontal pod autoscaling of every service."
  type = object({
    enabled                = optional(bool, false)
    max_replicas           = optional(number, 10)
    target_cpu_utilization = optional(number, 70)
  })
  default = {}

  validation {
    condition     = var.autoscaling.target_cpu_utilization > 0 && var.autoscaling.target_cpu_utilization <= 100
    error_message = "autoscaling.target_cpu_utilization must be a percentage (1-100)."
  }
}

# ---------------------------------------------------------------- edge, network, monitoring

variable "bootstrap_api_key" {
  description = "The gateway's first admin API key. Null: a random key is generated (read it from the bootstrap_api_key output)."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.bootstrap_api_key == null || length(coalesce(var.bootstrap_api_key, "x")) >= 32
    error_message = "bootstrap_api_key must be at least 32 characters."
  }
}

variable "ingress" {
  description = "An Ingress in front of the gateway."
  type = object({
    enabled     = optional(bool, false)
    class_name  = optional(string, "nginx")
    host        = optional(string, "")
    tls_secret  = optional(string, "")
    annotations = optional(map(string), {})
  })
  default = {}

  validation {
    condition     = !var.ingress.enabled || can(regex("^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", var.ingress.host))
    error_message = "ingress.host must be a DNS name when the ingress is enabled."
  }
}

variable "network_policy" {
  description = "NetworkPolicies: on by default (default deny plus the mesh's paths). The namespaces and CIDRs narrow the non-mesh paths."
  type = object({
    enabled              = optional(bool, true)
    monitoring_namespace = optional(string, "monitoring")
    ingress_namespace    = optional(string, "")
    database_cidrs       = optional(list(string), [])
  })
  default = {}

  validation {
    condition     = alltrue([for c in var.network_policy.database_cidrs : can(cidrhost(c, 0))])
    error_message = "network_policy.database_cidrs must be CIDR blocks."
  }
}

variable "monitoring" {
  description = "Prometheus Operator objects (ServiceMonitor, PrometheusRule) and the Grafana dashboard ConfigMap. The labels select them in your Prometheus."
  type = object({
    service_monitor   = optional(bool, false)
    prometheus_rule   = optional(bool, false)
    grafana_dashboard = optional(bool, false)
    labels            = optional(map(string), {})
  })
  default = {}
}
