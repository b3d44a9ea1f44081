//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// sampler samples, every 10 ms, which nodes hold an address.
type sampler struct {
	ip netip.Addr
	s  *sandbox.Sampler
}

func sample(ip netip.Addr) *sampler {
	// Bounded: at most 10 minutes of samples.
	return &sampler{ip: ip, s: cluster.StartSampler(10*time.Millisecond, 10*time.Minute, ip)}
}

// end stops sampling and fails the test if the address was ever on two
// nodes at once.
func (s *sampler) end(t *testing.T, during string) {
	t.Helper()
	r := s.s.Stop()
	a := r.Of(s.ip)
	t.Logf("%s: %s (%d rounds, slowest %s, %d late)", during, a, r.Rounds, r.Slowest.Round(time.Microsecond), r.Late)
	if r.Err != nil {
		t.Errorf("%s: %d sampling rounds failed, first: %v", during, r.Errors, r.Err)
	}
	if len(a.Double) > 0 {
		t.Errorf("%s: %s was on two nodes at once in %d samples: %v", during, s.ip, len(a.Double), a.Double)
	}
	if a.Samples < 10 {
		t.Errorf("%s: only %d samples; the check proves nothing", during, a.Samples)
	}
}

// The holder's daemon is killed and its copy of the address goes with it
// (a node that died): another node binds the address within the lease
// duration plus one second.
func TestFailoverWhenTheHolderDies(t *testing.T) {
	lb := addr("203.0.113.130")
	service(t, "failover", false, map[string]string{annotations.LoadBalancerIPs: lb.String()})
	holder := waitHolder(t, lb)
	if _, err := cluster.StopDaemon(holder, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	// The node is gone with its daemon: nothing answers for the
	// address there any more.
	if _, err := sandbox.InNS(holder.NS, "ip", "addr", "del", lb.String()+"/32", "dev", "eth1"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cluster.StartDaemon(holder); err != nil {
			t.Error(err)
		}
		// The node comes back and leaves the address where it is.
		eventually(t, 30*time.Second, "the address stays with the new holder", func() (bool, string) {
			h := holders(lb)
			return len(h) == 1 && h[0] != holder.Name, fmt.Sprint(h)
		})
	})
	var took time.Duration
	eventually(t, 30*time.Second, "another node takes over", func() (bool, string) {
		for _, n := range cluster.Nodes {
			if n != holder && n.HasAddress(lb) {
				took = time.Since(killed)
				return true, ""
			}
		}
		return false, "no other node"
	})
	record("failover after the holder died", took.Round(time.Millisecond).String())
	t.Logf("failover: another node bound %s %s after the holder died", lb, took.Round(time.Millisecond))
	if limit := 5*time.Second + time.Second; took > limit {
		t.Errorf("failover took %s, want at most the lease duration plus 1 s (%s)", took, limit)
	}
}

// The holder is cut off from the API server, the rest of the cluster is
// not: it gives the address up before its heartbeat can expire, another
// node takes over after, and the address is never on two nodes.
func TestHolderCutOffFromTheAPI(t *testing.T) {
	lb := addr("203.0.113.131")
	service(t, "cutoff", false, map[string]string{annotations.LoadBalancerIPs: lb.String()})
	holder := waitHolder(t, lb)
	s := sample(lb)
	expiry := heartbeatExpiry(t, holder.Name)
	if err := cluster.CutAPI(holder, true); err != nil {
		t.Fatal(err)
	}
	restored := false
	defer func() {
		if !restored {
			_ = cluster.CutAPI(holder, false)
		}
	}()
	var released time.Time
	eventually(t, 30*time.Second, "the cut-off holder gives the address up", func() (bool, string) {
		if !holder.HasAddress(lb) {
			released = time.Now()
			return true, ""
		}
		return false, "still bound"
	})
	margin := expiry.Sub(released)
	record("holder cut off: address released before its heartbeat could expire by", margin.Round(time.Millisecond).String())
	if margin <= 0 {
		t.Errorf("the cut-off holder released the address %s after its heartbeat could expire", -margin)
	}
	var newHolder string
	eventually(t, 30*time.Second, "another node takes over", func() (bool, string) {
		h := holders(lb)
		if len(h) == 1 && h[0] != holder.Name {
			newHolder = h[0]
			return true, ""
		}
		return false, fmt.Sprint(h)
	})
	if err := cluster.CutAPI(holder, false); err != nil {
		t.Fatal(err)
	}
	restored = true
	// Sticky: the node that comes back does not take the address back.
	time.Sleep(3 * time.Second)
	s.end(t, "holder cut off and back")
	if h := holders(lb); len(h) != 1 || h[0] != newHolder {
		t.Errorf("after the cut-off node came back the address is on %v, want %s only", h, newHolder)
	}
	if h := leaseHolder(t, "cutoff"); h != newHolder {
		t.Errorf("Lease names %q, want %s", h, newHolder)
	}
}

// Pod moves and a rolling update with two replicas: the address follows
// the pods and is never on two nodes at once.
func TestMovesAndRollingUpdateNeverDoubleBind(t *testing.T) {
	lb := addr("203.0.113.132")
	service(t, "rolling", true, egressAnn(lb.String()))
	n1, n2, n3 := cluster.Nodes[0], cluster.Nodes[1], cluster.Nodes[2]
	s := sample(lb)
	p := runPod(t, "rolling", n1)
	waitServed(t, "rolling", n1, true, lb)
	// Two moves.
	for _, to := range []*sandbox.Node{n2, n3} {
		if err := cluster.DeletePod(ctx(t), p); err != nil {
			t.Fatal(err)
		}
		p = runPod(t, "rolling", to)
		waitServed(t, "rolling", to, true, lb)
	}
	// Two replicas, then a rolling update: a new pod starts before an
	// old one goes, one at a time.
	second := runPod(t, "rolling", n1)
	time.Sleep(500 * time.Millisecond)
	for _, step := range []struct {
		old *sandbox.Pod
		on  *sandbox.Node
	}{{p, n2}, {second, n1}} {
		fresh := runPod(t, "rolling", step.on)
		time.Sleep(300 * time.Millisecond)
		if err := cluster.DeletePod(ctx(t), step.old); err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		_ = fresh
	}
	eventually(t, 30*time.Second, "one holder with a local pod", func() (bool, string) {
		h := holders(lb)
		return len(h) == 1 && (h[0] == n1.Name || h[0] == n2.Name), fmt.Sprint(h)
	})
	s.end(t, "moves and rolling update")
	holder := holders(lb)[0]
	if l := leaseHolder(t, "rolling"); l != holder {
		t.Errorf("Lease names %q, address on %s", l, holder)
	}
}

// A stopped daemon hands its Cluster-policy Services over at once: the
// heartbeat says it is draining, the Lease is released after the address
// is removed, and the next node in rank acquires on the watch event.
func TestSigtermHandoverIsFast(t *testing.T) {
	lb := addr("203.0.113.133")
	service(t, "fast-handover", false, map[string]string{annotations.LoadBalancerIPs: lb.String()})
	leader := waitHolder(t, lb)
	s := sample(lb)
	code, err := cluster.StopDaemon(leader, syscall.SIGTERM)
	if err != nil || code != 0 {
		t.Fatalf("SIGTERM: exit %d, %v", code, err)
	}
	stopped := time.Now()
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			if err := cluster.StartDaemon(leader); err != nil {
				t.Error(err)
			}
		}
	})
	var took time.Duration
	eventually(t, 30*time.Second, "another node takes over", func() (bool, string) {
		h := holders(lb)
		if len(h) == 1 && h[0] != leader.Name {
			took = time.Since(stopped)
			return true, ""
		}
		return false, fmt.Sprint(h)
	})
	record("SIGTERM handover after the daemon exited", took.Round(time.Millisecond).String())
	t.Logf("SIGTERM handover: %s after the old holder's process exited", took.Round(time.Millisecond))
	time.Sleep(time.Second)
	s.end(t, "SIGTERM handover")
	// The restarted daemon does not take it back (sticky).
	restarted = true
	if err := cluster.StartDaemon(leader); err != nil {
		t.Fatal(err)
	}
	newHolder := holders(lb)
	time.Sleep(3 * time.Second)
	if h := holders(lb); fmt.Sprint(h) != fmt.Sprint(newHolder) {
		t.Errorf("the address moved from %v to %v when the old holder came back", newHolder, h)
	}
	// The Service Lease names its node and its heartbeat; it is never
	// renewed, so its resourceVersion stays put while nothing changes.
	l1, err := cluster.Admin.CoordinationV1().Leases(ns).Get(ctx(t), election.LeaseName("fast-handover"), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	l2, err := cluster.Admin.CoordinationV1().Leases(ns).Get(ctx(t), election.LeaseName("fast-handover"), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l1.ResourceVersion != l2.ResourceVersion {
		t.Errorf("the Service Lease was written while nothing changed (%s -> %s)", l1.ResourceVersion, l2.ResourceVersion)
	}
	if !slices.ContainsFunc(l2.OwnerReferences, func(o metav1.OwnerReference) bool { return o.Kind == "Service" && o.Name == "fast-handover" }) {
		t.Errorf("the Lease has no ownerReference to its Service: %+v", l2.OwnerReferences)
	}
}
