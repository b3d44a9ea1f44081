package compat

import (
	"errors"
	"strings"
	"testing"
)

func sysctls(m map[string]string) func(string) (string, error) {
	return func(p string) (string, error) {
		if v, ok := m[p]; ok {
			return v + "\n", nil
		}
		return "", errors.New("no such sysctl")
	}
}

func TestCheck(t *testing.T) {
	legacyRouting := map[string]string{"enable-host-legacy-routing": "true", "kube-proxy-replacement": "true", "enable-bpf-masquerade": "false"}
	tests := []struct {
		name string
		in   Input
		// want lists the components found, in order; blocking the
		// number of blocking findings.
		want     []string
		blocking int
		says     string
	}{
		{name: "plain node", in: Input{Links: []string{"lo", "eth0", "veth1"}, Mark: 0x1000}},
		{name: "flannel host-gw, loose rp_filter", in: Input{Links: []string{"eth0", "cni0"}, Sysctl: sysctls(map[string]string{"ipv4/conf/all/rp_filter": "2"})}},
		{
			name: "cilium BPF host routing", blocking: 1, want: []string{"cilium"}, says: "bpf.hostLegacyRouting=true",
			in: Input{Links: []string{"cilium_host", "cilium_net"}, CiliumConfig: map[string]string{"kube-proxy-replacement": "true", "enable-bpf-masquerade": "true"}},
		},
		{
			name: "cilium BPF host routing, pre-1.14 strict", blocking: 1, want: []string{"cilium"},
			in: Input{Links: []string{"cilium_host"}, CiliumConfig: map[string]string{"kube-proxy-replacement": "strict", "enable-bpf-masquerade": "true"}},
		},
		{name: "cilium legacy routing", in: Input{Links: []string{"cilium_host"}, CiliumConfig: legacyRouting}},
		{
			name: "cilium legacy routing, BPF masquerade, routed steering", want: []string{"cilium"}, says: "egressvip_tunnel=vxlan",
			in: Input{Links: []string{"cilium_host"}, CiliumConfig: map[string]string{"enable-host-legacy-routing": "true", "enable-bpf-masquerade": "true"}},
		},
		{
			name: "cilium legacy routing, BPF masquerade, VXLAN steering",
			in:   Input{Links: []string{"cilium_host"}, Tunnel: true, CiliumConfig: map[string]string{"enable-host-legacy-routing": "true", "enable-bpf-masquerade": "true"}},
		},
		{
			name: "cilium, config unreadable", want: []string{"cilium"}, says: "could not be read",
			in: Input{Links: []string{"cilium_host"}},
		},
		{
			name: "cilium WireGuard", want: []string{"cilium"}, says: "egressvip_fwmark",
			in: Input{Links: []string{"cilium_host"}, CiliumConfig: map[string]string{"enable-host-legacy-routing": "true", "enable-wireguard": "true"}},
		},
		{name: "calico eBPF", want: []string{"calico"}, says: "natOutgoing", in: Input{Links: []string{"bpfnatout", "bpfnatin"}}},
		{
			name: "calico iptables chains, iptables backend", want: []string{"calico"}, says: "chainInsertMode",
			in: Input{Backend: "iptables-nft", Ruleset: "*nat\n-A POSTROUTING -m comment --comment \"cali:O3lYWMrLQYEMJtB5\" -j cali-POSTROUTING\n"},
		},
		{
			name: "calico iptables chains, nftables backend",
			in:   Input{Backend: "nftables", Ruleset: "*nat\n-A POSTROUTING -j cali-POSTROUTING\n"},
		},
		{
			name: "kube-proxy IPVS without strict ARP", want: []string{"kube-proxy"}, says: "strictARP",
			in: Input{Links: []string{"kube-ipvs0"}, ServiceInterface: "eth1", Sysctl: sysctls(map[string]string{"ipv4/conf/all/arp_ignore": "0", "ipv4/conf/all/arp_announce": "0"})},
		},
		{
			name: "kube-proxy IPVS with strict ARP",
			in:   Input{Links: []string{"kube-ipvs0"}, ServiceInterface: "eth1", Sysctl: sysctls(map[string]string{"ipv4/conf/all/arp_ignore": "1", "ipv4/conf/all/arp_announce": "2"})},
		},
		{
			name: "nft restore of the whole ct mark", want: []string{"ruleset"}, says: "meta mark set ct mark",
			in: Input{Mark: 0x1000, Ruleset: "table ip x {\n\tchain c {\n\t\tmeta mark set ct mark\n\t}\n}\n"},
		},
		{
			name: "nft restore with a mask without the bit",
			in:   Input{Mark: 0x1000, Ruleset: "\t\tmeta mark set ct mark and 0xffff0000\n"},
		},
		{
			name: "nft restore with a mask with the bit", want: []string{"ruleset"},
			in: Input{Mark: 0x1000, Ruleset: "\t\tmeta mark set ct mark & 0x0000ff00\n"},
		},
		{
			name: "iptables restore, full masks", want: []string{"ruleset"}, says: "CONNMARK",
			in: Input{Mark: 0x1000, Ruleset: "-A PREROUTING -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n"},
		},
		{
			name: "iptables restore, Cilium-like mask",
			in:   Input{Mark: 0x1000, Ruleset: "-A PREROUTING -j CONNMARK --restore-mark --nfmask 0xf00 --ctmask 0xf00\n-A PREROUTING -j CONNMARK --restore-mark --nfmask 0x200 --ctmask 0x200\n"},
		},
		{
			name: "egressvip's own ct mark rule is not a restore",
			in:   Input{Mark: 0x1000, Ruleset: "\t\tct direction original meta mark & 0x00001000 == 0x00001000 ct mark set ct mark | 0x00001000\n"},
		},
		{
			name: "strict rp_filter on an overlay", want: []string{"rp_filter"}, says: "flannel.1",
			in: Input{Links: []string{"flannel.1"}, Sysctl: sysctls(map[string]string{"ipv4/conf/all/rp_filter": "0", "ipv4/conf/flannel.1/rp_filter": "1"})},
		},
		{
			name: "blocking first", blocking: 1, want: []string{"cilium", "kube-proxy"},
			in: Input{Links: []string{"kube-ipvs0", "cilium_host"}, CiliumConfig: map[string]string{"kube-proxy-replacement": "true", "enable-bpf-masquerade": "true"}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Check(tc.in)
			var comps []string
			blocking := 0
			for _, f := range got {
				comps = append(comps, f.Component)
				if f.Blocking {
					blocking++
				}
			}
			if strings.Join(comps, ",") != strings.Join(tc.want, ",") || blocking != tc.blocking {
				t.Fatalf("found %q (%d blocking), want %q (%d blocking): %v", comps, blocking, tc.want, tc.blocking, got)
			}
			if tc.says != "" && !strings.Contains(got[0].Message, tc.says) {
				t.Errorf("message %q does not say %q", got[0].Message, tc.says)
			}
			if blocking > 0 && !got[0].Blocking {
				t.Errorf("blocking finding not first: %v", got)
			}
		})
	}
}
