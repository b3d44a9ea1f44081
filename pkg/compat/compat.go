// Package compat recognises the neighbours on a node that egressvip cannot
// work next to, or only with a setting changed: a CNI whose datapath
// bypasses netfilter, a masquerade that runs after it, kube-proxy's IPVS
// mode without strict ARP, a rule that copies the whole conntrack mark into
// the packet mark. It only reads (link names, sysctls, rulesets, one
// ConfigMap); Check is pure, Gather collects its Input on a node.
//
// The rules, and what they rest on, are the README's compatibility table.
package compat

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Finding is one neighbour egressvip cannot work next to as it is set up.
type Finding struct {
	// Component is the neighbour: "cilium", "calico", "kube-proxy", or
	// "ruleset" for a rule of any origin.
	Component string
	// Blocking: egress cannot work on this node at all (the pods' packets
	// never meet egressvip's rules); egress is then not programmed here
	// and egress Services get a Warning saying why. Otherwise it is a
	// warning with the setting to change.
	Blocking bool
	// Message says what was found, what it breaks and what to change.
	Message string
}

func (f Finding) String() string { return f.Component + ": " + f.Message }

// Input is what Check looks at.
type Input struct {
	// Links are the names of the node's network interfaces.
	Links []string
	// Sysctl reads a sysctl under /proc/sys/net ("ipv4/conf/all/arp_ignore");
	// an error means unknown.
	Sysctl func(path string) (string, error)
	// CiliumConfig is kube-system/cilium-config's data, nil when it could
	// not be read (or there is no Cilium).
	CiliumConfig map[string]string
	// Ruleset is the node's firewall as text: `nft list ruleset` and the
	// iptables-save output of both flavours, concatenated.
	Ruleset string
	// Backend is egressvip's firewall backend ("nftables",
	// "iptables-nft", "iptables-legacy"); Tunnel says VXLAN steering is on.
	Backend string
	Tunnel  bool
	// Mark is egressvip's steering bit (packet and conntrack mark).
	Mark uint32
	// ServiceInterface is where egressvip binds addresses.
	ServiceInterface string
}

func (in Input) has(link string) bool { return slices.Contains(in.Links, link) }

// sysctlInt reads a sysctl as a number; -1 when unknown.
func (in Input) sysctlInt(path string) int {
	if in.Sysctl == nil {
		return -1
	}
	v, err := in.Sysctl(path)
	if err != nil {
		return -1
	}
	var n int
	if _, err := fmt.Sscan(strings.TrimSpace(v), &n); err != nil {
		return -1
	}
	return n
}

// Overlay devices of the CNIs: replies to a steered pod come back through
// them with an off-cluster source.
var overlayDevices = []string{"flannel.1", "vxlan.calico", "tunl0", "cilium_vxlan", "cilium_geneve", "cilium_host"}

// Check returns what in says about the node's neighbours, blocking
// findings first.
func Check(in Input) []Finding {
	var out []Finding
	add := func(component string, blocking bool, format string, a ...any) {
		out = append(out, Finding{Component: component, Blocking: blocking, Message: fmt.Sprintf(format, a...)})
	}

	// Cilium: BPF host routing hands a pod's packets to the device in
	// BPF, past netfilter; BPF masquerade rewrites them at the device,
	// after egressvip's SNAT and steering.
	if in.has("cilium_host") {
		cfg := in.CiliumConfig
		switch {
		case cfg == nil:
			add("cilium", false, "Cilium runs on this node and kube-system/cilium-config could not be read: egress works only with "+
				"bpf.hostLegacyRouting=true (BPF host routing bypasses netfilter), and steering only without BPF masquerade or with egressvip_tunnel=vxlan")
		case on(cfg["enable-host-legacy-routing"]):
			if on(cfg["enable-bpf-masquerade"]) && !in.Tunnel {
				add("cilium", false, "Cilium's BPF masquerade rewrites pods' packets steered to another node to this node's address at the device: "+
					"set egressvip_tunnel=vxlan (or bpf.masquerade=false)")
			}
		case on(cfg["enable-bpf-masquerade"]) && kpr(cfg["kube-proxy-replacement"]):
			add("cilium", true, "Cilium's BPF host routing (kube-proxy replacement with BPF masquerade, enable-host-legacy-routing not true) "+
				"sends pods' packets past netfilter, so no SNAT or steering rule ever sees them: set bpf.hostLegacyRouting=true")
		case on(cfg["enable-bpf-masquerade"]) || kpr(cfg["kube-proxy-replacement"]):
			add("cilium", false, "Cilium may use BPF host routing here (enable-host-legacy-routing is not true), which bypasses netfilter: "+
				"set bpf.hostLegacyRouting=true for egress to work")
		}
		if cfg != nil && (on(cfg["enable-ipsec"]) || on(cfg["enable-wireguard"])) {
			add("cilium", false, "Cilium's encryption marks packets with bits of 0xf000, egressvip's steering mark is one of them by default: set egressvip_fwmark to a bit outside 0xff00 (and outside 0xffff0000 with Calico)")
		}
	}

	// Calico's eBPF dataplane forwards pods' packets in BPF unless their
	// pool has natOutgoing.
	if in.has("bpfnatout") {
		add("calico", false, "Calico's eBPF dataplane bypasses netfilter for pods of IP pools without natOutgoing: "+
			"egress works only for pods of pools with natOutgoing: true")
	}
	// Calico's iptables dataplane in Insert mode puts its chains first
	// again every refresh: its MASQUERADE and its mangle ACCEPT of
	// established packets then come before the iptables backends' rules.
	if strings.HasPrefix(in.Backend, "iptables") && strings.Contains(in.Ruleset, "cali-POSTROUTING") {
		add("calico", false, "Calico's iptables chains are on this node and egressvip uses the %s backend: with Calico's chainInsertMode Insert "+
			"(its default) its MASQUERADE runs first; use egressvip's nftables backend (egress_withnftables=true) or chainInsertMode: Append", in.Backend)
	}

	// kube-proxy's IPVS mode binds every LoadBalancer IP to kube-ipvs0 on
	// every node: without strict ARP every node answers for the address.
	if in.has("kube-ipvs0") {
		ignore := max(in.sysctlInt("ipv4/conf/all/arp_ignore"), in.sysctlInt("ipv4/conf/"+in.ServiceInterface+"/arp_ignore"))
		announce := max(in.sysctlInt("ipv4/conf/all/arp_announce"), in.sysctlInt("ipv4/conf/"+in.ServiceInterface+"/arp_announce"))
		if ignore < 1 || announce < 2 {
			add("kube-proxy", false, "kube-proxy's IPVS mode binds every LoadBalancer IP on kube-ipvs0 of every node and arp_ignore/arp_announce "+
				"are %d/%d: every node answers ARP for egress addresses; set ipvs.strictARP: true in kube-proxy's configuration", ignore, announce)
		}
	}

	// A restore of the whole conntrack mark copies egressvip's conntrack
	// mark bit into the packet mark: replies and other traffic would be
	// steered, and dropped by the guard rule.
	for _, l := range strings.Split(in.Ruleset, "\n") {
		if copiesBit(l, in.Mark) {
			add("ruleset", false, "a rule copies the conntrack mark into the packet mark with egressvip's steering bit %#x (%s): "+
				"other traffic would be steered; give it a mask without that bit, or set egressvip_fwmark to another bit", in.Mark, strings.TrimSpace(l))
			break
		}
	}

	// Replies to a steered pod come back through the CNI's overlay with
	// an off-cluster source: strict reverse-path filtering drops them.
	all := in.sysctlInt("ipv4/conf/all/rp_filter")
	for _, dev := range overlayDevices {
		if !in.has(dev) {
			continue
		}
		if rp := max(all, in.sysctlInt("ipv4/conf/"+dev+"/rp_filter")); rp == 1 {
			add("rp_filter", false, "net.ipv4.conf.%s.rp_filter is strict (1): replies to pods steered from this node come back through %s "+
				"with an off-cluster source and are dropped; set it to 2 (loose)", dev, dev)
		}
	}

	slices.SortStableFunc(out, func(a, b Finding) int {
		switch {
		case a.Blocking == b.Blocking:
			return 0
		case a.Blocking:
			return -1
		}
		return 1
	})
	return out
}

// on reads a cilium-config boolean.
func on(v string) bool { return strings.EqualFold(strings.TrimSpace(v), "true") }

// kpr reads cilium-config's kube-proxy-replacement ("true", or "strict"
// before Cilium 1.14).
func kpr(v string) bool {
	v = strings.ToLower(strings.TrimSpace(v))
	return v == "true" || v == "strict"
}

var (
	nftRestore = regexp.MustCompile(`meta mark set ct mark(?:\s+(?:and|&)\s+(0x[0-9a-fA-F]+|[0-9]+))?`)
	iptCTMask  = regexp.MustCompile(`--ctmask\s+(0x[0-9a-fA-F]+|[0-9]+)`)
)

// copiesBit says whether rule l copies conntrack mark bit into the packet
// mark: nftables `meta mark set ct mark` (with `and <mask>`, only the
// mask's bits), iptables `CONNMARK --restore-mark` (iptables-save prints
// its --ctmask: the bits it copies; none printed: all).
func copiesBit(l string, bit uint32) bool {
	if bit == 0 {
		return false
	}
	mask := uint64(0)
	switch {
	case strings.Contains(l, "CONNMARK") && strings.Contains(l, "--restore-mark"):
		mask = 0xffffffff
		if m := iptCTMask.FindStringSubmatch(l); m != nil {
			mask, _ = strconv.ParseUint(m[1], 0, 32)
		}
	default:
		m := nftRestore.FindStringSubmatch(l)
		if m == nil {
			return false
		}
		mask = 0xffffffff
		if m[1] != "" {
			mask, _ = strconv.ParseUint(m[1], 0, 32)
		}
	}
	return uint32(mask)&bit != 0
}
