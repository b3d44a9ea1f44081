//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// startFlow starts a flow of UDP datagrams from p to the external host.
func startFlow(t *testing.T, p *sandbox.Pod, interval time.Duration) *sandbox.Flow {
	t.Helper()
	f, err := cluster.StartFlow(p, netip.AddrPortFrom(sandbox.ExternalAddr(false), sandbox.UDPPort), interval)
	if err != nil {
		t.Fatalf("start a flow from %s: %v", p.Name, err)
	}
	return f
}

// checkFlow fails t unless every datagram of the flow arrived with the
// wanted source and no gap was over one second.
func checkFlow(t *testing.T, r sandbox.FlowReport, during string) {
	t.Helper()
	if r.SendErr != nil {
		t.Errorf("sending %s: %v", during, r.SendErr)
	}
	if r.Arrived == 0 {
		t.Errorf("no datagram arrived %s", during)
	}
	if len(r.Wrong) > 0 {
		t.Errorf("%d datagrams left with another source %s, e.g. %v", len(r.Wrong), during, r.Wrong[:min(3, len(r.Wrong))])
	}
	if r.LongestGap > time.Second {
		t.Errorf("egress interrupted for %s %s", r.LongestGap.Round(time.Millisecond), during)
	}
}

// An API server outage: a Service no other node could serve keeps its
// datapath; one another node could serve gives its address up before its
// Lease could expire, so no address is ever held by two nodes.
func TestAPIServerOutage(t *testing.T) {
	pinnedLB, sharedLB := addr("203.0.113.120"), addr("203.0.113.121")
	node := cluster.Nodes[1]
	service(t, "outage-pinned", true, egressAnn(pinnedLB.String()))
	p := runPod(t, "outage-pinned", node)
	service(t, "outage-shared", false, map[string]string{annotations.LoadBalancerIPs: sharedLB.String()})
	waitServed(t, "outage-pinned", node, true, pinnedLB)
	eventually(t, 60*time.Second, "outage-shared served", func() (bool, string) {
		h := holders(sharedLB)
		return len(h) == 1, fmt.Sprint(h)
	})

	// The holder's last heartbeat the API server saw before the outage:
	// no other node can take the Service over before it plus the lease
	// duration.
	expiry := heartbeatExpiry(t, leaseHolder(t, "outage-shared"))

	f := startFlow(t, p, 20*time.Millisecond)
	// A renewal may land between the read above and the pause: that
	// only makes the real expiry later than the one checked.
	if err := cluster.PauseAPIServer(true); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			_ = cluster.PauseAPIServer(false)
		}
	}()
	// Twice the lease duration (5 s), watching the shared address.
	var released time.Time
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if released.IsZero() && len(holders(sharedLB)) == 0 {
			released = time.Now()
		}
	}
	pinnedHeld, sharedHolders := node.HasAddress(pinnedLB), holders(sharedLB)
	rules := node.SNATRulesFor(ns + "/outage-pinned")
	if err := cluster.PauseAPIServer(false); err != nil {
		t.Fatal(err)
	}
	resumed = true
	r := f.Stop(pinnedLB)
	record("API outage 10 s: pinned egress longest gap", r.LongestGap.Round(time.Millisecond).String())
	t.Logf("flow every 20 ms during a 10 s outage: %s", r)

	if !pinnedHeld || len(rules) == 0 {
		t.Errorf("pinned egress Service lost its datapath during the outage (address %v, rules %v)", pinnedHeld, rules)
	}
	checkFlow(t, r, "during the outage")
	if len(sharedHolders) != 0 || released.IsZero() {
		t.Errorf("a Service another node could serve kept its address through the outage on %v", sharedHolders)
	} else {
		margin := expiry.Sub(released)
		record("API outage: shared address released before its heartbeat could expire by", margin.Round(time.Millisecond).String())
		// The safety property itself: released after the Lease could
		// expire, the address could be held by two nodes at once.
		if margin <= 0 {
			t.Errorf("the shared address was released %s after its Lease could expire", -margin)
		}
	}
	// After the outage both are served again.
	waitServed(t, "outage-pinned", node, true, pinnedLB)
	eventually(t, 60*time.Second, "outage-shared served again", func() (bool, string) {
		h := holders(sharedLB)
		return len(h) == 1, fmt.Sprint(h)
	})
}

// Addresses and rules of a Service deleted while the daemon was down are
// removed when it starts again; a Service that still exists keeps working
// throughout.
func TestStaleStateRemovedOnStart(t *testing.T) {
	staleLB, keepLB := addr("203.0.113.122"), addr("203.0.113.123")
	node := cluster.Nodes[0]
	service(t, "stale", true, egressAnn(staleLB.String()))
	service(t, "stale-keep", true, egressAnn(keepLB.String()))
	runPod(t, "stale", node)
	keep := runPod(t, "stale-keep", node)
	waitServed(t, "stale", node, true, staleLB)
	waitServed(t, "stale-keep", node, true, keepLB)

	if _, err := cluster.StopDaemon(node, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Admin.CoreV1().Services(ns).Delete(ctx(t), "stale", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// Nothing removes them while the daemon is down.
	time.Sleep(time.Second)
	if !node.HasAddress(staleLB) || len(node.SNATRulesFor(ns+"/stale")) == 0 {
		t.Fatal("setup: the killed daemon's state vanished on its own")
	}
	f := startFlow(t, keep, 20*time.Millisecond)
	if err := cluster.StartDaemon(node); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "stale address and rules removed", func() (bool, string) {
		return !node.HasAddress(staleLB) && len(node.SNATRulesFor(ns+"/stale")) == 0, fmt.Sprint(node.SNATRulesFor(ns + "/stale"))
	})
	time.Sleep(time.Second)
	r := f.Stop(keepLB)
	t.Logf("flow of the remaining Service across the restart: %s", r)
	checkFlow(t, r, "for the remaining Service across the restart")
	waitServed(t, "stale-keep", node, true, keepLB)
}

// The manifests pass kubectl's client-side and server-side dry runs
// against the real API server.
func TestManifestsDryRun(t *testing.T) {
	dir := filepath.Join("..", "..", "manifests")
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"client", "server"} {
		out, err := cluster.Kubectl("apply", "--dry-run="+mode, "-f", abs)
		if err != nil {
			t.Errorf("kubectl apply --dry-run=%s -f manifests/: %v\n%s", mode, err, out)
		}
	}
}
