// Package chart tests the Helm chart with the helm CLI that
// testing/helmtool builds: lint, the defaults against manifests/ (parsed
// into Kubernetes objects, so a change on one side only fails), what
// non-default values ask for, and strict decoding of every rendered object.
package chart

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/egressvip/egressvip/testing/helmtool"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
)

const manifestsDir = "../../manifests"

// strict decodes Kubernetes' built-in kinds and the Prometheus Operator
// kinds the chart renders, failing on unknown and duplicate fields.
var strict = func() runtime.Decoder {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := addMonitoringTypes(s); err != nil {
		panic(err)
	}
	return serializer.NewCodecFactory(s, serializer.EnableStrict).UniversalDeserializer()
}()

// decodeStream decodes every document of a YAML stream strictly.
func decodeStream(t *testing.T, name string, data []byte) []runtime.Object {
	t.Helper()
	reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []runtime.Object
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if onlyComments(doc) {
			continue
		}
		obj, _, err := strict.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%s: strict decode: %v\n%s", name, err, doc)
		}
		out = append(out, obj)
	}
}

func onlyComments(doc []byte) bool {
	for _, line := range strings.Split(string(doc), "\n") {
		if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// runHelm runs helm with its own empty home, so no user configuration or
// repository cache takes part.
func runHelm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	bin := helmtool.Require(t)
	home := t.TempDir()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
		"KUBECONFIG="+filepath.Join(home, "no-kubeconfig"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

// valuesFile writes values YAML to a file for helm's -f.
func valuesFile(t *testing.T, yaml string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// render is `helm template <release> . --namespace <namespace> <args>`,
// strictly decoded.
func render(t *testing.T, release, namespace string, args ...string) []runtime.Object {
	t.Helper()
	out, err := runHelm(t, append([]string{"template", release, ".", "--namespace", namespace}, args...)...)
	if err != nil {
		t.Fatalf("helm template %v: %v\n%s", args, err, out)
	}
	return decodeStream(t, "helm template", []byte(out))
}

func manifestObjects(t *testing.T, file string) []runtime.Object {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(manifestsDir, file))
	if err != nil {
		t.Fatal(err)
	}
	return decodeStream(t, file, data)
}

// only returns the single object of type T, failing on none or several.
func only[T runtime.Object](t *testing.T, objs []runtime.Object) T {
	t.Helper()
	var found []T
	for _, o := range objs {
		if v, ok := o.(T); ok {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("want one %T, got %d", zero, len(found))
	}
	return found[0]
}

func count[T runtime.Object](objs []runtime.Object) int {
	n := 0
	for _, o := range objs {
		if _, ok := o.(T); ok {
			n++
		}
	}
	return n
}

func asJSON(v any) string {
	b, _ := json.MarshalIndent(v, "", "  ")
	return string(b)
}

// sameField reports a difference between manifests/ and the chart.
func sameField(t *testing.T, what string, manifest, chart any) {
	t.Helper()
	if !equality.Semantic.DeepEqual(manifest, chart) {
		t.Errorf("%s differs between manifests/ and the chart's defaults:\nmanifests: %s\nchart:     %s", what, asJSON(manifest), asJSON(chart))
	}
}

func sortedEnv(env []corev1.EnvVar) []corev1.EnvVar {
	out := append([]corev1.EnvVar(nil), env...)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func envByName(t *testing.T, c corev1.Container) map[string]corev1.EnvVar {
	t.Helper()
	m := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		if _, dup := m[e.Name]; dup {
			t.Errorf("env %s set twice", e.Name)
		}
		m[e.Name] = e
	}
	return m
}

func TestLint(t *testing.T) {
	cases := []struct {
		name string
		args []string
	}{
		{name: "defaults"},
		{name: "podMonitor", args: []string{"--set", "podMonitor.enabled=true"}},
		{name: "serviceMonitor and rules", args: []string{"--set", "prometheus.serviceMonitor.enabled=true,prometheus.prometheusRule.enabled=true,prometheus.prometheusRule.refusedAddresses.enabled=true"}},
		{name: "existing ServiceAccount, no RBAC", args: []string{"--set", "serviceAccount.create=false,serviceAccount.name=egress,rbac.create=false"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runHelm(t, append([]string{"lint", "--strict", "."}, tc.args...)...)
			if err != nil {
				t.Fatalf("helm lint --strict: %v\n%s", err, out)
			}
		})
	}
}

// The chart's defaults render what manifests/ holds: the same RBAC rules
// and the same DaemonSet. The chart creates no Namespace (helm install
// --create-namespace, or kubectl create namespace) and adds Helm's labels.
func TestDefaultsMatchManifests(t *testing.T) {
	chart := render(t, "egressvip", "egressvip")
	rbac := manifestObjects(t, "rbac.yaml")
	mds := only[*appsv1.DaemonSet](t, manifestObjects(t, "daemonset.yaml"))

	if n := count[*corev1.Namespace](chart); n != 0 {
		t.Errorf("the chart renders %d Namespaces; a chart leaves its namespace to helm --create-namespace", n)
	}

	msa, csa := only[*corev1.ServiceAccount](t, rbac), only[*corev1.ServiceAccount](t, chart)
	sameField(t, "ServiceAccount name/namespace", []string{msa.Name, msa.Namespace}, []string{csa.Name, csa.Namespace})

	mcr, ccr := only[*rbacv1.ClusterRole](t, rbac), only[*rbacv1.ClusterRole](t, chart)
	sameField(t, "ClusterRole name", mcr.Name, ccr.Name)
	sameField(t, "ClusterRole rules", mcr.Rules, ccr.Rules)

	mcrb, ccrb := only[*rbacv1.ClusterRoleBinding](t, rbac), only[*rbacv1.ClusterRoleBinding](t, chart)
	sameField(t, "ClusterRoleBinding name", mcrb.Name, ccrb.Name)
	sameField(t, "ClusterRoleBinding roleRef", mcrb.RoleRef, ccrb.RoleRef)
	sameField(t, "ClusterRoleBinding subjects", mcrb.Subjects, ccrb.Subjects)
	if n := count[*rbacv1.Role](rbac) + count[*rbacv1.RoleBinding](rbac); n != count[*rbacv1.Role](chart)+count[*rbacv1.RoleBinding](chart) {
		t.Errorf("manifests/rbac.yaml has %d Roles and RoleBindings, the chart a different number", n)
	}

	cds := only[*appsv1.DaemonSet](t, chart)
	sameField(t, "DaemonSet name/namespace", []string{mds.Name, mds.Namespace}, []string{cds.Name, cds.Namespace})
	sameField(t, "DaemonSet selector", mds.Spec.Selector, cds.Spec.Selector)
	sameField(t, "DaemonSet updateStrategy", mds.Spec.UpdateStrategy, cds.Spec.UpdateStrategy)
	for k, v := range mds.Spec.Template.Labels {
		if cds.Spec.Template.Labels[k] != v {
			t.Errorf("pod label %s=%s of manifests/ missing from the chart (%v)", k, v, cds.Spec.Template.Labels)
		}
	}

	mp, cp := mds.Spec.Template.Spec, cds.Spec.Template.Spec
	if len(mp.Containers) != 1 || len(cp.Containers) != 1 {
		t.Fatalf("want one container on both sides, got %d and %d", len(mp.Containers), len(cp.Containers))
	}
	mc, cc := mp.Containers[0], cp.Containers[0]
	sameField(t, "container env (by name)", sortedEnv(mc.Env), sortedEnv(cc.Env))
	sameField(t, "container securityContext", mc.SecurityContext, cc.SecurityContext)
	sameField(t, "container volumeMounts", mc.VolumeMounts, cc.VolumeMounts)
	sameField(t, "volumes", mp.Volumes, cp.Volumes)
	sameField(t, "livenessProbe", mc.LivenessProbe, cc.LivenessProbe)
	sameField(t, "readinessProbe", mc.ReadinessProbe, cc.ReadinessProbe)
	sameField(t, "container ports", mc.Ports, cc.Ports)
	sameField(t, "container resources", mc.Resources, cc.Resources)
	sameField(t, "container image", mc.Image, cc.Image)
	sameField(t, "container args", mc.Args, cc.Args)
	sameField(t, "hostNetwork", mp.HostNetwork, cp.HostNetwork)
	sameField(t, "dnsPolicy", mp.DNSPolicy, cp.DNSPolicy)
	sameField(t, "priorityClassName", mp.PriorityClassName, cp.PriorityClassName)
	sameField(t, "tolerations", mp.Tolerations, cp.Tolerations)
	sameField(t, "serviceAccountName", mp.ServiceAccountName, cp.ServiceAccountName)

	// Whatever else either side sets, such as a field added to the
	// manifest later, must match too. The pull policy is the one field
	// the chart spells out: IfNotPresent is what the API server defaults
	// a tagged image to.
	if cc.ImagePullPolicy != corev1.PullIfNotPresent || (mc.ImagePullPolicy != "" && mc.ImagePullPolicy != corev1.PullIfNotPresent) {
		t.Errorf("imagePullPolicy: manifests/ %q, chart %q; want IfNotPresent (or unset in manifests/)", mc.ImagePullPolicy, cc.ImagePullPolicy)
	}
	mp.Containers = []corev1.Container{mc}
	cp.Containers = []corev1.Container{cc}
	mp.Containers[0].Env, cp.Containers[0].Env = sortedEnv(mc.Env), sortedEnv(cc.Env)
	mp.Containers[0].ImagePullPolicy, cp.Containers[0].ImagePullPolicy = "", ""
	sameField(t, "pod spec (all other fields)", mp, cp)
}

// Non-default values: another namespace and release, an existing
// ServiceAccount, extra and overridden env, node placement, and the
// Prometheus Operator objects.
func TestCustomValues(t *testing.T) {
	const ns = "egress-system"
	values := valuesFile(t, `
serviceAccount:
  create: false
  name: egress-daemon
env:
  vip_servicesinterface: bond0.100
  log_level: debug
  egress_podcidr: "10.244.0.0/16,fd00:10:244::/56"
  vip_arp: null
envValueFrom:
  egress_servicecidr:
    configMapKeyRef: {name: cluster-cidrs, key: services}
nodeSelector:
  egressvip.example/gateway: "true"
tolerations:
  - key: dedicated
    operator: Equal
    value: gateway
    effect: NoSchedule
image:
  tag: v9.9.9
podLabels:
  team: network
podAnnotations:
  example/annotated: "yes"
`)
	objs := render(t, "edge", ns, "-f", values, "--set", "podMonitor.enabled=true,podMonitor.interval=30s,podMonitor.labels.release=prom")

	for _, o := range objs {
		m, err := metaOf(o)
		if err != nil {
			t.Fatal(err)
		}
		switch o.(type) {
		case *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding:
			if m.GetNamespace() != "" {
				t.Errorf("%T %s: cluster-scoped object with namespace %q", o, m.GetName(), m.GetNamespace())
			}
		case *rbacv1.Role, *rbacv1.RoleBinding:
			// The allocator's pools live in kube-system, wherever the
			// release is.
			if m.GetNamespace() != "kube-system" {
				t.Errorf("%T %s: namespace %q, want kube-system", o, m.GetName(), m.GetNamespace())
			}
		default:
			if m.GetNamespace() != ns {
				t.Errorf("%T %s: namespace %q, want %q", o, m.GetName(), m.GetNamespace(), ns)
			}
		}
	}
	if n := count[*corev1.ServiceAccount](objs); n != 0 {
		t.Errorf("serviceAccount.create=false rendered %d ServiceAccounts", n)
	}
	crb := only[*rbacv1.ClusterRoleBinding](t, objs)
	wantSubject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: "egress-daemon", Namespace: ns}}
	if !reflect.DeepEqual(crb.Subjects, wantSubject) {
		t.Errorf("ClusterRoleBinding subjects %v, want %v", crb.Subjects, wantSubject)
	}

	ds := only[*appsv1.DaemonSet](t, objs)
	spec := ds.Spec.Template.Spec
	if spec.ServiceAccountName != "egress-daemon" {
		t.Errorf("serviceAccountName %q, want egress-daemon", spec.ServiceAccountName)
	}
	if !reflect.DeepEqual(spec.NodeSelector, map[string]string{"egressvip.example/gateway": "true"}) {
		t.Errorf("nodeSelector %v", spec.NodeSelector)
	}
	wantTol := []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "gateway", Effect: corev1.TaintEffectNoSchedule}}
	if !reflect.DeepEqual(spec.Tolerations, wantTol) {
		t.Errorf("tolerations %v, want %v", spec.Tolerations, wantTol)
	}
	c := spec.Containers[0]
	if c.Image != "ghcr.io/egressvip/egressvip-iptables:v9.9.9" {
		t.Errorf("image %q", c.Image)
	}
	env := envByName(t, c)
	for name, want := range map[string]string{
		"vip_servicesinterface": "bond0.100",
		"log_level":             "debug",
		"egress_podcidr":        "10.244.0.0/16,fd00:10:244::/56",
		"svc_election":          "true", // a default that stays
	} {
		if env[name].Value != want {
			t.Errorf("env %s=%q, want %q", name, env[name].Value, want)
		}
	}
	if _, ok := env["vip_arp"]; ok {
		t.Error("env vip_arp set to null must be left out")
	}
	if e := env["egress_servicecidr"]; e.ValueFrom == nil || e.ValueFrom.ConfigMapKeyRef == nil || e.ValueFrom.ConfigMapKeyRef.Name != "cluster-cidrs" || e.ValueFrom.ConfigMapKeyRef.Key != "services" {
		t.Errorf("env egress_servicecidr from envValueFrom: %+v", e)
	}
	for name, path := range map[string]string{"vip_nodename": "spec.nodeName", "POD_NAMESPACE": "metadata.namespace"} {
		if e := env[name]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != path {
			t.Errorf("env %s must come from %s, got %+v", name, path, e)
		}
	}
	podLabels := labels.Set(ds.Spec.Template.Labels)
	if podLabels["team"] != "network" || ds.Spec.Template.Annotations["example/annotated"] != "yes" {
		t.Errorf("podLabels/podAnnotations missing: %v %v", ds.Spec.Template.Labels, ds.Spec.Template.Annotations)
	}
	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil || !sel.Matches(podLabels) {
		t.Errorf("DaemonSet selector %v does not match its pods' labels %v (%v)", ds.Spec.Selector, podLabels, err)
	}

	pm := only[*PodMonitor](t, objs)
	pmSel, err := metav1.LabelSelectorAsSelector(&pm.Spec.Selector)
	if err != nil || !pmSel.Matches(podLabels) {
		t.Errorf("PodMonitor selector %v does not match the pods' labels %v (%v)", pm.Spec.Selector, podLabels, err)
	}
	if !reflect.DeepEqual(pm.Spec.NamespaceSelector.MatchNames, []string{ns}) {
		t.Errorf("PodMonitor namespaceSelector %v", pm.Spec.NamespaceSelector)
	}
	if len(pm.Spec.PodMetricsEndpoints) != 1 || pm.Spec.PodMetricsEndpoints[0].Port != "metrics" || pm.Spec.PodMetricsEndpoints[0].Interval != "30s" {
		t.Errorf("PodMonitor endpoints %+v", pm.Spec.PodMetricsEndpoints)
	}
	if !hasPort(c, pm.Spec.PodMetricsEndpoints[0].Port) {
		t.Errorf("the container has no port named %q: %v", pm.Spec.PodMetricsEndpoints[0].Port, c.Ports)
	}
	if pm.Labels["release"] != "prom" {
		t.Errorf("podMonitor.labels not on the PodMonitor: %v", pm.Labels)
	}
	if count[*ServiceMonitor](objs)+count[*PrometheusRule](objs) != 0 {
		t.Error("ServiceMonitor or PrometheusRule rendered though not enabled")
	}
}

func hasPort(c corev1.Container, name string) bool {
	for _, p := range c.Ports {
		if p.Name == name {
			return true
		}
	}
	return false
}

func metaOf(o runtime.Object) (metav1.Object, error) {
	type hasMeta interface{ GetObjectMeta() metav1.Object }
	if m, ok := o.(hasMeta); ok {
		return m.GetObjectMeta(), nil
	}
	m, ok := o.(metav1.Object)
	if !ok {
		return nil, errors.New("object without metadata")
	}
	return m, nil
}

func TestServiceMonitorAndRules(t *testing.T) {
	const ns = "monitoring-test"
	objs := render(t, "egressvip", ns, "--set",
		"prometheus.serviceMonitor.enabled=true,prometheus.serviceMonitor.interval=15s,prometheus.serviceMonitor.additionalLabels.release=prom,"+
			"prometheus.prometheusRule.enabled=true,prometheus.prometheusRule.refusedAddresses.enabled=true,prometheus.prometheusRule.additionalLabels.release=prom")
	ds := only[*appsv1.DaemonSet](t, objs)
	podLabels := labels.Set(ds.Spec.Template.Labels)

	svc := only[*corev1.Service](t, objs)
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("metrics Service clusterIP %q, want None (headless)", svc.Spec.ClusterIP)
	}
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(podLabels) {
		t.Errorf("metrics Service selector %v does not match the pods' labels %v", svc.Spec.Selector, podLabels)
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 2112 || svc.Spec.Ports[0].TargetPort.StrVal != "metrics" || !hasPort(ds.Spec.Template.Spec.Containers[0], "metrics") {
		t.Errorf("metrics Service ports %+v", svc.Spec.Ports)
	}

	sm := only[*ServiceMonitor](t, objs)
	smSel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
	if err != nil || !smSel.Matches(labels.Set(svc.Labels)) {
		t.Errorf("ServiceMonitor selector %v does not match the metrics Service's labels %v (%v)", sm.Spec.Selector, svc.Labels, err)
	}
	// The selector must not match Services of other releases' pods: it
	// names the metrics component.
	if smSel.Matches(podLabels) && podLabels["app.kubernetes.io/component"] == "" {
		t.Errorf("ServiceMonitor selector %v is loose enough to match any Service with the pods' labels", sm.Spec.Selector)
	}
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" || sm.Spec.Endpoints[0].Interval != "15s" || sm.Spec.Endpoints[0].Path != "/metrics" {
		t.Errorf("ServiceMonitor endpoints %+v", sm.Spec.Endpoints)
	}
	if sm.Labels["release"] != "prom" || !reflect.DeepEqual(sm.Spec.NamespaceSelector.MatchNames, []string{ns}) {
		t.Errorf("ServiceMonitor labels %v, namespaceSelector %v", sm.Labels, sm.Spec.NamespaceSelector)
	}

	pr := only[*PrometheusRule](t, objs)
	if pr.Labels["release"] != "prom" {
		t.Errorf("PrometheusRule labels %v", pr.Labels)
	}
	if len(pr.Spec.Groups) != 1 {
		t.Fatalf("want one rule group, got %d", len(pr.Spec.Groups))
	}
	want := map[string]string{
		"EgressVIPRepairsRepeating":     "increase(egressvip_repairs_total[15m]) > 2",
		"EgressVIPSyncErrors":           "rate(egressvip_sync_errors_total[5m]) > 0",
		"EgressVIPAddressPoolExhausted": `egressvip_pool_addresses{state="free"} == 0`,
		"EgressVIPAddressesRefused":     "egressvip_refused_addresses > 0",
		"EgressVIPLeaseWriteErrors":     `rate(egressvip_lease_writes_total{result="error"}[5m]) > 0`,
	}
	got := map[string]Rule{}
	for _, r := range pr.Spec.Groups[0].Rules {
		got[r.Alert] = r
	}
	for alert, expr := range want {
		r, ok := got[alert]
		if !ok {
			t.Errorf("alert %s missing", alert)
			continue
		}
		if r.Expr.StrVal != expr {
			t.Errorf("%s expr %q, want %q", alert, r.Expr.StrVal, expr)
		}
		if r.Labels["severity"] == "" {
			t.Errorf("%s has no severity label", alert)
		}
		for k, v := range r.Annotations {
			// Prometheus expands $labels; Helm must leave them alone
			// and printf must have had all its arguments.
			if strings.Contains(v, "%!") || strings.Contains(v, "<no value>") || (k == "summary" && !strings.Contains(v, "{{ $")) {
				t.Errorf("%s annotation %s badly rendered: %q", alert, k, v)
			}
		}
		if alert != "EgressVIPRepairsRepeating" && (r.For == nil || *r.For == "") {
			t.Errorf("%s has no for:", alert)
		}
	}
	if len(got) != len(want) {
		t.Errorf("alerts %v, want %v", keys(got), keys(want))
	}

	// The refused-addresses alert is off by default: its metric is only
	// proposed.
	def := only[*PrometheusRule](t, render(t, "egressvip", ns, "--set", "prometheus.prometheusRule.enabled=true"))
	for _, r := range def.Spec.Groups[0].Rules {
		if r.Alert == "EgressVIPAddressesRefused" {
			t.Error("EgressVIPAddressesRefused is on by default; egressvip_refused_addresses does not exist yet")
		}
	}
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Monitoring objects need CRDs a bare cluster lacks, so the defaults
// render none: `kubectl apply --server-side --dry-run=server` of the
// defaults passes on a cluster without the Prometheus Operator.
func TestDefaultsNeedNoCRDs(t *testing.T) {
	for _, o := range render(t, "egressvip", "egressvip") {
		if gvk := o.GetObjectKind().GroupVersionKind(); gvk.Group == monitoringGV.Group {
			t.Errorf("default values render a %s, which needs the Prometheus Operator's CRDs", gvk.Kind)
		}
	}
}

func TestPrometheusServerOff(t *testing.T) {
	ds := only[*appsv1.DaemonSet](t, render(t, "egressvip", "egressvip", "--set",
		"env.prometheus_server=off,livenessProbe.enabled=false,readinessProbe.enabled=false"))
	c := ds.Spec.Template.Spec.Containers[0]
	if len(c.Ports) != 0 || c.LivenessProbe != nil || c.ReadinessProbe != nil {
		t.Errorf("prometheus_server=off: want no ports and probes, got %v %v %v", c.Ports, c.LivenessProbe, c.ReadinessProbe)
	}
	ds = only[*appsv1.DaemonSet](t, render(t, "egressvip", "egressvip", "--set", "env.prometheus_server=0.0.0.0:9100"))
	c = ds.Spec.Template.Spec.Containers[0]
	if len(c.Ports) != 1 || c.Ports[0].ContainerPort != 9100 || c.LivenessProbe.HTTPGet.Port.IntValue() != 9100 || c.ReadinessProbe.HTTPGet.Port.IntValue() != 9100 {
		t.Errorf("prometheus_server=0.0.0.0:9100: ports %v, probes %v %v", c.Ports, c.LivenessProbe, c.ReadinessProbe)
	}
}

func TestImageDigest(t *testing.T) {
	ds := only[*appsv1.DaemonSet](t, render(t, "egressvip", "egressvip", "--set", "image.repository=registry.example/egressvip,image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"))
	if got := ds.Spec.Template.Spec.Containers[0].Image; got != "registry.example/egressvip@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" {
		t.Errorf("image %q", got)
	}
}

// Values that cannot work stop the render with a message that says why.
func TestRejectedValues(t *testing.T) {
	cases := []struct {
		name string
		set  string
		want string
	}{
		{"vip_nodename in env", "env.vip_nodename=node1", "vip_nodename comes from the downward API"},
		{"POD_NAMESPACE in envValueFrom", "envValueFrom.POD_NAMESPACE.fieldRef.fieldPath=metadata.name", "POD_NAMESPACE comes from the downward API"},
		{"env and envValueFrom", "envValueFrom.log_level.configMapKeyRef.name=x,envValueFrom.log_level.configMapKeyRef.key=y", "log_level is set in both env and envValueFrom"},
		{"probes without a port", "env.prometheus_server=off", "set livenessProbe.enabled and readinessProbe.enabled to false"},
		{"both monitors", "podMonitor.enabled=true,prometheus.serviceMonitor.enabled=true", "enable one"},
		{"no ServiceAccount name", "serviceAccount.create=false", "serviceAccount.name is required"},
		{"misspelt value", "podMonitr.enabled=true", "podMonitr"},
		{"env value not a scalar", "env.log_level.nested=x", "log_level"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runHelm(t, "template", "egressvip", ".", "--namespace", "egressvip", "--set", tc.set)
			if err == nil {
				t.Fatalf("--set %s rendered; want an error", tc.set)
			}
			if !strings.Contains(out, tc.want) {
				t.Errorf("--set %s: error %q does not say %q", tc.set, strings.TrimSpace(out), tc.want)
			}
		})
	}
}

// chartMeta is the part of Chart.yaml the version rule reads.
type chartMeta struct {
	Version    string `json:"version"`
	AppVersion string `json:"appVersion"`
}

// One version for chart and daemon: version is appVersion without its
// "v", and appVersion is the image tag manifests/ deploys.
func TestChartVersionFollowsApp(t *testing.T) {
	data, err := os.ReadFile("Chart.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var meta chartMeta
	if err := utilyaml.Unmarshal(data, &meta); err != nil {
		t.Fatal(err)
	}
	if meta.Version == "" || "v"+meta.Version != meta.AppVersion {
		t.Errorf("Chart.yaml version %q and appVersion %q: want version = appVersion without its v", meta.Version, meta.AppVersion)
	}
	ds := only[*appsv1.DaemonSet](t, manifestObjects(t, "daemonset.yaml"))
	image := ds.Spec.Template.Spec.Containers[0].Image
	if tag := image[strings.LastIndex(image, ":")+1:]; tag != meta.AppVersion {
		t.Errorf("manifests/daemonset.yaml deploys %s, Chart.yaml's appVersion is %s", image, meta.AppVersion)
	}
}

// The README's values table names every value of values.yaml.
func TestReadmeListsEveryValue(t *testing.T) {
	data, err := os.ReadFile("values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var values map[string]any
	if err := utilyaml.Unmarshal(data, &values); err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var missing []string
	for _, path := range leafPaths("", values) {
		if !bytes.Contains(readme, []byte("`"+path+"`")) {
			missing = append(missing, path)
		}
	}
	if len(missing) > 0 {
		t.Errorf("README.md's values table lacks %s", strings.Join(missing, ", "))
	}
}

// passedThrough are values the templates copy as they are (toYaml): the
// README names them, not their keys.
var passedThrough = map[string]bool{"securityContext": true, "updateStrategy": true, "resources": true, "labels": true}

// leafPaths lists the dotted paths of values that are not maps, of empty
// maps (which take user keys) and of maps passed through as they are.
func leafPaths(prefix string, v map[string]any) []string {
	var out []string
	for k, child := range v {
		p := k
		if prefix != "" {
			p = prefix + "." + k
		}
		if m, ok := child.(map[string]any); ok && len(m) > 0 && !passedThrough[k] {
			out = append(out, leafPaths(p, m)...)
			continue
		}
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}
