package snat

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/vishvananda/netlink"
)

func TestConntrackFlushes(t *testing.T) {
	ex := []netip.Prefix{podNet4}
	all := func(pod, src netip.Addr) Rule { return Rule{Service: "ns/a", PodIP: pod, SourceIP: src} }
	ports := func(pod, src netip.Addr, p ...annotations.DestinationPort) Rule {
		return Rule{Service: "ns/a", PodIP: pod, SourceIP: src, Ports: p}
	}
	tests := []struct {
		name       string
		prev, next []Rule
		want       []Flush
	}{
		{name: "nothing changes", prev: []Rule{all(pod4, lb4)}, next: []Rule{all(pod4, lb4)}},
		{name: "only the comment changes", prev: []Rule{all(pod4, lb4)},
			next: []Rule{{Service: "ns/renamed", PodIP: pod4, SourceIP: lb4}}},
		{name: "rule added", next: []Rule{all(pod4, lb4)},
			want: []Flush{{PodIP: pod4}}},
		{name: "rule removed", prev: []Rule{all(pod4, lb4), all(pod4b, lb4b)}, next: []Rule{all(pod4b, lb4b)},
			want: []Flush{{PodIP: pod4}}},
		{name: "source changed", prev: []Rule{all(pod4, lb4)}, next: []Rule{all(pod4, lb4b)},
			want: []Flush{{PodIP: pod4}}},
		{name: "ports added to an all-traffic rule", prev: []Rule{all(pod4, lb4)}, next: []Rule{ports(pod4, lb4, udp5060)},
			want: []Flush{{PodIP: pod4}}},
		{name: "port changed flushes old and new port only", prev: []Rule{ports(pod4, lb4, udp5060, tcp8080)},
			next: []Rule{ports(pod4, lb4, tcp8080, annotations.DestinationPort{Protocol: annotations.UDP, Port: 5061})},
			want: []Flush{{PodIP: pod4, Ports: []annotations.DestinationPort{udp5060, {Protocol: annotations.UDP, Port: 5061}}}}},
		{name: "port rule added under an unchanged all-traffic rule of another Service",
			prev: []Rule{{Service: "z/all", PodIP: pod4, SourceIP: lb4}},
			next: []Rule{{Service: "a/sip", PodIP: pod4, SourceIP: lb4b, Ports: []annotations.DestinationPort{udp5060}}, {Service: "z/all", PodIP: pod4, SourceIP: lb4}},
			want: []Flush{{PodIP: pod4, Ports: []annotations.DestinationPort{udp5060}}}},
		{name: "shadowed port rule changes nothing",
			prev: []Rule{{Service: "a/all", PodIP: pod4, SourceIP: lb4}},
			next: []Rule{{Service: "a/all", PodIP: pod4, SourceIP: lb4}, {Service: "z/sip", PodIP: pod4, SourceIP: lb4b, Ports: []annotations.DestinationPort{udp5060}}}},
		{name: "two pods, sorted", prev: []Rule{all(pod4b, lb4)}, next: []Rule{all(pod4, lb4)},
			want: []Flush{{PodIP: pod4}, {PodIP: pod4b}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			prev := Desired{Rules: tc.prev, Exclude: ex}.forFamily(IPv4)
			next := Desired{Rules: tc.next, Exclude: ex}.forFamily(IPv4)
			got := ConntrackFlushes(prev, next)
			if len(got) != len(tc.want) {
				t.Fatalf("got %d flushes %+v, want %+v", len(got), got, tc.want)
			}
			for i := range got {
				if got[i].PodIP != tc.want[i].PodIP || !slices.Equal(got[i].Ports, tc.want[i].Ports) {
					t.Errorf("flush %d = %+v, want %+v", i, got[i], tc.want[i])
				}
				if !slices.Contains(got[i].Exclude, podNet4) {
					t.Errorf("flush %d lost the exclusions: %v", i, got[i].Exclude)
				}
			}
		})
	}
}

func flow(src, dst netip.Addr, proto uint8, dport uint16) *netlink.ConntrackFlow {
	return &netlink.ConntrackFlow{Forward: netlink.IPTuple{
		SrcIP: net.IP(src.AsSlice()), DstIP: net.IP(dst.AsSlice()), Protocol: proto, SrcPort: 40000, DstPort: dport,
	}}
}

func TestFlushMatchConntrackFlow(t *testing.T) {
	all := Flush{PodIP: pod4, Exclude: []netip.Prefix{podNet4, svcNet4}}
	sip := Flush{PodIP: pod4, Ports: []annotations.DestinationPort{udp5060}, Exclude: []netip.Prefix{podNet4}}
	v6 := Flush{PodIP: pod6, Exclude: []netip.Prefix{podNet6}}
	sctp := Flush{PodIP: pod4, Ports: []annotations.DestinationPort{{Protocol: annotations.SCTP, Port: 3868}}, Exclude: []netip.Prefix{podNet4}}
	tests := []struct {
		name   string
		filter Flush
		flow   *netlink.ConntrackFlow
		want   bool
	}{
		{"pod to external", all, flow(pod4, ext4, 6, 443), true},
		{"other pod", all, flow(pod4b, ext4, 6, 443), false},
		{"towards pod CIDR", all, flow(pod4, netip.MustParseAddr("10.244.3.3"), 6, 443), false},
		{"towards Service CIDR", all, flow(pod4, netip.MustParseAddr("10.96.0.10"), 17, 53), false},
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
