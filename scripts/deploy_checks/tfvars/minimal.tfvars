# The least a caller of terraform/modules/crewmesh gives.
database = {
  host = "postgres.example.internal"
}
database_password = "example-password-0123"
