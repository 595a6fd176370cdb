output "namespace" {
  description = "Namespace of the release."
  value       = local.namespace
}

output "release_name" {
  description = "Helm release name."
  value       = helm_release.crewmesh.name
}

output "release_status" {
  description = "Status of the Helm release (deployed, failed, ...)."
  value       = helm_release.crewmesh.status
}

output "gateway_service" {
  description = "In-cluster address of the gateway's HTTP API (host:port)."
  value       = "${local.fullname}-gateway.${local.namespace}.svc:8080"
}

output "gateway_url" {
  description = "Public URL of the gateway when the ingress is enabled, else null."
  value       = var.ingress.enabled ? "${var.ingress.tls_secret == "" ? "http" : "https"}://${var.ingress.host}" : null
}

output "grpc_endpoints" {
  description = "In-cluster gRPC (mTLS) addresses of the mesh services, by service."
  value       = { for s, p in local.grpc_ports : s => "${local.fullname}-${s}.${local.namespace}.svc:${p}" }
}

output "spiffe_ids" {
  description = "Workload identity of each service (URI SAN of its certificate)."
  value       = { for s in local.services : s => "spiffe://${var.trust_domain}/${s}" }
}

output "bootstrap_api_key_secret" {
  description = "Secret (and key) holding the gateway's first admin API key."
  value = {
    name = kubernetes_secret_v1.bootstrap.metadata[0].name
    key  = "api-key"
  }
}

output "bootstrap_api_key" {
  description = "The gateway's first admin API key. Use it to create tenants and their keys, then rotate it."
  value       = local.bootstrap_api_key
  sensitive   = true
}

output "database_password_secret" {
  description = "Name of the Secret the services read the Postgres password from (empty: none)."
  value       = local.database_secret
}
