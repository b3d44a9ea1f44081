package sandbox

import (
	"encoding/json"
	"net/netip"
	"strings"
)

// LBAddresses lists the deprecated (preferred lifetime 0) full-length
// addresses on n's serviceInterface, eth1: the ones egressvip binds.
func (n *Node) LBAddresses() ([]netip.Addr, error) {
	out, err := sh("ip", "-n", n.NS, "-j", "addr", "show", "dev", "eth1")
	if err != nil {
		return nil, err
	}
	var ifs []struct {
		AddrInfo []struct {
			Local      string `json:"local"`
			PrefixLen  int    `json:"prefixlen"`
			Deprecated bool   `json:"deprecated"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal([]byte(out), &ifs); err != nil {
		return nil, err
	}
	var addrs []netip.Addr
	for _, i := range ifs {
		for _, a := range i.AddrInfo {
			ip, err := netip.ParseAddr(a.Local)
			if err == nil && a.Deprecated && a.PrefixLen == ip.BitLen() {
				addrs = append(addrs, ip)
			}
		}
	}
	return addrs, nil
}

// HasAddress reports whether n's serviceInterface holds ip.
func (n *Node) HasAddress(ip netip.Addr) bool {
	addrs, err := n.LBAddresses()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if a == ip {
			return true
		}
	}
	return false
}

// NAT returns the nat table of n for IPv4 or IPv6 (iptables-legacy-save).
func (n *Node) NAT(ipv6 bool) string {
	bin := "iptables-legacy-save"
	if ipv6 {
		bin = "ip6tables-legacy-save"
	}
	out, _ := InNS(n.NS, bin, "-t", "nat")
	return out
}

// SNATRulesFor returns the egressvip rules of n that name service
// ("namespace/name") in their comment, both families.
func (n *Node) SNATRulesFor(service string) []string {
	var out []string
	for _, v6 := range []bool{false, true} {
		for _, l := range strings.Split(n.NAT(v6), "\n") {
			if strings.HasPrefix(l, "-A EGRESSVIP-") && (strings.Contains(l, "--comment "+service+" ") || strings.Contains(l, `--comment "`+service+`"`)) {
				out = append(out, l)
			}
		}
	}
	return out
}
