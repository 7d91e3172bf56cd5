{{- define "pyebpf.name" -}}pyebpf{{- end -}}

{{- define "pyebpf.fullname" -}}
{{- if contains "pyebpf" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-pyebpf" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pyebpf.selectorLabels" -}}
app.kubernetes.io/name: pyebpf
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pyebpf.labels" -}}
{{ include "pyebpf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pyebpf.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The daemon's configuration (deploy/pyebpf.yaml's keys). */}}
{{- define "pyebpf.config" -}}
{{- $outputs := dict -}}
{{- with .Values.pyroscope.url -}}
{{- $_ := set $outputs "pyroscope" (dict "url" . "application_name" $.Values.pyroscope.applicationName) -}}
{{- end -}}
{{- with .Values.otlp.endpoint -}}
{{- $otlp := dict "endpoint" . "protocol" $.Values.otlp.protocol -}}
{{- with $.Values.otlp.headers -}}{{- $_ := set $otlp "headers" . -}}{{- end -}}
{{- $_ := set $outputs "otlp" $otlp -}}
{{- end -}}
{{- $discovery := dict "rescan_interval_secs" 10 "include" .Values.include "exclude" .Values.exclude -}}
{{- $config := dict "listen" "127.0.0.1:7464" "metrics_listen" (printf "0.0.0.0:%d" (int .Values.metricsPort)) -}}
{{- $_ := set $config "sampling" (dict "rate_hz" (int .Values.samplingRateHz)) -}}
{{- $_ := set $config "discovery" $discovery -}}
{{- $_ := set $config "aggregation" (dict "window_secs" 60 "retention_secs" 600) -}}
{{- $_ := set $config "metrics" (dict "top_functions" 10) -}}
{{- $_ := set $config "outputs" $outputs -}}
{{- $_ := set $config "logging" .Values.logging -}}
{{- toYaml (mergeOverwrite $config (deepCopy .Values.extraConfig)) -}}
{{- end -}}
