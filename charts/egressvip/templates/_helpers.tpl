{{/*
The chart's name, or nameOverride.
*/}}
{{- define "egressvip.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects. A release name that already contains
the chart's name is used as it is (release "egressvip" gives "egressvip").
*/}}
{{- define "egressvip.fullname" -}}
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

{{- define "egressvip.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "egressvip.labels" -}}
helm.sh/chart: {{ include "egressvip.chart" . }}
{{ include "egressvip.selectorLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The DaemonSet's selector: the one manifests/daemonset.yaml has, so that a
DaemonSet applied from manifests/ can be adopted by a release (a selector is
immutable). Pods also carry app.kubernetes.io/instance.
*/}}
{{- define "egressvip.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egressvip.name" . }}
{{- end }}

{{/*
The ServiceAccount the daemon runs as.
*/}}
{{- define "egressvip.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "egressvip.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest, or repository:tag (tag defaults to
the chart's appVersion).
*/}}
{{- define "egressvip.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
The port of prometheus_server (/metrics, /healthz, /readyz), or nothing
when it is "off" or names no port. Unset means the daemon's default, :2112.
*/}}
{{- define "egressvip.metricsPort" -}}
{{- $addr := toString (.Values.env.prometheus_server | default ":2112") }}
{{- if regexMatch ":[0-9]+$" $addr }}
{{- regexFind "[0-9]+$" $addr }}
{{- end }}
{{- end }}
