{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "loramux.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "loramux.fullname" -}}
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

{{- define "loramux.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loramux.labels" -}}
helm.sh/chart: {{ include "loramux.chart" . }}
{{ include "loramux.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "loramux.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loramux.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loramux.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loramux.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loramux.keysSecret" -}}
{{- default (printf "%s-keys" (include "loramux.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "loramux.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cuda" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}

{{/* The container's `loramux serve` arguments, one flag per server value. */}}
{{- define "loramux.args" -}}
{{- $s := .Values.server -}}
- --model
- {{ .Values.model.id | quote }}
{{- with .Values.model.revision }}
- --revision
- {{ . | quote }}
{{- end }}
{{- with .Values.model.name }}
- --model-name
- {{ . | quote }}
{{- end }}
- --dtype
- {{ .Values.model.dtype | quote }}
- --lora-dtype
- {{ .Values.model.loraDtype | quote }}
- --device
- {{ .Values.model.device | quote }}
- --quantization
- {{ .Values.model.quantization | quote }}
{{- with .Values.model.deviceMap }}
- --device-map
- {{ . | quote }}
{{- end }}
- --host
- "0.0.0.0"
- --port
- {{ $s.port | int64 | quote }}
- --adapter-root
- /adapters
- --hub-cache-dir
- /models/hub
- --state-dir
- /var/lib/loramux/state
{{- with .Values.store.registry }}
- --registry
- {{ . | quote }}
{{- end }}
- --registry-sync-s
- {{ .Values.store.syncS | quote }}
{{- range .Values.store.objectRoots }}
- --object-root
- {{ . | quote }}
{{- end }}
{{- with .Values.store.endpointUrl }}
- --object-endpoint-url
- {{ . | quote }}
{{- end }}
- --object-cache-dir
- /var/cache/loramux/objects
{{- if .Values.merge.enabled }}
- --merge-root
- /var/lib/loramux/merges
{{- end }}
- --adapter-slots
- {{ $s.adapterSlots | int64 | quote }}
{{- if not (kindIs "invalid" $s.adapterMemoryMiB) }}
- --adapter-memory-mib
- {{ $s.adapterMemoryMiB | quote }}
{{- end }}
- --host-cache-mib
- {{ $s.hostCacheMiB | int64 | quote }}
- --max-lora-rank
- {{ $s.maxLoraRank | int64 | quote }}
- --target-modules
- {{ join "," $s.targetModules | quote }}
- --max-batch-size
- {{ $s.maxBatchSize | int64 | quote }}
- --max-batch-tokens
- {{ $s.maxBatchTokens | int64 | quote }}
- --kv-cache
- {{ $s.kvCache | quote }}
{{- with $s.kvCacheTokens }}
- --kv-cache-tokens
- {{ . | int64 | quote }}
{{- end }}
{{- if $s.compile }}
- --compile
{{- end }}
- --lora-kernel
- {{ $s.loraKernel | quote }}
{{- if $s.cudaGraphs }}
- --cuda-graphs
{{- end }}
{{- if not $s.overlapSteps }}
- --no-overlap-steps
{{- end }}
{{- if $s.engineProcess }}
- --engine-process
{{- end }}
- --max-prefill-tokens
- {{ $s.maxPrefillTokens | int64 | quote }}
- --batch-window-ms
- {{ $s.batchWindowMs | quote }}
- --join-ratio
- {{ $s.joinRatio | quote }}
- --join-max-steps
- {{ $s.joinMaxSteps | int64 | quote }}
- --adapter-wait-ms
- {{ $s.adapterWaitMs | quote }}
- --scheduling
- {{ $s.scheduling | quote }}
- --max-queue
- {{ $s.maxQueue | int64 | quote }}
{{- if not (kindIs "invalid" $s.maxQueuePerTenant) }}
- --max-queue-per-tenant
- {{ $s.maxQueuePerTenant | int64 | quote }}
{{- end }}
- --default-max-new-tokens
- {{ $s.defaultMaxNewTokens | int64 | quote }}
- --max-prompt-bytes
- {{ $s.maxPromptBytes | int64 | quote }}
- --slot-wait-s
- {{ $s.slotWaitS | quote }}
- --engine-stall-s
- {{ $s.engineStallS | quote }}
- --max-connection-age-s
- {{ $s.maxConnectionAgeS | quote }}
- --shutdown-grace-s
- {{ $s.shutdownGraceS | int64 | quote }}
- --base-mismatch
- {{ $s.baseMismatch | quote }}
{{- if $s.allowPickleWeights }}
- --allow-pickle-weights
{{- end }}
{{- if $s.hubOffline }}
- --hub-offline
{{- end }}
{{- with $s.hubEndpoint }}
- --hub-endpoint
- {{ . | quote }}
{{- end }}
- --auth
- {{ .Values.auth.mode | quote }}
{{- if eq .Values.auth.mode "keys" }}
- --auth-keys-file
- /etc/loramux/keys/keys.yaml
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert
- /etc/loramux/tls/tls.crt
- --tls-key
- /etc/loramux/tls/tls.key
{{- if .Values.tls.clientCaSecretName }}
- --tls-client-ca
- /etc/loramux/client-ca/ca.crt
{{- end }}
- --health-port
- {{ .Values.server.healthPort | int64 | quote }}
{{- end }}
{{- if .Values.http.enabled }}
- --http-port
- {{ .Values.http.port | int64 | quote }}
{{- end }}
{{- if .Values.metrics.enabled }}
- --metrics-port
- {{ .Values.metrics.port | int64 | quote }}
- --metrics-host
- "0.0.0.0"
{{- end }}
- --otel-traces-exporter
- {{ .Values.otel.tracesExporter | quote }}
- --otel-metrics-exporter
- {{ .Values.otel.metricsExporter | quote }}
- --otel-exporter-otlp-protocol
- {{ .Values.otel.protocol | quote }}
{{- with .Values.otel.endpoint }}
- --otel-exporter-otlp-endpoint
- {{ . | quote }}
{{- end }}
- --otel-service-name
- {{ .Values.otel.serviceName | quote }}
- --log-level
- {{ $s.logLevel | quote }}
- --log-format
- {{ $s.logFormat | quote }}
{{- range $s.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* A volume: the named claim, or an emptyDir (with a size limit when one is given). */}}
{{- define "loramux.volume" -}}
{{- if .claim.existingClaim }}
persistentVolumeClaim:
  claimName: {{ .claim.existingClaim }}
{{- else if .claim.sizeLimit }}
emptyDir:
  sizeLimit: {{ .claim.sizeLimit }}
{{- else }}
emptyDir: {}
{{- end }}
{{- end }}
