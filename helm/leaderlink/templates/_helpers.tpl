{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "leaderlink.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release name + chart name, unless the release name already contains the chart name.
*/}}
{{- define "leaderlink.fullname" -}}
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

{{- define "leaderlink.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "leaderlink.labels" -}}
helm.sh/chart: {{ include "leaderlink.chart" . }}
{{ include "leaderlink.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: leaderlink
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels that select this release's pods (never change them: Deployment selectors are immutable).
*/}}
{{- define "leaderlink.selectorLabels" -}}
app.kubernetes.io/name: {{ include "leaderlink.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "leaderlink.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "leaderlink.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "leaderlink.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
A value as a TOML integer. Helm reads numbers in values files as float64, which print as
1.048576e+08; int64 turns them back into whole numbers.
*/}}
{{- define "leaderlink.tomlInt" -}}
{{- printf "%d" (int64 .) }}
{{- end }}

{{/*
A value as a TOML float: always with a decimal point or an exponent, so 1 renders as 1.0.
*/}}
{{- define "leaderlink.tomlFloat" -}}
{{- $s := printf "%v" (float64 .) }}
{{- if or (contains "." $s) (contains "e" $s) (contains "E" $s) }}{{ $s }}{{ else }}{{ $s }}.0{{ end }}
{{- end }}

{{/*
ceil(config.shutdown_grace_ms / 1000): seconds leaderlink drains in-flight calls after SIGTERM.
*/}}
{{- define "leaderlink.shutdownGraceSeconds" -}}
{{- div (add (int64 .Values.config.shutdown_grace_ms) 999) 1000 }}
{{- end }}

{{/*
The pod's terminationGracePeriodSeconds: the preStop sleep, then leaderlink's drain
(shutdown_grace_ms), then 2 s in which leaderlink answers the calls the grace cut off. A value
that leaves no room for them fails the render.
*/}}
{{- define "leaderlink.terminationGracePeriodSeconds" -}}
{{- $needed := add (int64 .Values.preStopSleepSeconds) (include "leaderlink.shutdownGraceSeconds" . | int64) 2 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 8 }}
{{- else if le (int64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds=%d is too short: it must exceed preStopSleepSeconds (%d) + ceil(config.shutdown_grace_ms/1000) (%s) + 2 = %d, or Kubernetes kills leaderlink while it drains in-flight calls; leave it null to derive it" (int64 .Values.terminationGracePeriodSeconds) (int64 .Values.preStopSleepSeconds) (include "leaderlink.shutdownGraceSeconds" .) $needed) }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
kafka_security_protocol from kafka.tls.enabled and kafka.sasl.enabled ("" when both are off).
*/}}
{{- define "leaderlink.kafkaSecurityProtocol" -}}
{{- $k := .Values.kafka }}
{{- if and $k.tls.enabled $k.sasl.enabled }}SASL_SSL
{{- else if $k.tls.enabled }}SSL
{{- else if $k.sasl.enabled }}SASL_PLAINTEXT
{{- end }}
{{- end }}

{{/*
Checks that values fit together; fails the render with a message naming the value otherwise.
Included by the ConfigMap, so every render runs it.
*/}}
{{- define "leaderlink.validate" -}}
{{- $c := .Values.config }}
{{- if and (empty $c.bootstrap) (not .Values.devCluster) }}
{{- fail "config.bootstrap is empty: set the Kafka brokers (--set 'config.bootstrap={kafka-0.kafka:9092}'), or set devCluster=true to run leaderlink's in-memory dev cluster (not for production)" }}
{{- end }}
{{- if or (eq (int64 .Values.ports.grpc) (int64 .Values.ports.admin)) (eq (int64 .Values.ports.grpc) (int64 .Values.ports.metrics)) (eq (int64 .Values.ports.admin) (int64 .Values.ports.metrics)) }}
{{- fail "ports.grpc, ports.admin and ports.metrics must differ" }}
{{- end }}
{{- if lt (int64 $c.max_in_flight_bytes_per_connection) (int64 $c.max_request_bytes) }}
{{- fail "config.max_in_flight_bytes_per_connection must be >= config.max_request_bytes, or a valid request could never be sent" }}
{{- end }}
{{- if lt (int64 $c.retry_backoff_max_ms) (int64 $c.retry_backoff_ms) }}
{{- fail "config.retry_backoff_max_ms must be >= config.retry_backoff_ms" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.clientAuth (not .Values.tls.clientCaSecretName) }}
{{- fail "tls.clientAuth needs tls.clientCaSecretName (a Secret with the client CA certificate)" }}
{{- end }}
{{- if and .Values.kafka.sasl.enabled (or (not .Values.kafka.sasl.username) (not .Values.kafka.sasl.passwordSecretName)) }}
{{- fail "kafka.sasl.enabled needs kafka.sasl.username and kafka.sasl.passwordSecretName" }}
{{- end }}
{{- if and (not .Values.kafka.tls.enabled) (or .Values.kafka.tls.caSecretName .Values.kafka.tls.clientCertSecretName) }}
{{- fail "kafka.tls.caSecretName / kafka.tls.clientCertSecretName are set but kafka.tls.enabled is false" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int64 .Values.autoscaling.minReplicas) (int64 .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must be <= autoscaling.maxReplicas" }}
{{- end }}
{{- $_ := include "leaderlink.terminationGracePeriodSeconds" . }}
{{- end }}

{{/*
leaderlink's configuration file. Keys are rendered one by one with their TOML types (leaderlink
rejects unknown keys and wrong types); the TLS and SASL keys only when enabled.
*/}}
{{- define "leaderlink.configToml" -}}
{{- $c := .Values.config -}}
# leaderlink configuration, rendered by the leaderlink Helm chart from its values.
# Check a file like it with `leaderlink config check FILE`.
# admin_token is not here: it comes from the environment (LEADERLINK_ADMIN_TOKEN).
listen = {{ printf "0.0.0.0:%d" (int64 .Values.ports.grpc) | quote }}
admin_listen = {{ printf "0.0.0.0:%d" (int64 .Values.ports.admin) | quote }}
metrics_listen = {{ printf "0.0.0.0:%d" (int64 .Values.ports.metrics) | quote }}
bootstrap = {{ toJson (default (list) $c.bootstrap) }}
client_id = {{ toJson $c.client_id }}
max_in_flight = {{ include "leaderlink.tomlInt" $c.max_in_flight }}
connections_per_leader = {{ include "leaderlink.tomlInt" $c.connections_per_leader }}
ordering = {{ toJson $c.ordering }}
idempotence = {{ $c.idempotence }}
compression = {{ toJson $c.compression }}
max_frame_bytes = {{ include "leaderlink.tomlInt" $c.max_frame_bytes }}
max_request_bytes = {{ include "leaderlink.tomlInt" $c.max_request_bytes }}
default_timeout_ms = {{ include "leaderlink.tomlInt" $c.default_timeout_ms }}
connect_timeout_ms = {{ include "leaderlink.tomlInt" $c.connect_timeout_ms }}
handshake_timeout_ms = {{ include "leaderlink.tomlInt" $c.handshake_timeout_ms }}
stall_timeout_ms = {{ include "leaderlink.tomlInt" $c.stall_timeout_ms }}
kafka_timeout_ms = {{ include "leaderlink.tomlInt" $c.kafka_timeout_ms }}
metadata_max_age_ms = {{ include "leaderlink.tomlInt" $c.metadata_max_age_ms }}
metadata_max_idle_ms = {{ include "leaderlink.tomlInt" $c.metadata_max_idle_ms }}
retry_backoff_ms = {{ include "leaderlink.tomlInt" $c.retry_backoff_ms }}
retry_backoff_max_ms = {{ include "leaderlink.tomlInt" $c.retry_backoff_max_ms }}
allow_auto_topic_creation = {{ $c.allow_auto_topic_creation }}
max_stream_in_flight = {{ include "leaderlink.tomlInt" $c.max_stream_in_flight }}
max_concurrent_calls = {{ include "leaderlink.tomlInt" $c.max_concurrent_calls }}
max_queued_per_connection = {{ include "leaderlink.tomlInt" $c.max_queued_per_connection }}
max_in_flight_bytes_per_connection = {{ include "leaderlink.tomlInt" $c.max_in_flight_bytes_per_connection }}
max_batch_bytes = {{ include "leaderlink.tomlInt" $c.max_batch_bytes }}
linger_ms = {{ include "leaderlink.tomlInt" $c.linger_ms }}
http2_max_concurrent_streams = {{ include "leaderlink.tomlInt" $c.http2_max_concurrent_streams }}
http2_max_pending_reset_streams = {{ include "leaderlink.tomlInt" $c.http2_max_pending_reset_streams }}
http2_max_header_list_size = {{ include "leaderlink.tomlInt" $c.http2_max_header_list_size }}
http2_abuse_penalty_ms = {{ include "leaderlink.tomlInt" $c.http2_abuse_penalty_ms }}
http2_initial_stream_window_bytes = {{ include "leaderlink.tomlInt" $c.http2_initial_stream_window_bytes }}
http2_keepalive_interval_ms = {{ include "leaderlink.tomlInt" $c.http2_keepalive_interval_ms }}
http2_keepalive_timeout_ms = {{ include "leaderlink.tomlInt" $c.http2_keepalive_timeout_ms }}
max_connection_age_ms = {{ include "leaderlink.tomlInt" $c.max_connection_age_ms }}
max_connection_age_grace_ms = {{ include "leaderlink.tomlInt" $c.max_connection_age_grace_ms }}
idle_connection_timeout_ms = {{ include "leaderlink.tomlInt" $c.idle_connection_timeout_ms }}
shutdown_grace_ms = {{ include "leaderlink.tomlInt" $c.shutdown_grace_ms }}
{{- with $c.otlp_endpoint }}
otlp_endpoint = {{ toJson . }}
{{- end }}
trace_sample_ratio = {{ include "leaderlink.tomlFloat" $c.trace_sample_ratio }}
trace_record_header = {{ $c.trace_record_header }}
log_format = {{ toJson $c.log_format }}
{{- if .Values.tls.enabled }}
# gRPC server TLS (Forwarder port)
tls_cert_file = "/etc/leaderlink/tls/tls.crt"
tls_key_file = "/etc/leaderlink/tls/tls.key"
{{- if .Values.tls.clientAuth }}
tls_client_ca_file = {{ printf "/etc/leaderlink/client-ca/%s" .Values.tls.clientCaKey | toJson }}
{{- end }}
{{- end }}
{{- $proto := include "leaderlink.kafkaSecurityProtocol" . }}
{{- if $proto }}
# Kafka connection security
kafka_security_protocol = {{ toJson $proto }}
{{- if .Values.kafka.tls.enabled }}
{{- with .Values.kafka.tls.caSecretName }}
kafka_tls_ca_file = {{ printf "/etc/leaderlink/kafka-ca/%s" $.Values.kafka.tls.caKey | toJson }}
{{- end }}
{{- if .Values.kafka.tls.clientCertSecretName }}
kafka_tls_cert_file = "/etc/leaderlink/kafka-client/tls.crt"
kafka_tls_key_file = "/etc/leaderlink/kafka-client/tls.key"
{{- end }}
{{- end }}
{{- if .Values.kafka.sasl.enabled }}
kafka_sasl_mechanism = {{ toJson .Values.kafka.sasl.mechanism }}
kafka_sasl_username = {{ toJson .Values.kafka.sasl.username }}
kafka_sasl_password_file = {{ printf "/etc/leaderlink/kafka-sasl/%s" .Values.kafka.sasl.passwordSecretKey | toJson }}
{{- end }}
{{- end }}
{{ end }}

{{/*
The named ports of the Services.
*/}}
{{- define "leaderlink.servicePorts" -}}
- name: grpc
  port: {{ int64 .Values.ports.grpc }}
  targetPort: grpc
  protocol: TCP
  {{- if not .Values.tls.enabled }}
  appProtocol: kubernetes.io/h2c
  {{- end }}
- name: admin
  port: {{ int64 .Values.ports.admin }}
  targetPort: admin
  protocol: TCP
  appProtocol: kubernetes.io/h2c
- name: metrics
  port: {{ int64 .Values.ports.metrics }}
  targetPort: metrics
  protocol: TCP
  appProtocol: http
{{- end }}
