package desired

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"github.com/egressvip/egressvip/pkg/model"
)

// Admission is what decides which LoadBalancer IPs a Service may claim.
type Admission struct {
	// NodeAddresses are every Node's addresses.
	NodeAddresses map[netip.Addr]bool
	Host          model.Host
	// Exclude are the pod and Service CIDRs.
	Exclude []netip.Prefix
	// Allowed, when not empty, are the only ranges LoadBalancer IPs may
	// come from (egressvip_allowed_cidrs).
	Allowed []netip.Prefix
	// ClaimedBy is, per address, the namespace its address Lease records
	// (written by the node that held it, in the daemon's namespace, which
	// a namespace admin cannot write).
	ClaimedBy map[netip.Addr]string
}

// Admit removes from each Service the LoadBalancer IPs it may not claim,
// with a Problem each, so that nothing is bound, announced, SNATed to or
// reported for them. An address is an identity that firewalls trust: it
// may not be a node's, a gateway's, a pod's or a Service's, a special
// address, outside the allow-list, or one that a Service of another
// namespace claimed first. Every node decides the same for addresses the
// cluster knows (Nodes, CIDRs, other Services); the host checks use this
// node's own interface.
// It changes services in place and returns it.
func Admit(services []model.Service, a Admission) []model.Service {
	out := services
	for i := range out {
		s := &out[i]
		for _, ip := range s.Addresses() {
			if why := a.refuse(ip); why != "" {
				refuseAddress(s, ip, EventAddressRefused, fmt.Sprintf("LoadBalancer IP %s refused: %s", ip, why))
			}
		}
	}
	// Of Services of different namespaces claiming one address, the
	// first claim keeps it: the namespace its address Lease records (a
	// namespace admin can neither write nor replay it; a Service's status
	// can be stale, so it counts for nothing), then the oldest Service,
	// then by namespace and name. Services of one namespace may share an
	// address.
	claims := make(map[netip.Addr][]int, len(out))
	for i, s := range out {
		for _, ip := range s.Addresses() {
			claims[ip] = append(claims[ip], i)
		}
	}
	for ip, idx := range claims {
		if len(idx) == 1 {
			continue
		}
		first := a.ClaimedBy[ip]
		winner := slices.MinFunc(idx, func(x, y int) int { return compareClaims(out[x], out[y], first) })
		for _, i := range idx {
			if out[i].Key.Namespace != out[winner].Key.Namespace {
				refuseAddress(&out[i], ip, EventAddressConflict,
					fmt.Sprintf("LoadBalancer IP %s is already claimed by a Service of another namespace; it is not served for this one", ip))
			}
		}
	}
	return out
}

func compareClaims(a, b model.Service, first string) int {
	ia, ib := a.Key.Namespace == first, b.Key.Namespace == first
	if first != "" && ia != ib {
		if ia {
			return -1
		}
		return 1
	}
	if c := a.Created.Compare(b.Created); c != 0 {
		return c
	}
	return cmp.Compare(a.Key.String(), b.Key.String())
}

// Refuse says why ip may not be claimed ("" if it may), by the rules that
// do not depend on other Services: what the address allocator must never
// hand out.
func (a Admission) Refuse(ip netip.Addr) string { return a.refuse(ip) }

// refuse says why ip may not be claimed ("" if it may).
func (a Admission) refuse(ip netip.Addr) string {
	in := func(ps []netip.Prefix) bool {
		return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(ip) })
	}
	switch {
	case ip.IsUnspecified():
		return "the unspecified address"
	case ip.IsLoopback():
		return "a loopback address"
	case ip.IsMulticast():
		return "a multicast address"
	case ip.IsLinkLocalUnicast():
		return "a link-local address"
	case ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "the limited broadcast address"
	case a.NodeAddresses[ip]:
		return "a Node's address"
	case slices.Contains(a.Host.Own, ip):
		return "an address of this node's serviceInterface"
	case slices.Contains(a.Host.Gateways, ip):
		return "this node's gateway"
	case in(a.Exclude):
		return "inside the pod or Service CIDRs"
	case len(a.Allowed) > 0 && !in(a.Allowed):
		return "outside the ranges allowed by egressvip_allowed_cidrs"
	}
	for _, p := range a.Host.Subnets {
		if !ip.Is4() || !p.Addr().Is4() || p.Bits() >= 31 || !p.Contains(ip) {
			continue
		}
		network := p.Masked().Addr()
		if ip == network {
			return "the network address of " + p.Masked().String()
		}
		if ip == broadcast(p) {
			return "the broadcast address of " + p.Masked().String()
		}
	}
	return ""
}

// broadcast is the last address of an IPv4 prefix.
func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// refuseAddress takes ip away from the Service with a Problem; a Service
// left without any address is not served.
func refuseAddress(s *model.Service, ip netip.Addr, reason, message string) {
	switch ip {
	case s.LBv4:
		s.LBv4 = netip.Addr{}
	case s.LBv6:
		s.LBv6 = netip.Addr{}
	default:
		return
	}
	s.Problems = append(s.Problems, model.Problem{Reason: reason, Message: message})
	if s.Invalid == "" && !s.LBv4.IsValid() && !s.LBv6.IsValid() {
		s.Invalid = ReasonRefused
	}
}
