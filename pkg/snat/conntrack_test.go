package snat

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/vishvananda/netlink"
)

func plansOf(d model.Datapath) map[netip.Addr]*podPlan {
	fams, _ := normalize(d, nil, "")
	return compile(fams[IPv4]).plans
}

func TestFlushes(t *testing.T) {
	ex := []netip.Prefix{podNet4}
	all := func(pod, src netip.Addr) model.SNATRule {
		return model.SNATRule{Service: "ns/a", Pod: pod, Source: src}
	}
	withPorts := func(pod, src netip.Addr, p ...annotations.DestinationPort) model.SNATRule {
		return model.SNATRule{Service: "ns/a", Pod: pod, Source: src, Filter: ports(p...)}
	}
	allowed := model.Filter{Allow: prefixes("198.51.100.0/24")}
	tests := []struct {
		name       string
		prev, next model.Datapath
		want       []flush
	}{
		{name: "nothing changes", prev: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}}, next: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}}},
		{name: "only the Service's name changes", prev: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}},
			next: model.Datapath{SNAT: []model.SNATRule{{Service: "ns/renamed", Pod: pod4, Source: lb4}}}},
		{name: "rule added", next: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}},
			want: []flush{{pod: pod4}}},
		{name: "rule removed", prev: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4), all(pod4b, lb4b)}}, next: model.Datapath{SNAT: []model.SNATRule{all(pod4b, lb4b)}},
			want: []flush{{pod: pod4}}},
		{name: "source changed", prev: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}}, next: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4b)}},
			want: []flush{{pod: pod4}}},
		{name: "SNAT becomes steering", prev: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}}, next: model.Datapath{Steer: []model.SteerRule{{Service: "ns/a", Pod: pod4}}},
			want: []flush{{pod: pod4}}},
		{name: "hold ends", prev: model.Datapath{Hold: []model.HoldRule{{Service: "ns/a", Pod: pod4}}}, next: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}},
			want: []flush{{pod: pod4}}},
		{name: "ports added to an all-traffic rule", prev: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}}, next: model.Datapath{SNAT: []model.SNATRule{withPorts(pod4, lb4, udp5060)}},
			want: []flush{{pod: pod4}}},
		{name: "port changed flushes old and new port only", prev: model.Datapath{SNAT: []model.SNATRule{withPorts(pod4, lb4, udp5060, tcp8080)}},
			next: model.Datapath{SNAT: []model.SNATRule{withPorts(pod4, lb4, tcp8080, annotations.DestinationPort{Protocol: annotations.UDP, Port: 5061})}},
			want: []flush{{pod: pod4, ports: []annotations.DestinationPort{udp5060, {Protocol: annotations.UDP, Port: 5061}}}}},
		{name: "port rule added under an unchanged all-traffic rule of another Service",
			prev: model.Datapath{SNAT: []model.SNATRule{{Service: "z/all", Pod: pod4, Source: lb4}}},
			next: model.Datapath{SNAT: []model.SNATRule{{Service: "a/sip", Pod: pod4, Source: lb4b, Filter: ports(udp5060)}, {Service: "z/all", Pod: pod4, Source: lb4}}},
			want: []flush{{pod: pod4, ports: []annotations.DestinationPort{udp5060}}}},
		{name: "shadowed port rule changes nothing",
			prev: model.Datapath{SNAT: []model.SNATRule{{Service: "a/all", Pod: pod4, Source: lb4}}},
			next: model.Datapath{SNAT: []model.SNATRule{{Service: "a/all", Pod: pod4, Source: lb4}, {Service: "z/sip", Pod: pod4, Source: lb4b, Filter: ports(udp5060)}}}},
		{name: "prefix filter added: all of the pod's entries",
			prev: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}},
			next: model.Datapath{SNAT: []model.SNATRule{{Service: "ns/a", Pod: pod4, Source: lb4, Filter: allowed}}},
			want: []flush{{pod: pod4}}},
		{name: "same prefix filter: nothing",
			prev: model.Datapath{SNAT: []model.SNATRule{{Service: "ns/a", Pod: pod4, Source: lb4, Filter: allowed}}},
			next: model.Datapath{SNAT: []model.SNATRule{{Service: "ns/a", Pod: pod4, Source: lb4, Filter: allowed}}}},
		{name: "two pods, sorted", prev: model.Datapath{SNAT: []model.SNATRule{all(pod4b, lb4)}}, next: model.Datapath{SNAT: []model.SNATRule{all(pod4, lb4)}},
			want: []flush{{pod: pod4}, {pod: pod4b}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := flushes(plansOf(tc.prev), plansOf(tc.next), ex)
			if len(got) != len(tc.want) {
				t.Fatalf("got %d flushes %+v, want %+v", len(got), got, tc.want)
			}
			for i := range got {
				if got[i].pod != tc.want[i].pod || !slices.Equal(got[i].ports, tc.want[i].ports) {
					t.Errorf("flush %d = %+v, want %+v", i, got[i], tc.want[i])
				}
				if !slices.Contains(got[i].exclude, podNet4) {
					t.Errorf("flush %d lost the exclusions: %v", i, got[i].exclude)
				}
			}
		})
	}
}

func flow(src, dst netip.Addr, proto uint8, dport uint16) *netlink.ConntrackFlow {
	return &netlink.ConntrackFlow{
		Forward: netlink.IPTuple{SrcIP: net.IP(src.AsSlice()), DstIP: net.IP(dst.AsSlice()), Protocol: proto, SrcPort: 40000, DstPort: dport},
		Reverse: netlink.IPTuple{SrcIP: net.IP(dst.AsSlice()), DstIP: net.IP(src.AsSlice()), Protocol: proto, SrcPort: dport, DstPort: 40000},
	}
}

// dnatFlow is a flow whose destination was DNATed to to.
func dnatFlow(src, dst, to netip.Addr, proto uint8, dport uint16) *netlink.ConntrackFlow {
	f := flow(src, dst, proto, dport)
	f.Reverse.SrcIP = net.IP(to.AsSlice())
	return f
}

func TestFlushMatchConntrackFlow(t *testing.T) {
	all := flush{pod: pod4, exclude: []netip.Prefix{podNet4, svcNet4}}
	sip := flush{pod: pod4, ports: []annotations.DestinationPort{udp5060}, exclude: []netip.Prefix{podNet4}}
	v6 := flush{pod: pod6, exclude: []netip.Prefix{podNet6}}
	sctp := flush{pod: pod4, ports: []annotations.DestinationPort{{Protocol: annotations.SCTP, Port: 3868}}, exclude: []netip.Prefix{podNet4}}
	tests := []struct {
		name   string
		filter flush
		flow   *netlink.ConntrackFlow
		want   bool
	}{
		{"pod to external", all, flow(pod4, ext4, 6, 443), true},
		{"other pod", all, flow(pod4b, ext4, 6, 443), false},
		{"towards pod CIDR", all, flow(pod4, netip.MustParseAddr("10.244.3.3"), 6, 443), false},
		{"towards Service CIDR", all, flow(pod4, netip.MustParseAddr("10.96.0.10"), 17, 53), false},
		{"towards a ClusterIP DNATed to an external endpoint", all, dnatFlow(pod4, netip.MustParseAddr("10.96.0.10"), ext4, 6, 443), false},
		{"towards an external address DNATed to a pod", all, dnatFlow(pod4, ext4, netip.MustParseAddr("10.244.3.3"), 6, 443), false},
		{"port filter, matching", sip, flow(pod4, ext4, 17, 5060), true},
		{"port filter, other protocol", sip, flow(pod4, ext4, 6, 5060), false},
		{"port filter, other port", sip, flow(pod4, ext4, 17, 5061), false},
		{"reply direction is not the pod's flow", all, flow(ext4, pod4, 6, 443), false},
		{"IPv6 pod to external", v6, flow(pod6, ext6, 17, 5060), true},
		// The netlink library does not read SCTP ports: they read as 0.
		{"SCTP port filter, port unreadable", sctp, flow(pod4, ext4, 132, 0), true},
		{"SCTP port filter, matching port", sctp, flow(pod4, ext4, 132, 3868), true},
		{"SCTP port filter, other port when readable", sctp, flow(pod4, ext4, 132, 3869), false},
		{"SCTP port filter, other pod", sctp, flow(pod4b, ext4, 132, 0), false},
		{"SCTP port filter, excluded destination", sctp, flow(pod4, netip.MustParseAddr("10.244.3.3"), 132, 0), false},
		{"UDP port filter does not match SCTP", sip, flow(pod4, ext4, 132, 0), false},
		{"SCTP port filter does not match UDP without port", sctp, flow(pod4, ext4, 17, 0), false},
		{"IPv6 towards pod CIDR", v6, flow(pod6, netip.MustParseAddr("fd00:10:244:2::1"), 17, 5060), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.filter.MatchConntrackFlow(tc.flow); got != tc.want {
				t.Errorf("MatchConntrackFlow = %v, want %v", got, tc.want)
			}
		})
	}
}

// snatFlow is a flow from src to dst whose source was translated to to.
func snatFlow(src, dst, to netip.Addr, proto uint8, dport uint16) *netlink.ConntrackFlow {
	f := flow(src, dst, proto, dport)
	f.Reverse.DstIP = net.IP(to.AsSlice())
	return f
}

func TestMistranslatedMatchConntrackFlow(t *testing.T) {
	node := netip.MustParseAddr("203.0.113.1")
	d := model.Datapath{
		SNAT: []model.SNATRule{
			// pod4: SIP by lb4b, the rest by lb4.
			{Service: "a/sip", Pod: pod4, Source: lb4b, Filter: ports(udp5060)},
			{Service: "b/all", Pod: pod4, Source: lb4},
			// pod4b: only towards 198.51.100.0/24 but not .128/25.
			{Service: "c/some", Pod: pod4b, Source: lb4, Filter: model.Filter{Allow: prefixes("198.51.100.0/24"), Deny: prefixes("198.51.100.128/25")}},
		},
		Steer:   []model.SteerRule{{Service: "d/steered", Pod: netip.MustParseAddr("10.244.2.7")}},
		Exclude: []netip.Prefix{podNet4, svcNet4},
	}
	fams, _ := normalize(d, nil, "")
	m := newMistranslated(fams[IPv4], nil)
	steered := netip.MustParseAddr("10.244.2.7")
	tests := []struct {
		name string
		flow *netlink.ConntrackFlow
		want bool
	}{
		{"SNATed to the LoadBalancer IP", snatFlow(pod4, ext4, lb4, 6, 443), false},
		{"MASQUERADEd to the node", snatFlow(pod4, ext4, node, 6, 443), true},
		{"not translated", flow(pod4, ext4, 6, 443), true},
		{"port rule: its own address", snatFlow(pod4, ext4, lb4b, 17, 5060), false},
		{"port rule: the all-traffic rule's address", snatFlow(pod4, ext4, lb4, 17, 5060), true},
		{"other traffic with the port rule's address", snatFlow(pod4, ext4, lb4b, 17, 5061), true},
		{"excluded destination, translated", snatFlow(pod4, netip.MustParseAddr("10.244.3.3"), node, 6, 443), false},
		{"ClusterIP DNATed to a pod", dnatFlow(pod4, ext4, netip.MustParseAddr("10.244.3.3"), 6, 443), false},
		{"pod without rules", snatFlow(pod6, ext6, node, 6, 443), false},
		{"prefix rule: allowed, wrong", snatFlow(pod4b, ext4, node, 6, 443), true},
		{"prefix rule: allowed, right", snatFlow(pod4b, ext4, lb4, 6, 443), false},
		{"prefix rule: denied destination is not ours", snatFlow(pod4b, netip.MustParseAddr("198.51.100.200"), node, 6, 443), false},
		{"prefix rule: outside allow is not ours", snatFlow(pod4b, netip.MustParseAddr("192.0.2.9"), node, 6, 443), false},
		{"steered: untranslated", flow(steered, ext4, 17, 53), false},
		{"steered: MASQUERADEd on the source node", snatFlow(steered, ext4, node, 17, 53), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := m.MatchConntrackFlow(tc.flow); got != tc.want {
				t.Errorf("MatchConntrackFlow = %v, want %v", got, tc.want)
			}
		})
	}
}
