# Installs the crewmesh Helm chart: namespace, the Secrets it reads (Postgres
# password, bootstrap API key) and the values, optionally cert-manager first.

locals {
  services = ["gateway", "router", "agent-runtime", "audit", "config", "metrics"]
  # Keys of the services in the chart's values.
  values_keys = {
    gateway         = "gateway"
    router          = "router"
    "agent-runtime" = "agentRuntime"
    audit           = "audit"
    config          = "config"
    metrics         = "metrics"
  }
  grpc_ports = {
    router          = 7001
    "agent-runtime" = 7002
    audit           = 7003
    config          = 7004
    metrics         = 7005
  }

  # The chart's object names: <release>-<service>, or <release>-crewmesh-<service>.
  fullname  = trimsuffix(substr(strcontains(var.release_name, "crewmesh") ? var.release_name : "${var.release_name}-crewmesh", 0, 40), "-")
  namespace = var.create_namespace ? kubernetes_namespace_v1.this[0].metadata[0].name : var.namespace

  chart = var.chart_repository != null ? "crewmesh" : coalesce(var.chart_path, "${path.module}/../../../helm/crewmesh")

  # Whether a secret was given is not itself secret (count cannot use sensitive values).
  has_database_password = nonsensitive(var.database_password != null)
  has_bootstrap_api_key = nonsensitive(var.bootstrap_api_key != null)

  database_secret = (
    var.database_password_secret != null ? var.database_password_secret :
    local.has_database_password ? kubernetes_secret_v1.database[0].metadata[0].name : ""
  )
  bootstrap_api_key = local.has_bootstrap_api_key ? var.bootstrap_api_key : "cm_${random_password.bootstrap[0].result}"

  peer_namespace = { for k, v in {
    monitoring = var.network_policy.monitoring_namespace
    ingress    = var.network_policy.ingress_namespace
  } : k => [{ namespaceSelector = { matchLabels = { "kubernetes.io/metadata.name" = v } } }] if v != "" }

  values = {
    image = {
      repository = var.image.repository
      tag        = var.image.tag
      digest     = var.image.digest
    }
    trustDomain  = var.trust_domain
    commonLabels = var.labels
    logging = {
      level  = var.log_level
      format = "json"
    }
    telemetry = {
      otlpEndpoint = var.otlp_endpoint
    }
    tls = {
      source = "certManager"
      certManager = {
        createIssuer = var.cert_manager_issuer == null
        issuerRef = {
          name  = var.cert_manager_issuer == null ? "" : var.cert_manager_issuer.name
          kind  = var.cert_manager_issuer == null ? "Issuer" : var.cert_manager_issuer.kind
          group = "cert-manager.io"
        }
      }
    }
    database = {
      host           = var.database.host
      port           = var.database.port
      name           = var.database.name
      user           = var.database.user
      sslMode        = var.database.ssl_mode
      maxConnections = var.database.max_connections
      existingSecret = local.database_secret
      passwordKey    = "password"
    }
    etcd = {
      bundled = {
        enabled  = var.etcd.bundled
        replicas = var.etcd.replicas
        persistence = {
          size         = var.etcd.storage_size
          storageClass = var.etcd.storage_class
        }
      }
      external = {
        endpoints = var.etcd.endpoints
        tls = {
          enabled        = true
          existingSecret = var.etcd.client_tls_secret
        }
        auth = {
          username       = var.etcd.username
          existingSecret = var.etcd.password_secret
          passwordKey    = "password"
        }
      }
    }
    autoscaling = {
      enabled                        = var.autoscaling.enabled
      targetCPUUtilizationPercentage = var.autoscaling.target_cpu_utilization
    }
    services = { for s in local.services : local.values_keys[s] => merge(
      {
        replicas = var.replicas
        autoscaling = {
          minReplicas = var.replicas
          maxReplicas = max(var.replicas, var.autoscaling.max_replicas)
        }
      },
      s == "gateway" ? {
        bootstrapApiKey = {
          existingSecret = kubernetes_secret_v1.bootstrap.metadata[0].name
          key            = "api-key"
        }
      } : {}
    ) }
    networkPolicy = merge(
      {
        enabled   = var.network_policy.enabled
        adminFrom = lookup(local.peer_namespace, "monitoring", [])
        database = {
          to = [for c in var.network_policy.database_cidrs : { ipBlock = { cidr = c } }]
        }
        etcd = {
          to    = [for c in var.etcd.endpoint_cidrs : { ipBlock = { cidr = c } }]
          ports = [2379]
        }
      },
      contains(keys(local.peer_namespace), "ingress") ? { gatewayFrom = local.peer_namespace["ingress"] } : {},
    )
    metrics = {
      serviceMonitor = {
        enabled = var.monitoring.service_monitor
        labels  = var.monitoring.labels
      }
      prometheusRule = {
        enabled = var.monitoring.prometheus_rule
        labels  = var.monitoring.labels
      }
      grafanaDashboard = {
        enabled = var.monitoring.grafana_dashboard
      }
    }
    ingress = {
      enabled     = var.ingress.enabled
      className   = var.ingress.class_name
      annotations = var.ingress.annotations
      hosts = [{
        host  = var.ingress.host
        paths = [{ path = "/", pathType = "Prefix" }]
      }]
      tls = var.ingress.tls_secret == "" ? [] : [{ secretName = var.ingress.tls_secret, hosts = [var.ingress.host] }]
    }
  }
}

resource "kubernetes_namespace_v1" "this" {
  count = var.create_namespace ? 1 : 0

  metadata {
    name = var.namespace
    labels = merge(var.labels, {
      "app.kubernetes.io/part-of"                  = "crewmesh"
      "pod-security.kubernetes.io/enforce"         = "restricted"
      "pod-security.kubernetes.io/enforce-version" = "latest"
    })
  }
}

resource "kubernetes_secret_v1" "database" {
  count = local.has_database_password ? 1 : 0

  metadata {
    name      = "${local.fullname}-db"
    namespace = local.namespace
    labels    = merge(var.labels, { "app.kubernetes.io/part-of" = "crewmesh" })
  }
  type = "Opaque"
  data = {
    password = var.database_password
  }
}

resource "random_password" "bootstrap" {
  count = local.has_bootstrap_api_key ? 0 : 1

  length  = 48
  special = false
}

resource "kubernetes_secret_v1" "bootstrap" {
  metadata {
    name      = "${local.fullname}-bootstrap-key"
    namespace = local.namespace
    labels    = merge(var.labels, { "app.kubernetes.io/part-of" = "crewmesh" })
  }
  type = "Opaque"
  data = {
    "api-key" = local.bootstrap_api_key
  }
}

resource "helm_release" "cert_manager" {
  count = var.install_cert_manager ? 1 : 0

  name             = "cert-manager"
  namespace        = "cert-manager"
  create_namespace = true
  repository       = "https://charts.jetstack.io"
  chart            = "cert-manager"
  version          = var.cert_manager_version
  atomic           = var.atomic
  wait             = true
  timeout          = var.helm_timeout_seconds
  values = [yamlencode({
    crds = { enabled = true }
  })]
}

resource "helm_release" "crewmesh" {
  name        = var.release_name
  namespace   = local.namespace
  repository  = var.chart_repository
  chart       = local.chart
  version     = var.chart_version
  atomic      = var.atomic
  wait        = true
  timeout     = var.helm_timeout_seconds
  max_history = 10

  values = concat([yamlencode(local.values)], var.extra_values)

  depends_on = [
    helm_release.cert_manager,
    kubernetes_secret_v1.database,
    kubernetes_secret_v1.bootstrap,
  ]
}
