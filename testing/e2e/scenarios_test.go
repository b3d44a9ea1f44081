//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// LoadBalancer IPs: 203.0.113.100+ and 2001:db8:1::100+ (the nodes use
// .11-.13 on the external network, the external host .250).

// Scenario 1.
func TestEgressIPv4(t *testing.T) {
	lb := addr("203.0.113.100")
	node := cluster.Nodes[0]
	service(t, "egress-v4", true, egressAnn(lb.String()))
	p := runPod(t, "egress-v4", node)
	waitServed(t, "egress-v4", node, true, lb)

	expectSource(t, p, false, lb)
	eventually(t, 30*time.Second, "status and annotations", func() (bool, string) {
		svc := getService(t, "egress-v4")
		ing := svc.Status.LoadBalancer.Ingress
		ok := len(ing) == 1 && ing[0].IP == lb.String() &&
			svc.Annotations[annotations.VIPHost] == node.Name &&
			svc.Annotations[annotations.ActiveEndpoint] == p.IP4.String()
		return ok, fmt.Sprintf("ingress %v annotations %v", ing, svc.Annotations)
	})
	if h := leaseHolder(t, "egress-v4"); h != node.Name {
		t.Errorf("lease held by %q, want %s", h, node.Name)
	}
	if h := holders(lb); len(h) != 1 {
		t.Errorf("address on %v, want exactly one node", h)
	}
	if body := httpGet(t, node, "/readyz"); !strings.Contains(body, "ok") {
		t.Errorf("/readyz on %s: %q", node.Name, body)
	}
	if body := httpGet(t, node, "/metrics"); !strings.Contains(body, "egressvip_snat_rules") || strings.Contains(body, "egressvip_owned_services 0") {
		t.Errorf("/metrics on %s does not show the served Service:\n%s", node.Name, body)
	}
}

// Scenario 2.
func TestEgressDestinationPorts(t *testing.T) {
	lb := addr("203.0.113.101")
	node := cluster.Nodes[1]
	service(t, "egress-ports", true, egressAnn(lb.String(), annotations.EgressDestinationPorts, "udp:5060"))
	p := runPod(t, "egress-ports", node)
	waitServed(t, "egress-ports", node, true, lb)

	if src := sourceSeen(t, p, "udp", false, sandbox.UDPPort); src != lb {
		t.Errorf("UDP to 5060 arrived from %s, want %s", src, lb)
	}
	if src := sourceSeen(t, p, "tcp", false, sandbox.TCPPort); src != node.ExtIP4 {
		t.Errorf("TCP to 8080 arrived from %s, want the node address %s", src, node.ExtIP4)
	}
	if src := sourceSeen(t, p, "udp", false, sandbox.UDPOtherPort); src != node.ExtIP4 {
		t.Errorf("UDP to 7070 arrived from %s, want the node address %s", src, node.ExtIP4)
	}
}

// Scenario 3.
func TestEgressIPv6(t *testing.T) {
	lb4, lb6 := addr("203.0.113.102"), addr("2001:db8:1::102")
	node := cluster.Nodes[2]
	service(t, "egress-v6", true, egressAnn(lb4.String()+","+lb6.String(), annotations.EgressFamilies, "ipv4,ipv6"))
	p := runPod(t, "egress-v6", node)
	waitServed(t, "egress-v6", node, true, lb4, lb6)

	expectSource(t, p, true, lb6)
	expectSource(t, p, false, lb4)
	eventually(t, 30*time.Second, "active-endpoint-ipv6", func() (bool, string) {
		a := getService(t, "egress-v6").Annotations
		return a[annotations.ActiveEndpointIPv6] == p.IP6.String(), fmt.Sprint(a)
	})
}

// Scenario 4.
func TestClusterTrafficIsNotSNATed(t *testing.T) {
	lb4, lb6 := addr("203.0.113.103"), addr("2001:db8:1::103")
	node, other := cluster.Nodes[0], cluster.Nodes[1]
	service(t, "egress-incluster", true, egressAnn(lb4.String()+","+lb6.String(), annotations.EgressFamilies, "ipv4,ipv6"))
	client := runPod(t, "egress-incluster", node)
	server := runPod(t, "plain-server", other)
	waitServed(t, "egress-incluster", node, true, lb4, lb6)
	// The control: outside the cluster ranges both families leave with
	// the LoadBalancer IPs, so the exclusions below are what keeps them.
	expectSource(t, client, false, lb4)
	expectSource(t, client, true, lb6)

	// A UDP server in the other pod records the source it sees.
	var srvConn net.PacketConn
	if err := sandbox.Do(server.NS, func() error {
		var err error
		srvConn, err = net.ListenPacket("udp", ":6000")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer srvConn.Close()
	for _, dst := range []netip.Addr{server.IP4, server.IP6} {
		conn, err := sandbox.OpenUDP(client, netip.AddrPortFrom(dst, 6000))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = conn.Write([]byte("hello"))
		conn.Close()
		_ = srvConn.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 64)
		_, from, err := srvConn.ReadFrom(buf)
		if err != nil {
			t.Fatalf("pod-to-pod to %s: %v", dst, err)
		}
		got := netip.MustParseAddrPort(from.String()).Addr().Unmap()
		want := client.IP4
		if dst.Is6() {
			want = client.IP6
		}
		if got != want {
			t.Errorf("pod-to-pod to %s arrived from %s, want the pod IP %s", dst, got, want)
		}
	}

	// Service traffic. kube-proxy DNATs a ClusterIP before egressvip's
	// postrouting chain sees the packet. A Service whose endpoint is a
	// pod: the packet reaches the pod with the client's pod IP.
	inCluster := clusterIPService(t, "plain-server", 6000)
	for _, dst := range inCluster {
		conn, err := sandbox.OpenUDP(client, netip.AddrPortFrom(dst, 6000))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = conn.Write([]byte("hello"))
		conn.Close()
		_ = srvConn.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 64)
		_, from, err := srvConn.ReadFrom(buf)
		if err != nil {
			t.Fatalf("pod to the ClusterIP %s: %v", dst, err)
		}
		got := netip.MustParseAddrPort(from.String()).Addr().Unmap()
		want := client.IP4
		if dst.Is6() {
			want = client.IP6
		}
		if got != want {
			t.Errorf("pod to the ClusterIP %s arrived at the pod from %s, want the pod IP %s", dst, got, want)
		}
	}
	// A Service whose endpoint is outside the cluster (the external host):
	// the packet leaves the node to a destination outside every excluded
	// range, but it was sent to a ClusterIP, so it must keep the node
	// address (the CNI's MASQUERADE), not get the LoadBalancer IP.
	t.Run("ClusterIP to an external endpoint", func(t *testing.T) {
		ext, err := cluster.CreateExternalService(ctx(t), ns, "incluster-ext")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cluster.DeleteExternalService(context.Background(), ext) })
		for _, tc := range []struct {
			v6   bool
			want netip.Addr
		}{{false, node.ExtIP4}, {true, node.ExtIP6}} {
			dst := ext.ClusterIP(tc.v6)
			for proto, port := range map[string]uint16{"tcp": sandbox.TCPPort, "udp": sandbox.UDPPort} {
				payload := fmt.Sprintf("svc-ext-%s-%d", proto, time.Now().UnixNano())
				src, err := cluster.Send(client, proto, netip.AddrPortFrom(dst, port), payload, 5*time.Second)
				if err != nil {
					t.Fatalf("%s to the ClusterIP %s: %v", proto, dst, err)
				}
				if src != tc.want {
					t.Errorf("%s to the ClusterIP %s arrived at the external host from %s, want the node address %s (not SNATed)", proto, dst, src, tc.want)
				}
			}
		}
	})
	// The ranges are the detected ones (not the IPv4 fallback
	// 10.96.0.0/12), in each family's table.
	for _, tc := range []struct {
		v6    bool
		cidrs []string
	}{
		{false, []string{"10.96.0.0/16", node.PodCIDRs[0].String(), other.PodCIDRs[0].String()}},
		{true, []string{"fd00:10:96::/112", node.PodCIDRs[1].String(), other.PodCIDRs[1].String()}},
	} {
		// iptables: a RETURN rule per range; nftables: the exclude set.
		nat, nft := node.NAT(tc.v6), node.NFT(tc.v6)
		for _, cidr := range tc.cidrs {
			if !strings.Contains(nat, "-d "+cidr+" ") && !strings.Contains(nft, cidr) {
				t.Errorf("no exclusion of %s in the node's nat table or nftables table:\n%s\n%s", cidr, nat, nft)
			}
		}
	}
}

// Scenario 5.
func TestAddressFollowsThePod(t *testing.T) {
	lb := addr("203.0.113.104")
	from, to := cluster.Nodes[0], cluster.Nodes[1]
	service(t, "mover", true, egressAnn(lb.String()))
	old := runPod(t, "mover", from)
	waitServed(t, "mover", from, true, lb)
	if src := sourceSeen(t, old, "udp", false, sandbox.UDPPort); src != lb {
		t.Fatalf("before the move: source %s, want %s", src, lb)
	}

	if err := cluster.DeletePod(ctx(t), old); err != nil {
		t.Fatal(err)
	}
	moved := runPod(t, "mover", to)
	ready := time.Now()
	// Send every 20 ms from the new pod until a datagram arrives with the
	// LoadBalancer IP.
	conn, err := sandbox.OpenUDP(moved, netip.AddrPortFrom(sandbox.ExternalAddr(false), sandbox.UDPPort))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	prefix := fmt.Sprintf("move-%d-", time.Now().UnixNano())
	var converged time.Duration
	for i := 0; ; i++ {
		_, _ = conn.Write([]byte(fmt.Sprintf("%s%d", prefix, i)))
		if hits := cluster.External.HitsWithPrefix(prefix); slices.ContainsFunc(hits, func(h sandbox.Hit) bool { return h.Source == lb }) {
			for _, h := range hits {
				if h.Source == lb {
					converged = h.At.Sub(ready)
					break
				}
			}
			break
		}
		if time.Since(ready) > 60*time.Second {
			t.Fatalf("no packet with the LoadBalancer IP within 60 s of the new pod being Ready")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("convergence: new pod Ready -> first packet with %s: %s", lb, converged.Round(time.Millisecond))
	record(figConvergence, converged.Round(time.Millisecond).String())

	waitServed(t, "mover", to, true, lb)
	if rules := from.SNATRulesFor(ns + "/mover"); len(rules) != 0 {
		t.Errorf("old node kept rules: %v", rules)
	}
	if h := leaseHolder(t, "mover"); h != to.Name {
		t.Errorf("lease held by %q, want %s", h, to.Name)
	}
	eventually(t, 30*time.Second, "vipHost follows", func() (bool, string) {
		a := getService(t, "mover").Annotations
		return a[annotations.VIPHost] == to.Name && a[annotations.ActiveEndpoint] == moved.IP4.String(), fmt.Sprint(a)
	})
}

// Scenario 6.
func TestDaemonCrashDoesNotInterruptEgress(t *testing.T) {
	lb := addr("203.0.113.105")
	node := cluster.Nodes[2]
	service(t, "steady", true, egressAnn(lb.String()))
	p := runPod(t, "steady", node)
	waitServed(t, "steady", node, true, lb)

	// Every other datagram opens a new socket, so it meets the nat rules
	// of that moment: a window without rules would show the node address.
	f := startFlow(t, p, 10*time.Millisecond)
	// A crash, then a rolling update (SIGTERM): each time the new process
	// starts and takes over while the flow goes on.
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
		time.Sleep(2 * time.Second)
		code, err := cluster.StopDaemon(node, sig)
		if err != nil {
			t.Fatal(err)
		}
		if sig == syscall.SIGTERM && code != 0 {
			t.Errorf("exit status %d after SIGTERM, want 0", code)
		}
		if err := cluster.StartDaemon(node); err != nil {
			t.Fatal(err)
		}
		time.Sleep(6 * time.Second)
	}
	r := f.Stop(lb)
	t.Logf("flow every 10 ms across SIGKILL and SIGTERM restarts: %s", r)
	record(figGap, r.LongestGap.Round(time.Millisecond).String())
	record("scenario 6: datagrams sent/arrived", fmt.Sprintf("%d/%d", r.Sent, r.Arrived))
	checkFlow(t, r, "across the restarts")
	waitServed(t, "steady", node, true, lb)
}

// Scenario 7.
func TestRemovalCleansEveryNode(t *testing.T) {
	lb := addr("203.0.113.106")
	node := cluster.Nodes[0]
	service(t, "gone", true, egressAnn(lb.String()))
	runPod(t, "gone", node)
	waitServed(t, "gone", node, true, lb)

	svc := getService(t, "gone")
	delete(svc.Annotations, annotations.Egress)
	if _, err := cluster.Admin.CoreV1().Services(ns).Update(ctx(t), svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "rules removed after the annotation went", func() (bool, string) {
		for _, n := range cluster.Nodes {
			if r := n.SNATRulesFor(ns + "/gone"); len(r) > 0 {
				return false, fmt.Sprintf("%s still has %v", n.Name, r)
			}
		}
		return true, ""
	})
	if h := holders(lb); len(h) != 1 {
		t.Errorf("without egress the Service keeps its address on one node, got %v", h)
	}

	if err := cluster.Admin.CoreV1().Services(ns).Delete(ctx(t), "gone", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "address removed from every node", func() (bool, string) {
		h := holders(lb)
		return len(h) == 0, fmt.Sprint(h)
	})
	// The Lease names the Service as its owner: the garbage collector
	// deletes it with the Service.
	eventually(t, 30*time.Second, "Lease deleted with its Service", func() (bool, string) {
		_, err := cluster.Admin.CoordinationV1().Leases(ns).Get(ctx(t), election.LeaseName("gone"), metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
}

// Scenario 8.
func TestBadInputIsReportedAndIsolated(t *testing.T) {
	healthyLB := addr("203.0.113.109")
	node := cluster.Nodes[1]
	service(t, "bad-ports", true, egressAnn("203.0.113.107", annotations.EgressDestinationPorts, "tcp:70000"))
	service(t, "bad-v6", true, egressAnn("203.0.113.108", annotations.EgressIPv6, "true"))
	service(t, "bad-ip", true, egressAnn("not-an-ip"))
	service(t, "healthy", true, egressAnn(healthyLB.String()))
	for _, app := range []string{"bad-ports", "bad-v6", "bad-ip"} {
		runPod(t, app, node)
	}
	p := runPod(t, "healthy", node)
	waitServed(t, "healthy", node, true, healthyLB)
	if src := sourceSeen(t, p, "udp", false, sandbox.UDPPort); src != healthyLB {
		t.Errorf("healthy Service egressed from %s, want %s", src, healthyLB)
	}

	waitEvent(t, "bad-ports", "InvalidAnnotation", "70000")
	waitEvent(t, "bad-v6", "EgressFamilyMismatch", "IPv6")
	waitEvent(t, "bad-ip", "InvalidLoadBalancerIP", "not-an-ip")
	for _, ip := range []string{"203.0.113.107", "203.0.113.108"} {
		if h := holders(addr(ip)); len(h) != 0 {
			t.Errorf("%s bound on %v although its Service is invalid", ip, h)
		}
	}
	for _, name := range []string{"bad-ports", "bad-v6", "bad-ip"} {
		if r := node.SNATRulesFor(ns + "/" + name); len(r) > 0 {
			t.Errorf("%s got rules %v", name, r)
		}
		if h := leaseHolder(t, name); h != "" {
			t.Errorf("%s has a lease holder %s", name, h)
		}
	}
}

// Scenario 9.
func TestForeignClassIsLeftAlone(t *testing.T) {
	foreignLB, barrierLB := addr("203.0.113.110"), addr("203.0.113.113")
	node := cluster.Nodes[0]
	service(t, "foreign", true, egressAnn(foreignLB.String()), func(s *corev1.Service) {
		class := "example.com/other-lb"
		s.Spec.LoadBalancerClass = &class
	})
	runPod(t, "foreign", node)
	// A Service of ours created after it is served: by then the daemons
	// have seen the foreign one too.
	service(t, "barrier", true, egressAnn(barrierLB.String()))
	runPod(t, "barrier", node)
	waitServed(t, "barrier", node, true, barrierLB)

	if h := holders(foreignLB); len(h) != 0 {
		t.Errorf("foreign-class address bound on %v", h)
	}
	if h := leaseHolder(t, "foreign"); h != "" {
		t.Errorf("foreign-class Service has a lease holder %s", h)
	}
	svc := getService(t, "foreign")
	if _, ok := svc.Annotations[annotations.VIPHost]; ok || len(svc.Status.LoadBalancer.Ingress) > 0 {
		t.Errorf("foreign-class Service was written: %v %v", svc.Annotations, svc.Status.LoadBalancer)
	}
}

// Scenario 10.
func TestTwoEgressServicesOnOneNode(t *testing.T) {
	lbA, lbB := addr("203.0.113.111"), addr("203.0.113.112")
	node := cluster.Nodes[2]
	service(t, "twin-a", true, egressAnn(lbA.String()))
	service(t, "twin-b", true, egressAnn(lbB.String()))
	a := runPod(t, "twin-a", node)
	b := runPod(t, "twin-b", node)
	waitServed(t, "twin-a", node, true, lbA)
	waitServed(t, "twin-b", node, true, lbB)
	expectSource(t, a, false, lbA)
	expectSource(t, b, false, lbB)
}

// SIGTERM: a Service another node can serve is handed over at once; the
// daemon exits 0.
func TestSigtermHandsOver(t *testing.T) {
	lb := addr("203.0.113.114")
	service(t, "handover", false, map[string]string{annotations.LoadBalancerIPs: lb.String()})
	leader := waitHolder(t, lb)
	start := time.Now()
	code, err := cluster.StopDaemon(leader, syscall.SIGTERM)
	if err != nil || code != 0 {
		t.Fatalf("SIGTERM: exit %d, %v", code, err)
	}
	t.Cleanup(func() {
		if err := cluster.StartDaemon(leader); err != nil {
			t.Error(err)
		}
	})
	if leader.HasAddress(lb) {
		t.Fatal("the stopped daemon left the address of a Service another node can serve")
	}
	eventually(t, 30*time.Second, "another node takes over", func() (bool, string) {
		h := holders(lb)
		return len(h) == 1 && h[0] != leader.Name, fmt.Sprint(h)
	})
	record("SIGTERM handover (Cluster policy)", time.Since(start).Round(time.Millisecond).String())
}

// egressvip cleanup removes what egressvip owns and nothing else.
func TestZCleanupCommand(t *testing.T) {
	lb := addr("203.0.113.115")
	node := cluster.Nodes[0]
	service(t, "cleanup", true, egressAnn(lb.String()))
	runPod(t, "cleanup", node)
	waitServed(t, "cleanup", node, true, lb)
	if code, err := cluster.StopDaemon(node, syscall.SIGTERM); err != nil || code != 0 {
		t.Fatalf("SIGTERM: exit %d, %v", code, err)
	}
	defer func() {
		if err := cluster.StartDaemon(node); err != nil {
			t.Error(err)
		}
	}()
	if !node.HasAddress(lb) {
		t.Fatal("SIGTERM removed a pinned egress Service's address")
	}
	if out, err := cluster.Cleanup(node); err != nil {
		t.Fatalf("egressvip cleanup: %v\n%s", err, out)
	}
	if addrs, _ := node.LBAddresses(); len(addrs) != 0 {
		t.Errorf("cleanup left addresses %v", addrs)
	}
	for _, v6 := range []bool{false, true} {
		nat := node.NAT(v6)
		if strings.Contains(nat, "EGRESSVIP") {
			t.Errorf("cleanup left chains:\n%s", nat)
		}
		if table := node.NFT(v6); table != "" {
			t.Errorf("cleanup left the nftables table:\n%s", table)
		}
		if !strings.Contains(nat, "sandbox CNI natOutgoing") {
			t.Errorf("cleanup removed the CNI's rule:\n%s", nat)
		}
	}
	_ = context.Background()
}
