{{/* Names and labels. Kubernetes names stop at 63 characters. */}}
{{- define "modstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modstream.fullname" -}}
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

{{- define "modstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "modstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "modstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modstream.kafkaUserName" -}}
{{- default (include "modstream.fullname" .) .Values.strimzi.kafkaUser.name }}
{{- end }}

{{- define "modstream.kafkaUserEnabled" -}}
{{- if and .Values.strimzi.enabled .Values.strimzi.kafkaUser.enabled }}true{{ end }}
{{- end }}

{{/* The Secret holding the SASL password: an explicit one, else the one Strimzi writes for our KafkaUser. */}}
{{- define "modstream.kafkaSecretName" -}}
{{- if .Values.kafkaAuth.existingSecret }}
{{- .Values.kafkaAuth.existingSecret }}
{{- else if include "modstream.kafkaUserEnabled" . }}
{{- include "modstream.kafkaUserName" . }}
{{- end }}
{{- end }}

{{/* image: repository:tag, where an empty tag means the chart's appVersion. */}}
{{- define "modstream.image" -}}
{{- printf "%s:%s" .repository (default .root.Chart.AppVersion .tag) }}
{{- end }}

{{- define "modstream.kafkaCaDir" -}}
/etc/modstream-kafka-tls
{{- end }}

{{/*
The config file. Values map one-to-one onto common/config.py; the chart fills the
Kafka settings it can derive (KafkaUser, mounted CA) and drops empty optional
strings, which the client would otherwise receive as "" instead of "unset".
*/}}
{{- define "modstream.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $kafka := $cfg.kafka }}
{{- if include "modstream.kafkaUserEnabled" . }}
{{- if not $kafka.sasl_mechanism }}{{ $_ := set $kafka "sasl_mechanism" "SCRAM-SHA-512" }}{{ end }}
{{- if not $kafka.sasl_username }}{{ $_ := set $kafka "sasl_username" (include "modstream.kafkaUserName" .) }}{{ end }}
{{- end }}
{{- if and .Values.kafkaAuth.caSecret (not $kafka.ssl_cafile) }}
{{- $_ := set $kafka "ssl_cafile" (printf "%s/%s" (include "modstream.kafkaCaDir" .) .Values.kafkaAuth.caKey) }}
{{- end }}
{{- range $key := keys $kafka }}
{{- if eq (toString (get $kafka $key)) "" }}{{ $_ := unset $kafka $key }}{{ end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* serveConfigV2: one application. The Classifier is not listed: deploy.serve_app derives its options from
config.classifier (workers.classifier.classifier_options), so Python and the chart cannot disagree. */}}
{{- define "modstream.serveConfig" -}}
{{- $controller := dict
    "name" "PipelineController"
    "num_replicas" 1
    "ray_actor_options" (dict "num_cpus" .Values.serve.controllerNumCpus) }}
{{- $app := dict
    "name" .Values.config.classifier.app_name
    "import_path" .Values.serve.importPath
    "args" (dict "config_file" "/etc/modstream/config.yaml")
    "deployments" (list $controller) }}
{{- toYaml (dict "applications" (list $app)) }}
{{- end }}

{{/*
Checks that values.schema.json cannot express because they relate two values.
Each message names the values to change.
*/}}
{{- define "modstream.validate" -}}
{{- $v := .Values }}
{{- $c := $v.config.classifier }}
{{- $t := $v.config.thresholds }}
{{- if and (not (kindIs "invalid" $t.review)) (not (kindIs "invalid" $t.block)) (gt (float64 $t.review) (float64 $t.block)) }}
{{- fail "config.thresholds.review must not exceed config.thresholds.block" }}
{{- end }}
{{- if and (gt (float64 $c.num_gpus) 0.0) (not $v.ray.gpuWorkers.enabled) }}
{{- fail "config.classifier.num_gpus > 0 needs ray.gpuWorkers.enabled=true: no other Ray node has GPUs" }}
{{- end }}
{{- if and $c.autoscaling (gt (int $c.min_replicas) (int $c.max_replicas)) }}
{{- fail "config.classifier.min_replicas must not exceed config.classifier.max_replicas" }}
{{- end }}
{{- if not (or $v.ray.cpuWorkers.enabled $v.ray.gpuWorkers.enabled) }}
{{- fail "enable ray.cpuWorkers or ray.gpuWorkers: the head runs no pipeline actors" }}
{{- end }}
{{- range $group := list "cpuWorkers" "gpuWorkers" }}
{{- $g := get $v.ray $group }}
{{- if and $g.enabled (or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "ray.%s needs minReplicas <= replicas <= maxReplicas" $group) }}
{{- end }}
{{- end }}
{{- if and (hasPrefix "SASL" $v.config.kafka.security_protocol) (not (include "modstream.kafkaSecretName" .)) }}
{{- fail "config.kafka.security_protocol SASL_* needs kafkaAuth.existingSecret (or strimzi.kafkaUser.enabled) for the password" }}
{{- end }}
{{- if and $v.strimzi.enabled (not $v.strimzi.clusterName) }}
{{- fail "strimzi.enabled needs strimzi.clusterName" }}
{{- end }}
{{- end }}

{{/*
Pod template of a Ray group. Arguments: root (the chart context), component,
containerName, group (its values), image, gpus.
*/}}
{{- define "modstream.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $resources := deepCopy .group.resources }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $resources.requests "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $resources.limits "nvidia.com/gpu" (int .gpus) }}
{{- end }}
{{- $secret := include "modstream.kafkaSecretName" $root -}}
metadata:
  labels:
    {{- include "modstream.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  annotations:
    checksum/config: {{ include "modstream.config" $root | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "modstream.serviceAccountName" $root }}
  {{- /* Only the head's autoscaler sidecar talks to the Kubernetes API. */}}
  automountServiceAccountToken: {{ eq .component "ray-head" }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .containerName }}
      image: {{ .image }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      env:
        - name: MODSTREAM_CONFIG
          value: /etc/modstream/config.yaml
        {{- if eq .component "ray-head" }}
        {{- /* The head's own address: the Ray dashboard binds to it (ray.head.dashboardHost). */}}
        - name: MY_POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        {{- if eq $v.ray.head.dashboardHost "podIP" }}
        {{- /* The serve CLI inside the pod (serve status, serve deploy) reads it: the dashboard is not on localhost. */}}
        - name: RAY_DASHBOARD_ADDRESS
          value: http://$(MY_POD_IP):{{ get $v.ray.head.rayStartParams "dashboard-port" | default 8265 | int }}
        {{- end }}
        {{- end }}
        {{- if $secret }}
        - name: MODSTREAM_KAFKA_SASL_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ $v.kafkaAuth.passwordKey }}
        {{- if $v.kafkaAuth.usernameKey }}
        - name: MODSTREAM_KAFKA_SASL_USERNAME
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ $v.kafkaAuth.usernameKey }}
        {{- end }}
        {{- end }}
        {{- /* The root filesystem is read-only: the default bundle and library caches go to the /tmp emptyDir. */}}
        - name: MODSTREAM_HOME
          value: /tmp/modstream
        {{- /* Every Ray process in the pod records here; one exporter per node serves the sum. */}}
        - name: PROMETHEUS_MULTIPROC_DIR
          value: /tmp/modstream-metrics
        - name: XDG_CACHE_HOME
          value: /tmp/.cache
        - name: MPLCONFIGDIR
          value: /tmp/.matplotlib
        - name: CUDA_CACHE_PATH
          value: /tmp/.nv
        {{- /* Serve's controller reconciles every 0.1 s by default, ~3% of a core while idle (common/raysession.py). */}}
        - name: RAY_SERVE_CONTROL_LOOP_INTERVAL_S
          value: "0.5"
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: app-metrics
          containerPort: {{ $v.config.metrics_port }}
          protocol: TCP
      {{- if and (eq .component "ray-head") (eq $v.ray.head.dashboardHost "podIP") }}
      {{- /* KubeRay's own head probes may ask the dashboard on localhost, where it no longer listens:
             the same checks, with the dashboard asked on the pod's address. */}}
      {{- $dashboardPort := get $v.ray.head.rayStartParams "dashboard-port" | default 8265 | int }}
      {{- $check := printf "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success && wget -T 2 -q -O- http://${MY_POD_IP}:%d/api/gcs_healthz | grep success" $dashboardPort }}
      readinessProbe:
        exec:
          command: ["bash", "-c", {{ $check | quote }}]
        initialDelaySeconds: 10
        timeoutSeconds: 5
        periodSeconds: 5
        failureThreshold: 10
      livenessProbe:
        exec:
          command: ["bash", "-c", {{ $check | quote }}]
        initialDelaySeconds: 30
        timeoutSeconds: 5
        periodSeconds: 5
        failureThreshold: 120
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/modstream
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
        {{- if $v.kafkaAuth.caSecret }}
        - name: kafka-ca
          mountPath: {{ include "modstream.kafkaCaDir" $root }}
          readOnly: true
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "modstream.fullname" $root }}-config
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.tmpSizeLimit }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shmSizeLimit }}
    {{- if $v.kafkaAuth.caSecret }}
    - name: kafka-ca
      secret:
        secretName: {{ $v.kafkaAuth.caSecret }}
        items:
          - key: {{ $v.kafkaAuth.caKey }}
            path: {{ $v.kafkaAuth.caKey }}
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
