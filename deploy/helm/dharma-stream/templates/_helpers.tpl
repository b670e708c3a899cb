{{/*
Names, labels and the small pieces every template shares.
*/}}

{{- define "dharma-stream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name. Kept to 40 characters so that suffixes ("-controller", "-runner",
"-migrate") stay within the 63 characters a label value or a Service name may have.
*/}}
{{- define "dharma-stream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dharma-stream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "dharma-stream.labels" -}}
helm.sh/chart: {{ include "dharma-stream.chart" . }}
app.kubernetes.io/name: {{ include "dharma-stream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dharma-stream
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "controller"). */}}
{{- define "dharma-stream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dharma-stream.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dharma-stream.controllerName" -}}
{{- printf "%s-controller" (include "dharma-stream.fullname" .) }}
{{- end }}

{{- define "dharma-stream.controllerConfigMap" -}}
{{- printf "%s-controller" (include "dharma-stream.fullname" .) }}
{{- end }}

{{- define "dharma-stream.runnerConfigMap" -}}
{{- printf "%s-runner" (include "dharma-stream.fullname" .) }}
{{- end }}

{{/* The controller's and migrations' Secret (key DB_PASSWORD): the user's, or the chart's. */}}
{{- define "dharma-stream.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else }}
{{- include "dharma-stream.fullname" . }}
{{- end }}
{{- end }}

{{/*
The runners' Secret (keys DB_PASSWORD and WEBDAV_PASSWORD, RUNNER_SECRET_NAME): the user's
runner.secret.existingSecret; else, runners sharing the controller's login and its existing
Secret, that Secret; else the one the chart makes (secret.yaml).
*/}}
{{- define "dharma-stream.runnerSecretName" -}}
{{- if .Values.runner.secret.existingSecret }}
{{- .Values.runner.secret.existingSecret }}
{{- else if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else }}
{{- printf "%s-runner" (include "dharma-stream.fullname" .) }}
{{- end }}
{{- end }}

{{/* The runners' DB_USER: their own login, or the controller's. */}}
{{- define "dharma-stream.runnerDbUser" -}}
{{- default .Values.database.user .Values.runner.database.user }}
{{- end }}

{{- define "dharma-stream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dharma-stream.controllerName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Leader election is forced on with more than one replica. */}}
{{- define "dharma-stream.leaderElection" -}}
{{- if or .Values.controller.leaderElection.enabled (gt (int .Values.controller.replicas) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/* An image reference: include with (dict "image" .Values.x.image "ctx" $). */}}
{{- define "dharma-stream.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
A value as an environment variable's text. YAML numbers reach templates as float64, which
would print 21474836480 as 2.147483648e+10: whole numbers are printed as integers. Maps and
lists become JSON (the settings parse RUNNER_NODE_SELECTOR & co. as JSON).
*/}}
{{- define "dharma-stream.envValue" -}}
{{- $v := . }}
{{- if kindIs "float64" $v }}
{{- if eq $v (floor $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "map" $v) (kindIs "slice" $v) }}
{{- toJson $v }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/* Renders a dict as ConfigMap data (sorted keys, every value a string). */}}
{{- define "dharma-stream.envData" -}}
{{- range $key, $value := . }}
{{ $key }}: {{ include "dharma-stream.envValue" $value | quote }}
{{- end }}
{{- end }}

{{/* Database settings shared by the controller, the runner and the migration Job. */}}
{{- define "dharma-stream.databaseEnv" -}}
{{- $db := .Values.database }}
{{- dict "DB_HOST" $db.host "DB_PORT" $db.port "DB_NAME" $db.name "DB_USER" $db.user "DB_SSLMODE" $db.sslmode "DB_CONNECT_TIMEOUT" $db.connectTimeoutSeconds | toJson }}
{{- end }}

{{/* The restricted Pod Security Standard, for every container of the chart. */}}
{{- define "dharma-stream.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "dharma-stream.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Checks that cannot be expressed in values.schema.json. Missing connection settings are not
fatal here (the default values must render for linting and `helm template`): NOTES.txt
warns, and the controller refuses to start with a message naming the variable.
*/}}
{{- define "dharma-stream.validate" -}}
{{- if and (not .Values.secret.existingSecret) (not .Values.secret.create) }}
{{- fail "set secret.existingSecret to a Secret with DB_PASSWORD and WEBDAV_PASSWORD, or secret.create=true" }}
{{- end }}
{{- if and .Values.runner.database.user .Values.secret.existingSecret (not .Values.runner.secret.existingSecret) }}
{{- fail "runner.database.user is set and secret.existingSecret is used: set runner.secret.existingSecret to the runners' Secret (keys DB_PASSWORD of runner.database.user, and WEBDAV_PASSWORD)" }}
{{- end }}
{{- if and (not .Values.runner.secret.existingSecret) (not .Values.secret.existingSecret) (not .Values.secret.create) }}
{{- fail "set runner.secret.existingSecret, or secret.create=true" }}
{{- end }}
{{- if and (hasPrefix "http://" (lower .Values.webdav.baseUrl)) (not .Values.webdav.allowInsecureHttp) }}
{{- fail (printf "webdav.baseUrl %s is plain http: the WebDAV password and every talk would cross the network unencrypted. Use https://, or set webdav.allowInsecureHttp=true to accept that" .Values.webdav.baseUrl) }}
{{- end }}
{{- $np := .Values.networkPolicy }}
{{- if $np.enabled }}
{{- if not $np.databaseCidrs }}
{{- fail "networkPolicy.enabled (the default) needs networkPolicy.databaseCidrs, the address(es) of PostgreSQL such as [10.20.0.5/32]: runners may reach nothing else. Or set networkPolicy.enabled=false if you apply NetworkPolicies of your own" }}
{{- end }}
{{- if not $np.webdav.cidrs }}
{{- fail "networkPolicy.enabled (the default) needs networkPolicy.webdav.cidrs, the address(es) of the WebDAV server such as [203.0.113.10/32]: runners may reach nothing else. Or set networkPolicy.enabled=false if you apply NetworkPolicies of your own" }}
{{- end }}
{{- end }}
{{- end }}

{{/* RUNNER_MODELS_VOLUME (JSON): the models volume source, {} for none. */}}
{{- define "dharma-stream.modelsVolume" -}}
{{- $m := .Values.models }}
{{- if and $m.persistentVolumeClaim.claimName $m.image.reference }}
{{- fail "models: set persistentVolumeClaim.claimName or image.reference, not both (one volume is mounted at /models/volume)" }}
{{- end }}
{{- if $m.persistentVolumeClaim.claimName }}
{{- dict "persistentVolumeClaim" (dict "claimName" $m.persistentVolumeClaim.claimName) | toJson }}
{{- else if $m.image.reference }}
{{- dict "image" (dict "reference" $m.image.reference "pullPolicy" $m.image.pullPolicy) | toJson }}
{{- else }}
{{- dict | toJson }}
{{- end }}
{{- end }}

{{/* Ports of the WebDAV server for the runners' NetworkPolicy (JSON list). */}}
{{- define "dharma-stream.webdavPorts" -}}
{{- $ports := .Values.networkPolicy.webdav.ports }}
{{- if not $ports }}
{{- $url := urlParse (default "https://" .Values.webdav.baseUrl) }}
{{- if regexMatch ":[0-9]+$" $url.host }}
{{- $ports = list (regexFind "[0-9]+$" $url.host | int) }}
{{- else if eq (lower $url.scheme) "http" }}
{{- $ports = list 80 }}
{{- else }}
{{- $ports = list 443 }}
{{- end }}
{{- end }}
{{- toJson $ports }}
{{- end }}

{{/* Required settings that are still empty (for NOTES.txt). */}}
{{- define "dharma-stream.missing" -}}
{{- $missing := list }}
{{- if not .Values.database.host }}{{ $missing = append $missing "database.host" }}{{ end }}
{{- if not .Values.database.user }}{{ $missing = append $missing "database.user" }}{{ end }}
{{- if not .Values.webdav.baseUrl }}{{ $missing = append $missing "webdav.baseUrl" }}{{ end }}
{{- join ", " $missing }}
{{- end }}

{{/* NetworkPolicy egress to DNS: the cluster resolver (networkPolicy.dns.to), port 53. */}}
{{- define "dharma-stream.dnsEgress" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  to:
    {{- toYaml .Values.networkPolicy.dns.to | nindent 4 }}
{{- end }}
{{/* NetworkPolicy peers for a list of CIDRs; none means any destination. */}}
{{- define "dharma-stream.cidrPeers" -}}
to:
{{- range . }}
  - ipBlock:
      cidr: {{ . }}
{{- end }}
{{- end }}
