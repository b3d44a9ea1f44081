//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// A kube-vip user's egress annotations mean what they meant there, proven
// with real packets: the external host has a second address to show
// denied and allowed networks.
func TestKubeVIPNetworkAnnotations(t *testing.T) {
	other := cluster.External.SecondAddr(false) // 203.0.113.251
	first := sandbox.ExternalAddr(false)        // 203.0.113.250
	n1 := cluster.Nodes[0]
	for _, tc := range []struct {
		name      string
		ann       []string
		fromFirst string // "lb" or "node"
		fromOther string
	}{
		{name: "denied", ann: []string{annotations.EgressDeniedNetworks, other.String() + "/32"}, fromFirst: "lb", fromOther: "node"},
		{name: "allowed", ann: []string{annotations.EgressAllowedNetworks, other.String()}, fromFirst: "node", fromOther: "lb"},
		{name: "ports", ann: []string{annotations.EgressDestinationPorts, fmt.Sprintf("udp:%d", sandbox.UDPOtherPort)}, fromFirst: "node", fromOther: "node"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lb := addr(fmt.Sprintf("203.0.113.%d", 170+len(tc.name)))
			name := "kv-" + tc.name
			service(t, name, true, egressAnn(lb.String(), tc.ann...))
			p := runPod(t, name, n1)
			waitServed(t, name, n1, true, lb)
			want := func(which string) netip.Addr {
				if which == "lb" {
					return lb
				}
				return n1.ExtIP4
			}
			for _, c := range []struct {
				dst  netip.Addr
				want string
			}{{first, tc.fromFirst}, {other, tc.fromOther}} {
				src, err := cluster.Send(p, "udp", netip.AddrPortFrom(c.dst, sandbox.UDPPort), fmt.Sprintf("%s-%s-%d", name, c.dst, time.Now().UnixNano()), 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if src != want(c.want) {
					t.Errorf("%s: to %s arrived from %s, want %s (%s)", tc.name, c.dst, src, want(c.want), c.want)
				}
			}
			if tc.name == "ports" {
				if src := sourceSeen(t, p, "udp", false, sandbox.UDPOtherPort); src != lb {
					t.Errorf("ports: to the listed port arrived from %s, want %s", src, lb)
				}
			}
		})
	}
}

// An unknown kube-vip egress annotation is refused loudly and never
// widened: a Warning, nothing programmed, the pod keeps its node's address.
func TestUnknownEgressAnnotationIsRefused(t *testing.T) {
	lb := addr("203.0.113.180")
	n1 := cluster.Nodes[0]
	service(t, "kv-unknown", true, egressAnn(lb.String(), "kube-vip.io/egress-foo", "bar"))
	p := runPod(t, "kv-unknown", n1)
	waitEvent(t, "kv-unknown", annotations.ReasonUnknown, "kube-vip.io/egress-foo")
	time.Sleep(2 * time.Second)
	if h := holders(lb); len(h) != 0 {
		t.Errorf("%s bound on %v for a Service with an unknown egress annotation", lb, h)
	}
	if src := sourceSeen(t, p, "udp", false, sandbox.UDPPort); src != n1.ExtIP4 {
		t.Errorf("the pod left from %s, want its node's address %s", src, n1.ExtIP4)
	}
}

// kube-vip.io/ignore: the Service is left alone.
func TestIgnoredService(t *testing.T) {
	lb := addr("203.0.113.181")
	service(t, "kv-ignored", false, map[string]string{annotations.LoadBalancerIPs: lb.String(), annotations.Ignore: "true"})
	time.Sleep(3 * time.Second)
	if h := holders(lb); len(h) != 0 {
		t.Errorf("%s bound on %v for an ignored Service", lb, h)
	}
}

// An egress pod's traffic to another node's address and to the API server
// (through the kubernetes Service, which kube-proxy DNATs to the API
// server's address) keeps its node's address; a client-go call from the
// pod through the kubernetes Service succeeds although the LoadBalancer
// range is not on the node network.
func TestNodesAndAPIServerKeepTheNodeAddress(t *testing.T) {
	lb := addr("203.0.113.182")
	n1, n2 := cluster.Nodes[0], cluster.Nodes[1]
	service(t, "kv-internal", true, egressAnn(lb.String()))
	p := runPod(t, "kv-internal", n1)
	waitServed(t, "kv-internal", n1, true, lb)
	seen, err := cluster.ListenOnNode(n2, 7100)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := sandbox.OpenUDP(p, netip.AddrPortFrom(n2.IP4, 7100))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	eventually(t, 5*time.Second, "node-2 receives the pod's datagram", func() (bool, string) {
		if _, err := conn.Write([]byte("to-node-" + p.Name)); err != nil {
			return false, err.Error()
		}
		got := seen()
		return len(got) > 0, fmt.Sprint(got)
	})
	if got := seen(); slices.Contains(got, lb) {
		t.Errorf("node-2 saw the pod's datagram from %v: the egress address, not the pod's or node-1's", got)
	}
	ctx, cancel := context.WithTimeout(ctx(t), 20*time.Second)
	defer cancel()
	version, err := cluster.ClientGoFromPod(ctx, p)
	if err != nil {
		t.Fatalf("a client-go call from the egress pod through the kubernetes Service failed: %v", err)
	}
	record("egress pod to the API server through the kubernetes Service", "client-go call succeeded ("+version+")")
}

// egressvip's own address allocator (egressvip_allocator=true), from
// kube-vip-cloud-provider's ConfigMap: 50 Services without addresses get
// distinct ones quickly; a full pool gives AllocationFailed; the
// allocator's node killed during a burst of 50 more: no address twice.
func TestAllocator(t *testing.T) {
	nsName := "alloc"
	createNamespace(t, nsName)
	setPools(t, map[string]string{
		"range-" + nsName: "2001:db8:1::1000-2001:db8:1::10ff",
		"range-small":     "2001:db8:1::2000-2001:db8:1::2001",
	})
	single := corev1.IPFamilyPolicySingleStack
	mk := func(ns, name string) {
		createServiceObj(t, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, IPFamilyPolicy: &single, IPFamilies: []corev1.IPFamily{corev1.IPv6Protocol},
				Ports: []corev1.ServicePort{{Name: "p", Port: 80, Protocol: corev1.ProtocolTCP}}},
		})
	}
	start := time.Now()
	for i := range 50 {
		mk(nsName, fmt.Sprintf("a%02d", i))
	}
	created := time.Now()
	addrs := waitAllocated(t, nsName, 50, 60*time.Second)
	took := time.Since(created)
	record("allocator: 50 Services got distinct addresses, after the last was created", took.Round(time.Millisecond).String())
	t.Logf("allocator: 50 created in %s, all allocated %s after the last", created.Sub(start).Round(time.Millisecond), took.Round(time.Millisecond))
	distinct := map[string]bool{}
	for _, a := range addrs {
		distinct[a] = true
	}
	if len(distinct) != len(addrs) {
		t.Errorf("%d distinct addresses for %d Services: %v", len(distinct), len(addrs), addrs)
	}

	// A full pool.
	createNamespace(t, "small")
	for i := range 3 {
		mk("small", fmt.Sprintf("s%d", i))
	}
	waitAllocated(t, "small", 2, 30*time.Second)
	waitWarningIn(t, "small", "", "AllocationFailed", "")

	// The allocator's node killed during a burst.
	holder := leaseHolderIn(t, daemonNS, "egressvip.allocator")
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 50 {
			mk(nsName, fmt.Sprintf("b%02d", i))
		}
	}()
	time.Sleep(100 * time.Millisecond)
	if _, err := cluster.StopDaemon(cluster.Node(holder), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	t.Cleanup(func() { _ = cluster.StartDaemon(cluster.Node(holder)) })
	all := waitAllocated(t, nsName, 100, 60*time.Second)
	seen := map[string]string{}
	for svc, a := range all {
		if other, dup := seen[a]; dup {
			t.Errorf("%s handed out twice: %s and %s", a, other, svc)
		}
		seen[a] = svc
	}
	record("allocator killed during a burst of 50: addresses handed out twice", fmt.Sprint(len(all)-len(seen)))
}
