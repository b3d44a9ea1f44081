package snat

import (
	"context"
	"slices"
	"testing"

	"github.com/egressvip/egressvip/internal/privtest"
)

func TestKubeVIPTablesAndRules(t *testing.T) {
	tables := kubeVIPTables([]byte("table ip filter\ntable ip kube_vip_v4\ntable ip6 kube_vip_lb_v6\ntable inet kube-proxy\ntable ip egressvip\n"))
	if want := []string{"nftables table ip kube_vip_v4", "nftables table ip6 kube_vip_lb_v6"}; !slices.Equal(tables, want) {
		t.Errorf("tables: got %q, want %q", tables, want)
	}
	mangle := kubeVIPRules([]byte("*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-VIP-EGRESS - [0:0]\n-A PREROUTING -j KUBE-VIP-EGRESS\nCOMMIT\n"), "mangle")
	if want := []string{"mangle chain KUBE-VIP-EGRESS"}; !slices.Equal(mangle, want) {
		t.Errorf("mangle: got %q, want %q", mangle, want)
	}
	nat := kubeVIPRules([]byte("*nat\n:POSTROUTING ACCEPT [0:0]\n"+
		"-A POSTROUTING -s 10.244.1.5/32 -m mark --mark 0x40/0x40 -m comment --comment a3ViZS12aXAK=kube-vip-default -j SNAT --to-source 203.0.113.10\n"+
		"-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE\nCOMMIT\n"), "nat")
	if want := []string{"nat: 1 rules commented a3ViZS12aXAK"}; !slices.Equal(nat, want) {
		t.Errorf("nat: got %q, want %q", nat, want)
	}
	if got := kubeVIPRules([]byte("*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n"), "nat"); len(got) != 0 {
		t.Errorf("no kube-vip rules: got %q", got)
	}
}

// TestPrivilegedKubeVIPLeftovers: kube-vip's tables, chain and rules in a
// namespace are found, and nothing is reported where there are none.
func TestPrivilegedKubeVIPLeftovers(t *testing.T) {
	privtest.Require(t, "nft", "iptables-nft-save", "iptables-legacy-save")
	ns := privtest.NewNS(t, "snat-kubevip")
	var clean []string
	ns.Do(t, func() { clean = KubeVIPLeftovers(context.Background()) })
	if len(clean) != 0 {
		t.Fatalf("a fresh namespace: found %q", clean)
	}
	ns.Exec(t, "nft", "add", "table", "ip", "kube_vip_v4")
	ns.Exec(t, "iptables-nft", "-t", "mangle", "-N", "KUBE-VIP-EGRESS")
	ns.Exec(t, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.1.5/32", "-m", "comment", "--comment", "a3ViZS12aXAK=kube-vip-default", "-j", "SNAT", "--to-source", "203.0.113.10")
	var found []string
	ns.Do(t, func() { found = KubeVIPLeftovers(context.Background()) })
	for _, want := range []string{
		"nftables table ip kube_vip_v4",
		"iptables-nft IPv4 mangle chain KUBE-VIP-EGRESS",
		"iptables-legacy IPv4 nat: 1 rules commented a3ViZS12aXAK",
	} {
		if !slices.Contains(found, want) {
			t.Errorf("missing %q in %q", want, found)
		}
	}
}
