package compat

import (
	"context"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/kube/kubefake"
)

// TestPrivilegedGather: in a namespace that looks like a Cilium node with
// BPF host routing and kube-proxy in IPVS mode without strict ARP, Gather
// reads the links, sysctls, ruleset and ConfigMap, and Check finds both;
// a plain namespace has no finding.
func TestPrivilegedGather(t *testing.T) {
	privtest.Require(t, "nft")
	plain := privtest.NewNS(t, "compat-plain")
	var in Input
	plain.Do(t, func() {
		in = Gather(context.Background(), Node{Mark: 0x1000, Backend: "nftables", ServiceInterface: "lo"})
	})
	if got := Check(in); len(got) != 0 {
		t.Fatalf("a plain namespace: %v", got)
	}
	if !slices.Contains(in.Links, "lo") {
		t.Fatalf("links %v lack lo", in.Links)
	}

	ns := privtest.NewNS(t, "compat-cilium")
	ns.Exec(t, "ip", "link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net")
	ns.Exec(t, "ip", "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "ipvs-peer")
	ns.Exec(t, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=0", "net.ipv4.conf.all.arp_announce=0")
	ns.Exec(t, "nft", "add", "table", "ip", "other")
	ns.Exec(t, "nft", "add", "chain", "ip", "other", "pre", "{ type filter hook prerouting priority mangle; }")
	ns.Exec(t, "nft", "add", "rule", "ip", "other", "pre", "meta", "mark", "set", "ct", "mark")
	cs := fake.NewClientset(&corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "cilium-config"},
		Data:       map[string]string{"kube-proxy-replacement": "true", "enable-bpf-masquerade": "true"},
	})
	ns.Do(t, func() {
		in = Gather(context.Background(), Node{Client: kubefake.Wrap(cs), Mark: 0x1000, Backend: "nftables", ServiceInterface: "lo"})
	})
	got := Check(in)
	var comps []string
	for _, f := range got {
		comps = append(comps, f.Component)
	}
	if strings.Join(comps, ",") != "cilium,kube-proxy,ruleset" || !got[0].Blocking {
		t.Fatalf("found %v, want cilium (blocking), kube-proxy, ruleset", got)
	}
}
