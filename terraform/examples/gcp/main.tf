# crewmesh on GCP: a VPC, a private GKE cluster (Dataplane V2 enforces the chart's
# NetworkPolicies), Cloud SQL for Postgres on a private IP, and the crewmesh module.

provider "google" {
  project = var.project_id
  region  = var.region
}

locals {
  subnet_cidr   = "10.50.0.0/20"
  pods_cidr     = "10.60.0.0/14"
  services_cidr = "10.64.0.0/20"
  master_cidr   = "172.16.0.16/28"
}

# ---------------------------------------------------------------- network

resource "google_compute_network" "crewmesh" {
  name                    = var.name
  auto_create_subnetworks = false
}

resource "google_compute_subnetwork" "crewmesh" {
  name                     = var.name
  network                  = google_compute_network.crewmesh.id
  region                   = var.region
  ip_cidr_range            = local.subnet_cidr
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = local.pods_cidr
  }

  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = local.services_cidr
  }

  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Deny every ingress that no rule allows (GKE adds its own rules for the control
# plane); allow traffic inside the VPC's node, pod and service ranges.
resource "google_compute_firewall" "deny_ingress" {
  name      = "${var.name}-deny-ingress"
  network   = google_compute_network.crewmesh.id
  direction = "INGRESS"
  priority  = 65534

  deny {
    protocol = "all"
  }
  source_ranges = ["0.0.0.0/0"]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "allow_internal" {
  name      = "${var.name}-allow-internal"
  network   = google_compute_network.crewmesh.id
  direction = "INGRESS"
  priority  = 1000

  allow {
    protocol = "tcp"
  }
  allow {
    protocol = "udp"
  }
  allow {
    protocol = "icmp"
  }
  source_ranges = [local.subnet_cidr, local.pods_cidr, local.services_cidr]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Private services access, for Cloud SQL's private IP.
resource "google_compute_global_address" "sql" {
  name          = "${var.name}-sql"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  prefix_length = 20
  network       = google_compute_network.crewmesh.id
}

resource "google_service_networking_connection" "sql" {
  network                 = google_compute_network.crewmesh.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.sql.name]
}

resource "google_compute_router" "crewmesh" {
  name    = var.name
  region  = var.region
  network = google_compute_network.crewmesh.id
}

# Egress for the private nodes: the router's model providers, image pulls.
resource "google_compute_router_nat" "crewmesh" {
  name                               = var.name
  router                             = google_compute_router.crewmesh.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# ---------------------------------------------------------------- GKE

resource "google_service_account" "nodes" {
  account_id   = "${var.name}-nodes"
  display_name = "${var.name} GKE nodes"
}

resource "google_project_iam_member" "nodes" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/artifactregistry.reader",
  ])
  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_container_cluster" "crewmesh" {
  name     = var.name
  location = var.region

  network         = google_compute_network.crewmesh.id
  subnetwork      = google_compute_subnetwork.crewmesh.id
  networking_mode = "VPC_NATIVE"

  # Dataplane V2 (Cilium) enforces Kubernetes NetworkPolicies itself; the Calico
  # network-policy add-on stays off, as GKE requires with Dataplane V2.
  datapath_provider = "ADVANCED_DATAPATH"
  network_policy {
    enabled = false
  }

  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = true

  release_channel {
    channel = "REGULAR"
  }

  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = local.master_cidr
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_cidrs
      content {
        cidr_block   = cidr_blocks.value
        display_name = "operators"
      }
    }
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  # Applies to the default pool, which is removed; the node pool below sets it too.
  node_config {
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  enable_intranode_visibility = true
  enable_legacy_abac          = false
  enable_shielded_nodes       = true

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }

  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = true
    }
  }

  resource_labels = {
    app = "crewmesh"
  }
}

resource "google_container_node_pool" "default" {
  name     = "default"
  cluster  = google_container_cluster.crewmesh.id
  location = var.region

  autoscaling {
    min_node_count = 1
    max_node_count = 3
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.node_machine_type
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }

    labels = {
      app = "crewmesh"
    }
  }
}

# ---------------------------------------------------------------- Cloud SQL for Postgres

resource "google_sql_database_instance" "crewmesh" {
  name                = var.name
  region              = var.region
  database_version    = "POSTGRES_18"
  deletion_protection = true

  depends_on = [google_service_networking_connection.sql]

  settings {
    tier              = var.db_tier
    edition           = "ENTERPRISE"
    availability_type = "REGIONAL"
    disk_autoresize   = true

    ip_configuration {
      ipv4_enabled    = false
      private_network = google_compute_network.crewmesh.id
      ssl_mode        = "ENCRYPTED_ONLY"
    }

    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
      start_time                     = "02:00"
      transaction_log_retention_days = 7
      backup_retention_settings {
        retained_backups = 14
      }
    }

    insights_config {
      query_insights_enabled = true
    }

    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_duration"
      value = "on"
    }
  }
}

resource "google_sql_database" "crewmesh" {
  name     = "crewmesh"
  instance = google_sql_database_instance.crewmesh.name
}

resource "random_password" "db" {
  length  = 40
  special = false
}

resource "google_sql_user" "crewmesh" {
  name     = "crewmesh"
  instance = google_sql_database_instance.crewmesh.name
  password = random_password.db.result
}

# ---------------------------------------------------------------- crewmesh

data "google_client_config" "current" {}

provider "kubernetes" {
  host                   = "https://${google_container_cluster.crewmesh.endpoint}"
  token                  = data.google_client_config.current.access_token
  cluster_ca_certificate = base64decode(google_container_cluster.crewmesh.master_auth[0].cluster_ca_certificate)
}

provider "helm" {
  kubernetes = {
    host                   = "https://${google_container_cluster.crewmesh.endpoint}"
    token                  = data.google_client_config.current.access_token
    cluster_ca_certificate = base64decode(google_container_cluster.crewmesh.master_auth[0].cluster_ca_certificate)
  }
}

module "crewmesh" {
  source = "../../modules/crewmesh"

  image = {
    tag = var.crewmesh_image_tag
  }
  trust_domain = "${var.name}.crewmesh.internal"

  install_cert_manager = true

  database = {
    host     = google_sql_database_instance.crewmesh.private_ip_address
    name     = google_sql_database.crewmesh.name
    user     = google_sql_user.crewmesh.name
    ssl_mode = "require"
  }
  database_password = random_password.db.result

  # No managed etcd on GCP: the chart's bundled etcd, three members on the
  # cluster's default StorageClass (Persistent Disk CSI).
  etcd = {
    bundled  = true
    replicas = 3
  }

  replicas = 3
  autoscaling = {
    enabled      = true
    max_replicas = 12
  }

  network_policy = {
    database_cidrs = ["${google_compute_global_address.sql.address}/${google_compute_global_address.sql.prefix_length}"]
  }

  monitoring = {
    # GKE Managed Prometheus reads PodMonitoring objects, not ServiceMonitors:
    # scrape the admin ports with your own PodMonitoring, or run kube-prometheus-stack.
    service_monitor = false
    prometheus_rule = false
  }

  depends_on = [google_container_node_pool.default]
}
