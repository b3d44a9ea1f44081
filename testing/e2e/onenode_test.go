//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// Scenarios of "an address is on one node at a time": every one samples
// the addresses of all nodes every 10 ms and prints how many samples had
// an address on two nodes (must be 0).

const sampleEvery = 10 * time.Millisecond

// noDoubles fails the test when an address was on two nodes in any sample
// and records the count for the summary.
func noDoubles(t *testing.T, figure string, r sandbox.SamplerReport, ips ...netip.Addr) {
	t.Helper()
	doubles := 0
	for _, ip := range ips {
		a := r.Of(ip)
		doubles += len(a.Double)
		if len(a.Double) > 0 {
			t.Errorf("%s: %s was on two nodes in %d samples, first %v", figure, ip, len(a.Double), a.Double[0])
		}
		if a.Samples < 10 {
			t.Errorf("%s: only %d samples of %s; the check proves nothing", figure, a.Samples, ip)
		}
	}
	record(figure+": samples with an address on two nodes", fmt.Sprintf("%d of %d rounds (%s)", doubles, r.Rounds, r.Interval))
	t.Logf("%s: %s", figure, r.String())
}

// Two Services of one namespace share an address (TCP and UDP of one
// server), externalTrafficPolicy Cluster: one node holds it, both
// Services report that node, for 60 s.
func TestSharedAddressIsOnOneNode(t *testing.T) {
	ips := []netip.Addr{addr("203.0.113.190"), addr("203.0.113.191"), addr("203.0.113.192")}
	for i, ip := range ips {
		for _, proto := range []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP} {
			name := fmt.Sprintf("shared-%d-%s", i, strings.ToLower(string(proto)))
			service(t, name, false, map[string]string{annotations.LoadBalancerIPs: ip.String()}, func(s *corev1.Service) {
				s.Spec.Ports = []corev1.ServicePort{{Name: "dns", Port: 53, Protocol: proto}}
			})
		}
	}
	for _, ip := range ips {
		waitHolder(t, ip)
	}
	s := cluster.StartSampler(sampleEvery, 0, ips...)
	time.Sleep(60 * time.Second)
	r := s.Stop()
	noDoubles(t, "shared address (TCP+UDP, Cluster policy, 60 s)", r, ips...)
	for i, ip := range ips {
		h := holders(ip)
		if len(h) != 1 {
			t.Fatalf("%s held by %v", ip, h)
		}
		for _, proto := range []string{"tcp", "udp"} {
			name := fmt.Sprintf("shared-%d-%s", i, strings.ToLower(string(proto)))
			eventually(t, 30*time.Second, name+" reports its holder", func() (bool, string) {
				svc := getService(t, name)
				return svc.Annotations[annotations.VIPHost] == h[0], svc.Annotations[annotations.VIPHost]
			})
			if l := leaseHolder(t, name); l != h[0] {
				t.Errorf("%s: Service Lease names %q, the address is on %s", name, l, h[0])
			}
		}
	}
}

// lifecycleFigures measures, after the holder stopped renewing, when its
// address left it and when another node held it; the first must come
// before the second, the second within the lease duration plus 1 s.
func lifecycleFigures(t *testing.T, figure string, ip netip.Addr, dead *sandbox.Node, since time.Time) (gone, taken time.Duration) {
	t.Helper()
	eventually(t, 30*time.Second, "another node holds "+ip.String(), func() (bool, string) {
		h := holders(ip)
		if gone == 0 && !slices.Contains(h, dead.Name) {
			gone = time.Since(since)
		}
		if len(h) == 1 && h[0] != dead.Name {
			taken = time.Since(since)
			return true, ""
		}
		return false, fmt.Sprint(h)
	})
	record(figure+": address gone from the old holder", gone.Round(time.Millisecond).String())
	record(figure+": another node holds it", taken.Round(time.Millisecond).String())
	t.Logf("%s: gone from %s after %s, held elsewhere after %s", figure, dead.Name, gone.Round(time.Millisecond), taken.Round(time.Millisecond))
	if gone == 0 || gone >= taken {
		t.Errorf("%s: the old holder's address went after %s, not before another node took it (%s)", figure, gone, taken)
	}
	if limit := 5*time.Second + time.Second; taken > limit {
		t.Errorf("%s: takeover after %s, want at most the lease duration plus 1 s (%s)", figure, taken, limit)
	}
	return gone, taken
}

// The holder's daemon is SIGKILLed and not restarted for 30 s: its address
// leaves the kernel by itself (its lifetime runs out), before another node
// takes it over.
func TestKilledHolderIsFencedByTheKernel(t *testing.T) {
	lb := addr("203.0.113.193")
	service(t, "killed", false, map[string]string{annotations.LoadBalancerIPs: lb.String()})
	holder := waitHolder(t, lb)
	s := cluster.StartSampler(sampleEvery, 0, lb)
	if _, err := cluster.StopDaemon(holder, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	t.Cleanup(func() {
		if err := cluster.StartDaemon(holder); err != nil {
			t.Error(err)
		}
	})
	lifecycleFigures(t, "holder SIGKILLed", lb, holder, killed)
	time.Sleep(time.Until(killed.Add(30 * time.Second)))
	noDoubles(t, "holder SIGKILLed, 30 s", s.Stop(), lb)
}

// The holder's daemon is frozen (SIGSTOP) for 30 s, then continued: the
// kernel drops its address before another node takes it, and the node
// that wakes up does not bind it again.
func TestFrozenHolderIsFencedByTheKernel(t *testing.T) {
	lb := addr("203.0.113.194")
	service(t, "frozen", false, map[string]string{annotations.LoadBalancerIPs: lb.String()})
	holder := waitHolder(t, lb)
	s := cluster.StartSampler(sampleEvery, 0, lb)
	if err := cluster.SignalDaemon(holder, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	continued := false
	t.Cleanup(func() {
		if !continued {
			_ = cluster.SignalDaemon(holder, syscall.SIGCONT)
		}
	})
	_, taken := lifecycleFigures(t, "holder frozen (SIGSTOP)", lb, holder, stopped)
	time.Sleep(time.Until(stopped.Add(30 * time.Second)))
	if err := cluster.SignalDaemon(holder, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	continued = true
	// Awake again: it must not bind the address back.
	time.Sleep(5 * time.Second)
	noDoubles(t, "holder frozen 30 s and continued", s.Stop(), lb)
	if h := holders(lb); len(h) != 1 || h[0] == holder.Name {
		t.Errorf("after the frozen holder continued, %s is on %v", lb, h)
	}
	_ = taken
}

// The holder of a pinned Service (externalTrafficPolicy Local, its only
// pod there) is cut off from the API server, keeps the address (no other
// node could serve it), and meanwhile the pod is deleted and created on
// another node, as an eviction would: the new node takes the address over
// after probing the wire; the cut-off node hears the probe, knows its own
// claim is stale and steps down; never are both holding it.
func TestCutOffHolderStepsDownWhenThePodMoves(t *testing.T) {
	lb := addr("203.0.113.195")
	n1, n2 := cluster.Nodes[0], cluster.Nodes[1]
	service(t, "evicted", true, egressAnn(lb.String()))
	p := runPod(t, "evicted", n1)
	waitServed(t, "evicted", n1, true, lb)
	s := cluster.StartSampler(sampleEvery, 0, lb)
	if err := cluster.CutAPI(n1, true); err != nil {
		t.Fatal(err)
	}
	restored := false
	t.Cleanup(func() {
		if !restored {
			_ = cluster.CutAPI(n1, false)
		}
	})
	// Kept through the outage: no other node could serve it.
	time.Sleep(6 * time.Second)
	if !n1.HasAddress(lb) {
		t.Fatalf("the cut-off holder gave a pinned address up")
	}
	// The eviction: the pod goes, a new one runs on node-2.
	if err := cluster.DeletePod(ctx(t), p); err != nil {
		t.Fatal(err)
	}
	moved := time.Now()
	runPod(t, "evicted", n2)
	eventually(t, 30*time.Second, "node-2 holds the address", func() (bool, string) {
		h := holders(lb)
		return len(h) == 1 && h[0] == n2.Name, fmt.Sprint(h)
	})
	took := time.Since(moved)
	if err := cluster.CutAPI(n1, false); err != nil {
		t.Fatal(err)
	}
	restored = true
	time.Sleep(3 * time.Second)
	r := s.Stop()
	noDoubles(t, "cut-off holder, pod rescheduled", r, lb)
	record("cut-off holder, pod rescheduled: new node holds the address", took.Round(time.Millisecond).String())
	if h := holders(lb); len(h) != 1 || h[0] != n2.Name {
		t.Errorf("after the cut-off node came back, %s is on %v", lb, h)
	}
}

// A heartbeat and a Service Lease deleted by hand: no holder change, no
// unbind; both are written again.
func TestHandDeletedLeasesChangeNothing(t *testing.T) {
	lb := addr("203.0.113.196")
	service(t, "deleted-leases", false, map[string]string{annotations.LoadBalancerIPs: lb.String()})
	holder := waitHolder(t, lb)
	s := cluster.StartSampler(sampleEvery, 0, lb)
	leases := cluster.Admin.CoordinationV1()
	for _, key := range []struct{ ns, name string }{
		{daemonNS, election.HeartbeatName(holder.Name)},
		{ns, election.LeaseName("deleted-leases")},
	} {
		if err := leases.Leases(key.ns).Delete(ctx(t), key.name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, 30*time.Second, key.name+" written again", func() (bool, string) {
			_, err := leases.Leases(key.ns).Get(ctx(t), key.name, metav1.GetOptions{})
			return err == nil, fmt.Sprint(err)
		})
	}
	time.Sleep(8 * time.Second)
	r := s.Stop()
	noDoubles(t, "heartbeat and Service Lease deleted by hand", r, lb)
	a := r.Of(lb)
	if len(a.Changes) != 0 || a.None != 0 {
		t.Errorf("the address changed holders %d times and was on no node in %d samples after its Leases were deleted", len(a.Changes), a.None)
	}
	if h := leaseHolder(t, "deleted-leases"); h != holder.Name {
		t.Errorf("the Service Lease names %q, want %s", h, holder.Name)
	}
}

// An address that cannot be bound on a node (IPv6 disabled on its
// serviceInterface) affects its Service alone: it gets an ApplyFailed
// Warning, and every other Service of that node still gets its status and
// still fails over.
func TestUnbindableAddressAffectsItsServiceAlone(t *testing.T) {
	n1, n2 := cluster.Nodes[0], cluster.Nodes[1]
	if _, err := sandbox.InNS(n1.NS, "sysctl", "-qw", "net.ipv6.conf.eth1.disable_ipv6=1"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Enabling IPv6 again does not bring the node's own IPv6
		// address back: later scenarios need it.
		if _, err := sandbox.InNS(n1.NS, "sysctl", "-qw", "net.ipv6.conf.eth1.disable_ipv6=0"); err != nil {
			t.Error(err)
		}
		if err := cluster.RestoreNodeAddresses(n1); err != nil {
			t.Error(err)
		}
	})
	bad := addr("2001:db8:1::197")
	good := addr("203.0.113.197")
	service(t, "unbindable", true, map[string]string{annotations.LoadBalancerIPs: bad.String()})
	service(t, "bindable", true, egressAnn(good.String()))
	runPod(t, "unbindable", n1)
	p := runPod(t, "bindable", n1)
	waitServed(t, "bindable", n1, true, good)
	waitEvent(t, "unbindable", "ApplyFailed", bad.String())
	eventually(t, 30*time.Second, "bindable reports its address", func() (bool, string) {
		svc := getService(t, "bindable")
		ing := svc.Status.LoadBalancer.Ingress
		return len(ing) == 1 && ing[0].IP == good.String(), fmt.Sprint(ing)
	})
	// The bindable Service still fails over: its pod moves to node-2.
	if _, err := cluster.MovePod(ctx(t), p, "bindable-moved", n2); err != nil {
		t.Fatal(err)
	}
	waitServed(t, "bindable", n2, true, good)
	eventually(t, 30*time.Second, "bindable reports node-2", func() (bool, string) {
		svc := getService(t, "bindable")
		return svc.Annotations[annotations.VIPHost] == n2.Name, svc.Annotations[annotations.VIPHost]
	})
	if n1.HasAddress(bad) {
		t.Errorf("node-1 holds %s with IPv6 disabled", bad)
	}
}

// A namespace admin's sequence of edits cannot take another namespace's
// address: the claim is recorded on the address Lease, which they cannot
// write, and a stale status counts for nothing.
func TestClaimSequenceCannotTakeAnAddress(t *testing.T) {
	lb := addr("203.0.113.198")
	n1 := cluster.Nodes[0]
	for _, n := range []string{"claim-attacker", "claim-victim"} {
		createNamespace(t, n)
	}
	// The attacker is served with the address first.
	createService(t, "claim-attacker", "x", true, egressAnn(lb.String()))
	ap := runPodIn(t, "claim-attacker", "x", n1)
	waitHolder(t, lb)
	eventually(t, 30*time.Second, "the attacker's status shows the address", func() (bool, string) {
		svc, _ := cluster.Admin.CoreV1().Services("claim-attacker").Get(ctx(t), "x", metav1.GetOptions{})
		return svc != nil && len(svc.Status.LoadBalancer.Ingress) == 1, ""
	})
	// Scale to 0, move the annotation away.
	if err := cluster.DeletePod(ctx(t), ap); err != nil {
		t.Fatal(err)
	}
	annotate(t, "claim-attacker", "x", annotations.LoadBalancerIPs, "203.0.113.249")
	// The victim claims the address and is served.
	createService(t, "claim-victim", "db", true, egressAnn(lb.String()))
	vp := runPodIn(t, "claim-victim", "db", n1)
	waitServedIn(t, "claim-victim", "db", n1, lb)
	// Move it back, with a pod: the victim keeps it.
	annotate(t, "claim-attacker", "x", annotations.LoadBalancerIPs, lb.String())
	attackerPod := runPodIn(t, "claim-attacker", "x", n1)
	waitWarningIn(t, "claim-attacker", "x", "LoadBalancerIPConflict", "")
	time.Sleep(3 * time.Second)
	if got := sourceSeen(t, vp, "udp", false, sandbox.UDPPort); got != lb {
		t.Errorf("the victim's pod left from %s, want %s", got, lb)
	}
	if got := sourceSeen(t, attackerPod, "udp", false, sandbox.UDPPort); got == lb {
		t.Errorf("the attacker's pod left with the victim's address %s", lb)
	}
}

// A pod that forges an egress pod's source address does not get that
// pod's egress address: the packet did not enter through the interface
// the egress pod lives behind.
func TestForgedSourceDoesNotGetTheAddress(t *testing.T) {
	lb := addr("203.0.113.199")
	n1 := cluster.Nodes[0]
	service(t, "forged", true, egressAnn(lb.String()))
	victim := runPod(t, "forged", n1)
	waitServed(t, "forged", n1, true, lb)
	forger := runPod(t, "forger", n1)
	got, err := cluster.SendSpoofed(forger, victim.IP4, netip.AddrPortFrom(sandbox.ExternalAddr(false), sandbox.UDPPort), "forged-"+victim.Name, 2*time.Second)
	if err == nil && got == lb {
		t.Fatalf("a datagram forged with %s's source left with its egress address %s", victim.IP4, lb)
	}
	t.Logf("forged datagram: arrived from %v (%v)", got, err)
	if got := sourceSeen(t, victim, "udp", false, sandbox.UDPPort); got != lb {
		t.Errorf("the real pod left from %s, want %s", got, lb)
	}
	_ = context.Background
}
