package sandbox

import (
	"fmt"
	"net/netip"
)

// The node network's layout: one segment, or (Options.RoutedNodes) a
// subnet per node and one for the control plane behind a router.

// maxRoutedNodes is how many /28 node subnets fit in 198.51.100.0/24 after
// the control plane's.
const maxRoutedNodes = 15

// nodeNetwork4 and nodeNetwork6 hold every node-network subnet; routed
// nodes reach them through the router.
var (
	nodeNetwork4 = netip.MustParsePrefix(nodeNet4 + "0/24")
	nodeNetwork6 = netip.MustParsePrefix("2001:db8:100::/48")
)

// nodePlan is where a host sits on the node network.
type nodePlan struct {
	ip4, ip6 netip.Prefix // its address and subnet
	gw4, gw6 netip.Addr   // the router on its subnet; invalid on one segment
}

// planNode places node i (from 1). On one segment node i is
// 198.51.100.(10+i)/24 and 2001:db8:100::(0x10+i)/64. Routed, node i has
// 198.51.100.(16i)/28 with the router at .16i+1 and itself at .16i+2, and
// 2001:db8:100:i::/64 with the router at ::1 and itself at ::2.
func planNode(i int, routed bool) nodePlan {
	if !routed {
		return nodePlan{
			ip4: netip.MustParsePrefix(fmt.Sprintf("%s%d/24", nodeNet4, 10+i)),
			ip6: netip.MustParsePrefix(fmt.Sprintf("%s%x/64", nodeNet6, 0x10+i)),
		}
	}
	return nodePlan{
		ip4: netip.MustParsePrefix(fmt.Sprintf("%s%d/28", nodeNet4, 16*i+2)),
		ip6: netip.MustParsePrefix(fmt.Sprintf("2001:db8:100:%x::2/64", i)),
		gw4: netip.MustParseAddr(fmt.Sprintf("%s%d", nodeNet4, 16*i+1)),
		gw6: netip.MustParseAddr(fmt.Sprintf("2001:db8:100:%x::1", i)),
	}
}

// planControlPlane places the API server: 198.51.100.1 and 2001:db8:100::1,
// on the one segment (/24, /64) or routed on 198.51.100.0/28 with the
// router at .14 and 2001:db8:100::/64 with the router at ::fe.
func planControlPlane(routed bool) nodePlan {
	if !routed {
		return nodePlan{ip4: netip.MustParsePrefix(apiServerIP + "/24"), ip6: netip.MustParsePrefix(nodeNet6 + "1/64")}
	}
	return nodePlan{
		ip4: netip.MustParsePrefix(apiServerIP + "/28"),
		ip6: netip.MustParsePrefix(nodeNet6 + "1/64"),
		gw4: netip.MustParseAddr(nodeNet4 + "14"),
		gw6: netip.MustParseAddr(nodeNet6 + "fe"),
	}
}

// routePodCIDRs routes each node's pod ranges from the router to the node,
// and the pod ranges from the control plane to the router.
func (c *Cluster) routePodCIDRs() error {
	cp := planControlPlane(true)
	if err := shAll(
		[]string{"ip", "-n", controlNS, "route", "add", PodCIDR4.String(), "via", cp.gw4.String()},
		[]string{"ip", "-n", controlNS, "-6", "route", "add", PodCIDR6.String(), "via", cp.gw6.String()},
	); err != nil {
		return err
	}
	for _, n := range c.Nodes {
		for _, p := range n.PodCIDRs {
			via := n.IP4
			if p.Addr().Is6() {
				via = n.IP6
			}
			if _, err := sh("ip", "-n", routerNS, "route", "add", p.String(), "via", via.String()); err != nil {
				return err
			}
		}
	}
	return nil
}
