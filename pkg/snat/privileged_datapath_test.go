package snat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/model"
	"golang.org/x/sys/unix"
)

// recorder is a UDP server that records which datagram came from where.
type recorder struct {
	at   netip.AddrPort
	mu   sync.Mutex
	seen map[string]netip.Addr
	news chan struct{}
}

// newRecorder listens on at in ns until the test ends.
func newRecorder(t *testing.T, ns *privtest.NS, at netip.AddrPort) *recorder {
	t.Helper()
	r := &recorder{at: at, seen: map[string]netip.Addr{}, news: make(chan struct{}, 1)}
	var (
		pc  net.PacketConn
		err error
	)
	ns.Do(t, func() { pc, err = net.ListenPacket("udp", at.String()) })
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", at, ns.Name, err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	go func() {
		buf := make([]byte, 256)
		for {
			n, peer, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			r.seen[string(buf[:n])] = peer.(*net.UDPAddr).AddrPort().Addr().Unmap()
			r.mu.Unlock()
			select {
			case r.news <- struct{}{}:
			default:
			}
		}
	}()
	return r
}

func (r *recorder) has(payload string) (netip.Addr, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.seen[payload]
	return a, ok
}

// waitFor returns the source payload arrived from, waiting up to d.
func (r *recorder) waitFor(payload string, d time.Duration) (netip.Addr, bool) {
	deadline := time.After(d)
	for {
		if a, ok := r.has(payload); ok {
			return a, true
		}
		select {
		case <-r.news:
		case <-deadline:
			return netip.Addr{}, false
		}
	}
}

var payloads atomic.Int64

func payload(what string) string { return fmt.Sprintf("%s-%d", what, payloads.Add(1)) }

// sendFrom sends one datagram from ns, from src (which pod A may forge) or
// the address the kernel picks when src is invalid.
func sendFrom(t *testing.T, ns *privtest.NS, src netip.Addr, dst netip.AddrPort, msg string) {
	t.Helper()
	var err error
	ns.Do(t, func() {
		laddr := ":0"
		if src.IsValid() {
			laddr = netip.AddrPortFrom(src, 0).String()
		}
		// A transparent socket may send from an address it does not have.
		lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				if strings.HasSuffix(network, "6") {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
				} else {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
				}
			})
			return errors.Join(err, serr)
		}}
		network := "udp4"
		if dst.Addr().Is6() {
			network = "udp6"
		}
		var pc net.PacketConn
		if pc, err = lc.ListenPacket(context.Background(), network, laddr); err != nil {
			return
		}
		defer pc.Close()
		_, err = pc.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(dst))
	})
	if err != nil {
		t.Fatalf("send from %s to %s in %s: %v", src, dst, ns.Name, err)
	}
}

// arrives sends a datagram and returns the source it arrived with: a
// datagram a second, for up to 10 s, as the kernel may still be setting up
// the path (an IPv6 address's local route is added by a work queue).
func arrives(t *testing.T, r *recorder, ns *privtest.NS, src netip.Addr, what string) netip.Addr {
	t.Helper()
	for range 10 {
		msg := payload(what)
		sendFrom(t, ns, src, r.at, msg)
		if a, ok := r.waitFor(msg, time.Second); ok {
			return a
		}
	}
	t.Fatalf("%s: no datagram from %s to %s arrived in 10 s", what, sender(ns, src), r.at)
	return netip.Addr{}
}

func sender(ns *privtest.NS, src netip.Addr) string {
	if src.IsValid() {
		return src.String() + " in " + ns.Name
	}
	return ns.Name
}

// neverArrives sends a datagram that must be dropped, then probes that
// take the same way out and must arrive: once two probes sent after it
// arrived, so would it have.
func neverArrives(t *testing.T, r *recorder, ns *privtest.NS, src netip.Addr, what string, probe func(what string) netip.Addr) {
	t.Helper()
	msg := payload(what)
	sendFrom(t, ns, src, r.at, msg)
	probe(what + " (probe)")
	probe(what + " (second probe)")
	if a, ok := r.has(msg); ok {
		t.Errorf("%s: datagram from %s arrived at %s from %s; want it dropped", what, sender(ns, src), r.at, a)
	}
}

// TestPrivilegedExcludeOriginalDestination: a connection to a ClusterIP
// that kube-proxy DNATs to an address outside the cluster keeps the
// node's source (the CNI's MASQUERADE), never the LoadBalancer IP.
func TestPrivilegedExcludeOriginalDestination(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		// kube-proxy's stand-in: ClusterIP :443 to the external server.
		tp.node.Exec(t, b.ipt, "-t", "nat", "-A", "PREROUTING", "-d", "10.96.0.10/32", "-p", "tcp", "--dport", "443", "-j", "DNAT", "--to-destination", "203.0.113.2:8080")
		tp.node.Exec(t, b.ip6t, "-t", "nat", "-A", "PREROUTING", "-d", "fd00:10:96::a/128", "-p", "tcp", "--dport", "443", "-j", "DNAT", "--to-destination", "[2001:db8:1::2]:8080")
		svc4, svc6 := netip.AddrPortFrom(clusterIP4, 443), netip.AddrPortFrom(clusterIP6, 443)
		m := tp.manager(t, nil)

		// Without the Service CIDRs excluded, the DNATed connection
		// would take the LoadBalancer IP: the test can tell.
		d := rulesFor()
		d.Exclude = []netip.Prefix{podNet4, podNet6}
		tp.apply(t, m, d)
		if got := tp.seenAs(t, "tcp", svc4); got != lb4 {
			t.Fatalf("setup: connection to the ClusterIP arrived from %s, want %s (DNAT and SNAT)", got, lb4)
		}
		tp.apply(t, m, rulesFor())
		if got := tp.seenAs(t, "tcp", svc4); got != node4 {
			t.Errorf("connection to ClusterIP %s, DNATed to %s, arrived from %s, want the node's %s", svc4, extSrv4, got, node4)
		}
		if got := tp.seenAs(t, "tcp", svc6); got != node6 {
			t.Errorf("connection to ClusterIP %s, DNATed to %s, arrived from %s, want the node's %s", svc6, extSrv6, got, node6)
		}
		if got := tp.seenAs(t, "tcp", netip.AddrPortFrom(extSrv4, 8080)); got != lb4 {
			t.Errorf("direct connection arrived from %s, want %s", got, lb4)
		}
	})
}

// TestPrivilegedFilters: Allow, Deny and ports, both families.
func TestPrivilegedFilters(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		m := tp.manager(t, nil)
		check := func(what, network string, dst netip.AddrPort, want netip.Addr) {
			t.Helper()
			if got := tp.seenAs(t, network, dst); got != want {
				t.Errorf("%s: %s to %s arrived from %s, want %s", what, network, dst, got, want)
			}
		}
		d := rulesFor()
		for i := range d.SNAT {
			d.SNAT[i].Filter = model.Filter{
				Allow: prefixes("203.0.113.0/24", "2001:db8:1::/64"),
				Deny:  prefixes("203.0.113.3/32", "2001:db8:1::3/128"),
				Ports: ports(udp5060).Ports,
			}
		}
		tp.apply(t, m, d)
		check("allowed", "udp", netip.AddrPortFrom(extSrv4, 5060), lb4)
		check("denied", "udp", netip.AddrPortFrom(extSrv4b, 5060), node4)
		check("other port", "tcp", netip.AddrPortFrom(extSrv4, 8080), node4)
		check("IPv6 allowed", "udp", netip.AddrPortFrom(extSrv6, 5060), lb6)
		check("IPv6 denied", "udp", netip.AddrPortFrom(extSrv6b, 5060), node6)
		check("IPv6 other port", "tcp", netip.AddrPortFrom(extSrv6, 8080), node6)

		for i := range d.SNAT {
			d.SNAT[i].Filter = model.Filter{Deny: prefixes("203.0.113.2/32", "2001:db8:1::2/128")}
		}
		tp.apply(t, m, d)
		check("deny only: denied", "tcp", netip.AddrPortFrom(extSrv4, 8080), node4)
		check("deny only: other", "tcp", netip.AddrPortFrom(extSrv4b, 8080), lb4)
		check("IPv6 deny only: denied", "tcp", netip.AddrPortFrom(extSrv6, 8080), node6)
		check("IPv6 deny only: other", "tcp", netip.AddrPortFrom(extSrv6b, 8080), lb6)
	})
}

// TestPrivilegedAntiSpoof: pod A forges egress pod B's source; its
// datagram never reaches the external host (with B's LoadBalancer IP or
// any other), B's own traffic still leaves with it.
func TestPrivilegedAntiSpoof(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		tp.node.Exec(t, "ip", "addr", "add", "203.0.113.11/32", "dev", "vext")
		tp.node.Exec(t, "ip", "-6", "addr", "add", "2001:db8:1::11/128", "dev", "vext", "nodad", "preferred_lft", "0")
		for _, c := range []struct {
			rec        *recorder
			b, lb, nod netip.Addr
		}{
			{newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv4, 5070)), pod4b, lb4b, node4},
			{newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv6, 5070)), pod6b, lb6b, node6},
		} {
			if got := arrives(t, c.rec, tp.pod, c.b, "forged before Apply"); got != c.nod {
				t.Fatalf("setup: forged datagram arrived from %s, want the CNI's %s", got, c.nod)
			}
		}
		m := tp.manager(t, nil)
		tp.apply(t, m, model.Datapath{
			SNAT: []model.SNATRule{
				{Service: "default/b", Pod: pod4b, Source: lb4b},
				{Service: "default/b", Pod: pod6b, Source: lb6b},
			},
			Exclude: excludeAll,
			Fenced:  []netip.Addr{lb4b, lb6b},
		})
		for _, c := range []struct {
			rec    *recorder
			b, lb  netip.Addr
			family string
		}{
			{newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv4, 5071)), pod4b, lb4b, "IPv4"},
			{newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv6, 5071)), pod6b, lb6b, "IPv6"},
		} {
			probe := func(what string) netip.Addr {
				got := arrives(t, c.rec, tp.podB, netip.Addr{}, what)
				if got != c.lb {
					t.Errorf("%s: B's own datagram arrived from %s, want %s", what, got, c.lb)
				}
				return got
			}
			probe(c.family + ": B's own")
			neverArrives(t, c.rec, tp.pod, c.b, c.family+": A forging B", probe)
		}
	})
}

// TestPrivilegedSteer: a steered pod's packets leave the node marked and
// with the pod's address, past a CNI's MASQUERADE (iptables-legacy, and
// the backend's flavour); the test's policy routing takes them to a holder
// that SNATs them (a Remote rule); the external host sees the holder's
// LoadBalancer IP and the replies reach the pod.
//
//	node ns  vhold 198.51.100.1/25 - hnode 198.51.100.2/25  holder ns
//	                                 hext 198.51.100.129/25, LB 198.51.100.140
//	                                  |
//	ext ns                           eth1 198.51.100.130/25
func TestPrivilegedSteer(t *testing.T) {
	holderLB := netip.MustParseAddr("198.51.100.140")
	forEachBackend(t, func(t *testing.T, b backendCase) {
		privtest.Require(t, "iptables-legacy")
		tp := newTopo(t, b)
		holder := privtest.NewNS(t, "snat-holder")
		privtest.Veth(t, tp.node, "vhold", holder, "hnode")
		privtest.Veth(t, holder, "hext", tp.ext, "eth1")
		tp.node.Exec(t, "ip", "addr", "add", "198.51.100.1/25", "dev", "vhold")
		tp.node.Exec(t, "sysctl", "-qw", "net.ipv4.conf.vhold.rp_filter=0")
		holder.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0")
		holder.Exec(t, "ip", "addr", "add", "198.51.100.2/25", "dev", "hnode")
		holder.Exec(t, "ip", "addr", "add", "198.51.100.129/25", "dev", "hext")
		holder.Exec(t, "ip", "addr", "add", "198.51.100.140/32", "dev", "hext")
		holder.Exec(t, "ip", "route", "add", "10.244.0.0/16", "via", "198.51.100.1")
		holder.Exec(t, "ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.130")
		tp.ext.Exec(t, "ip", "addr", "add", "198.51.100.130/25", "dev", "eth1")
		// A CNI's MASQUERADE of the other iptables flavour too: an
		// iptables ACCEPT sets up no translation, so only the null SNAT
		// (the nft table's, for every backend) keeps it off.
		tp.node.Exec(t, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE")
		// The routing package's part, by hand.
		tp.node.Exec(t, "ip", "rule", "add", "fwmark", "0x1000/0x1000", "table", "100")
		tp.node.Exec(t, "ip", "route", "add", "default", "via", "198.51.100.2", "table", "100")

		udp, tcp := netip.AddrPortFrom(extSrv4, 5060), netip.AddrPortFrom(extSrv4, 8080)
		if got := tp.seenAs(t, "udp", udp); got != node4 {
			t.Fatalf("setup: before steering, packet arrived from %s, want %s", got, node4)
		}
		// The holder does not know the pod yet: what is steered to it
		// is dropped, not forwarded with the pod's address.
		hm := newManagerIn(t, holder, Config{Backend: b.name}, nil)
		transit := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/48")}
		applyIn(t, holder, hm, model.Datapath{Exclude: excludeAll, Transit: transit, NodeInterfaces: []string{"hnode"}})
		m := tp.manager(t, nil)
		tp.apply(t, m, model.Datapath{
			Steer:   []model.SteerRule{{Service: "default/steered", Pod: pod4, Holder: "holder", Via: []netip.Addr{netip.MustParseAddr("198.51.100.2")}}},
			Exclude: excludeAll,
		})
		rec := newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv4, 5071))
		neverArrives(t, rec, tp.pod, netip.Addr{}, "steered to a holder that does not know the pod", func(what string) netip.Addr {
			return arrives(t, rec, holder, netip.Addr{}, what)
		})
		applyIn(t, holder, hm, model.Datapath{
			SNAT:           []model.SNATRule{{Service: "default/steered", Pod: pod4, Source: holderLB, Remote: true}},
			Exclude:        excludeAll,
			Fenced:         []netip.Addr{holderLB},
			Transit:        transit,
			NodeInterfaces: []string{"hnode"},
		})
		// The holder SNATs by the pod's address: seeing its LoadBalancer
		// IP proves the packet left the node with the pod's.
		if got := tp.seenAs(t, "udp", udp); got != holderLB {
			t.Errorf("steered UDP arrived from %s, want the holder's %s", got, holderLB)
		}
		if got := tp.seenAs(t, "tcp", tcp); got != holderLB {
			t.Errorf("steered TCP arrived from %s, want the holder's %s", got, holderLB)
		}
		// An excluded destination is not steered.
		tp.node.Exec(t, b.ipt, "-t", "nat", "-A", "PREROUTING", "-d", "10.96.0.10/32", "-p", "tcp", "--dport", "443", "-j", "DNAT", "--to-destination", "203.0.113.2:8080")
		if got := tp.seenAs(t, "tcp", netip.AddrPortFrom(clusterIP4, 443)); got != node4 {
			t.Errorf("ClusterIP DNATed outside arrived from %s, want the node's %s (not steered)", got, node4)
		}
	})
}

// TestPrivilegedHoldAndGate: a held pod's packets are dropped; with the
// gate, an unknown pod's are, except to excluded destinations.
func TestPrivilegedHoldAndGate(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		tp.node.Exec(t, b.ipt, "-t", "nat", "-A", "PREROUTING", "-d", "10.96.0.10/32", "-p", "tcp", "--dport", "443", "-j", "DNAT", "--to-destination", "203.0.113.2:8080")
		rec := newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv4, 5070))
		probe := func(what string) netip.Addr { return arrives(t, rec, tp.podB, netip.Addr{}, what) }
		m := tp.manager(t, nil)

		tp.apply(t, m, model.Datapath{Hold: []model.HoldRule{{Service: "default/strict", Pod: pod4}}, Exclude: excludeAll})
		neverArrives(t, rec, tp.pod, netip.Addr{}, "held pod", probe)
		if got := tp.seenAs(t, "tcp", netip.AddrPortFrom(clusterIP4, 443)); got != node4 {
			t.Errorf("held pod to a ClusterIP: arrived from %s, want %s", got, node4)
		}
		tp.apply(t, m, model.Datapath{Hold: []model.HoldRule{{Service: "default/strict", Pod: pod4, Filter: ports(udp5060)}}, Exclude: excludeAll})
		if got := arrives(t, rec, tp.pod, netip.Addr{}, "held pod, other port"); got != node4 {
			t.Errorf("held pod, other port: arrived from %s, want %s", got, node4)
		}

		gate := &model.Gate{PodCIDRs: []netip.Prefix{podNet4, podNet6}, Known: []netip.Addr{pod4b, pod6b}}
		tp.apply(t, m, model.Datapath{Gate: gate, Exclude: excludeAll})
		neverArrives(t, rec, tp.pod, netip.Addr{}, "gate: unknown pod", probe)
		if got := tp.seenAs(t, "tcp", netip.AddrPortFrom(clusterIP4, 443)); got != node4 {
			t.Errorf("gate: unknown pod to a ClusterIP: arrived from %s, want %s", got, node4)
		}
		gate.Known = append(gate.Known, pod4)
		tp.apply(t, m, model.Datapath{Gate: gate, Exclude: excludeAll})
		if got := arrives(t, rec, tp.pod, netip.Addr{}, "gate: known pod"); got != node4 {
			t.Errorf("gate: known pod: arrived from %s, want %s", got, node4)
		}
	})
}

// TestPrivilegedFence: an SNAT to an address the node does not hold
// (any more) never leaves with it.
func TestPrivilegedFence(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		m := tp.manager(t, nil)
		tp.apply(t, m, rulesFor())
		for _, c := range []struct {
			rec        *recorder
			lb, nod    netip.Addr
			del, readd []string
		}{
			{newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv4, 5070)), lb4, node4,
				[]string{"ip", "addr", "del", "203.0.113.10/32", "dev", "vext"},
				[]string{"ip", "addr", "add", "203.0.113.10/32", "dev", "vext"}},
			{newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv6, 5070)), lb6, node6,
				[]string{"ip", "-6", "addr", "del", "2001:db8:1::10/128", "dev", "vext"},
				[]string{"ip", "-6", "addr", "add", "2001:db8:1::10/128", "dev", "vext", "nodad", "preferred_lft", "0"}},
		} {
			if got := arrives(t, c.rec, tp.pod, netip.Addr{}, "bound"); got != c.lb {
				t.Fatalf("with %s bound, arrived from %s", c.lb, got)
			}
			tp.node.Exec(t, c.del...)
			probe := func(what string) netip.Addr {
				got := arrives(t, c.rec, tp.podB, netip.Addr{}, what)
				if got == c.lb {
					t.Errorf("%s: a datagram arrived from %s, which the node no longer holds", what, got)
				}
				return got
			}
			neverArrives(t, c.rec, tp.pod, netip.Addr{}, c.lb.String()+" removed", probe)
			tp.node.Exec(t, c.readd...)
			if got := arrives(t, c.rec, tp.pod, netip.Addr{}, "bound again"); got != c.lb {
				t.Errorf("with %s bound again, arrived from %s", c.lb, got)
			}
		}
	})
}

// TestPrivilegedTunnelGuard: pods cannot send to the tunnel port, neither
// through the node nor to it; the rules with a tunnel device load.
func TestPrivilegedTunnelGuard(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		through := newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv4, 4789))
		to := newRecorder(t, tp.node, netip.AddrPortFrom(node4, 4789))
		through6 := newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv6, 4789))
		other := newRecorder(t, tp.ext, netip.AddrPortFrom(extSrv4, 5070))
		otherNode := newRecorder(t, tp.node, netip.AddrPortFrom(node4, 5070))
		arrives(t, through, tp.pod, netip.Addr{}, "before Apply")
		m := tp.managerWith(t, Config{Backend: b.name, TunnelDevice: "evx0", TunnelPort: 4789, PodCIDRs: []netip.Prefix{podNet4, podNet6}}, nil)
		tp.apply(t, m, rulesFor())
		probe := func(r *recorder) func(string) netip.Addr {
			return func(what string) netip.Addr { return arrives(t, r, tp.pod, netip.Addr{}, what) }
		}
		neverArrives(t, through, tp.pod, netip.Addr{}, "VXLAN port through the node", probe(other))
		neverArrives(t, to, tp.pod, netip.Addr{}, "VXLAN port of the node", probe(otherNode))
		neverArrives(t, through6, tp.pod, netip.Addr{}, "IPv6 VXLAN port", probe(other))
		if got := tp.seenAs(t, "udp", netip.AddrPortFrom(extSrv4, 5060)); got != lb4 {
			t.Errorf("with a tunnel device, egress arrived from %s", got)
		}
	})
}
