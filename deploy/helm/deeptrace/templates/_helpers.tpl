{{/* The namespace every object goes to. */}}
{{- define "deeptrace.namespace" -}}
{{- .Values.namespace.name | default .Release.Namespace -}}
{{- end -}}

{{/* Labels: name (the component) and part-of, as in deploy/kubernetes/. */}}
{{- define "deeptrace.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: deeptrace
{{- end -}}

{{- define "deeptrace.image" -}}
{{ required "image.repository is required" .Values.image.repository }}:{{ required "image.tag is required" .Values.image.tag }}
{{- end -}}
