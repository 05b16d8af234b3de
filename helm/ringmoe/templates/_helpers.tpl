{{/* Names. */}}
{{- define "ringmoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ringmoe.fullname" -}}
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

{{- define "ringmoe.coordinator" -}}{{ include "ringmoe.fullname" . | trunc 51 | trimSuffix "-" }}-coordinator{{- end }}
{{- define "ringmoe.workers" -}}{{ include "ringmoe.fullname" . | trunc 55 | trimSuffix "-" }}-workers{{- end }}
{{- define "ringmoe.etcd" -}}{{ include "ringmoe.fullname" . | trunc 58 | trimSuffix "-" }}-etcd{{- end }}

{{- define "ringmoe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "ringmoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ringmoe
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "coordinator"). */}}
{{- define "ringmoe.selector" -}}
app.kubernetes.io/name: {{ include "ringmoe.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ringmoe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ringmoe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ringmoe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "ringmoe.workerImage" -}}
{{- $repo := ternary .Values.image.cudaRepository .Values.image.repository (eq .Values.workers.device "cuda") }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "ringmoe.svcSuffix" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* The coordinator's client address inside the cluster. */}}
{{- define "ringmoe.coordinatorAddr" -}}
{{- printf "%s.%s:%d" (include "ringmoe.coordinator" .) (include "ringmoe.svcSuffix" .) (int .Values.coordinator.service.port) }}
{{- end }}

{{/* etcd endpoints, comma-separated, for --etcd. */}}
{{- define "ringmoe.etcdEndpoints" -}}
{{- if eq .Values.etcd.mode "bundled" }}
{{- $scheme := ternary "https" "http" .Values.etcd.bundled.tls.enabled }}
{{- $eps := list }}
{{- range $i := until (int .Values.etcd.bundled.replicas) }}
{{- $eps = append $eps (printf "%s://%s-%d.%s-headless.%s:2379" $scheme (include "ringmoe.etcd" $) $i (include "ringmoe.etcd" $) (include "ringmoe.svcSuffix" $)) }}
{{- end }}
{{- join "," $eps }}
{{- else }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Does etcd use TLS, and with a client certificate? */}}
{{- define "ringmoe.etcdTls" -}}
{{- if eq .Values.etcd.mode "bundled" }}{{ .Values.etcd.bundled.tls.enabled }}{{ else if eq .Values.etcd.mode "external" }}{{ .Values.etcd.external.tls.enabled }}{{ else }}false{{ end }}
{{- end }}
{{- define "ringmoe.etcdClientCert" -}}
{{- if eq .Values.etcd.mode "bundled" }}{{ and .Values.etcd.bundled.tls.enabled .Values.etcd.bundled.tls.clientCertAuth }}{{ else if eq .Values.etcd.mode "external" }}{{ and .Values.etcd.external.tls.enabled .Values.etcd.external.tls.clientCert }}{{ else }}false{{ end }}
{{- end }}
{{- define "ringmoe.etcdTlsSecret" -}}
{{- if eq .Values.etcd.mode "bundled" }}{{ .Values.etcd.bundled.tls.secretName }}{{ else }}{{ .Values.etcd.external.tls.secretName }}{{ end }}
{{- end }}

{{/* The etcd (or heartbeat) arguments shared by the coordinator and the workers. */}}
{{- define "ringmoe.etcdArgs" -}}
{{- if ne .Values.etcd.mode "none" }}
- --etcd={{ include "ringmoe.etcdEndpoints" . }}
- --cluster={{ .Values.etcd.cluster }}
{{- if eq (include "ringmoe.etcdTls" .) "true" }}
- --etcd-ca=/etc/ringmoe/etcd-tls/ca.crt
{{- if eq (include "ringmoe.etcdClientCert" .) "true" }}
- --etcd-cert=/etc/ringmoe/etcd-tls/tls.crt
- --etcd-key=/etc/ringmoe/etcd-tls/tls.key
{{- end }}
{{- if and (eq .Values.etcd.mode "external") .Values.etcd.external.tls.domain }}
- --etcd-domain={{ .Values.etcd.external.tls.domain }}
{{- end }}
{{- end }}
{{- if and (eq .Values.etcd.mode "external") .Values.etcd.external.auth.user }}
- --etcd-user={{ .Values.etcd.external.auth.user }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ringmoe.etcdEnv" -}}
{{- if and (eq .Values.etcd.mode "external") .Values.etcd.external.auth.user }}
- name: RINGMOE_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.auth.passwordSecret }}
      key: {{ .Values.etcd.external.auth.passwordKey }}
{{- end }}
{{- end }}

{{/* Volumes every ringmoe pod mounts: the models, etcd's TLS, and the security hooks. */}}
{{- define "ringmoe.commonVolumes" -}}
- name: models
{{- if .Values.model.volume.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.existingClaim }}
    readOnly: true
{{- else if .Values.model.volume.hostPath }}
  hostPath:
    path: {{ .Values.model.volume.hostPath }}
    type: Directory
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "ringmoe.fullname" . }}-models
    readOnly: true
{{- end }}
{{- if and (ne .Values.etcd.mode "none") (eq (include "ringmoe.etcdTls" .) "true") }}
- name: etcd-tls
  secret:
    secretName: {{ include "ringmoe.etcdTlsSecret" . }}
{{- end }}
{{- with .Values.security.tls.secretName }}
- name: tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .Values.security.auth.clusterSecretName }}
- name: auth
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}

{{- define "ringmoe.commonMounts" -}}
- name: models
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- if and (ne .Values.etcd.mode "none") (eq (include "ringmoe.etcdTls" .) "true") }}
- name: etcd-tls
  mountPath: /etc/ringmoe/etcd-tls
  readOnly: true
{{- end }}
{{- if .Values.security.tls.secretName }}
- name: tls
  mountPath: /etc/ringmoe/tls
  readOnly: true
{{- end }}
{{- if .Values.security.auth.clusterSecretName }}
- name: auth
  mountPath: /etc/ringmoe/auth
  readOnly: true
{{- end }}
{{- end }}

{{- define "ringmoe.modelArg" -}}
{{- printf "--model=%s=%s/%s" .Values.model.name (trimSuffix "/" .Values.model.mountPath) .Values.model.path }}
{{- end }}

{{- define "ringmoe.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "ringmoe.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* Telemetry flags of every ringmoe server: metrics port and log format. */}}
{{/* The cluster secret both the coordinator and the workers present and require, and TLS
(mTLS: the Secret's CA must sign every peer's certificate). */}}
{{- define "ringmoe.securityArgs" -}}
{{- if .Values.security.auth.clusterSecretName }}
- --cluster-secret-file=/etc/ringmoe/auth/secret
{{- end }}
{{- include "ringmoe.tlsArgs" . }}
{{- end }}

{{- define "ringmoe.tlsArgs" -}}
{{- if .Values.security.tls.secretName }}
- --tls-cert=/etc/ringmoe/tls/tls.crt
- --tls-key=/etc/ringmoe/tls/tls.key
- --tls-ca=/etc/ringmoe/tls/ca.crt
{{- end }}
{{- end }}

{{/* A gRPC health probe on `port` (for `service`): the kubelet's own gRPC probe, or with TLS
(which the kubelet's probe does not speak) `ringmoe health` over mTLS on 127.0.0.1. */}}
{{- define "ringmoe.grpcProbe" -}}
{{- if .ctx.Values.security.tls.secretName }}
exec:
  command:
    - ringmoe
    - health
    - --addr=127.0.0.1:{{ .port }}
    {{- with .service }}
    - --service={{ . }}
    {{- end }}
    {{- include "ringmoe.tlsArgs" .ctx | nindent 4 }}
{{- else }}
grpc:
  port: {{ .port }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "ringmoe.telemetryArgs" -}}
{{- if .Values.metrics.enabled }}
- --metrics-addr=0.0.0.0:{{ .Values.metrics.port }}
{{- end }}
- --log-format={{ .Values.logFormat }}
{{- end }}

{{/* The OpenTelemetry environment (traces go out only when an endpoint is set). */}}
{{- define "ringmoe.telemetryEnv" -}}
{{- with .ctx.Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "ringmoe-%s" $.component | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $.ctx.Values.tracing.sampler | quote }}
{{- with $.ctx.Values.tracing.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,k8s.namespace.name=%s" $.ctx.Release.Name $.ctx.Release.Namespace | quote }}
{{- end }}
{{- end }}

{{/* The metrics container port. */}}
{{- define "ringmoe.metricsPort" -}}
{{- if .Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end }}
