{{/*
The relay's collector-shaped configuration, built from values. Rendered into the ConfigMap after
relay.configOverrides is deep-merged over it. tests/deploy/rendered.rs runs `otlp-relay check` on it.
*/}}
{{- define "otlp-relay.relay.tls" -}}
{{- $t := .Values.relay.receivers.tls -}}
{{- if $t.enabled }}
tls:
  cert_file: /etc/otlp-relay/tls/tls.crt
  key_file: /etc/otlp-relay/tls/tls.key
  client_ca_file: /etc/otlp-relay/tls/ca.crt
  min_version: {{ $t.minVersion | quote }}
  reload_interval: {{ $t.reloadInterval }}
  {{- with $t.allowedClients }}
  allowed_clients:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* One otlphttp exporter: (list . "name" "url" tokenAuth) */}}
{{- define "otlp-relay.relay.exporter" -}}
{{- $ := index . 0 -}}
{{- $name := index . 1 -}}
{{- $url := index . 2 -}}
{{- $e := $.Values.relay.exporter -}}
otlphttp/{{ $name }}:
  endpoint: {{ $url }}
  traces_endpoint: {{ $url }}/v1/traces
  headers:
    x-mlflow-experiment-id: {{ $.Values.mlflow.experimentId | quote }}
  compression: {{ $e.compression }}
  timeout: {{ $e.timeout }}
  disable_keep_alives: {{ $e.disableKeepAlives }}
  retry_on_failure:
    enabled: {{ $e.retryOnFailure.enabled }}
    initial_interval: {{ $e.retryOnFailure.initialInterval }}
    max_interval: {{ $e.retryOnFailure.maxInterval }}
    max_elapsed_time: {{ $e.retryOnFailure.maxElapsedTime }}
  sending_queue:
    enabled: true
    num_consumers: {{ $e.numConsumers }}
    queue_size: {{ $e.queueSize }}
    {{- if $.Values.relay.spool.enabled }}
    # Each exporter spools to its own subdirectory of the one file_storage.
    storage: file_storage/spool
    {{- end }}
  {{- if index . 3 }}
  auth:
    authenticator: oauth2client/mlflow
  {{- end }}
{{- end -}}

{{- define "otlp-relay.relay.exporterNames" -}}
{{- $names := list -}}
{{- if include "otlp-relay.tokenPath" . }}{{ $names = append $names "mlflow" }}{{ end -}}
{{- if include "otlp-relay.directPath" . }}{{ $names = append $names "mlflow-direct" }}{{ end -}}
{{- join "," $names -}}
{{- end -}}

{{- define "otlp-relay.relay.config" -}}
{{- $r := .Values.relay -}}
{{- $p := $r.processors -}}
{{- $exporters := splitList "," (include "otlp-relay.relay.exporterNames" .) -}}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 0.0.0.0:4317
        max_recv_msg_size_mib: {{ $r.receivers.maxRecvMsgSizeMib }}
        include_metadata: {{ $r.receivers.includeMetadata }}
        {{- include "otlp-relay.relay.tls" . | nindent 8 }}
      http:
        endpoint: 0.0.0.0:4318
        max_recv_msg_size_mib: {{ $r.receivers.maxRecvMsgSizeMib }}
        include_metadata: {{ $r.receivers.includeMetadata }}
        {{- include "otlp-relay.relay.tls" . | nindent 8 }}
processors:
  memory_limiter:
    check_interval: {{ $p.memoryLimiter.checkInterval }}
    limit_mib: {{ $p.memoryLimiter.limitMib }}
    spike_limit_mib: {{ $p.memoryLimiter.spikeLimitMib }}
  {{- if $p.groupbytrace.enabled }}
  groupbytrace:
    wait_duration: {{ $p.groupbytrace.waitDuration }}
    root_grace: {{ $p.groupbytrace.rootGrace }}
    max_hold: {{ $p.groupbytrace.maxHold }}
  {{- end }}
  batch:
    send_batch_size: {{ $p.batch.sendBatchSize }}
    send_batch_max_size: {{ $p.batch.sendBatchMaxSize }}
    timeout: {{ $p.batch.timeout }}
exporters:
  {{- if include "otlp-relay.tokenPath" . }}
  {{- include "otlp-relay.relay.exporter" (list . "mlflow" (include "otlp-relay.gate.url" .) true) | nindent 2 }}
  {{- end }}
  {{- if include "otlp-relay.directPath" . }}
  {{- include "otlp-relay.relay.exporter" (list . "mlflow-direct" (include "otlp-relay.mlflow.url" .) false) | nindent 2 }}
  {{- end }}
extensions:
  health_check:
    endpoint: 0.0.0.0:13133
  {{- if include "otlp-relay.tokenPath" . }}
  oauth2client/mlflow:
    client_id: ${env:OIDC_CLIENT_ID}
    client_secret: ${env:OIDC_CLIENT_SECRET}
    token_url: ${env:OIDC_TOKEN_URL}
    {{- with $r.oauthSecret.scopes }}
    scopes:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    expiry_buffer: {{ $r.oauthSecret.expiryBuffer }}
    {{- if .Values.oidc.caBundle.configMapName }}
    tls:
      ca_file: {{ include "otlp-relay.caBundlePath" . }}
    {{- end }}
  {{- end }}
  {{- if $r.spool.enabled }}
  file_storage/spool:
    directory: /var/lib/otlp-relay/spool
    fsync: {{ $r.spool.fsync }}
    max_size_mib: {{ $r.spool.maxSizeMib }}
  {{- end }}
service:
  extensions:
    - health_check
    {{- if include "otlp-relay.tokenPath" . }}
    - oauth2client/mlflow
    {{- end }}
    {{- if $r.spool.enabled }}
    - file_storage/spool
    {{- end }}
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter{{ if $p.groupbytrace.enabled }}, groupbytrace{{ end }}, batch]
      exporters:
        {{- range $exporters }}
        - otlphttp/{{ . }}
        {{- end }}
  telemetry:
    metrics:
      address: 0.0.0.0:8888
  shutdown_timeout: {{ $r.shutdownTimeoutSeconds }}s
{{- end -}}

{{/* The final config text (values + overrides). */}}
{{- define "otlp-relay.relay.configYaml" -}}
{{- $cfg := include "otlp-relay.relay.config" . | fromYaml -}}
{{- if hasKey $cfg "Error" -}}
{{- fail (printf "relay config did not render as YAML: %s" $cfg.Error) -}}
{{- end -}}
{{- $cfg = mergeOverwrite $cfg (deepCopy .Values.relay.configOverrides) -}}
{{- toYaml $cfg -}}
{{- end -}}
