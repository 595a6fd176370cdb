# Most inputs of terraform/modules/crewmesh set, external etcd included.
namespace    = "llm-platform"
release_name = "prod"
image = {
  repository = "registry.example.com/crewmesh/crewmesh"
  digest     = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
}
trust_domain  = "mesh.example.com"
log_level     = "debug"
otlp_endpoint = "http://otel-collector.observability:4317"
cert_manager_issuer = {
  name = "corp-mesh-ca"
}
database = {
  host            = "10.20.0.10"
  port            = 6432
  name            = "crewmesh_prod"
  user            = "crewmesh_app"
  ssl_mode        = "verify-full"
  max_connections = 20
}
database_password_secret = "prod-db"
etcd = {
  bundled           = false
  endpoints         = ["https://etcd-0.example.internal:2379", "https://etcd-1.example.internal:2379"]
  client_tls_secret = "etcd-client"
  username          = "crewmesh"
  password_secret   = "etcd-password"
  endpoint_cidrs    = ["10.30.0.0/24"]
}
replicas = 3
autoscaling = {
  enabled      = true
  max_replicas = 20
}
bootstrap_api_key = "cm_0123456789abcdef0123456789abcdef"
ingress = {
  enabled    = true
  host       = "crewmesh.example.com"
  tls_secret = "crewmesh-public-tls"
}
network_policy = {
  ingress_namespace = "ingress-nginx"
  database_cidrs    = ["10.20.0.0/16"]
}
monitoring = {
  service_monitor   = true
  prometheus_rule   = true
  grafana_dashboard = true
  labels            = { release = "kube-prometheus-stack" }
}
labels = {
  team = "platform"
}
