package steer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressvip/egressvip/pkg/model"
)

// resolver finds the next hop of steer rules, looking each holder address
// up once per Apply: a few hundred steered pods cost as many route lookups
// as there are holders.
type resolver struct {
	m      *Manager
	tcfg   *model.Tunnel
	tun    *tunnel
	tunErr error
	seen   map[netip.Addr]onLink
	names  map[int]string
	used   map[string]bool // devices of on-link hops
}

// onLink is the answer of a route lookup for a holder address.
type onLink struct {
	ok  bool
	dev int
	// why it is not on-link, for the operator.
	why string
}

func (m *Manager) newResolver(tcfg *model.Tunnel, tun *tunnel, tunErr error) *resolver {
	return &resolver{m: m, tcfg: tcfg, tun: tun, tunErr: tunErr,
		seen: map[netip.Addr]onLink{}, names: map[int]string{}, used: map[string]bool{}}
}

// devices are the devices of the on-link hops resolved.
func (r *resolver) devices() []string {
	out := make([]string, 0, len(r.used))
	for d := range r.used {
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

func (r *resolver) devName(index int) string {
	if n, ok := r.names[index]; ok {
		return n
	}
	n := fmt.Sprintf("if%d", index)
	if l, err := r.m.h.LinkByIndex(index); err == nil {
		n = l.Attrs().Name
	}
	r.names[index] = n
	return n
}

// lookup asks the kernel how it reaches ip: on-link when the route has no
// gateway (a connected subnet, or a device route), so that a packet sent
// to ip as next hop arrives at ip's own interface.
func (r *resolver) lookup(ip netip.Addr) onLink {
	if l, ok := r.seen[ip]; ok {
		return l
	}
	var l onLink
	routes, err := r.m.h.RouteGet(net.IP(ip.AsSlice()))
	switch {
	case err != nil:
		l.why = fmt.Sprintf("%s: no route to it (%v)", ip, err)
	case len(routes) == 0:
		l.why = fmt.Sprintf("%s: no route to it", ip)
	case routes[0].Type == unix.RTN_LOCAL:
		l.why = fmt.Sprintf("%s is an address of this node", ip)
	case routes[0].Gw != nil:
		l.why = fmt.Sprintf("%s is reached via %s dev %s", ip, routes[0].Gw, r.devName(routes[0].LinkIndex))
	case routes[0].LinkIndex <= 0:
		l.why = fmt.Sprintf("%s: the route to it has no device", ip)
	default:
		l.ok, l.dev = true, routes[0].LinkIndex
	}
	r.seen[ip] = l
	return l
}

// resolve returns the next hop of s: through the VXLAN device when
// s.Tunnel (for IPv4 the holder's inner address, for IPv6 the link-local
// address of its VXLAN MAC), else the first address of s.Via of the pod's
// family that is on-link.
func (r *resolver) resolve(s model.SteerRule) (hop, error) {
	pod := s.Pod.Unmap()
	fam := family(pod)
	if s.Tunnel {
		return r.throughTunnel(s, fam)
	}
	var via []netip.Addr
	for _, v := range s.Via {
		if v = v.Unmap(); v.IsValid() && family(v) == fam {
			via = append(via, v)
		}
	}
	if len(via) == 0 {
		return hop{}, fmt.Errorf("holder %s has no %s address to steer pod %s to", s.Holder, familyName(fam), pod)
	}
	var why []string
	for _, v := range via {
		l := r.lookup(v)
		if l.ok {
			r.used[r.devName(l.dev)] = true
			return hop{gw: v, dev: l.dev}, nil
		}
		why = append(why, l.why)
	}
	addrs := make([]string, len(via))
	for i, v := range via {
		addrs[i] = v.String()
	}
	return hop{}, fmt.Errorf("holder %s (%s) is not on-link from %s (%s); enable VXLAN mode",
		s.Holder, strings.Join(addrs, ", "), r.m.cfg.Node, strings.Join(why, "; "))
}

func (r *resolver) throughTunnel(s model.SteerRule, fam int) (hop, error) {
	switch {
	case r.tcfg == nil:
		return hop{}, fmt.Errorf("holder %s is to be reached through the VXLAN tunnel, but VXLAN mode is off on %s", s.Holder, r.m.cfg.Node)
	case r.tun == nil:
		return hop{}, fmt.Errorf("holder %s: the VXLAN device of %s is not ready: %w", s.Holder, r.m.cfg.Node, r.tunErr)
	}
	if err, bad := r.tun.badPeers[s.Holder]; bad {
		return hop{}, fmt.Errorf("holder %s: %w", s.Holder, err)
	}
	i := slices.IndexFunc(r.tcfg.Peers, func(p model.TunnelPeer) bool { return p.Node == s.Holder })
	if i < 0 {
		return hop{}, fmt.Errorf("holder %s is not a VXLAN peer of %s (its VTEP address or MAC is not known yet)", s.Holder, r.m.cfg.Node)
	}
	if fam == netlink.FAMILY_V6 {
		return hop{gw: r.tun.lladdr[s.Holder], dev: r.tun.index}, nil
	}
	peer := r.tcfg.Peers[i]
	var inner []netip.Addr
	for _, a := range peer.Inner {
		if a = a.Unmap(); a.IsValid() && family(a) == fam && r.tun.inner[a] == s.Holder {
			inner = append(inner, a)
		}
	}
	if len(inner) == 0 {
		return hop{}, fmt.Errorf("holder %s has no %s address on the VXLAN tunnel to steer pod %s to", s.Holder, familyName(fam), s.Pod)
	}
	// Prefer the address the holder is steered to on-link (its InternalIP).
	gw := inner[0]
	for _, v := range s.Via {
		if slices.Contains(inner, v.Unmap()) {
			gw = v.Unmap()
			break
		}
	}
	return hop{gw: gw, dev: r.tun.index}, nil
}

// errNotOwned says an interface of the tunnel's name exists and is not
// egressvip's.
var errNotOwned = errors.New("exists and is not egressvip's")

// Interfaces returns the interfaces through which this node reaches addrs
// (other nodes' addresses): where their traffic, steered traffic among it,
// arrives. Addresses without a route, or local ones, are skipped.
func (m *Manager) Interfaces(addrs []netip.Addr) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	names := map[int]string{}
	var out []string
	for _, a := range addrs {
		routes, err := m.h.RouteGet(net.IP(a.Unmap().AsSlice()))
		if err != nil || len(routes) == 0 || routes[0].Type == unix.RTN_LOCAL || routes[0].LinkIndex <= 0 {
			continue
		}
		idx := routes[0].LinkIndex
		if _, ok := names[idx]; !ok {
			if l, err := m.h.LinkByIndex(idx); err == nil {
				names[idx] = l.Attrs().Name
			} else {
				names[idx] = ""
			}
		}
		if n := names[idx]; n != "" {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
