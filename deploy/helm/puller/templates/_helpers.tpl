{{/* The release's prefix for every name: "puller" for a release named puller. */}}
{{- define "puller.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "puller.labels" -}}
app.kubernetes.io/part-of: puller
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* A program's labels; dict: root, program (worker, http, blob-cache). */}}
{{- define "puller.programLabels" -}}
{{ include "puller.selector" . }}
app.kubernetes.io/component: {{ .program }}
{{ include "puller.labels" .root }}
{{- end -}}

{{/* A program's pods; dict: root, program. */}}
{{- define "puller.selector" -}}
app.kubernetes.io/name: puller-{{ .program }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* An image reference; dict: root, image (repository, tag, digest). */}}
{{- define "puller.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .root.Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* The blob cache's upstream registry as image names spell it (docker.io for Docker Hub). */}}
{{- define "puller.cachedRegistry" -}}
{{- $host := (urlParse .Values.blobCache.upstream).host -}}
{{- if has $host (list "registry-1.docker.io" "index.docker.io") -}}
docker.io
{{- else -}}
{{ $host }}
{{- end -}}
{{- end -}}

{{/* The Secret a program's RabbitMQ URL is in; the program's name. */}}
{{- define "puller.amqpSecret" -}}
{{ include "puller.fullname" .root }}-{{ .program }}-amqp
{{- end -}}
