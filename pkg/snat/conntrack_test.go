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
