//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/helmtool"
)

// The Helm chart installs into the sandbox cluster (server-side apply of
// what `helm template` renders), and the DaemonSet it renders runs the
// daemons: every node restarts with the chart's environment, and a
// Service is served.
func TestHelmChartInstallsAndRuns(t *testing.T) {
	helm, err := helmtool.EnsureHelm()
	if err != nil {
		t.Fatalf("helm: %v", err)
	}
	chart := filepath.Join(repoRoot(t), "charts", "egressvip")
	out, err := exec.Command(helm, "template", "egressvip", chart, "--namespace", daemonNS,
		"--set", "env.vip_servicesinterface=eth1", "--set", "env.log_level=debug").CombinedOutput()
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, out)
	}
	file := filepath.Join(t.TempDir(), "chart.yaml")
	if err := os.WriteFile(file, out, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := cluster.Kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", file); err != nil {
		t.Fatalf("server-side apply of the chart: %v\n%s", err, got)
	}
	ds := renderedDaemonSet(t, out)
	for _, n := range cluster.Nodes {
		env, err := cluster.DaemonSetEnv(n, ds)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cluster.StopDaemon(n, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := cluster.StartDaemonWith(n, cluster.DaemonBinary(), env); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, n := range cluster.Nodes {
			_, _ = cluster.StopDaemon(n, syscall.SIGTERM)
			if err := cluster.StartDaemon(n); err != nil {
				t.Error(err)
			}
		}
	})
	lb := addr("203.0.113.185")
	service(t, "from-chart", false, map[string]string{annotations.LoadBalancerIPs: lb.String()})
	waitHolder(t, lb)
	eventually(t, 30*time.Second, "the daemons run from the chart are ready", func() (bool, string) {
		for _, n := range cluster.Nodes {
			if body := httpGet(t, n, "/readyz"); !strings.HasPrefix(body, "ok") {
				return false, n.Name + ": " + body
			}
		}
		return true, ""
	})
	record("Helm chart", "installed by server-side apply; its DaemonSet's environment runs the daemons")
}

// renderedDaemonSet finds the DaemonSet in a rendered chart.
func renderedDaemonSet(t *testing.T, rendered []byte) *appsv1.DaemonSet {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(rendered)))
	for {
		doc, err := r.Read()
		if err != nil {
			break
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			continue
		}
		if ds, ok := obj.(*appsv1.DaemonSet); ok {
			return ds
		}
	}
	t.Fatal("no DaemonSet in the rendered chart")
	return nil
}

func repoRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("repository root: %v", err)
	}
	return strings.TrimSpace(string(out))
}
