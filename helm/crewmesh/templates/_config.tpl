{{/* The service's config file (TOML): (dict "root" $ "name" "router"). */}}
{{- define "crewmesh.configToml" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- $ctx := . }}
{{- $v := fromYaml (include "crewmesh.serviceValues" $ctx) }}
{{- $callees := fromYamlArray (include "crewmesh.callees" $ctx) }}
# crewmesh {{ $name }}: rendered by the crewmesh Helm chart from its values.
# Any field can be overridden with CREWMESH_<SECTION>__<FIELD> (extraEnv).
trust_domain = {{ include "crewmesh.tomlString" $root.Values.trustDomain }}

[server]
{{- if ne $name "gateway" }}
grpc_addr = "0.0.0.0:{{ int $v.grpcPort }}"
{{- end }}
admin_addr = "0.0.0.0:{{ int $v.adminPort }}"
shutdown_grace_secs = {{ int $root.Values.shutdownGraceSeconds }}

[tls]
{{- if $root.Values.tls.trustBundle.configMap }}
ca_file = "/etc/crewmesh/trust/{{ $root.Values.tls.trustBundle.key }}"
{{- else }}
ca_file = "/etc/crewmesh/tls/ca.crt"
{{- end }}
cert_file = "/etc/crewmesh/tls/tls.crt"
key_file = "/etc/crewmesh/tls/tls.key"

[telemetry]
log_level = {{ include "crewmesh.tomlString" $root.Values.logging.level }}
log_format = {{ include "crewmesh.tomlString" $root.Values.logging.format }}
{{- with $root.Values.telemetry.otlpEndpoint }}
otlp_endpoint = {{ include "crewmesh.tomlString" . }}
{{- end }}
{{- if $callees }}

[peers]
{{- range $callee := $callees }}
{{- $cctx := dict "root" $root "name" $callee }}
{{ $callee | replace "-" "_" }} = "{{ include "crewmesh.componentName" $cctx }}:{{ include "crewmesh.grpcPort" $cctx }}"
{{- end }}
{{- end }}
{{- if has $name (list "audit" "metrics" "agent-runtime") }}

[database]
url = {{ include "crewmesh.tomlString" (include "crewmesh.databaseUrl" $ctx) }}
{{- if include "crewmesh.databaseSecretName" $root }}
password_file = "/etc/crewmesh/db/password"
{{- end }}
max_connections = {{ int $root.Values.database.maxConnections }}
{{- end }}
{{- if eq $name "config" }}
{{- $etcd := $root.Values.etcd }}

[store]
backend = "etcd"

[store.etcd]
endpoints = {{ fromYamlArray (include "crewmesh.etcdEndpoints" $root) | toJson }}
{{- if $etcd.bundled.enabled }}
ca_file = "/etc/crewmesh/tls/ca.crt"
cert_file = "/etc/crewmesh/tls/tls.crt"
key_file = "/etc/crewmesh/tls/tls.key"
{{- else if $etcd.external.tls.enabled }}
{{- if $etcd.external.tls.existingSecret }}
ca_file = "{{ include "crewmesh.etcdTlsDir" $root }}/ca.crt"
cert_file = "{{ include "crewmesh.etcdTlsDir" $root }}/tls.crt"
key_file = "{{ include "crewmesh.etcdTlsDir" $root }}/tls.key"
{{- else }}
ca_file = "/etc/crewmesh/tls/ca.crt"
cert_file = "/etc/crewmesh/tls/tls.crt"
key_file = "/etc/crewmesh/tls/tls.key"
{{- end }}
{{- end }}
{{- if and (not $etcd.bundled.enabled) $etcd.external.auth.username }}
username = {{ include "crewmesh.tomlString" $etcd.external.auth.username }}
{{- if $etcd.external.auth.existingSecret }}
password_file = "/etc/crewmesh/etcd-auth/password"
{{- end }}
{{- end }}
{{- end }}
{{- if eq $name "gateway" }}

[gateway]
http_addr = "0.0.0.0:{{ int $v.httpPort }}"
bootstrap_api_key_file = "/etc/crewmesh/bootstrap/api-key"
upstream_timeout_secs = {{ int $v.upstreamTimeoutSecs }}
{{- end }}
{{- if eq $name "router" }}

[router]
refresh_interval_ms = {{ int64 $v.refreshIntervalMs }}
upstream_connect_timeout_ms = {{ int64 $v.upstreamConnectTimeoutMs }}
upstream_timeout_ms = {{ int64 $v.upstreamTimeoutMs }}
{{- end }}
{{- end }}
