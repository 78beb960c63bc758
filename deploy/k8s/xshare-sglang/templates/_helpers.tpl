{{/* Names and labels */}}
{{- define "xshare.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "xshare.fullname" -}}
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

{{- define "xshare.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xshare.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "xshare.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "xshare.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
xshare.io/mode: {{ .Values.mode }}
{{- end -}}

{{/* Pod labels; role = leader (node rank 0, serves HTTP) or worker */}}
{{- define "xshare.podLabels" -}}
{{ include "xshare.selectorLabels" .ctx }}
xshare.io/role: {{ .role }}
{{- with .ctx.Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "xshare.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{- define "xshare.adminSecretName" -}}
{{- default (printf "%s-admin" (include "xshare.fullname" .)) .Values.admin.existingSecret -}}
{{- end -}}

{{- define "xshare.validate" -}}
{{- if and (eq .Values.mode "single") (ne (int .Values.nodes) 1) -}}
{{- fail (printf "nodes=%v needs mode lws or ray (single mode runs one node)" .Values.nodes) -}}
{{- end -}}
{{- if and (eq .Values.model.volume.type "pvc") (not .Values.model.volume.claimName) -}}
{{- fail "model.volume.type=pvc needs model.volume.claimName" -}}
{{- end -}}
{{- if and (eq .Values.model.volume.type "hostPath") (not .Values.model.volume.hostPath) -}}
{{- fail "model.volume.type=hostPath needs model.volume.hostPath" -}}
{{- end -}}
{{- end -}}

{{/* sglang.launch_server arguments common to every node (no multi-node or host/port flags) */}}
{{- define "xshare.serverArgs" -}}
{{- $tp := int .Values.server.tp -}}
{{- if eq $tp 0 }}{{ $tp = mul (int .Values.nodes) (int .Values.gpusPerNode) | int }}{{ end -}}
- --model-path
- {{ .Values.model.path | quote }}
{{- with .Values.model.servedName }}
- --served-model-name
- {{ . | quote }}
{{- end }}
- --tp-size
- {{ $tp | quote }}
{{- if gt (int .Values.server.ep) 0 }}
- --ep-size
- {{ .Values.server.ep | int | quote }}
{{- end }}
{{- if .Values.server.enableMetrics }}
- --enable-metrics
{{- end }}
{{- if .Values.model.trustRemoteCode }}
- --trust-remote-code
{{- end }}
{{- range .Values.server.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Environment of every SGLang container: XSHARE_* plugin settings, admin token file, extra env */}}
{{- define "xshare.env" -}}
- name: XSHARE_ENABLE
  value: {{ ternary "1" "0" .Values.xshare.enabled | quote }}
- name: XSHARE_POLICY
  value: {{ .Values.xshare.policy | quote }}
{{- if not (kindIs "invalid" .Values.xshare.budget) }}
- name: XSHARE_BUDGET
  value: {{ .Values.xshare.budget | toString | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.xshare.targetMass) }}
- name: XSHARE_TARGET_MASS
  value: {{ .Values.xshare.targetMass | toString | quote }}
{{- end }}
- name: XSHARE_WARMUP_K
  value: {{ .Values.xshare.warmupK | int | toString | quote }}
{{- if not (kindIs "invalid" .Values.xshare.groupBudget) }}
- name: XSHARE_GROUP_BUDGET
  value: {{ .Values.xshare.groupBudget | toString | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.xshare.gpuCap) }}
- name: XSHARE_GPU_CAP
  value: {{ .Values.xshare.gpuCap | int | toString | quote }}
{{- end }}
- name: XSHARE_APPLY_PREFILL
  value: {{ ternary "1" "0" .Values.xshare.applyPrefill | quote }}
{{- if .Values.xshare.extra }}
- name: XSHARE_EXTRA
  value: {{ .Values.xshare.extra | toJson | quote }}
{{- end }}
{{- with .Values.xshare.deepepMode }}
- name: XSHARE_DEEPEP_MODE
  value: {{ . | quote }}
{{- end }}
{{- range $k, $v := .Values.xshare.env }}
- name: {{ printf "XSHARE_%s" (upper $k) }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- if .Values.admin.enabled }}
- name: XSHARE_ADMIN_TOKEN_FILE
  value: {{ printf "%s/%s" .Values.admin.mountPath .Values.admin.secretKey | quote }}
{{- end }}
{{- with .Values.server.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "xshare.resources" -}}
{{- $limits := merge (dict .Values.gpuResourceName (int .Values.gpusPerNode | toString)) (deepCopy (default (dict) .Values.resources.limits)) -}}
limits:
{{ toYaml $limits | indent 2 }}
{{- with .Values.resources.requests }}
requests:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}

{{- define "xshare.probes" -}}
{{- $p := .Values.probes -}}
startupProbe:
  httpGet: {path: {{ $p.startup.path | quote }}, port: http}
  periodSeconds: {{ $p.startup.periodSeconds }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
readinessProbe:
  httpGet: {path: {{ $p.readiness.path | quote }}, port: http}
  periodSeconds: {{ $p.readiness.periodSeconds }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
livenessProbe:
  httpGet: {path: {{ $p.liveness.path | quote }}, port: http}
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
{{- end -}}

{{/* Node ranks >= 1: their server answers /health once the node's schedulers are up (no readiness: no Service) */}}
{{- define "xshare.workerProbes" -}}
{{- $p := .Values.probes -}}
startupProbe:
  httpGet: {path: /health, port: http}
  periodSeconds: {{ $p.startup.periodSeconds }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
livenessProbe:
  httpGet: {path: /health, port: http}
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
{{- end -}}

{{- define "xshare.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if ne .Values.model.volume.type "none" }}
- name: model
  mountPath: {{ .Values.model.volume.mountPath | quote }}
  readOnly: {{ .Values.model.volume.readOnly }}
{{- end }}
{{- if .Values.admin.enabled }}
- name: admin-token
  mountPath: {{ .Values.admin.mountPath | quote }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "xshare.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.server.shmSize }}
{{- if eq .Values.model.volume.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.claimName | quote }}
    readOnly: {{ .Values.model.volume.readOnly }}
{{- else if eq .Values.model.volume.type "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.volume.hostPath | quote }}
    type: Directory
{{- end }}
{{- if .Values.admin.enabled }}
- name: admin-token
  secret:
    secretName: {{ include "xshare.adminSecretName" . }}
    defaultMode: 0400
    items:
      - key: {{ .Values.admin.secretKey | quote }}
        path: {{ .Values.admin.secretKey | quote }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level fields shared by every pod template */}}
{{- define "xshare.podSpecCommon" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- if .Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
{{ toYaml . }}
{{- end }}
{{- with .Values.affinity }}
affinity:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.securityContext }}
securityContext:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}

{{- define "xshare.podAnnotations" -}}
{{- with .Values.podAnnotations }}
annotations:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}

{{/* The admin state of the pod that serves HTTP (node rank 0): XSHARE_ADMIN_STATE_DIR, its mount and volume */}}
{{- define "xshare.adminStateOn" -}}
{{- if and .Values.admin.enabled (ne .Values.admin.state.type "none") }}true{{ end -}}
{{- end -}}

{{- define "xshare.adminStateEnv" -}}
{{- if include "xshare.adminStateOn" . }}
- name: XSHARE_ADMIN_STATE_DIR
  value: {{ .Values.admin.state.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "xshare.adminStateMount" -}}
{{- if include "xshare.adminStateOn" . }}
- name: admin-state
  mountPath: {{ .Values.admin.state.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "xshare.adminStateVolume" -}}
{{- if include "xshare.adminStateOn" . }}
- name: admin-state
{{- if eq .Values.admin.state.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "admin.state.claimName is required when admin.state.type is pvc" .Values.admin.state.claimName | quote }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end -}}
