{{/* Labels every object carries. */}}
{{- define "ztunnel-py.labels" -}}
app.kubernetes.io/part-of: ztunnel-py
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "ztunnel-py.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The node DaemonSet's image: eBPF redirection needs bcc, only in the <appVersion>-bpf build (an explicit
image.tag is taken as given). */}}
{{- define "ztunnel-py.nodeImage" -}}
{{- if and (eq .Values.node.redirectMode "ebpf") (not .Values.image.tag) -}}
{{ .Values.image.repository }}:{{ .Chart.AppVersion }}-bpf
{{- else -}}
{{ include "ztunnel-py.image" . }}
{{- end }}
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

{{/* What the config model is built from: read-only (node proxy, node agent, waypoints). */}}
{{- define "ztunnel-py.readRules" -}}
- apiGroups: [""]
  resources: [namespaces, pods, services, nodes]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [gateways]
  verbs: [get, list, watch]
- apiGroups: [security.istio.io]
  resources: [authorizationpolicies, peerauthentications, requestauthentications]
  verbs: [get, list, watch]
- apiGroups: [rbac.istio.io]
  resources: [serviceroles, servicerolebindings, clusterrbacconfigs, rbacconfigs]
  verbs: [get, list, watch]
- apiGroups: [authentication.istio.io]
  resources: [policies, meshpolicies]
  verbs: [get, list, watch]
{{- end }}
