output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name ...)."
  value       = module.eks.cluster_name
}

output "database_endpoint" {
  description = "RDS Postgres endpoint."
  value       = aws_db_instance.crewmesh.endpoint
}

output "gateway_service" {
  description = "In-cluster address of the crewmesh gateway."
  value       = module.crewmesh.gateway_service
}

output "gateway_url" {
  description = "Public URL of the gateway, when ingress_host is set."
  value       = module.crewmesh.gateway_url
}

output "bootstrap_api_key" {
  description = "The gateway's first admin API key."
  value       = module.crewmesh.bootstrap_api_key
  sensitive   = true
}
