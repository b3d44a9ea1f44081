package steer

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressvip/egressvip/pkg/model"
)

// Encapsulation overhead of VXLAN: outer IP header, UDP (8), VXLAN (8) and
// the inner Ethernet header (14).
const (
	overhead4 = 20 + 8 + 8 + 14
	overhead6 = 40 + 8 + 8 + 14
)

// in6AddrGenModeNone: the device gets no IPv6 link-local address, so it
// sends no router or neighbour solicitations, MLD reports or DAD probes
// into the tunnel (IN6_ADDR_GEN_MODE_NONE).
const in6AddrGenModeNone = 1

// tunnel is the VXLAN device as ensureTunnel left it.
type tunnel struct {
	name     string
	index    int
	underlay string
	mtu      int
	// inner maps each peer's inner address to the peer's node name.
	inner map[netip.Addr]string
	// lladdr maps each valid peer's node name to the IPv6 link-local
	// address derived from its MAC: the next hop of steered IPv6.
	lladdr map[string]netip.Addr
	// badPeers are peers the device cannot reach (an invalid MAC or
	// underlay address), by node name.
	badPeers map[string]error
}

// ownedDevice says whether l is egressvip's VXLAN device: its alias, or
// (when a crash came between creating it and setting the alias, which the
// kernel does not take at creation) the MAC address egressvip derives.
func (m *Manager) ownedDevice(l netlink.Link) bool {
	return l.Type() == "vxlan" && (l.Attrs().Alias == DeviceAlias || bytes.Equal(l.Attrs().HardwareAddr, m.mac))
}

func validName(name string) error {
	if name == "" || len(name) > unix.IFNAMSIZ-1 || name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n") {
		return fmt.Errorf("%q is not a valid interface name (1-%d characters, no '/', ':' or spaces)", name, unix.IFNAMSIZ-1)
	}
	return nil
}

// ensureTunnel creates or repairs the VXLAN device of t and its FDB and
// neighbour entries, and sets its sysctls.
func (m *Manager) ensureTunnel(t *model.Tunnel) (*tunnel, error) {
	if err := validName(t.Device); err != nil {
		return nil, fmt.Errorf("VXLAN device: %w", err)
	}
	if t.VNI == 0 || t.VNI > 0xffffff {
		return nil, fmt.Errorf("VXLAN device %s: VNI %d is not between 1 and 16777215", t.Device, t.VNI)
	}
	local := t.Local.Unmap()
	if !local.IsValid() {
		return nil, fmt.Errorf("VXLAN device %s: no local underlay address", t.Device)
	}
	port := int(t.Port)
	if port == 0 {
		port = DefaultVXLANPort
	}
	under, err := m.linkWithAddr(local)
	if err != nil {
		return nil, fmt.Errorf("VXLAN device %s: %w", t.Device, err)
	}
	mtu := under.Attrs().MTU - overhead4
	if local.Is6() {
		mtu = under.Attrs().MTU - overhead6
	}
	want := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: t.Device, MTU: mtu, HardwareAddr: m.mac},
		VxlanId:      int(t.VNI),
		VtepDevIndex: under.Attrs().Index,
		SrcAddr:      net.IP(local.AsSlice()),
		Port:         port,
		Learning:     false,
	}
	l, err := m.h.LinkByName(t.Device)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		l = nil
	case err != nil:
		return nil, fmt.Errorf("VXLAN device %s: %w", t.Device, err)
	case !m.ownedDevice(l):
		return nil, fmt.Errorf("VXLAN device: interface %s %w (a %s without alias %q); remove or rename it, or configure another device name",
			t.Device, errNotOwned, l.Type(), DeviceAlias)
	case !sameVXLAN(l, want):
		// VNI, port, local address and underlay cannot change in place.
		m.log.WithField("interface", t.Device).Info("re-creating the VXLAN device with new settings")
		if err := m.h.LinkDel(l); err != nil {
			return nil, fmt.Errorf("VXLAN device %s: remove for new settings: %w", t.Device, err)
		}
		m.writes++
		l = nil
	}
	if l == nil {
		if err := m.h.LinkAdd(want); err != nil {
			return nil, fmt.Errorf("VXLAN device %s: create: %w", t.Device, err)
		}
		m.writes++
		m.devices[t.Device] = true
		if l, err = m.h.LinkByName(t.Device); err != nil {
			return nil, fmt.Errorf("VXLAN device %s: %w", t.Device, err)
		}
		if err := m.h.LinkSetIP6AddrGenMode(l, in6AddrGenModeNone); err != nil {
			m.log.WithError(err).WithField("interface", t.Device).Debug("cannot turn off IPv6 address generation")
		}
	}
	m.devices[t.Device] = true
	a := l.Attrs()
	if a.Alias != DeviceAlias {
		if err := m.h.LinkSetAlias(l, DeviceAlias); err != nil {
			return nil, fmt.Errorf("VXLAN device %s: set alias: %w", t.Device, err)
		}
		m.writes++
	}
	if !bytes.Equal(a.HardwareAddr, m.mac) {
		if err := m.h.LinkSetHardwareAddr(l, m.mac); err != nil {
			return nil, fmt.Errorf("VXLAN device %s: set MAC %s: %w", t.Device, m.mac, err)
		}
		m.writes++
	}
	if a.MTU != mtu {
		if err := m.h.LinkSetMTU(l, mtu); err != nil {
			return nil, fmt.Errorf("VXLAN device %s: set MTU %d: %w", t.Device, mtu, err)
		}
		m.writes++
	}
	if err := m.deviceAddr(l); err != nil {
		return nil, fmt.Errorf("VXLAN device %s: %w", t.Device, err)
	}
	if err := m.deviceSysctls(t.Device); err != nil {
		return nil, fmt.Errorf("VXLAN device %s: %w", t.Device, err)
	}
	if a.Flags&net.FlagUp == 0 {
		if err := m.h.LinkSetUp(l); err != nil {
			return nil, fmt.Errorf("VXLAN device %s: up: %w", t.Device, err)
		}
		m.writes++
	}
	tun := &tunnel{name: t.Device, index: a.Index, underlay: under.Attrs().Name, mtu: mtu,
		inner: map[netip.Addr]string{}, lladdr: map[string]netip.Addr{}, badPeers: map[string]error{}}
	if err := m.syncPeers(tun, t.Peers, local); err != nil {
		return tun, fmt.Errorf("VXLAN device %s: %w", t.Device, err)
	}
	return tun, nil
}

// sameVXLAN says whether the device l has the settings of want that
// cannot be changed in place.
func sameVXLAN(l netlink.Link, want *netlink.Vxlan) bool {
	v, ok := l.(*netlink.Vxlan)
	return ok && v.VxlanId == want.VxlanId && v.Port == want.Port && v.SrcAddr.Equal(want.SrcAddr) &&
		v.VtepDevIndex == want.VtepDevIndex && !v.Learning && v.Group == nil && !v.FlowBased
}

// deviceAddr4 is the one IPv4 address of the VXLAN device, the same on
// every node: it is never used on the wire (next hops are the peers' inner
// addresses, with permanent neighbour entries), but reverse-path filtering
// in loose mode (rp_filter 2, the default of systemd and Ubuntu for "all")
// drops every packet that arrives on an interface without any IPv4 address
// unless the route back to its source leaves by that interface
// (__fib_validate_source, "no_addr"); the steered packets' never does.
var deviceAddr4 = netip.MustParsePrefix("169.254.231.231/32")

// deviceAddr makes deviceAddr4 the only IPv4 address of the device.
func (m *Manager) deviceAddr(l netlink.Link) error {
	var addrs []netlink.Addr
	err := retry(func() (err error) {
		addrs, err = m.h.AddrList(l, netlink.FAMILY_V4)
		return err
	})
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	found := false
	for i := range addrs {
		ip, _ := netip.AddrFromSlice(addrs[i].IP)
		ones, _ := addrs[i].Mask.Size()
		if netip.PrefixFrom(ip.Unmap(), ones) == deviceAddr4 && !found {
			found = true
			continue
		}
		if err := m.h.AddrDel(l, &addrs[i]); err != nil {
			return fmt.Errorf("remove address %s: %w", addrs[i].IPNet, err)
		}
		m.writes++
	}
	if found {
		return nil
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(deviceAddr4.Addr().AsSlice()), Mask: net.CIDRMask(32, 32)}, Scope: int(netlink.SCOPE_LINK)}
	if err := m.h.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add address %s: %w", deviceAddr4, err)
	}
	m.writes++
	return nil
}

// linkWithAddr returns the interface that has ip.
func (m *Manager) linkWithAddr(ip netip.Addr) (netlink.Link, error) {
	var addrs []netlink.Addr
	err := retry(func() (err error) {
		addrs, err = m.h.AddrList(nil, family(ip))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if got, ok := netip.AddrFromSlice(a.IP); ok && got.Unmap() == ip {
			l, err := m.h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("interface of %s: %w", ip, err)
			}
			return l, nil
		}
	}
	return nil, fmt.Errorf("the underlay address %s is not an address of %s", ip, m.cfg.Node)
}

// deviceSysctls sets what the device needs, and only on the device:
//   - rp_filter 0: steered packets arrive on it from pods whose route back
//     leaves by the node network, which strict reverse-path filtering
//     drops. (The kernel uses the maximum of "all" and the device; Diagnose
//     reports an "all" of 1.)
//   - forwarding 1 (IPv4, IPv6): IPv4 forwards what arrives on a device
//     whose own forwarding is on. (IPv6 decides by "all"; force_forwarding
//     of Linux 6.17 on the device alone would not do: the replies arrive
//     on the holder's external interface.)
//
// accept_local is not needed: steered packets come from pod addresses,
// never from an address of the receiving node.
func (m *Manager) deviceSysctls(dev string) error {
	type setting struct {
		path, value string
		optional    bool
	}
	settings := []setting{
		{"ipv4/conf/" + dev + "/rp_filter", "0", false},
		{"ipv4/conf/" + dev + "/forwarding", "1", false},
		{"ipv6/conf/" + dev + "/forwarding", "1", true},
	}
	return m.inNS(func() error {
		for _, s := range settings {
			p := filepath.Join("/proc/sys/net", s.path)
			cur, err := os.ReadFile(p)
			if err != nil {
				if s.optional && errors.Is(err, os.ErrNotExist) {
					continue
				}
				return fmt.Errorf("read %s: %w", p, err)
			}
			if strings.TrimSpace(string(cur)) == s.value {
				continue
			}
			if err := os.WriteFile(p, []byte(s.value), 0o644); err != nil {
				return fmt.Errorf("set %s=%s: %w", p, s.value, err)
			}
			m.writes++
		}
		return nil
	})
}

// syncPeers makes the device's permanent FDB entries one per peer (its MAC
// to its underlay address) and its permanent neighbour entries one per
// inner address of a peer (to the peer's MAC). Entries the kernel made
// (stale, incomplete) are left to age.
func (m *Manager) syncPeers(tun *tunnel, peers []model.TunnelPeer, local netip.Addr) error {
	fdbWant := map[string]netip.Addr{}
	neighWant := map[netip.Addr]net.HardwareAddr{}
	for _, p := range peers {
		mac, err := net.ParseMAC(p.MAC)
		under := p.Underlay.Unmap()
		switch {
		case err != nil || len(mac) != 6 || mac[0]&1 != 0:
			tun.badPeers[p.Node] = fmt.Errorf("VXLAN peer %s has no valid unicast MAC address (%q)", p.Node, p.MAC)
			continue
		case !under.IsValid() || under.Is4() != local.Is4():
			tun.badPeers[p.Node] = fmt.Errorf("VXLAN peer %s has no %s underlay address (%v)", p.Node, familyName(family(local)), p.Underlay)
			continue
		}
		fdbWant[mac.String()] = under
		ll := linkLocal(mac)
		tun.lladdr[p.Node] = ll
		neighWant[ll] = mac
		for _, a := range p.Inner {
			a = a.Unmap()
			if !a.IsValid() {
				continue
			}
			if other, dup := tun.inner[a]; dup {
				m.log.WithField("ip", a.String()).Warnf("inner address claimed by VXLAN peers %s and %s; keeping %s", other, p.Node, other)
				continue
			}
			tun.inner[a] = p.Node
			neighWant[a] = mac
		}
	}
	var errs []error
	var fdb []netlink.Neigh
	err := retry(func() (err error) {
		fdb, err = m.h.NeighList(tun.index, unix.AF_BRIDGE)
		return err
	})
	if err != nil {
		return fmt.Errorf("list FDB: %w", err)
	}
	fdbHave := map[string]bool{}
	for _, n := range fdb {
		if n.LinkIndex != tun.index {
			continue
		}
		dst, _ := netip.AddrFromSlice(n.IP)
		key := n.HardwareAddr.String()
		if w, ok := fdbWant[key]; ok && w == dst.Unmap() && n.State&unix.NUD_PERMANENT != 0 && !fdbHave[key] {
			fdbHave[key] = true
			continue
		}
		del := n
		del.Family, del.Flags = unix.AF_BRIDGE, netlink.NTF_SELF
		if err := m.h.NeighDel(&del); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove FDB entry %s dst %s: %w", n.HardwareAddr, n.IP, err))
			continue
		}
		m.writes++
	}
	for key, dst := range fdbWant {
		if fdbHave[key] {
			continue
		}
		mac, _ := net.ParseMAC(key)
		n := &netlink.Neigh{LinkIndex: tun.index, Family: unix.AF_BRIDGE, State: unix.NUD_PERMANENT,
			Flags: netlink.NTF_SELF, IP: net.IP(dst.AsSlice()), HardwareAddr: mac}
		if err := m.h.NeighSet(n); err != nil {
			errs = append(errs, fmt.Errorf("add FDB entry %s dst %s: %w", mac, dst, err))
			continue
		}
		m.writes++
	}

	var neighs []netlink.Neigh
	err = retry(func() (err error) {
		neighs, err = m.h.NeighList(tun.index, netlink.FAMILY_ALL)
		return err
	})
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list neighbours: %w", err))...)
	}
	neighHave := map[netip.Addr]bool{}
	for _, n := range neighs {
		if n.LinkIndex != tun.index || (n.Family != unix.AF_INET && n.Family != unix.AF_INET6) {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		w, wanted := neighWant[ip]
		if wanted && bytes.Equal(w, n.HardwareAddr) && n.State&unix.NUD_PERMANENT != 0 {
			neighHave[ip] = true
			continue
		}
		if wanted || n.State&unix.NUD_PERMANENT == 0 {
			continue // NeighSet below replaces it; the kernel ages the rest
		}
		del := n
		if err := m.h.NeighDel(&del); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove neighbour %s: %w", ip, err))
			continue
		}
		m.writes++
	}
	for ip, mac := range neighWant {
		if neighHave[ip] {
			continue
		}
		n := &netlink.Neigh{LinkIndex: tun.index, Family: family(ip), State: unix.NUD_PERMANENT,
			IP: net.IP(ip.AsSlice()), HardwareAddr: mac}
		if err := m.h.NeighSet(n); err != nil {
			errs = append(errs, fmt.Errorf("add neighbour %s lladdr %s: %w", ip, mac, err))
			continue
		}
		m.writes++
	}
	return errors.Join(errs...)
}

// linkLocal is the IPv6 link-local address of a MAC address (modified
// EUI-64, RFC 4291 appendix A). It is the next hop of steered IPv6 in VXLAN
// mode: the kernel refuses an "onlink" gateway that a route of the main
// table sends through another device (ip6_route_check_nh_onlink), which the
// holder's global addresses always are, while a link-local gateway is
// on-link by definition and cannot clash.
func linkLocal(mac net.HardwareAddr) netip.Addr {
	return netip.AddrFrom16([16]byte{0: 0xfe, 1: 0x80,
		8: mac[0] ^ 0x02, 9: mac[1], 10: mac[2], 11: 0xff, 12: 0xfe, 13: mac[3], 14: mac[4], 15: mac[5]})
}

// removeDevices removes egressvip's VXLAN devices other than keep. The
// first call after start (or Cleanup) lists every link to find devices an
// earlier process created under another name; later calls know them.
func (m *Manager) removeDevices(keep string) error {
	if !m.scanned {
		var links []netlink.Link
		err := retry(func() (err error) {
			links, err = m.h.LinkList()
			return err
		})
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			if m.ownedDevice(l) {
				m.devices[l.Attrs().Name] = true
			}
		}
		m.scanned = true
	}
	var errs []error
	for name := range m.devices {
		if name == keep {
			continue
		}
		l, err := m.h.LinkByName(name)
		var nf netlink.LinkNotFoundError
		switch {
		case errors.As(err, &nf):
		case err != nil:
			errs = append(errs, fmt.Errorf("VXLAN device %s: %w", name, err))
			continue
		case m.ownedDevice(l):
			if err := m.h.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("remove VXLAN device %s: %w", name, err))
				continue
			}
			m.writes++
		}
		delete(m.devices, name)
	}
	return errors.Join(errs...)
}
