//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// previousRelease is the last commit before the heartbeat design: one
// client-go leader elector per Service, Leases without labels.
const previousRelease = "dfe6cad"

// A rolling upgrade of the DaemonSet from the previous release, node by
// node, then a rollback the same way, with 20 Services (10 of
// externalTrafficPolicy Cluster, 10 egress Services of Local policy with a
// pod each): no address is ever on two nodes, and every one ends held by
// one node.
func TestRollingUpgradeAndRollback(t *testing.T) {
	old, err := sandbox.BuildRelease(previousRelease)
	if err != nil {
		t.Fatalf("build the previous release: %v", err)
	}
	if err := cluster.ApplyReleaseRBAC(ctx(t), previousRelease); err != nil {
		t.Fatal(err)
	}
	oldEnv := map[*sandbox.Node][]string{}
	for _, n := range cluster.Nodes {
		env, err := cluster.ReleaseDaemonEnv(n, previousRelease)
		if err != nil {
			t.Fatal(err)
		}
		oldEnv[n] = env
	}
	runOld := func(n *sandbox.Node) {
		t.Helper()
		if code, err := cluster.StopDaemon(n, syscall.SIGTERM); err != nil || code != 0 {
			t.Fatalf("stop egressvip on %s: exit %d, %v", n.Name, code, err)
		}
		if err := cluster.StartDaemonWith(n, old, oldEnv[n]); err != nil {
			t.Fatal(err)
		}
	}
	runNew := func(n *sandbox.Node) {
		t.Helper()
		if code, err := cluster.StopDaemon(n, syscall.SIGTERM); err != nil || code != 0 {
			t.Fatalf("stop the previous release on %s: exit %d, %v", n.Name, code, err)
		}
		if err := cluster.StartDaemon(n); err != nil {
			t.Fatal(err)
		}
	}
	// Whatever happens, every node runs the current build again at the
	// end.
	t.Cleanup(func() {
		for _, n := range cluster.Nodes {
			_, _ = cluster.StopDaemon(n, syscall.SIGTERM)
			if err := cluster.StartDaemon(n); err != nil {
				t.Error(err)
			}
		}
	})

	// The cluster runs the previous release.
	for _, n := range cluster.Nodes {
		runOld(n)
	}
	var ips []netip.Addr
	for i := range 10 {
		ip := addr(fmt.Sprintf("203.0.113.%d", 200+i))
		ips = append(ips, ip)
		service(t, fmt.Sprintf("upgrade-cluster-%d", i), false, map[string]string{annotations.LoadBalancerIPs: ip.String()})
	}
	for i := range 10 {
		ip := addr(fmt.Sprintf("203.0.113.%d", 210+i))
		ips = append(ips, ip)
		name := fmt.Sprintf("upgrade-local-%d", i)
		service(t, name, true, egressAnn(ip.String()))
		runPod(t, name, cluster.Nodes[i%len(cluster.Nodes)])
	}
	// Every address is held by one node again, each at some moment: not
	// all at once, since the previous release alone flaps (see below).
	// The sampler counts what matters, an address on two nodes.
	allHeld := func(what string) {
		t.Helper()
		seen := map[netip.Addr]bool{}
		eventually(t, 90*time.Second, what, func() (bool, string) {
			var missing []string
			for _, ip := range ips {
				if h := holders(ip); len(h) == 1 {
					seen[ip] = true
				}
				if !seen[ip] {
					missing = append(missing, fmt.Sprintf("%s on %v", ip, holders(ip)))
				}
			}
			return len(missing) == 0, strings.Join(missing, ", ")
		})
	}
	allHeld("the previous release serves all 20 addresses")

	s := cluster.StartSampler(sampleEvery, 0, ips...)
	start := time.Now()
	for _, n := range cluster.Nodes {
		runNew(n)
		allHeld("every address held after " + n.Name + " was upgraded")
		time.Sleep(3 * time.Second)
	}
	upgraded := time.Since(start)
	for _, n := range cluster.Nodes {
		runOld(n)
		allHeld("every address held after " + n.Name + " was rolled back")
		time.Sleep(3 * time.Second)
	}
	r := s.Stop()
	noDoubles(t, "rolling upgrade from the previous release and rollback (20 Services)", r, ips...)
	changes := 0
	for _, ip := range ips {
		changes += len(r.Of(ip).Changes)
	}
	// Most changes are the previous release's own: its per-Service
	// electors renew through client-go's default rate limit and miss
	// their deadlines with 20 Services on a node.
	record("rolling upgrade and rollback: holder changes over 20 addresses", fmt.Sprintf("%d (upgrade took %s; the previous release alone flaps)", changes, upgraded.Round(time.Second)))
	t.Logf("rolling upgrade and rollback: %s", r.String())
}
