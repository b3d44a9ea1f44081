//go:build e2e

package e2e

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files of egressvip explain")

// egressvip explain against the sandbox, compared with golden files
// (testdata/explain-*.txt; -update rewrites them), for a served Service, a
// refused address, a skipped endpoint and a Service no node may hold.
func TestExplainGolden(t *testing.T) {
	n1, n2 := cluster.Nodes[0], cluster.Nodes[1]
	ns := "explain"
	createNamespace(t, ns)

	// Served: two replicas, one steered.
	createService(t, ns, "served", true, egressAnn("203.0.113.186", annotations.EgressDestinationPorts, "udp:5060"))
	runNamed(t, ns, "served", "served-0", n1)
	runNamed(t, ns, "served", "served-1", n2)
	waitHolder(t, addr("203.0.113.186"))

	// A refused address: a Node's.
	createService(t, ns, "refused", false, map[string]string{annotations.LoadBalancerIPs: n2.IP4.String()})

	// A skipped endpoint: a hand-written slice naming an address that is
	// no pod of the namespace.
	createServiceObj(t, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "skipped", Annotations: egressAnn("203.0.113.187")},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyCluster,
			Ports: []corev1.ServicePort{{Name: "sip", Port: 5060, Protocol: corev1.ProtocolUDP}}},
	})
	ready, node := true, n1.Name
	if _, err := cluster.Admin.DiscoveryV1().EndpointSlices(ns).Create(ctx(t), &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: "skipped-hand", Labels: map[string]string{discoveryv1.LabelServiceName: "skipped"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.250.9"}, NodeName: &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: "ghost"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitHolder(t, addr("203.0.113.187"))

	// No eligible node: Local policy, no pod.
	createService(t, ns, "nobody", true, egressAnn("203.0.113.188"))
	time.Sleep(2 * time.Second)

	for _, name := range []string{"served", "refused", "skipped", "nobody"} {
		t.Run(name, func(t *testing.T) {
			var out string
			eventually(t, 30*time.Second, "explain "+name, func() (bool, string) {
				var err error
				out, err = cluster.Explain(ns+"/"+name, "--no-age", "--no-kernel")
				return err == nil, out
			})
			got := maskExplain(out)
			file := filepath.Join("testdata", "explain-"+name+".txt")
			if *updateGolden {
				if err := os.MkdirAll("testdata", 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(file)
			if err != nil {
				t.Fatalf("%v (run with -update to write it)", err)
			}
			if got != string(want) {
				t.Errorf("explain %s/%s differs from %s:\n--- got\n%s\n--- want\n%s", ns, name, file, got, want)
			}
		})
	}
}

// runNamed runs a Ready pod of app with a fixed name.
func runNamed(t *testing.T, namespace, app, name string, node *sandbox.Node) {
	t.Helper()
	p, err := cluster.RunPod(ctx(t), namespace, name, node, map[string]string{"app": app})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cluster.DeletePod(ctx(t), p) })
}

// maskExplain keeps what a run cannot change: which node holds an address
// (a rank), the pod ranges node-ipam handed out and the routing-table
// numbers are the same on every run. Pod addresses depend on the pods the
// scenarios before made: each becomes <pod-N>, numbered in order of
// appearance; UIDs become <uid>; trailing spaces go, and columns are
// separated by two spaces.
func maskExplain(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		out = append(out, strings.TrimRight(l, " "))
	}
	s = uidRe.ReplaceAllString(strings.Join(out, "\n"), "<uid>")
	seen := map[string]string{}
	s = podIPRe.ReplaceAllStringFunc(s, func(a string) string {
		if strings.Contains(a, "/") {
			return a // a pod range
		}
		if _, ok := seen[a]; !ok {
			seen[a] = fmt.Sprintf("<pod-%d>", len(seen)+1)
		}
		return seen[a]
	})
	// Column widths follow the addresses' lengths: two spaces between
	// columns, whatever their widths.
	s = columnsRe.ReplaceAllString(s, "  ")
	return strings.TrimSpace(s) + "\n"
}

var (
	uidRe     = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`)
	columnsRe = regexp.MustCompile(`  +`)
	podIPRe   = regexp.MustCompile(`10\.244\.[0-9]+\.[0-9]+(/[0-9]+)?|fd00:10:244:[0-9a-f:]*(/[0-9]+)?`)
)
