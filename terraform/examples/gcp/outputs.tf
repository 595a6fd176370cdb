output "cluster_name" {
  description = "GKE cluster name (gcloud container clusters get-credentials ...)."
  value       = google_container_cluster.crewmesh.name
}

output "database_private_ip" {
  description = "Private IP of the Cloud SQL instance."
  value       = google_sql_database_instance.crewmesh.private_ip_address
}

output "gateway_service" {
  description = "In-cluster address of the crewmesh gateway."
  value       = module.crewmesh.gateway_service
}

output "bootstrap_api_key" {
  description = "The gateway's first admin API key."
  value       = module.crewmesh.bootstrap_api_key
  sensitive   = true
}
