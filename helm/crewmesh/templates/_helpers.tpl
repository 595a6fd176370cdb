{{/*
Names, labels and the shape of the mesh. Every per-service template ranges over
"crewmesh.serviceNames" and passes (dict "root" $ "name" $name) to the helpers below.
*/}}

{{- define "crewmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "crewmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "crewmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "crewmesh.labels" -}}
helm.sh/chart: {{ include "crewmesh.chart" . }}
app.kubernetes.io/name: {{ include "crewmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crewmesh
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of every pod of the release. */}}
{{- define "crewmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crewmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "name" "router"). */}}
{{- define "crewmesh.componentSelectorLabels" -}}
{{ include "crewmesh.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "crewmesh.componentLabels" -}}
{{ include "crewmesh.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* The six services, in a fixed order. */}}
{{- define "crewmesh.serviceNames" -}}
gateway router agent-runtime audit config metrics
{{- end }}

{{/* The values key of a service (agent-runtime -> agentRuntime). */}}
{{- define "crewmesh.valuesKey" -}}
{{- . | replace "-" "_" | camelcase | untitle }}
{{- end }}

{{/* The values block of a service: (dict "root" $ "name" "agent-runtime"). */}}
{{- define "crewmesh.serviceValues" -}}
{{- toYaml (index .root.Values.services (include "crewmesh.valuesKey" .name)) }}
{{- end }}

{{/* Kubernetes name of a service's objects. */}}
{{- define "crewmesh.componentName" -}}
{{- printf "%s-%s" (include "crewmesh.fullname" .root) .name }}
{{- end }}

{{/*
The mesh: for each service, the identities allowed to call any of its RPCs
(excluding the operator's "cli" client certificate, which is no pod). This mirrors
the allow-lists the binary enforces; `crewmesh mesh-policy` prints them, and
scripts/validate-deploy checks the rendered NetworkPolicies against it.
*/}}
{{- define "crewmesh.callers" -}}
gateway: []
router: [agent-runtime, gateway]
agent-runtime: [gateway]
audit: [agent-runtime, config, gateway, metrics, router]
config: [agent-runtime, audit, config, gateway, metrics, router]
metrics: [agent-runtime, gateway, router]
{{- end }}

{{/* Services a service calls (the inverse of crewmesh.callers), as a YAML list. */}}
{{- define "crewmesh.callees" -}}
{{- $callers := fromYaml (include "crewmesh.callers" .root) }}
{{- $out := list }}
{{- range $callee := splitList " " (include "crewmesh.serviceNames" .root) }}
{{- if has $.name (index $callers $callee) }}
{{- $out = append $out $callee }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The gRPC port of a service (empty for the gateway). */}}
{{- define "crewmesh.grpcPort" -}}
{{- $v := fromYaml (include "crewmesh.serviceValues" .) }}
{{- with $v.grpcPort }}{{ int . }}{{ end }}
{{- end }}

{{- define "crewmesh.image" -}}
{{- $img := .image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .appVersion $img.tag | toString) }}
{{- end }}
{{- end }}

{{/* Secret holding a service's certificate (ca.crt, tls.crt, tls.key). */}}
{{- define "crewmesh.tlsSecretName" -}}
{{- if eq .root.Values.tls.source "existingSecrets" }}
{{- $key := include "crewmesh.valuesKey" .name }}
{{- $secret := index .root.Values.tls.existingSecrets $key }}
{{- required (printf "tls.existingSecrets.%s is required when tls.source is existingSecrets" $key) $secret }}
{{- else }}
{{- printf "%s-tls" (include "crewmesh.componentName" .) }}
{{- end }}
{{- end }}

{{/* The issuer reference of the service certificates. */}}
{{- define "crewmesh.issuerRef" -}}
{{- $cm := .Values.tls.certManager }}
{{- if $cm.issuerRef.name }}
name: {{ $cm.issuerRef.name }}
kind: {{ $cm.issuerRef.kind }}
group: {{ $cm.issuerRef.group }}
{{- else if $cm.createIssuer }}
name: {{ include "crewmesh.fullname" . }}-ca
kind: Issuer
group: cert-manager.io
{{- else }}
{{- fail "tls.certManager.issuerRef.name is required when tls.certManager.createIssuer is false" }}
{{- end }}
{{- end }}

{{/* DNS names of a service's certificate. */}}
{{- define "crewmesh.dnsNames" -}}
{{- $svc := include "crewmesh.componentName" . }}
{{- $ns := .root.Release.Namespace }}
- {{ $svc }}
- {{ $svc }}.{{ $ns }}
- {{ $svc }}.{{ $ns }}.svc
- {{ $svc }}.{{ $ns }}.svc.cluster.local
{{- /* For operators who reach a service through kubectl port-forward. */}}
- localhost
{{- end }}

{{/* Secret with the Postgres password, or empty when none. */}}
{{- define "crewmesh.databaseSecretName" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else if .Values.database.password }}
{{- printf "%s-database" (include "crewmesh.fullname" .) }}
{{- end }}
{{- end }}

{{/* Postgres URL of a service (no password: it is read from a file). */}}
{{- define "crewmesh.databaseUrl" -}}
{{- $v := fromYaml (include "crewmesh.serviceValues" .) }}
{{- $db := .root.Values.database }}
{{- if $v.databaseUrl }}
{{- $v.databaseUrl }}
{{- else }}
{{- printf "postgres://%s@%s:%d/%s?sslmode=%s" $db.user $db.host (int $db.port) $db.name $db.sslMode }}
{{- end }}
{{- end }}

{{- define "crewmesh.bootstrapSecretName" -}}
{{- default (printf "%s-bootstrap" (include "crewmesh.fullname" .)) .Values.services.gateway.bootstrapApiKey.existingSecret }}
{{- end }}

{{- define "crewmesh.etcdName" -}}
{{- printf "%s-etcd" (include "crewmesh.fullname" .) }}
{{- end }}

{{- define "crewmesh.etcdTlsSecretName" -}}
{{- if eq .Values.tls.source "existingSecrets" }}
{{- required "tls.existingSecrets.etcd is required for the bundled etcd when tls.source is existingSecrets" .Values.tls.existingSecrets.etcd }}
{{- else }}
{{- printf "%s-tls" (include "crewmesh.etcdName" .) }}
{{- end }}
{{- end }}

{{/* etcd client endpoints of the config service, as a YAML list. */}}
{{- define "crewmesh.etcdEndpoints" -}}
{{- if .Values.etcd.bundled.enabled }}
- {{ printf "https://%s:2379" (include "crewmesh.etcdName" .) }}
{{- else }}
{{- if not .Values.etcd.external.endpoints }}
{{- fail "etcd.external.endpoints is required when etcd.bundled.enabled is false" }}
{{- end }}
{{- toYaml .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Where the config service reads etcd TLS material from, when it is not its mesh certificate. */}}
{{- define "crewmesh.etcdTlsDir" -}}
/etc/crewmesh/etcd-tls
{{- end }}

{{/* A TOML basic string. */}}
{{- define "crewmesh.tomlString" -}}
{{- . | toString | toJson }}
{{- end }}
