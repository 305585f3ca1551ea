{{/* Names: the release name, unless it already contains the chart's name. */}}
{{- define "sdxl-triton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sdxl-triton.fullname" -}}
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

{{- define "sdxl-triton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sdxl-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The recommended labels, on every object. */}}
{{- define "sdxl-triton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sdxl-triton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sdxl-triton
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "sdxl-triton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sdxl-triton.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sdxl-triton.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "sdxl-triton.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "sdxl-triton.imageTag" .) }}
{{- end }}
{{- end }}

{{/* The repository's directory inside the volume: subPath, else (build) <image tag>/<gpu product>. */}}
{{- define "sdxl-triton.repositorySubPath" -}}
{{- if .Values.modelRepository.subPath }}
{{- .Values.modelRepository.subPath }}
{{- else if eq .Values.modelRepository.source "build" }}
{{- printf "%s/%s" (include "sdxl-triton.imageTag" . | replace ":" "_") (.Values.gpu.product | default "any-gpu") }}
{{- end }}
{{- end }}

{{/* Where the server finds the repository. */}}
{{- define "sdxl-triton.repositoryPath" -}}
{{- $sub := include "sdxl-triton.repositorySubPath" . }}
{{- if and $sub (has .Values.modelRepository.source (list "build" "pvc")) }}
{{- printf "%s/%s" .Values.modelRepository.mountPath $sub }}
{{- else }}
{{- .Values.modelRepository.mountPath }}
{{- end }}
{{- end }}

{{/* The LoRA library the servers read (SDXL_LORA_LIBRARY), when loras.enabled. */}}
{{- define "sdxl-triton.loraLibrary" -}}
{{- if eq .Values.loras.source "volume" }}
{{- printf "%s/%s" .Values.modelRepository.mountPath .Values.loras.volumePath }}
{{- else }}
{{- print "/loras/library" }}
{{- end }}
{{- end }}

{{- define "sdxl-triton.claimName" -}}
{{- default (printf "%s-models" (include "sdxl-triton.fullname" .)) .Values.modelRepository.persistence.existingClaim }}
{{- end }}

{{/* The file the engine-build Job writes last; the servers wait for it. */}}
{{- define "sdxl-triton.buildMarker" -}}
{{- printf "%s/.sdxl-build-complete.json" (include "sdxl-triton.repositoryPath" .) }}
{{- end }}

{{/* The engine-build Job's name changes with what it builds: a Job's template cannot be changed. */}}
{{- define "sdxl-triton.buildJobName" -}}
{{- $key := list (include "sdxl-triton.image" .) .Values.gpu.product .Values.gpu.resourceName (include "sdxl-triton.repositorySubPath" .) .Values.modelRepository.build.preset .Values.modelRepository.build.unetPrecision .Values.modelRepository.build.vaePrecision .Values.modelRepository.build.controlnets .Values.modelRepository.build.depthEstimator .Values.modelRepository.build.ipAdapter .Values.modelRepository.build.exportArgs .Values.modelRepository.build.engineArgs | toJson | sha256sum | trunc 8 }}
{{- printf "%s-engines-%s" (include "sdxl-triton.fullname" . | trunc 46 | trimSuffix "-") $key }}
{{- end }}

{{/* /dev/shm size limit in MiB: sum(instances x per-instance use) x headroom + base. */}}
{{- define "sdxl-triton.shmMiB" -}}
{{- $total := 0.0 }}
{{- range $model, $count := .Values.sharedMemory.pythonInstances }}
{{- $per := index $.Values.sharedMemory.perInstanceMiB $model | default 0 }}
{{- $total = addf $total (mulf $count $per) }}
{{- end }}
{{- addf (mulf $total .Values.sharedMemory.headroomFactor) .Values.sharedMemory.baseMiB | ceil | int }}
{{- end }}

{{/* Seconds the pod needs from deletion to exit: preStop, the drain, tritonserver's exit, margin. */}}
{{- define "sdxl-triton.shutdownBudget" -}}
{{- $s := .Values.server }}
{{- add $s.preStopSleepSeconds $s.drainTimeoutSeconds $s.exitTimeoutSeconds 5 }}
{{- end }}

{{/* Node selection of everything that runs on the serving GPU (servers, engine build). */}}
{{- define "sdxl-triton.nodeSelector" -}}
{{- $selector := deepCopy .Values.nodeSelector }}
{{- if .Values.gpu.product }}
{{- $_ := set $selector "nvidia.com/gpu.product" .Values.gpu.product }}
{{- end }}
{{- with $selector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod security shared by every pod of the chart (restricted Pod Security Standard). */}}
{{- define "sdxl-triton.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "sdxl-triton.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* resources with the GPU added to the limits: (dict "resources" R "gpu" .Values.gpu). */}}
{{- define "sdxl-triton.resourcesWithGpu" -}}
{{- $resources := deepCopy .resources }}
{{- if gt (int .gpu.count) 0 }}
{{- $limits := deepCopy ($resources.limits | default dict) }}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* The PromQL selector of this release's series (the ServiceMonitor's job label is the Service). */}}
{{- define "sdxl-triton.promSelector" -}}
{{- printf "namespace=\"%s\",service=\"%s\"" .Release.Namespace (include "sdxl-triton.fullname" .) }}
{{- end }}

{{/* The Secret that holds the key of Triton's admin APIs: the one named, or the chart's own. */}}
{{- define "sdxl-triton.adminKeySecret" -}}
{{- .Values.security.adminKey.existingSecret | default (printf "%s-admin-key" (include "sdxl-triton.fullname" .)) -}}
{{- end }}

{{/* Where the pods mount that Secret; the key is the file named by security.adminKey.secretKey. */}}
{{- define "sdxl-triton.adminKeyDir" -}}
/var/run/secrets/sdxl-triton-admin
{{- end }}

{{/* The volume of that Secret: readable by the pods' group (fsGroup) only. */}}
{{- define "sdxl-triton.adminKeyVolume" -}}
- name: admin-key
  secret:
    secretName: {{ include "sdxl-triton.adminKeySecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.security.adminKey.secretKey }}
        path: {{ .Values.security.adminKey.secretKey }}
{{- end }}
