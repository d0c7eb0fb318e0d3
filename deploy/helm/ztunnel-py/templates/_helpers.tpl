{{/* Labels every object carries. */}}
{{- define "ztunnel-py.labels" -}}
app.kubernetes.io/part-of: ztunnel-py
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "ztunnel-py.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The CA Service every proxy and waypoint asks for certificates. */}}
{{- define "ztunnel-py.caAddress" -}}
ztunnel-ca.{{ .Release.Namespace }}.svc:15012
{{- end }}

{{/* The global flags of the ztunnel command. */}}
{{- define "ztunnel-py.globalArgs" -}}
- --log-level
- {{ .Values.logLevel }}
- --log-format
- {{ .Values.logFormat }}
{{- end }}

{{- define "ztunnel-py.podSecurity" -}}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "ztunnel-py.nonRoot" -}}
runAsNonRoot: true
runAsUser: 1337
runAsGroup: 1337
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}
