//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// flow sends a numbered UDP datagram from p every interval until stopped,
// and then reports what the external host saw.
type flow struct {
	prefix string
	stop   chan struct{}
	wg     sync.WaitGroup
	sent   int
}

func startFlow(t *testing.T, p *sandbox.Pod, interval time.Duration) *flow {
	t.Helper()
	conn, err := sandbox.OpenUDP(p, netip.AddrPortFrom(sandbox.ExternalAddr(false), sandbox.UDPPort))
	if err != nil {
		t.Fatal(err)
	}
	f := &flow{prefix: fmt.Sprintf("flow-%s-%d-", p.Name, time.Now().UnixNano()), stop: make(chan struct{})}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		defer conn.Close()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-f.stop:
				return
			case <-tick.C:
				_, _ = conn.Write([]byte(fmt.Sprintf("%s%d", f.prefix, f.sent)))
				f.sent++
			}
		}
	}()
	return f
}

// end stops the flow and returns the longest gap between arrivals and the
// datagrams that arrived from another source than want.
func (f *flow) end(want netip.Addr) (longest time.Duration, arrived int, wrong []string) {
	close(f.stop)
	f.wg.Wait()
	time.Sleep(300 * time.Millisecond)
	hits := cluster.External.HitsWithPrefix(f.prefix)
	for i, h := range hits {
		if h.Source != want {
			wrong = append(wrong, fmt.Sprintf("%s from %s", h.Payload, h.Source))
		}
		if i > 0 {
			longest = max(longest, h.At.Sub(hits[i-1].At))
		}
	}
	return longest, len(hits), wrong
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

	f := startFlow(t, p, 20*time.Millisecond)
	if err := cluster.PauseAPIServer(true); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			_ = cluster.PauseAPIServer(false)
		}
	}()
	// Twice the lease duration (5 s).
	time.Sleep(10 * time.Second)
	pinnedHeld, sharedHolders := node.HasAddress(pinnedLB), holders(sharedLB)
	rules := node.SNATRulesFor(ns + "/outage-pinned")
	if err := cluster.PauseAPIServer(false); err != nil {
		t.Fatal(err)
	}
	resumed = true
	longest, arrived, wrong := f.end(pinnedLB)
	record("API outage 10 s: pinned egress longest gap", longest.Round(time.Millisecond).String())
	t.Logf("during a 10 s outage: %d/%d datagrams arrived, longest gap %s", arrived, f.sent, longest.Round(time.Millisecond))

	if !pinnedHeld || len(rules) == 0 {
		t.Errorf("pinned egress Service lost its datapath during the outage (address %v, rules %v)", pinnedHeld, rules)
	}
	if len(wrong) > 0 {
		t.Errorf("%d datagrams left with another source during the outage, e.g. %v", len(wrong), wrong[:min(3, len(wrong))])
	}
	if longest > time.Second {
		t.Errorf("egress interrupted for %s during the outage", longest)
	}
	if len(sharedHolders) != 0 {
		t.Errorf("a Service another node could serve kept its address through the outage on %v", sharedHolders)
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
	longest, _, wrong := f.end(keepLB)
	if len(wrong) > 0 || longest > time.Second {
		t.Errorf("the remaining Service was disturbed by the restart: longest gap %s, wrong sources %v", longest, wrong)
	}
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
