{{/*
Named templates. Those that build containers and volumes take a context dict, so a
parent chart (helm/examples/kafka-consumer-sidecar) can call them with the shoal
subchart's values:
  (dict "values" .Values.shoal "root" $)   from a parent chart
  (dict "values" .Values "root" $)         from this chart
For a sidecar, add "sidecar" true (shoal.sidecar* templates do it themselves).
*/}}

{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shoal.fullname" -}}
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

{{- define "shoal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "shoal.labels" -}}
helm.sh/chart: {{ include "shoal.chart" . }}
{{ include "shoal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The image reference; the tag defaults to the chart's appVersion. */}}
{{- define "shoal.image" -}}
{{- $v := .values -}}
{{- printf "%s:%s" $v.image.repository (default .root.Chart.AppVersion $v.image.tag) }}
{{- end }}

{{/* --bind: what was asked, else 127.0.0.1 for a sidecar and 0.0.0.0 behind a Service. */}}
{{- define "shoal.bind" -}}
{{- if .values.bind }}{{ .values.bind }}{{ else if .sidecar }}127.0.0.1{{ else }}0.0.0.0{{ end }}
{{- end }}

{{/* "true" when the bind address is loopback: nothing outside the pod, kubelet included, reaches it. */}}
{{- define "shoal.loopback" -}}
{{- $bind := include "shoal.bind" . -}}
{{- if or (hasPrefix "127." $bind) (eq $bind "::1") }}true{{ end }}
{{- end }}

{{/*
How the kubelet probes shoal: "httpGet", "exec" or "none". probes.handler auto is exec
with a loopback bind (the kubelet's httpGet comes from the node, which a loopback bind
does not answer) and httpGet otherwise.
*/}}
{{- define "shoal.probeHandler" -}}
{{- $h := .values.probes.handler | default "auto" -}}
{{- if eq $h "auto" }}{{ ternary "exec" "httpGet" (eq (include "shoal.loopback" .) "true") }}{{ else }}{{ $h }}{{ end }}
{{- end }}

{{/*
The host an exec probe dials from inside the container: the bind address itself, loopback
for a wildcard bind, brackets around an IPv6 address.
*/}}
{{- define "shoal.probeHost" -}}
{{- $bind := include "shoal.bind" . -}}
{{- if eq $bind "0.0.0.0" }}127.0.0.1
{{- else if eq $bind "::" }}[::1]
{{- else if contains ":" $bind }}{{ printf "[%s]" (trimAll "[]" $bind) }}
{{- else }}{{ $bind }}
{{- end }}
{{- end }}

{{/*
Kafka-native serving's flags: [value under kafka, flag, the variable clap also reads it from].
The args and the checks both walk this table. Properties are not in it: they go to
SHOAL_KAFKA_PROPERTIES (shoal.kafkaEnv), so a Secret can hold some of them.
*/}}
{{- define "shoal.kafkaFlags" -}}
- [brokers, --kafka-brokers, SHOAL_KAFKA_BROKERS]
- [inputTopic, --kafka-input-topic, SHOAL_KAFKA_INPUT_TOPIC]
- [outputTopic, --kafka-output-topic, SHOAL_KAFKA_OUTPUT_TOPIC]
- [errorTopic, --kafka-error-topic, SHOAL_KAFKA_ERROR_TOPIC]
- [stateTopic, --kafka-state-topic, SHOAL_KAFKA_STATE_TOPIC]
- [groupId, --kafka-group-id, SHOAL_KAFKA_GROUP_ID]
- [model, --kafka-model, SHOAL_KAFKA_MODEL]
- [inputFormat, --kafka-input-format, SHOAL_KAFKA_INPUT_FORMAT]
- [maxInFlight, --kafka-max-in-flight, SHOAL_KAFKA_MAX_IN_FLIGHT]
{{- end }}

{{/* Fails on settings that would give a pod that cannot start, with the reason. */}}
{{- define "shoal.validate" -}}
{{- $v := .values -}}
{{- $managed := list "--model-repository" "--bind" "--http-port" "--grpc-port" "--metrics-port" "--shutdown-timeout-secs" -}}
{{- if $v.modelControlMode }}{{ $managed = append $managed "--model-control-mode" }}{{ end -}}
{{- if $v.grpcUds }}{{ $managed = append $managed "--grpc-uds" }}{{ end -}}
{{- if $v.httpUds }}{{ $managed = append $managed "--http-uds" }}{{ end -}}
{{- $k := $v.kafka | default dict -}}
{{- $secret := $k.propertiesSecret | default dict -}}
{{- $chartEnv := list -}}
{{- range $row := include "shoal.kafkaFlags" . | fromYamlArray }}
{{- if get $k (index $row 0) }}
{{- if not $k.brokers }}
{{- fail (printf "kafka.%s needs kafka.brokers: shoal refuses --kafka-* flags without --kafka-brokers" (index $row 0)) }}
{{- end }}
{{- $managed = append $managed (index $row 1) }}
{{- $chartEnv = append $chartEnv (index $row 2) }}
{{- end }}
{{- end }}
{{- if or $k.properties $secret.name $secret.key }}
{{- if not $k.brokers }}
{{- fail "kafka.properties and kafka.propertiesSecret need kafka.brokers" }}
{{- end }}
{{- if ne (empty $secret.name) (empty $secret.key) }}
{{- fail "kafka.propertiesSecret needs both name and key" }}
{{- end }}
{{- if $secret.name }}{{ $chartEnv = append $chartEnv "KAFKA_PROPERTIES_FROM_SECRET" }}{{ end }}
{{- /* clap reads SHOAL_KAFKA_PROPERTIES only when no --kafka-property is given */}}
{{- $managed = append $managed "--kafka-property" }}
{{- $chartEnv = append $chartEnv "SHOAL_KAFKA_PROPERTIES" }}
{{- end }}
{{- if $k.brokers }}
{{- if not (and $k.inputTopic $k.outputTopic) }}
{{- fail "kafka.brokers needs kafka.inputTopic and kafka.outputTopic" }}
{{- end }}
{{- if eq $k.inputTopic $k.outputTopic }}
{{- fail (printf "kafka.outputTopic must differ from kafka.inputTopic (%s): answers would be read back as requests" $k.inputTopic) }}
{{- end }}
{{- if and $k.stateTopic (has $k.stateTopic (list $k.inputTopic $k.outputTopic $k.errorTopic)) }}
{{- fail (printf "kafka.stateTopic (%s) must be a topic of its own, not the input, output or error topic" $k.stateTopic) }}
{{- end }}
{{- end }}
{{- range $e := $v.env }}
{{- if has $e.name $chartEnv }}
{{- fail (printf "env: %s is set by the chart's kafka values; set it there instead" $e.name) }}
{{- end }}
{{- end -}}
{{- range $arg := $v.extraArgs }}
{{- range $flag := $managed }}
{{- if or (eq (toString $arg) $flag) (hasPrefix (printf "%s=" $flag) (toString $arg)) }}
{{- fail (printf "extraArgs: %s is set by the chart; use the chart's value for it instead" $flag) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $v.modelControlMode (not (has $v.modelControlMode (list "none" "poll" "explicit"))) }}
{{- fail (printf "modelControlMode: %q is not one of none, poll, explicit" $v.modelControlMode) }}
{{- end }}
{{- range $key := list "grpcUds" "httpUds" }}
{{- $path := get $v $key }}
{{- if and $path (not (hasPrefix (printf "%s/" (trimSuffix "/" $v.sidecar.socketDir)) $path)) }}
{{- fail (printf "%s: %s must lie in sidecar.socketDir (%s), the writable directory the chart mounts for sockets" $key $path $v.sidecar.socketDir) }}
{{- end }}
{{- end }}
{{- if and (eq ($v.probes.handler | default "auto") "httpGet") (include "shoal.loopback" .) }}
{{- fail (printf "probes.handler: httpGet cannot reach shoal bound to %s (the kubelet probes from the node); use auto or exec, or a bind other than loopback" (include "shoal.bind" .)) }}
{{- end }}
{{- if not (has $v.probes.port (list "http" "metrics")) }}
{{- fail (printf "probes.port: %q is not http or metrics" $v.probes.port) }}
{{- end }}
{{- if and $v.modelRepository.initContainer.enabled (not $v.modelRepository.initContainer.image) }}
{{- fail "modelRepository.initContainer.image is required when the init container is enabled" }}
{{- end }}
{{- if and (not $v.modelRepository.initContainer.enabled) (not $v.modelRepository.volume) }}
{{- fail "modelRepository: set volume (a volume source) or enable initContainer; shoal needs a model repository" }}
{{- end }}
{{- end }}

{{/* The shoal container's arguments, one flag per item, built from values. */}}
{{- define "shoal.args" -}}
{{- $v := .values -}}
- {{ printf "--model-repository=%s" $v.modelRepository.path | quote }}
- {{ printf "--bind=%s" (include "shoal.bind" .) | quote }}
- {{ printf "--http-port=%d" (int $v.ports.http) | quote }}
- {{ printf "--grpc-port=%d" (int $v.ports.grpc) | quote }}
- {{ printf "--metrics-port=%d" (int $v.ports.metrics) | quote }}
- {{ printf "--shutdown-timeout-secs=%d" (int $v.shutdownTimeoutSecs) | quote }}
{{- with $v.modelControlMode }}
- {{ printf "--model-control-mode=%s" . | quote }}
{{- end }}
{{- with $v.grpcUds }}
- {{ printf "--grpc-uds=%s" . | quote }}
{{- end }}
{{- with $v.httpUds }}
- {{ printf "--http-uds=%s" . | quote }}
{{- end }}
{{- $k := $v.kafka | default dict }}
{{- if $k.brokers }}
{{- range $row := include "shoal.kafkaFlags" . | fromYamlArray }}
{{- with get $k (index $row 0) }}
- {{ printf "%s=%v" (index $row 1) . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- range $v.extraArgs }}
- {{ toString . | quote }}
{{- end }}
{{- end }}

{{/*
SHOAL_KAFKA_PROPERTIES: kafka.properties joined with ";" (each "$" doubled, so the kubelet's
$(VAR) expansion leaves them as written), then the propertiesSecret's KEY=VALUE list, which
the kubelet reads from the Secret and expands into the same variable.
*/}}
{{- define "shoal.kafkaEnv" -}}
{{- $k := .values.kafka | default dict -}}
{{- $secret := $k.propertiesSecret | default dict -}}
{{- $literal := join ";" ($k.properties | default list) | replace "$" "$$" -}}
{{- if and $k.brokers $secret.name -}}
- name: KAFKA_PROPERTIES_FROM_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $secret.name | quote }}
      key: {{ $secret.key | quote }}
- name: SHOAL_KAFKA_PROPERTIES
  value: {{ list $literal "$(KAFKA_PROPERTIES_FROM_SECRET)" | compact | join ";" | quote }}
{{- else if and $k.brokers $literal -}}
- name: SHOAL_KAFKA_PROPERTIES
  value: {{ $literal | quote }}
{{- end -}}
{{- end }}

{{/* The socket directory is mounted when a sidecar or a Unix socket needs it. */}}
{{- define "shoal.needsSocketDir" -}}
{{- if or .sidecar .values.grpcUds .values.httpUds }}true{{ end }}
{{- end }}

{{- define "shoal.needsShm" -}}
{{- if or .sidecar .values.sharedMemory.enabled }}true{{ end }}
{{- end }}

{{/*
One probe. exec: `shoal healthcheck` GETs http://<host>:<port><path> from inside the
container and gives up 200 ms before the kubelet would (at least 100 ms), so the
probe's event says why it failed.
*/}}
{{- define "shoal.probe" -}}
{{- $ms := max 100 (sub (mul (int (default 1 .cfg.timeoutSeconds)) 1000) 200) -}}
{{- if .exec -}}
exec:
  command:
    - /usr/local/bin/shoal
    - healthcheck
    - --url
    - {{ printf "http://%s:%d%s" .host (int .port) .path | quote }}
    - --timeout-ms
    - {{ printf "%d" (int $ms) | quote }}
{{- else -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{- end }}
initialDelaySeconds: {{ default 0 .cfg.initialDelaySeconds }}
periodSeconds: {{ .cfg.periodSeconds }}
timeoutSeconds: {{ .cfg.timeoutSeconds }}
failureThreshold: {{ .cfg.failureThreshold }}
{{- end }}

{{/* The shoal container, as one list item. */}}
{{- define "shoal.container" -}}
{{- include "shoal.validate" . }}
{{- $v := .values -}}
- name: shoal
  image: {{ include "shoal.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if and .sidecar $v.sidecar.native }}
  # A native sidecar: started before the app containers, stopped after them.
  restartPolicy: Always
  {{- end }}
  args:
    {{- include "shoal.args" . | nindent 4 }}
  ports:
    - name: http
      containerPort: {{ int $v.ports.http }}
      protocol: TCP
    - name: grpc
      containerPort: {{ int $v.ports.grpc }}
      protocol: TCP
    - name: metrics
      containerPort: {{ int $v.ports.metrics }}
      protocol: TCP
  {{- $kafkaEnv := include "shoal.kafkaEnv" . }}
  {{- if or $kafkaEnv $v.env }}
  env:
    {{- with $kafkaEnv }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $v.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with $v.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $handler := include "shoal.probeHandler" . }}
  {{- if ne $handler "none" }}
  {{- $exec := eq $handler "exec" }}
  {{- /* exec probes speak plain HTTP, which the metrics port always is */}}
  {{- $how := dict "exec" $exec "host" (include "shoal.probeHost" .) "port" (ternary (int $v.ports.metrics) $v.probes.port $exec) }}
  startupProbe:
    {{- include "shoal.probe" (merge (dict "path" "/v2/health/live" "cfg" $v.probes.startup) $how) | nindent 4 }}
  livenessProbe:
    {{- include "shoal.probe" (merge (dict "path" "/v2/health/live" "cfg" $v.probes.liveness) $how) | nindent 4 }}
  readinessProbe:
    {{- include "shoal.probe" (merge (dict "path" "/v2/health/ready" "cfg" $v.probes.readiness) $how) | nindent 4 }}
  {{- end }}
  {{- $resources := deepCopy (default dict $v.resources) }}
  {{- if gt (int $v.gpu.count) 0 }}
  {{- $limits := default dict (get $resources "limits") }}
  {{- $_ := set $limits $v.gpu.resourceName (int $v.gpu.count) }}
  {{- $_ := set $resources "limits" $limits }}
  {{- end }}
  {{- with $resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ $v.modelRepository.path }}
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- if include "shoal.needsShm" . }}
    - name: shm
      mountPath: /dev/shm
    {{- end }}
    {{- if include "shoal.needsSocketDir" . }}
    - name: sockets
      mountPath: {{ $v.sidecar.socketDir }}
    {{- end }}
{{- end }}

{{/* The init container that fills the model repository, when enabled, as a list item. */}}
{{- define "shoal.modelInitContainer" -}}
{{- $v := .values -}}
{{- $init := $v.modelRepository.initContainer -}}
{{- if $init.enabled -}}
- name: model-repository
  image: {{ $init.image | quote }}
  imagePullPolicy: {{ $init.imagePullPolicy }}
  {{- with $init.command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $init.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $init.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $init.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ $init.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* The pod's volumes for shoal, as list items. */}}
{{- define "shoal.volumes" -}}
{{- $v := .values -}}
{{- $init := $v.modelRepository.initContainer -}}
- name: models
{{- if $init.enabled }}
  emptyDir:
    {{- with $init.sizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- else }}
  {{- toYaml $v.modelRepository.volume | nindent 2 }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if include "shoal.needsShm" . }}
- name: shm
  emptyDir:
    medium: Memory
    {{- with $v.sharedMemory.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- if include "shoal.needsSocketDir" . }}
- name: sockets
  emptyDir: {}
{{- end }}
{{- end }}

{{/*
Sidecar building blocks for a stream processor's pod. Call with
(dict "values" <shoal values> "root" $); each renders list items:
  shoal.sidecarInitContainers  under initContainers: the model init container, then
                               shoal itself when sidecar.native (order matters)
  shoal.sidecarContainers      under containers: shoal when not native
  shoal.sidecarContainer       the shoal container alone, placement left to you
  shoal.sidecarVolumes         under volumes
  shoal.sidecarMounts          in the app container's volumeMounts: /dev/shm and the socket dir
  shoal.sidecarEnv             in the app container's env: where shoal answers
*/}}
{{- define "shoal.sidecarContainer" -}}
{{- include "shoal.container" (merge (dict "sidecar" true) .) }}
{{- end }}

{{- define "shoal.sidecarInitContainers" -}}
{{- $shoal := ternary (include "shoal.sidecarContainer" .) "" (and .values.sidecar.native true) }}
{{- printf "%s\n%s" (include "shoal.modelInitContainer" .) $shoal | trim }}
{{- end }}

{{- define "shoal.sidecarContainers" -}}
{{- if not .values.sidecar.native }}
{{- include "shoal.sidecarContainer" . }}
{{- end }}
{{- end }}

{{- define "shoal.sidecarVolumes" -}}
{{- include "shoal.volumes" (merge (dict "sidecar" true) .) }}
{{- end }}

{{- define "shoal.sidecarMounts" -}}
- name: shm
  mountPath: /dev/shm
- name: sockets
  mountPath: {{ .values.sidecar.socketDir }}
{{- end }}

{{- define "shoal.sidecarEnv" -}}
{{- $v := .values -}}
{{- $host := ternary "[::1]" "127.0.0.1" (eq (include "shoal.bind" (merge (dict "sidecar" true) .)) "::1") -}}
- name: SHOAL_HTTP_URL
  value: {{ printf "http://%s:%d" $host (int $v.ports.http) | quote }}
- name: SHOAL_GRPC_ADDRESS
  value: {{ printf "%s:%d" $host (int $v.ports.grpc) | quote }}
{{- with $v.grpcUds }}
- name: SHOAL_GRPC_UDS
  value: {{ . | quote }}
{{- end }}
{{- with $v.httpUds }}
- name: SHOAL_HTTP_UDS
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by both modes. */}}
{{- define "shoal.podSpecCommon" -}}
{{- $v := .values -}}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
automountServiceAccountToken: false
# Service links would put <SERVICE>_PORT variables in the environment, which clap could
# read as SHOAL_* flags for a Service named like one.
enableServiceLinks: false
terminationGracePeriodSeconds: {{ add (int $v.shutdownTimeoutSecs) (int $v.terminationGraceExtraSecs) }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
