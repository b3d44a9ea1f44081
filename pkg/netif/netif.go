// Package netif binds LoadBalancer IPs to the serviceInterface with netlink
// and announces them with gratuitous ARP / unsolicited neighbour
// advertisement.
//
// Ownership is recognisable in the kernel, so a restarted daemon (or
// `egressvip cleanup`) finds its addresses without any state file: an
// address is egressvip's when it is on the serviceInterface, full length
// (/32 or /128), deprecated (preferred lifetime 0) and, for IPv4, the label
// "<iface>:evip" (when that fits in 15 characters), for IPv6 the NODAD flag.
// Nothing else is ever removed.
package netif

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrInterfaceNotFound says the serviceInterface does not exist.
var ErrInterfaceNotFound = errors.New("interface not found")

// LabelSuffix is appended to the interface name to label owned IPv4 addresses.
const LabelSuffix = ":evip"

// infinity is the kernel's "forever" lifetime.
const infinity = 0xFFFFFFFF

// Config configures a Manager.
type Config struct {
	Interface string
	// Announce sends gratuitous ARP / unsolicited NA for new addresses.
	Announce bool
	Log      *logrus.Entry
	// NetNS is the network namespace to work in (tests); zero (or a closed
	// handle) means the process's namespace.
	NetNS netns.NsHandle
	// AnnounceCount and AnnounceInterval: how often and how far apart each
	// new address is announced (default 4 times, 1 s apart).
	AnnounceCount    int
	AnnounceInterval time.Duration
}

// Manager keeps the owned addresses of one interface.
type Manager struct {
	cfg Config
	h   *netlink.Handle
	log *logrus.Entry

	mu         sync.Mutex
	announcing map[netip.Addr]context.CancelFunc
	wg         sync.WaitGroup
}

// New returns a Manager; it does not touch the kernel.
func New(cfg Config) (*Manager, error) {
	if cfg.Interface == "" {
		return nil, errors.New("no interface configured")
	}
	if cfg.AnnounceCount <= 0 {
		cfg.AnnounceCount = 4
	}
	if cfg.AnnounceInterval <= 0 {
		cfg.AnnounceInterval = time.Second
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	h := &netlink.Handle{}
	if cfg.inOtherNS() {
		var err error
		if h, err = netlink.NewHandleAt(cfg.NetNS); err != nil {
			return nil, fmt.Errorf("netlink handle in namespace: %w", err)
		}
	}
	return &Manager{cfg: cfg, h: h, log: cfg.Log.WithField("interface", cfg.Interface), announcing: map[netip.Addr]context.CancelFunc{}}, nil
}

// inOtherNS says whether NetNS names a namespace to enter. Descriptor 0 is
// stdin, never a namespace handle, so the zero Config means "here".
func (c Config) inOtherNS() bool { return c.NetNS > 0 }

// label is the IPv4 label of owned addresses, or "" when it does not fit.
func label(iface string) string {
	if l := iface + LabelSuffix; len(l) <= 15 {
		return l
	}
	return ""
}

// Owned decides whether a kernel address on iface is egressvip's.
func Owned(a netlink.Addr, iface string) bool {
	if a.IPNet == nil {
		return false
	}
	ip, ok := netip.AddrFromSlice(a.IP)
	if !ok {
		return false
	}
	ip = ip.Unmap()
	// The kernel reports the lifetimes of an address that is valid forever
	// as forever, but keeps preferred lifetime 0 as the deprecated flag.
	ones, bits := a.Mask.Size()
	if ones != bits || a.Flags&unix.IFA_F_DEPRECATED == 0 || ip.IsLinkLocalUnicast() {
		return false
	}
	if ip.Is4() {
		return a.Label == label(iface)
	}
	return a.Flags&unix.IFA_F_NODAD != 0
}

func (m *Manager) link() (netlink.Link, error) {
	l, err := m.h.LinkByName(m.cfg.Interface)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, fmt.Errorf("interface %q not found: %w", m.cfg.Interface, ErrInterfaceNotFound)
		}
		return nil, fmt.Errorf("interface %q: %w", m.cfg.Interface, err)
	}
	return l, nil
}

// addrs lists the interface's addresses, retrying only interrupted dumps.
func (m *Manager) addrs(l netlink.Link) ([]netlink.Addr, error) {
	var err error
	for range 5 {
		var out []netlink.Addr
		out, err = m.h.AddrList(l, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return nil, err
}

func ipOf(a netlink.Addr) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.IP)
	return ip.Unmap()
}

// Owned lists the addresses egressvip owns on the interface.
func (m *Manager) Owned() ([]netip.Addr, error) {
	l, err := m.link()
	if err != nil {
		return nil, err
	}
	list, err := m.addrs(l)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	var out []netip.Addr
	for _, a := range list {
		if Owned(a, m.cfg.Interface) {
			out = append(out, ipOf(a))
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

// Sync makes the owned addresses exactly want: missing ones are added and
// announced, owned ones not wanted are removed. Addresses egressvip does not
// own are never touched, even when wanted.
func (m *Manager) Sync(ctx context.Context, want []netip.Addr) (added, removed []netip.Addr, err error) {
	l, err := m.link()
	if err != nil {
		return nil, nil, err
	}
	list, err := m.addrs(l)
	if err != nil {
		return nil, nil, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	wanted := map[netip.Addr]bool{}
	for _, a := range want {
		wanted[a.Unmap()] = true
	}
	present := map[netip.Addr]bool{}
	var errs []error
	for _, a := range list {
		ip := ipOf(a)
		present[ip] = true
		if !Owned(a, m.cfg.Interface) || wanted[ip] {
			continue
		}
		if err := m.h.AddrDel(l, &a); err != nil {
			errs = append(errs, fmt.Errorf("remove %s from %s: %w", ip, m.cfg.Interface, err))
			continue
		}
		m.stopAnnouncing(ip)
		removed = append(removed, ip)
	}
	for ip := range wanted {
		if present[ip] {
			continue
		}
		if err := m.h.AddrAdd(l, m.addr(ip)); err != nil {
			errs = append(errs, fmt.Errorf("bind %s to %s: %w", ip, m.cfg.Interface, err))
			continue
		}
		added = append(added, ip)
		if m.cfg.Announce {
			m.announce(ctx, l, ip)
		}
	}
	slices.SortFunc(added, netip.Addr.Compare)
	slices.SortFunc(removed, netip.Addr.Compare)
	return added, removed, errors.Join(errs...)
}

// addr is the kernel address for ip: full length, preferred lifetime 0 so
// the kernel never picks it as source for the node's own traffic, valid
// forever, and for IPv6 without duplicate address detection so it is usable
// at once.
func (m *Manager) addr(ip netip.Addr) *netlink.Addr {
	a := &netlink.Addr{
		IPNet:       &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(ip.BitLen(), ip.BitLen())},
		PreferedLft: 0,
		ValidLft:    infinity,
	}
	if ip.Is4() {
		a.Label = label(m.cfg.Interface)
	} else {
		a.Flags = unix.IFA_F_NODAD
	}
	return a
}

// Cleanup removes every owned address (for `egressvip cleanup`).
func (m *Manager) Cleanup() error {
	_, _, err := m.Sync(context.Background(), nil)
	m.Wait()
	return err
}

// Wait blocks until running announcements have ended.
func (m *Manager) Wait() { m.wg.Wait() }

// Host is what the node itself uses on the serviceInterface: addresses
// egressvip did not add, their on-link subnets, and the gateways of routes
// through the interface. None of them may be claimed by a Service.
type Host struct {
	Own      []netip.Addr
	Subnets  []netip.Prefix
	Gateways []netip.Addr
}

// Host reads the interface's own addresses and gateways.
func (m *Manager) Host() (Host, error) {
	var h Host
	l, err := m.link()
	if err != nil {
		return h, err
	}
	list, err := m.addrs(l)
	if err != nil {
		return h, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	for _, a := range list {
		if Owned(a, m.cfg.Interface) || a.IPNet == nil {
			continue
		}
		ip := ipOf(a)
		ones, _ := a.Mask.Size()
		h.Own = append(h.Own, ip)
		h.Subnets = append(h.Subnets, netip.PrefixFrom(ip, ones).Masked())
	}
	var routes []netlink.Route
	for range 5 {
		routes, err = m.h.RouteList(l, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return h, fmt.Errorf("list routes of %s: %w", m.cfg.Interface, err)
	}
	for _, r := range routes {
		if gw, ok := netip.AddrFromSlice(r.Gw); ok && r.Gw != nil {
			h.Gateways = append(h.Gateways, gw.Unmap())
		}
		for _, nh := range r.MultiPath {
			if gw, ok := netip.AddrFromSlice(nh.Gw); ok && nh.Gw != nil {
				h.Gateways = append(h.Gateways, gw.Unmap())
			}
		}
	}
	slices.SortFunc(h.Gateways, netip.Addr.Compare)
	h.Gateways = slices.Compact(h.Gateways)
	return h, nil
}
