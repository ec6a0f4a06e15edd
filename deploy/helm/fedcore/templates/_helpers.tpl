{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "fedcore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name: the release name alone when it already says "fedcore". */}}
{{- define "fedcore.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The root aggregator's Service: clients, committee members and relays dial it. */}}
{{- define "fedcore.aggregatorName" -}}
{{- printf "%s-aggregator" (include "fedcore.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedcore.relayName" -}}
{{- printf "%s-relay" (include "fedcore.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name relays check in the root's certificate (one of its SANs). */}}
{{- define "fedcore.upstreamHostname" -}}
{{- default (include "fedcore.aggregatorName" .) .Values.relay.serverHostname }}
{{- end }}

{{- define "fedcore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedcore.labels" -}}
helm.sh/chart: {{ include "fedcore.chart" . }}
app.kubernetes.io/name: {{ include "fedcore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedcore
{{- end }}

{{- define "fedcore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedcore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fedcore.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Pod-level security: the image's non-root user (uid 10001). */}}
{{- define "fedcore.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "fedcore.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
{{- end }}

{{/* Liveness, readiness and startup probes: /healthz on the metrics port. */}}
{{- define "fedcore.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 5
  failureThreshold: {{ .Values.probes.startupFailureThreshold }}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: {{ .Values.probes.livenessPeriodSeconds }}
  timeoutSeconds: 5
  failureThreshold: {{ .Values.probes.livenessFailureThreshold }}
readinessProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: {{ .Values.probes.readinessPeriodSeconds }}
  timeoutSeconds: 5
  failureThreshold: 2
{{- end }}
