{{/* Names, labels and the values-derived facts every template shares. */}}

{{- define "otlp-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "otlp-relay.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: include "otlp-relay.selectorLabels" (list . "relay") */}}
{{- define "otlp-relay.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "otlp-relay.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "otlp-relay.labels" -}}
{{- $ := index . 0 -}}
{{ include "otlp-relay.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ $.Release.Service }}
app.kubernetes.io/part-of: otlp-relay
app.kubernetes.io/version: {{ $.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" $.Chart.Name $.Chart.Version | replace "+" "_" }}
{{- with $.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod labels: selector labels, plus ambient enrolment when asked. */}}
{{- define "otlp-relay.podLabels" -}}
{{ include "otlp-relay.selectorLabels" . }}
{{- $ := index . 0 }}
{{- if and $.Values.istio.enabled $.Values.istio.enrolPods }}
istio.io/dataplane-mode: ambient
{{- end }}
{{- end -}}

{{- define "otlp-relay.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Is the gate rendered? (the seed's mlflow.auth.enabled) */}}
{{- define "otlp-relay.gateEnabled" -}}
{{- if .Values.mlflow.auth.enabled }}true{{ end -}}
{{- end -}}

{{/* Does the relay export through the gate with a token / straight to MLflow? */}}
{{- define "otlp-relay.tokenPath" -}}
{{- if has .Values.mode (list "token" "both") }}true{{ end -}}
{{- end -}}
{{- define "otlp-relay.directPath" -}}
{{- if has .Values.mode (list "direct" "both") }}true{{ end -}}
{{- end -}}

{{- define "otlp-relay.relay.serviceAccountName" -}}
{{- if .Values.relay.serviceAccount.create -}}
{{- default (printf "%s-relay" (include "otlp-relay.fullname" .)) .Values.relay.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.relay.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "otlp-relay.gate.serviceAccountName" -}}
{{- if .Values.gate.serviceAccount.create -}}
{{- default (printf "%s-gate" (include "otlp-relay.fullname" .)) .Values.gate.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gate.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "otlp-relay.mlflow.serviceAccountName" -}}
{{- if .Values.mlflow.serviceAccount.create -}}
{{- default (printf "%s-mlflow" (include "otlp-relay.fullname" .)) .Values.mlflow.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.mlflow.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* MLflow's own Service: `mlflow-server` behind the gate, `mlflow` without it. */}}
{{- define "otlp-relay.mlflow.serviceName" -}}
{{- if .Values.mlflow.service.name -}}
{{- .Values.mlflow.service.name -}}
{{- else if include "otlp-relay.gateEnabled" . -}}
mlflow-server
{{- else -}}
mlflow
{{- end -}}
{{- end -}}

{{- define "otlp-relay.mlflow.url" -}}
http://{{ include "otlp-relay.mlflow.serviceName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.service.port }}
{{- end -}}

{{- define "otlp-relay.gate.url" -}}
http://{{ .Values.gate.service.name }}.{{ .Release.Namespace }}.svc:{{ .Values.gate.service.port }}
{{- end -}}

{{- define "otlp-relay.oauthSecretName" -}}
{{- default .Values.mlflow.auth.secretName .Values.relay.oauthSecret.name -}}
{{- end -}}

{{- define "otlp-relay.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "otlp-relay.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* SPIFFE-style principal Istio uses in AuthorizationPolicies: (list . "ns" "sa"). */}}
{{- define "otlp-relay.principal" -}}
{{- $ := index . 0 -}}
{{- printf "%s/ns/%s/sa/%s" $.Values.istio.trustDomain (index . 1) (index . 2) -}}
{{- end -}}

{{/* Strict container securityContext shared by our containers. */}}
{{- define "otlp-relay.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "otlp-relay.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The CA bundle volume and mount (when oidc.caBundle.configMapName is set). */}}
{{- define "otlp-relay.caBundlePath" -}}
/etc/otlp-relay/oidc-ca/{{ .Values.oidc.caBundle.key }}
{{- end -}}
