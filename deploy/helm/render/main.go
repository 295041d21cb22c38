// Command render renders the DeepTrace Helm chart the way `helm template` would, for the tests
// and for machines without helm. IT IS NOT HELM: it is Go's text/template with the sprig
// functions (what Helm itself uses) plus the few Helm functions the chart calls: include,
// required, toYaml; and .Values (values.yaml, then -f files, then --set), .Release (Name,
// Namespace, Service) and .Chart (from Chart.yaml). No hooks, no subcharts, no lookup, no
// .Capabilities, no .Files, no schema validation. Keep deploy/helm/deeptrace/templates within
// that, or render with helm itself.
//
// Build (Debian: apt-get install golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o build/helm-render deploy/helm/render/main.go
//
// Use:
//
//	build/helm-render [-f VALUES.yaml ...] [--set a.b=c ...] [--release NAME] [--namespace NS] CHART_DIR
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var files, sets multi
	release := flag.String("release", "deeptrace", "release name (.Release.Name)")
	namespace := flag.String("namespace", "deeptrace", "release namespace (.Release.Namespace)")
	flag.Var(&files, "f", "values file merged over values.yaml (repeatable)")
	flag.Var(&sets, "set", "KEY.PATH=VALUE merged last (repeatable)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: helm-render [-f values.yaml] [--set k=v] [--release NAME] [--namespace NS] CHART_DIR")
		os.Exit(2)
	}
	out, err := render(flag.Arg(0), files, sets, *release, *namespace)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helm-render:", err)
		os.Exit(1)
	}
	os.Stdout.WriteString(out)
}

func readYAML(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// merge puts src over dst, maps merged key by key (as Helm merges values files).
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				dst[k] = merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
	return dst
}

func setValue(values map[string]interface{}, assignment string) error {
	key, raw, ok := strings.Cut(assignment, "=")
	if !ok {
		return fmt.Errorf("--set %q: want KEY=VALUE", assignment)
	}
	var value interface{} = raw
	if b, err := strconv.ParseBool(raw); err == nil {
		value = b
	} else if n, err := strconv.ParseInt(raw, 10, 64); err == nil {
		value = n
	}
	parts := strings.Split(key, ".")
	m := values
	for _, p := range parts[:len(parts)-1] {
		next, ok := m[p].(map[string]interface{})
		if !ok {
			next = map[string]interface{}{}
			m[p] = next
		}
		m = next
	}
	m[parts[len(parts)-1]] = value
	return nil
}

func toYAML(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func render(chartDir string, files, sets []string, release, namespace string) (string, error) {
	chartMeta, err := readYAML(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return "", err
	}
	values, err := readYAML(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return "", err
	}
	for _, f := range files {
		extra, err := readYAML(f)
		if err != nil {
			return "", err
		}
		values = merge(values, extra)
	}
	for _, s := range sets {
		if err := setValue(values, s); err != nil {
			return "", err
		}
	}
	chart := map[string]interface{}{}
	for k, v := range chartMeta { // Helm's .Chart fields are capitalized: .Chart.Name, .Chart.AppVersion
		chart[strings.ToUpper(k[:1])+k[1:]] = v
	}
	data := map[string]interface{}{
		"Values":  values,
		"Chart":   chart,
		"Release": map[string]interface{}{"Name": release, "Namespace": namespace, "Service": "Helm"},
	}

	root := template.New("chart").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env") // as in Helm: templates do not read the environment
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYAML
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, errors.New(msg)
		}
		return v, nil
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	root.Funcs(funcs)

	paths, err := filepath.Glob(filepath.Join(chartDir, "templates", "*"))
	if err != nil {
		return "", err
	}
	sort.Strings(paths)
	for _, p := range paths {
		text, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		name := filepath.ToSlash(filepath.Join(filepath.Base(chartDir), "templates", filepath.Base(p)))
		if _, err := root.New(name).Parse(string(text)); err != nil {
			return "", err
		}
	}
	var out strings.Builder
	for _, p := range paths {
		base := filepath.Base(p)
		if strings.HasPrefix(base, "_") || !(strings.HasSuffix(base, ".yaml") || strings.HasSuffix(base, ".yml")) {
			continue
		}
		name := filepath.ToSlash(filepath.Join(filepath.Base(chartDir), "templates", base))
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		body := strings.TrimSpace(buf.String())
		if body == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", name, body)
	}
	return out.String(), nil
}
