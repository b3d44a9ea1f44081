package sandbox

import (
	"strings"
)

// NAT returns the nat table of n for IPv4 or IPv6 (iptables-legacy-save).
func (n *Node) NAT(ipv6 bool) string {
	bin := "iptables-legacy-save"
	if ipv6 {
		bin = "ip6tables-legacy-save"
	}
	out, _ := InNS(n.NS, bin, "-t", "nat")
	return out
}

// NFT returns egressvip's nftables table of n for IPv4 or IPv6 as
// `nft list table` prints it ("" when there is none).
func (n *Node) NFT(ipv6 bool) string {
	family := "ip"
	if ipv6 {
		family = "ip6"
	}
	out, err := InNS(n.NS, "nft", "list", "table", family, "egressvip")
	if err != nil {
		return ""
	}
	return out
}

// GateArmed says whether egressvip's nftables gate is armed on n for IPv4
// or IPv6: its set of gated pod CIDRs has elements, so the off-cluster
// traffic of pod addresses the daemon does not know yet is dropped.
func (n *Node) GateArmed(ipv6 bool) bool {
	family := "ip"
	if ipv6 {
		family = "ip6"
	}
	out, err := InNS(n.NS, "nft", "list", "set", family, "egressvip", "gate-cidrs")
	return err == nil && strings.Contains(out, "elements = {")
}

// SNATRulesFor returns the egressvip SNAT of n that names service
// ("namespace/name"), both families and both backends: iptables rules as
// iptables-save prints them, nftables map elements as
// "nft <pod> [. proto . port] --to-source <LB IP>".
func (n *Node) SNATRulesFor(service string) []string {
	var out []string
	for _, v6 := range []bool{false, true} {
		for _, l := range strings.Split(n.NAT(v6), "\n") {
			if strings.HasPrefix(l, "-A EGRESSVIP-") && (strings.Contains(l, "--comment "+service+" ") || strings.Contains(l, `--comment "`+service+`"`)) {
				out = append(out, l)
			}
		}
		out = append(out, nftElements(n.NFT(v6), service)...)
	}
	return out
}

// nftElements finds the map elements of a table listing whose comment is
// service.
func nftElements(table, service string) []string {
	var out []string
	comment := `comment "` + service + `"`
	// Pods with network filters have clause chains: rules that name the
	// Service in their comment and SNAT to its address.
	for _, l := range strings.Split(table, "\n") {
		if !strings.Contains(l, comment) {
			continue
		}
		for _, kw := range []string{"snat ip to ", "snat ip6 to ", "snat to "} {
			if _, rest, ok := strings.Cut(l, kw); ok {
				if f := strings.Fields(rest); len(f) > 0 {
					out = append(out, "nft rule --to-source "+f[0])
				}
				break
			}
		}
	}
	for _, seg := range strings.FieldsFunc(table, func(r rune) bool { return r == ',' || r == '{' || r == '}' || r == '\n' }) {
		seg = strings.TrimSpace(seg)
		if !strings.Contains(seg, comment) {
			continue
		}
		// nft prints the comment after the key: `key comment "..." : value`.
		key, val, ok := strings.Cut(strings.Replace(seg, comment, "", 1), " : ")
		if !ok {
			continue
		}
		out = append(out, "nft "+strings.TrimSpace(key)+" --to-source "+strings.TrimSpace(val))
	}
	return out
}
