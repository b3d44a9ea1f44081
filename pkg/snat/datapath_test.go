package snat

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
)

var (
	clusterIP4 = netip.MustParseAddr("10.96.0.10")
	clusterIP6 = netip.MustParseAddr("fd00:10:96::a")
	node4      = netip.MustParseAddr("203.0.113.1")
	podF       = netip.MustParseAddr("10.244.1.7")
	remotePod4 = netip.MustParseAddr("10.244.2.9")
	unknown4   = netip.MustParseAddr("10.244.1.99")
)

// expect is what a traced packet should become.
type expect int

const (
	leavesAsPod expect = iota // no translation: the source stays
	leavesAsLB                // SNATed to want
	masqueraded               // left to the CNI's MASQUERADE
	steered                   // marked, source unchanged (no NAT here)
	dropped
)

func (e expect) String() string {
	return [...]string{"leaves with its own source", "leaves with the LoadBalancer IP", "is masqueraded by the CNI", "is steered", "is dropped"}[e]
}

type traceCase struct {
	name string
	p    pkt
	want expect
	lb   netip.Addr
}

func checkTrace(t *testing.T, n *node, tc traceCase) {
	t.Helper()
	got := n.trace(tc.p)
	ok := false
	switch tc.want {
	case leavesAsPod:
		ok = got.leaves(tc.p.src)
	case leavesAsLB:
		ok = got.leaves(tc.lb)
	case masqueraded:
		ok = got.unsupported == "" && !got.dropped && !got.marked && got.masquerade
	case steered:
		ok = got.steered(tc.p.src)
	case dropped:
		ok = got.unsupported == "" && got.dropped
	}
	if !ok {
		want := tc.want.String()
		if tc.want == leavesAsLB {
			want += " " + tc.lb.String()
		}
		t.Errorf("%s: packet %s %s; want it %s\n%s", tc.name, tc.p, got, want, n.dump())
	}
}

func dnat(p pkt, from netip.Addr) pkt {
	p.origDst = from
	return p
}

func spoofed(p pkt, iif string) pkt {
	p.iif, p.spoofed = iif, true
	return p
}

// TestTraceSNAT: SNAT rules with every kind of filter, local and remote,
// and exclusions by original and current destination.
func TestTraceSNAT(t *testing.T) {
	sctp5060 := annotations.DestinationPort{Protocol: annotations.SCTP, Port: 5060}
	d := model.Datapath{
		SNAT: []model.SNATRule{
			{Service: "default/sip", Pod: pod4, Source: lb4, Filter: ports(udp5060, sctp5060)},
			{Service: "other/web", Pod: pod4b, Source: lb4b},
			{Service: "default/sip", Pod: pod6, Source: lb6},
			{Service: "f/allow", Pod: podF, Source: lb4, Filter: model.Filter{
				Ports: []annotations.DestinationPort{{Protocol: annotations.TCP, Port: 443}},
				Allow: prefixes("198.51.100.0/24", "2001:db8:2::/48"),
				Deny:  prefixes("198.51.100.9/32"),
			}},
			{Service: "f/deny6", Pod: pod6b, Source: lb6b, Filter: model.Filter{Deny: prefixes("2001:db8:2::9/128", "198.51.100.0/24")}},
			{Service: "r/remote", Pod: remotePod4, Source: lb4b, Remote: true},
		},
		Exclude: []netip.Prefix{podNet4, svcNet4, podNet6, svcNet6, netip.MustParsePrefix("10.244.7.0/24")},
	}
	tcp443 := func(src, dst netip.Addr) pkt { return protoPkt(src, dst, annotations.TCP, 443) }
	tests := []traceCase{
		{"a packet from pod 10.244.1.5 to 198.51.100.9:5060/udp leaves with source 203.0.113.10", udpPkt(pod4, ext4, 5060), leavesAsLB, lb4},
		{"SCTP port", protoPkt(pod4, ext4, annotations.SCTP, 5060), leavesAsLB, lb4},
		{"other port is left to the CNI", protoPkt(pod4, ext4, annotations.TCP, 8080), masqueraded, netip.Addr{}},
		{"same port, other protocol", protoPkt(pod4, ext4, annotations.TCP, 5060), masqueraded, netip.Addr{}},
		{"all-traffic rule", tcp443(pod4b, ext4), leavesAsLB, lb4b},
		{"pod CIDR excluded", tcp443(pod4b, netip.MustParseAddr("10.244.2.7")), leavesAsPod, netip.Addr{}},
		{"ClusterIP excluded", udpPkt(pod4b, clusterIP4, 53), masqueraded, netip.Addr{}},
		{"DNATed from a ClusterIP to an external endpoint: excluded by the original destination", dnat(udpPkt(pod4b, ext4, 8080), clusterIP4), masqueraded, netip.Addr{}},
		{"DNATed to a pod: excluded by the current destination", dnat(udpPkt(pod4b, netip.MustParseAddr("10.244.3.3"), 80), ext4), leavesAsPod, netip.Addr{}},
		{"pod without rule", udpPkt(unknown4, ext4, 5060), masqueraded, netip.Addr{}},
		{"allowed prefix and port", tcp443(podF, netip.MustParseAddr("198.51.100.10")), leavesAsLB, lb4},
		{"denied inside the allowed prefix", tcp443(podF, ext4), masqueraded, netip.Addr{}},
		{"outside the allowed prefix", tcp443(podF, netip.MustParseAddr("203.0.113.50")), masqueraded, netip.Addr{}},
		{"allowed prefix, other port", protoPkt(podF, netip.MustParseAddr("198.51.100.10"), annotations.TCP, 80), masqueraded, netip.Addr{}},
		{"remote pod's packet, steered here", udpPkt(remotePod4, ext4, 5060), leavesAsLB, lb4b},
		{"IPv6 all traffic", udpPkt(pod6, ext6, 5060), leavesAsLB, lb6},
		{"IPv6 pod CIDR excluded", udpPkt(pod6, netip.MustParseAddr("fd00:10:244:2::3"), 5060), leavesAsPod, netip.Addr{}},
		{"IPv6 DNATed from a ClusterIP", dnat(udpPkt(pod6, ext6, 8080), clusterIP6), masqueraded, netip.Addr{}},
		{"IPv6 deny only: other destination", udpPkt(pod6b, netip.MustParseAddr("2001:db8:2::8"), 53), leavesAsLB, lb6b},
		{"IPv6 deny only: denied", udpPkt(pod6b, ext6, 53), masqueraded, netip.Addr{}},
	}
	forEachFake(t, func(t *testing.T, backend string) {
		n := newNode(t, backend, Config{})
		n.apply(t, d)
		for _, tc := range tests {
			checkTrace(t, n, tc)
		}
		got, err := n.m.Services(t.Context())
		must(t, err)
		if want := []string{"default/sip", "f/allow", "f/deny6", "other/web", "r/remote"}; !slices.Equal(got, want) {
			t.Errorf("Services = %v, want %v", got, want)
		}
	})
}

// TestTraceSteerHoldGate: steering marks and keeps the pod's source past
// the CNI's MASQUERADE; holds and the gate drop; exclusions pass.
func TestTraceSteerHoldGate(t *testing.T) {
	held := netip.MustParseAddr("10.244.1.8")
	d := model.Datapath{
		SNAT: []model.SNATRule{
			// A port of the steered pod stays here (first-match order by
			// Service: "a/..." before "b/...").
			{Service: "a/sip-here", Pod: pod4, Source: lb4, Filter: ports(udp5060)},
		},
		Steer: []model.SteerRule{
			{Service: "b/steered", Pod: pod4, Holder: "n2", Via: []netip.Addr{node4}},
			{Service: "s/filtered", Pod: pod4b, Holder: "n2", Filter: model.Filter{Allow: prefixes("198.51.100.0/24"), Ports: []annotations.DestinationPort{tcp8080}}},
			{Service: "s/v6", Pod: pod6, Holder: "n2"},
		},
		Hold: []model.HoldRule{
			{Service: "h/strict", Pod: held},
			{Service: "h/strict-port", Pod: podF, Filter: ports(udp5060)},
		},
		Gate: &model.Gate{
			PodCIDRs: []netip.Prefix{podNet4},
			Known:    []netip.Addr{netip.MustParseAddr("10.244.1.20")},
		},
		Exclude: []netip.Prefix{podNet4, svcNet4, podNet6},
		Fenced:  []netip.Addr{lb4},
	}
	tests := []traceCase{
		{"steered pod: marked, not masqueraded", protoPkt(pod4, ext4, annotations.TCP, 443), steered, netip.Addr{}},
		{"steered pod, port SNATed here by an earlier rule", udpPkt(pod4, ext4, 5060), leavesAsLB, lb4},
		{"steered pod, excluded destination", udpPkt(pod4, clusterIP4, 53), masqueraded, netip.Addr{}},
		{"steered pod, DNATed from a ClusterIP", dnat(udpPkt(pod4, ext4, 53), clusterIP4), masqueraded, netip.Addr{}},
		{"filtered steer: allowed", protoPkt(pod4b, ext4, annotations.TCP, 8080), steered, netip.Addr{}},
		{"filtered steer: other prefix", protoPkt(pod4b, node4, annotations.TCP, 8080), masqueraded, netip.Addr{}},
		{"filtered steer: other port", protoPkt(pod4b, ext4, annotations.TCP, 8081), masqueraded, netip.Addr{}},
		{"IPv6 steered", udpPkt(pod6, ext6, 53), steered, netip.Addr{}},
		{"held pod", udpPkt(held, ext4, 53), dropped, netip.Addr{}},
		{"held pod, in-cluster destination", udpPkt(held, clusterIP4, 53), masqueraded, netip.Addr{}},
		{"held port", udpPkt(podF, ext4, 5060), dropped, netip.Addr{}},
		{"held pod, other port", udpPkt(podF, ext4, 5061), masqueraded, netip.Addr{}},
		{"gate: unknown pod", udpPkt(unknown4, ext4, 53), dropped, netip.Addr{}},
		{"gate: unknown pod, in-cluster destination", udpPkt(unknown4, clusterIP4, 53), masqueraded, netip.Addr{}},
		{"gate: unknown pod, DNATed from a ClusterIP", dnat(udpPkt(unknown4, ext4, 53), clusterIP4), masqueraded, netip.Addr{}},
		{"gate: known pod", udpPkt(netip.MustParseAddr("10.244.1.20"), ext4, 53), masqueraded, netip.Addr{}},
		{"gate: pods of rules are known", protoPkt(pod4, ext4, annotations.TCP, 443), steered, netip.Addr{}},
		{"gate: node traffic", udpPkt(node4, ext4, 53), leavesAsPod, netip.Addr{}},
	}
	forEachFake(t, func(t *testing.T, backend string) {
		n := newNode(t, backend, Config{})
		n.apply(t, d)
		for _, tc := range tests {
			checkTrace(t, n, tc)
		}
		// The gate goes: unknown pods pass.
		d := d
		d.Gate = nil
		n.apply(t, d)
		checkTrace(t, n, traceCase{"no gate", udpPkt(unknown4, ext4, 53), masqueraded, netip.Addr{}})
	})
}

// TestTraceAntiSpoofFenceGuard: forged sources of egress pods are dropped
// (except from the tunnel), SNAT to an address the node does not hold is
// fenced, pods cannot send to the tunnel port.
func TestTraceAntiSpoofFenceGuard(t *testing.T) {
	d := model.Datapath{
		SNAT: []model.SNATRule{
			{Service: "a/b", Pod: pod4b, Source: lb4b},
			{Service: "r/remote", Pod: remotePod4, Source: lb4, Remote: true},
			{Service: "a/v6", Pod: pod6, Source: lb6},
		},
		Steer:   []model.SteerRule{{Service: "s/s", Pod: podF, Holder: "n2"}},
		Exclude: []netip.Prefix{podNet4, svcNet4, podNet6},
		Fenced:  []netip.Addr{lb4, lb4b, lb6},
	}
	local := func(p pkt, addrs ...netip.Addr) pkt {
		p.local = append([]netip.Addr{node4}, addrs...)
		return p
	}
	tests := []traceCase{
		{"pod B's own packet", udpPkt(pod4b, ext4, 53), leavesAsLB, lb4b},
		{"pod A forges pod B's source", spoofed(udpPkt(pod4b, ext4, 53), "vpod-a"), dropped, netip.Addr{}},
		{"pod A forges a steered pod's source", spoofed(udpPkt(podF, ext4, 53), "vpod-a"), dropped, netip.Addr{}},
		{"forged IPv6 source", spoofed(udpPkt(pod6, ext6, 53), "vpod-a"), dropped, netip.Addr{}},
		{"forged source of a pod without rules: not ours", spoofed(udpPkt(unknown4, ext4, 53), "vpod-a"), masqueraded, netip.Addr{}},
		{"remote pod over the tunnel, not routed back through it", spoofed(udpPkt(remotePod4, ext4, 53), "evx0"), leavesAsLB, lb4},
		{"remote pod forged on the node network", spoofed(udpPkt(remotePod4, ext4, 53), "eth0"), dropped, netip.Addr{}},
		{"fence: SNAT to an address the node holds", local(udpPkt(pod4b, ext4, 53), lb4b), leavesAsLB, lb4b},
		{"fence: SNAT to an address the node no longer holds", local(udpPkt(pod4b, ext4, 53), lb4), dropped, netip.Addr{}},
		{"fence: masqueraded traffic passes", local(udpPkt(unknown4, ext4, 53)), masqueraded, netip.Addr{}},
		{"tunnel guard: pod to the tunnel port", udpPkt(unknown4, ext4, 4789), dropped, netip.Addr{}},
		{"tunnel guard: pod to a node's tunnel port", udpPkt(pod4b, node4, 4789), dropped, netip.Addr{}},
		{"tunnel guard: TCP to that port", protoPkt(unknown4, ext4, annotations.TCP, 4789), masqueraded, netip.Addr{}},
		{"tunnel guard: a node's VXLAN", udpPkt(node4, ext4, 4789), leavesAsPod, netip.Addr{}},
		{"tunnel guard: IPv6 pod", udpPkt(pod6b, ext6, 4789), dropped, netip.Addr{}},
	}
	forEachFake(t, func(t *testing.T, backend string) {
		n := newNode(t, backend, Config{TunnelDevice: "evx0", TunnelPort: 4789, PodCIDRs: []netip.Prefix{podNet4, podNet6}})
		n.apply(t, d)
		for _, tc := range tests {
			checkTrace(t, n, tc)
		}
		if !strings.Contains(n.dump(), "maxseg") && !strings.Contains(n.dump(), "TCPMSS") {
			t.Errorf("no MSS clamp for steered SYNs into the tunnel:\n%s", n.dump())
		}
	})
}

// TestTraceMark: the steering mark is Config.Mark, set without clearing
// other bits.
func TestTraceMark(t *testing.T) {
	for _, bad := range []uint32{0x3000, 0xffffffff} {
		if _, err := New(Config{Mark: bad, Tables: [2]NFTables{NewFakeNFT(IPv4), NewFakeNFT(IPv6)}}); err == nil {
			t.Errorf("mark %#x accepted", bad)
		}
	}
	if _, err := New(Config{TunnelDevice: `evx"0`, Tables: [2]NFTables{NewFakeNFT(IPv4), NewFakeNFT(IPv6)}}); err == nil {
		t.Error("bad tunnel device accepted")
	}
	forEachFake(t, func(t *testing.T, backend string) {
		n := newNode(t, backend, Config{Mark: 0x4000})
		n.apply(t, model.Datapath{Steer: []model.SteerRule{{Service: "s/s", Pod: pod4}}})
		dump := n.dump()
		for _, want := range []string{"0x4000"} {
			if !strings.Contains(dump, want) {
				t.Errorf("mark %s not written:\n%s", want, dump)
			}
		}
		if strings.Contains(dump, "0x1000") {
			t.Errorf("default mark written:\n%s", dump)
		}
		checkTrace(t, n, traceCase{"steered with mark 0x4000", udpPkt(pod4, ext4, 53), steered, netip.Addr{}})
	})
}

// randomDatapath returns a random state of rules over a few pods,
// Services, kinds and filters.
func randomDatapath(rng *rand.Rand) model.Datapath {
	pods := []netip.Addr{pod4, pod4b, podF, pod6, pod6b}
	lbs := map[Family][]netip.Addr{IPv4: {lb4, lb4b}, IPv6: {lb6, lb6b}}
	allPorts := []annotations.DestinationPort{udp5060, tcp8080, {Protocol: annotations.SCTP, Port: 5060}, {Protocol: annotations.TCP, Port: 5060}}
	pfx := prefixes("198.51.100.0/24", "198.51.100.8/29", "203.0.113.0/24", "2001:db8:2::/48", "2001:db8:2::8/125")
	services := []string{"a/one", "b/two", "c/three"}
	filter := func() model.Filter {
		var f model.Filter
		for range rng.IntN(3) {
			f.Ports = append(f.Ports, allPorts[rng.IntN(len(allPorts))])
		}
		if rng.IntN(3) == 0 {
			for range 1 + rng.IntN(2) {
				f.Allow = append(f.Allow, pfx[rng.IntN(len(pfx))])
			}
		}
		if rng.IntN(3) == 0 {
			f.Deny = append(f.Deny, pfx[rng.IntN(len(pfx))])
		}
		return f
	}
	d := model.Datapath{Exclude: []netip.Prefix{podNet4, svcNet4, podNet6}}
	for range rng.IntN(9) {
		pod := pods[rng.IntN(len(pods))]
		svc := services[rng.IntN(len(services))]
		switch rng.IntN(4) {
		case 0:
			d.Steer = append(d.Steer, model.SteerRule{Service: svc, Pod: pod, Filter: filter()})
		case 1:
			d.Hold = append(d.Hold, model.HoldRule{Service: svc, Pod: pod, Filter: filter()})
		default:
			d.SNAT = append(d.SNAT, model.SNATRule{Service: svc, Pod: pod, Source: lbs[familyOf(pod)][rng.IntN(2)], Filter: filter()})
		}
	}
	return d
}

// TestBackendsAgree applies random states to both backends and traces
// random packets through both: iptables' rules must treat every packet
// like the nftables table, and what each reads back from the kernel must
// plan like what was applied (no conntrack entry of an unchanged pod goes
// on a restart).
func TestBackendsAgree(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	nftNode := newNode(t, BackendNFTables, Config{})
	iptNode := newNode(t, BackendIPTablesLegacy, Config{})
	srcs := []netip.Addr{pod4, pod4b, podF, unknown4, pod6, pod6b}
	dsts := []netip.Addr{ext4, netip.MustParseAddr("198.51.100.12"), netip.MustParseAddr("203.0.113.7"), clusterIP4, ext6, netip.MustParseAddr("2001:db8:2::10"), netip.MustParseAddr("fd00:10:244:3::3")}
	allPorts := []annotations.DestinationPort{udp5060, tcp8080, {Protocol: annotations.SCTP, Port: 5060}, {Protocol: annotations.TCP, Port: 5060}, {Protocol: annotations.UDP, Port: 53}}
	for round := range 60 {
		d := randomDatapath(rng)
		nftNode.apply(t, d)
		iptNode.apply(t, d)
		for _, src := range srcs {
			for _, dst := range dsts {
				if familyOf(src) != familyOf(dst) {
					continue
				}
				for _, p := range allPorts {
					pk := protoPkt(src, dst, p.Protocol, p.Port)
					a, b := nftNode.trace(pk), iptNode.trace(pk)
					if a.unsupported != "" || b.unsupported != "" || a.dropped != b.dropped || a.marked != b.marked || a.masquerade != b.masquerade || a.source != b.source {
						t.Fatalf("round %d: packet %s: nftables %s, iptables %s\nstate %+v\n%s%s", round, pk, a, b, d, nftNode.dump(), iptNode.dump())
					}
				}
			}
		}
		fams, _ := normalize(d, nil, "")
		for _, f := range Families {
			want := compile(fams[f]).plans
			read, err := nftRead(t.Context(), nftNode.nft[f])
			must(t, err)
			if fl := flushes(read.plans, want, nil); len(fl) != 0 {
				t.Fatalf("round %d %s: nftables read back differs: flushes %+v", round, f, fl)
			}
			save, _ := iptNode.ipt[f].Save(t.Context())
			rs, err := parseSave(save, nil)
			must(t, err)
			if fl := flushes(rs.readPlans().plans, want, nil); len(fl) != 0 {
				t.Fatalf("round %d %s: iptables read back differs: flushes %+v\n%s", round, f, fl, save)
			}
		}
	}
}

// manyServices returns n Services, one IPv4 pod each.
func manyServices(n int) model.Datapath {
	d := model.Datapath{Exclude: []netip.Prefix{podNet4, svcNet4}}
	for i := range n {
		d.SNAT = append(d.SNAT, model.SNATRule{
			Service: fmt.Sprintf("ns/svc-%02d", i),
			Pod:     netip.AddrFrom4([4]byte{10, 244, 2, byte(i + 1)}),
			Source:  lb4,
		})
	}
	return d
}

// TestApplyIsolatesABadService: a Service whose rule the kernel refuses
// fails alone, in a bounded number of writes; the others are written.
func TestApplyIsolatesABadService(t *testing.T) {
	for _, bad := range []int{0, 5, 15} {
		forEachFake(t, func(t *testing.T, backend string) {
			n := newNode(t, backend, Config{})
			badName := fmt.Sprintf("ns/svc-%02d", bad)
			d := manyServices(16)
			attempts := func() int {
				if backend == BackendNFTables {
					return n.nft[IPv4].Attempts
				}
				return n.ipt[IPv4].Attempts
			}
			refuse := func(s string) {
				if backend == BackendNFTables {
					n.nft[IPv4].Refuse = s
				} else {
					n.ipt[IPv4].Refuse = s
				}
			}
			check := func(what string, failed map[string]error, err error, before int) {
				t.Helper()
				if err != nil {
					t.Fatalf("%s: Apply error %v, want only %s failed", what, err, badName)
				}
				if len(failed) != 1 || failed[badName] == nil || !strings.Contains(failed[badName].Error(), "refused") {
					t.Fatalf("%s: failed = %v, want only %s", what, failed, badName)
				}
				// log2(16) + 2, and one more to clear the rest when the
				// bad one is found early.
				if got := attempts() - before; got > 7 {
					t.Errorf("%s: %d writes to isolate one bad Service among 16", what, got)
				}
				for i, r := range d.SNAT {
					p := udpPkt(r.Pod, ext4, 53)
					if i == bad {
						checkTrace(t, n, traceCase{"the bad Service's pod", p, masqueraded, netip.Addr{}})
					} else {
						checkTrace(t, n, traceCase{"another Service's pod", p, leavesAsLB, lb4})
					}
				}
			}
			// A restart: every Service is suspect.
			refuse(badName)
			before := attempts()
			failed, err := n.m.Apply(t.Context(), d)
			check("first write", failed, err, before)

			// Steady state: the good ones are known, one changed
			// Service goes bad.
			refuse("")
			n.apply(t, d)
			d.SNAT[bad].Source = lb4b
			refuse(badName)
			before = attempts()
			failed, err = n.m.Apply(t.Context(), d)
			if err != nil || len(failed) != 1 || failed[badName] == nil {
				t.Fatalf("one changed Service: failed = %v, %v", failed, err)
			}
			if got := attempts() - before; got > 2 {
				t.Errorf("one changed bad Service took %d writes, want 2 (all, then without it)", got)
			}
			d.SNAT[bad].Source = lb4
		})
	}
}

// TestApplyFamilyFailure: a family that cannot be written fails its
// Services; both failing is an error for everyone.
func TestApplyFamilyFailure(t *testing.T) {
	forEachFake(t, func(t *testing.T, backend string) {
		n := newNode(t, backend, Config{})
		boom := errors.New("ip6 table unusable")
		setErr := func(f Family, err error) {
			if backend == BackendNFTables {
				n.nft[f].RunErr = err
			} else {
				n.ipt[f].RestoreErr = err
			}
		}
		d := dualStack()
		d.SNAT = append(d.SNAT, model.SNATRule{Service: "v4/only", Pod: pod4b, Source: lb4b})
		setErr(IPv6, boom)
		failed, err := n.m.Apply(t.Context(), d)
		if err != nil || len(failed) != 1 || !errors.Is(failed["default/sip"], boom) || !strings.Contains(failed["default/sip"].Error(), "IPv6") {
			t.Fatalf("IPv6 failing: failed = %v, err = %v; want default/sip failed in IPv6", failed, err)
		}
		checkTrace(t, n, traceCase{"IPv4 written", udpPkt(pod4b, ext4, 53), leavesAsLB, lb4b})
		// A new Service that IPv4 cannot take fails alone: the rest of
		// IPv4 is in place.
		setErr(IPv4, boom)
		d.SNAT = append(d.SNAT, model.SNATRule{Service: "v4/new", Pod: podF, Source: lb4b})
		if failed, err := n.m.Apply(t.Context(), d); err != nil || len(failed) != 2 || failed["v4/new"] == nil || failed["default/sip"] == nil {
			t.Fatalf("IPv4 failing for a new Service: failed = %v, err = %v", failed, err)
		}
		checkTrace(t, n, traceCase{"IPv4 still in place", udpPkt(pod4b, ext4, 53), leavesAsLB, lb4b})
		// Nothing can be written at all: an error for everyone.
		n = newNode(t, backend, Config{})
		setErr(IPv4, boom)
		setErr(IPv6, boom)
		if failed, err := n.m.Apply(t.Context(), d); err == nil || failed != nil {
			t.Fatalf("both failing: failed = %v, err = %v; want an error for all", failed, err)
		}
		setErr(IPv4, nil)
		setErr(IPv6, nil)
		n.apply(t, d)
		checkTrace(t, n, traceCase{"IPv6 written after all", udpPkt(pod6, ext6, 53), leavesAsLB, lb6})
	})
}

// TestApplyInvalidRules: rules with missing addresses or mixed families
// fail their Service and nothing else.
func TestApplyInvalidRules(t *testing.T) {
	n := newNode(t, BackendNFTables, Config{})
	d := dualStack()
	d.SNAT = append(d.SNAT,
		model.SNATRule{Service: "a/mixed", Pod: pod4b, Source: lb6},
		model.SNATRule{Service: "a/nopod", Source: lb4},
	)
	d.Steer = append(d.Steer, model.SteerRule{Service: "a/nosteer"})
	failed, err := n.m.Apply(t.Context(), d)
	if err != nil || len(failed) != 3 || failed["a/mixed"] == nil || failed["a/nopod"] == nil || failed["a/nosteer"] == nil {
		t.Fatalf("failed = %v, %v", failed, err)
	}
	checkTrace(t, n, traceCase{"valid rule written", udpPkt(pod4, ext4, 53), leavesAsLB, lb4})
}

func TestSubtractPrefixes(t *testing.T) {
	got := subtractPrefixes(netip.MustParsePrefix("198.51.100.0/24"), prefixes("198.51.100.9/32", "198.51.100.128/25", "10.0.0.0/8"))
	want := prefixes("198.51.100.0/29", "198.51.100.8/32", "198.51.100.10/31", "198.51.100.12/30", "198.51.100.16/28", "198.51.100.32/27", "198.51.100.64/26")
	if !slices.Equal(got, want) {
		t.Errorf("subtract = %v, want %v", got, want)
	}
	if got := subtractPrefixes(netip.MustParsePrefix("198.51.100.0/24"), prefixes("198.51.0.0/16")); len(got) != 0 {
		t.Errorf("inside a denied prefix: %v", got)
	}
	six := subtractPrefixes(netip.MustParsePrefix("::/0"), prefixes("2001:db8::/32"))
	if len(six) != 32 {
		t.Errorf("::/0 minus a /32: %d prefixes, want 32", len(six))
	}
}

// TestTraceSteeredConnectionStaysSteered: a steered packet marks its
// connection; once this node SNATs the pod itself (it took the address
// over), a packet of a connection that began steered (its conntrack
// binding is none) is dropped until the entry is deleted, never sent with
// the pod's address; new connections and the replies pass.
func TestTraceSteeredConnectionStaysSteered(t *testing.T) {
	steer := model.Datapath{
		Steer:   []model.SteerRule{{Service: "a/moving", Pod: pod4, Holder: "n2", Via: []netip.Addr{node4}}},
		Exclude: []netip.Prefix{podNet4, svcNet4},
	}
	here := model.Datapath{
		SNAT:    []model.SNATRule{{Service: "a/moving", Pod: pod4, Source: lb4}},
		Exclude: steer.Exclude,
		Fenced:  []netip.Addr{lb4},
	}
	forEachFake(t, func(t *testing.T, backend string) {
		n := newNode(t, backend, Config{})
		n.apply(t, steer)
		first := udpPkt(pod4, ext4, 5060)
		got := n.trace(first)
		if !got.steered(pod4) || got.ctMark&0x1000 == 0 {
			t.Fatalf("steered packet %s, conntrack mark %#x; want steered and the connection marked\n%s", got, got.ctMark, n.dump())
		}
		n.apply(t, here)
		later := first
		later.ctMark = got.ctMark
		if got := n.trace(later); !got.dropped {
			t.Errorf("packet of a connection that began steered, pod now SNATed here: %s; want it dropped\n%s", got, n.dump())
		}
		checkTrace(t, n, traceCase{"new connection", udpPkt(pod4, ext4, 5060), leavesAsLB, lb4})
		reply := udpPkt(ext4, pod4, 40000)
		reply.reply, reply.ctMark, reply.iif, reply.oif = true, got.ctMark, "vext", "vpod"
		if got := n.trace(reply); got.dropped || got.unsupported != "" {
			t.Errorf("reply of a connection that began steered: %s; want it to pass", got)
		}
	})
}
