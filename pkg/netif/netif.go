// Package netif binds LoadBalancer IPs to the serviceInterface with netlink
// and announces them with gratuitous ARP / unsolicited neighbour
// advertisement.
//
// Ownership is recognisable in the kernel, so a restarted daemon (or
// `egressvip cleanup`) finds its addresses without any state file: an
// address is egressvip's when it is on the serviceInterface, full length
// (/32 or /128) and carries the address protocol AddrProto (IFA_PROTO,
// Linux ≥ 5.18), whatever the interface's name. Addresses bound by earlier
// versions are recognised by their old markers: deprecated (preferred
// lifetime 0) and, for IPv4, the label "<iface>:evip", for IPv6 the NODAD
// flag. New addresses carry both (the label when it fits in 15 characters),
// so a downgrade still finds them. Nothing else is ever removed.
//
// IPv6 addresses are bound with IFA_F_NOPREFIXROUTE, so that each one does
// not add a /128 route to the main table; owned addresses an earlier
// version bound without it get it in place (see Manager.upgrade).
//
// Watch notices within milliseconds when the kernel lost something egressvip
// keeps (an owned address deleted, the interface down, up, deleted or
// re-created); the next Sync restores the addresses and announces them
// again.
package netif

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrInterfaceNotFound says the serviceInterface does not exist.
var ErrInterfaceNotFound = errors.New("interface not found")

// LabelSuffix is appended to the interface name to label owned IPv4
// addresses (when the result fits in 15 characters).
const LabelSuffix = ":evip"

// infinity is the kernel's "forever" lifetime.
const infinity = 0xFFFFFFFF

// Config configures a Manager.
type Config struct {
	Interface string
	// Announce sends gratuitous ARP / unsolicited NA for new addresses,
	// and for all owned addresses after the interface came back up or was
	// re-created.
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
	cfg     Config
	h       *netlink.Handle
	sockets map[int]*nl.SocketHandle // raw requests; nil: a socket per request
	// dumps is the socket with strict checking for dumps, used while
	// strict holds (see openDumpSocket).
	dumps  map[int]*nl.SocketHandle
	strict atomic.Bool
	proto  bool   // mark addresses with AddrProto
	label  string // label(cfg.Interface)
	log    *logrus.Entry

	mu         sync.Mutex
	announcing map[netip.Addr]*pending
	announcer  bool          // the announcing goroutine runs
	wake       chan struct{} // a new address to announce
	wg         sync.WaitGroup

	state linkState
}

// linkState is what Sync and Watch share about the interface.
type linkState struct {
	mu sync.Mutex
	// wanted is the last Sync's want, each distinct address with its
	// index: Watch pokes when one of them is deleted. Sync's own removals
	// are never in it. Never modified once set: Syncs with the same want
	// share it.
	wanted map[netip.Addr]int
	// index and up: the interface as the last Sync saw it (index 0: not
	// yet seen).
	index int
	up    bool
	// reannounce: Watch saw the interface go down, come up or be
	// re-created, or lost events; the next Sync on an up interface
	// announces every owned address.
	reannounce bool
	// own are the addresses (with prefix length) egressvip did not add,
	// from the last Sync's listing: Host and OwnAddresses read them
	// instead of listing thousands of addresses again.
	own    []netip.Prefix
	listed bool
}

// New returns a Manager; it does not touch the interface. It fails when
// egressvip could not recognise the addresses it binds to the interface
// (see CheckOwnable).
func New(cfg Config) (*Manager, error) {
	if cfg.Interface == "" {
		return nil, errors.New("no interface configured")
	}
	if err := CheckOwnable(cfg.Interface); err != nil {
		return nil, err
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
	m := &Manager{cfg: cfg, h: &netlink.Handle{}, proto: kernelHasAddrProto(), label: label(cfg.Interface),
		log: cfg.Log.WithField("interface", cfg.Interface), announcing: map[netip.Addr]*pending{}, wake: make(chan struct{}, 1)}
	if cfg.inOtherNS() {
		var err error
		if m.h, err = netlink.NewHandleAt(cfg.NetNS); err != nil {
			return nil, fmt.Errorf("netlink handle in namespace: %w", err)
		}
		s, err := nl.GetNetlinkSocketAt(cfg.NetNS, netns.None(), unix.NETLINK_ROUTE)
		if err != nil {
			m.h.Close()
			return nil, fmt.Errorf("netlink socket in namespace: %w", err)
		}
		m.sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: s}}
	}
	m.openDumpSocket()
	return m, nil
}

// inOtherNS says whether NetNS names a namespace to enter. Descriptor 0 is
// stdin, never a namespace handle, so the zero Config means "here".
func (c Config) inOtherNS() bool { return c.NetNS > 0 }

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

// linkUp says whether the interface can send: administratively up and
// operationally up (or unknown, as for interfaces without carrier
// reporting).
func linkUp(a *netlink.LinkAttrs) bool {
	return a.Flags&net.FlagUp != 0 && a.Flags&net.FlagRunning != 0
}

func ipOf(a Addr) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.IP)
	return ip.Unmap()
}

// Owned lists the addresses egressvip owns on the interface.
func (m *Manager) Owned() ([]netip.Addr, error) {
	l, err := m.link()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	err = m.eachAddr(l.Attrs().Index, func() { out = out[:0] }, func(a ifAddr, _ []byte) error {
		if m.owned(a) {
			out = append(out, a.ip)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

// Sync makes the owned addresses exactly want: missing ones are added and
// announced, owned ones not wanted are removed. Addresses egressvip does not
// own are never touched, even when wanted. When the interface came back up
// or was re-created since the previous Sync (or Watch saw it happen in
// between), every wanted owned address is announced again, also those the
// kernel kept: the neighbours and switches may have forgotten them.
func (m *Manager) Sync(ctx context.Context, want []netip.Addr) (added, removed []netip.Addr, err error) {
	wanted := m.wantedSet(want)
	// Before any removal, so that Watch never takes one of ours for a loss.
	m.state.mu.Lock()
	m.state.wanted = wanted
	m.state.mu.Unlock()

	l, err := m.link()
	if err != nil {
		return nil, nil, err
	}
	index := l.Attrs().Index
	// What the interface has of each wanted address, by its index in
	// wanted.
	const (
		absent = iota
		foreign
		ours
	)
	seen := make([]uint8, len(wanted))
	var (
		drop    []Addr       // owned, not wanted
		upgrade []netip.Addr // owned, wanted, IPv6 with a prefix route
		own     []netip.Prefix
	)
	upgradable := kernelHasNoPrefixRoute()
	err = m.eachAddr(index, func() {
		clear(seen)
		drop, upgrade, own = drop[:0], upgrade[:0], nil
	}, func(a ifAddr, msg []byte) error {
		i, isWanted := wanted[a.ip]
		switch {
		case !m.owned(a):
			if isWanted {
				seen[i] = max(seen[i], foreign)
			}
			own = append(own, netip.PrefixFrom(a.ip, a.ones))
		case isWanted:
			seen[i] = ours
			if upgradable && a.ip.Is6() && a.flags&unix.IFA_F_NOPREFIXROUTE == 0 {
				upgrade = append(upgrade, a.ip)
			}
		default:
			// Removals are rare: only they need the whole address.
			full, err := parseAddr(msg)
			if err != nil {
				return err
			}
			drop = append(drop, full)
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	var errs []error
	for i := range drop {
		ip := ipOf(drop[i])
		if err := m.h.AddrDel(l, &drop[i].Addr); err != nil {
			errs = append(errs, fmt.Errorf("remove %s from %s: %w", ip, m.cfg.Interface, err))
			continue
		}
		m.stopAnnouncing(ip)
		removed = append(removed, ip)
	}
	for ip, i := range wanted {
		if seen[i] != absent {
			continue
		}
		if err := m.addOwned(index, ip, false); err != nil {
			errs = append(errs, fmt.Errorf("bind %s to %s: %w", ip, m.cfg.Interface, err))
			continue
		}
		added = append(added, ip)
	}
	m.upgrade(index, upgrade)
	slices.SortFunc(added, netip.Addr.Compare)
	slices.SortFunc(removed, netip.Addr.Compare)
	m.state.mu.Lock()
	m.state.own, m.state.listed = own, true
	m.state.mu.Unlock()

	up := linkUp(l.Attrs())
	all := m.observe(index, up)
	if m.cfg.Announce && up {
		announce := added
		if all {
			var kept []netip.Addr
			for ip, i := range wanted {
				if seen[i] == ours {
					kept = append(kept, ip)
				}
			}
			slices.SortFunc(kept, netip.Addr.Compare)
			announce = append(kept, added...)
			m.log.WithField("addresses", len(announce)).Info("interface came back: announcing every address again")
		}
		for _, ip := range announce {
			m.announce(ctx, l, ip)
		}
	}
	return added, removed, errors.Join(errs...)
}

// wantedSet indexes the distinct addresses of want. When they are those
// of the previous Sync, the usual case, it returns that Sync's set (Watch
// only reads it), so that a Sync that changes nothing builds no map.
func (m *Manager) wantedSet(want []netip.Addr) map[netip.Addr]int {
	m.state.mu.Lock()
	prev := m.state.wanted
	m.state.mu.Unlock()
	if prev != nil && len(want) >= len(prev) {
		hit := make([]bool, len(prev))
		n := 0
		for _, a := range want {
			i, ok := prev[a.Unmap()]
			if !ok {
				n = -1
				break
			}
			if !hit[i] {
				hit[i] = true
				n++
			}
		}
		if n == len(prev) {
			return prev
		}
	}
	wanted := make(map[netip.Addr]int, len(want))
	for _, a := range want {
		a = a.Unmap()
		if _, ok := wanted[a]; !ok {
			wanted[a] = len(wanted)
		}
	}
	return wanted
}

// upgrade sets IFA_F_NOPREFIXROUTE on owned IPv6 addresses an earlier
// version bound without it, in place (the addresses stay bound
// throughout), which removes their /128 routes from the main table.
// Once flagged, an address is left alone: this happens once per address.
// Failures only keep a route that is useless but harmless; they are logged
// and tried again at the next Sync. The replacement also resets the
// lifetimes to egressvip's (preferred 0, valid forever) and stamps
// AddrProto, as for a new address.
func (m *Manager) upgrade(index int, ips []netip.Addr) {
	var (
		done  int
		first error
	)
	for _, ip := range ips {
		if err := m.addOwned(index, ip, true); err != nil {
			if first == nil {
				first = fmt.Errorf("%s: %w", ip, err)
			}
			continue
		}
		done++
	}
	if done > 0 {
		m.log.WithField("addresses", done).Info("removed the prefix routes of addresses an earlier version bound")
	}
	if first != nil {
		m.log.WithError(first).WithField("addresses", len(ips)-done).Warn("cannot remove the prefix routes of addresses an earlier version bound")
	}
}

// observe records the interface as Sync sees it and says whether every
// owned address must be announced again: the interface was re-created (a
// new index) or came up since the previous Sync, or Watch saw a transition
// in between. While the interface is down nothing can be sent, so the
// need is kept for the Sync that finds it up. The first Sync announces
// only what it adds: addresses a previous process kept are known already.
func (m *Manager) observe(index int, up bool) bool {
	s := &m.state
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.index != 0 && (index != s.index || up && !s.up) {
		s.reannounce = true
	}
	s.index, s.up = index, up
	if !up {
		return false
	}
	all := s.reannounce
	s.reannounce = false
	return all
}

// Cleanup removes every owned address (for `egressvip cleanup`).
func (m *Manager) Cleanup() error {
	_, _, err := m.Sync(context.Background(), nil)
	m.Wait()
	return err
}

// Wait blocks until running announcements have ended.
func (m *Manager) Wait() { m.wg.Wait() }

// OwnAddresses are the interface's addresses egressvip did not add, as the
// last Sync listed them (nil before the first Sync).
func (m *Manager) OwnAddresses() []netip.Addr {
	m.state.mu.Lock()
	defer m.state.mu.Unlock()
	out := make([]netip.Addr, 0, len(m.state.own))
	for _, p := range m.state.own {
		out = append(out, p.Addr())
	}
	return out
}

// ownPrefixes are the addresses egressvip did not add, from the last Sync
// or, before it, listed now.
func (m *Manager) ownPrefixes(l netlink.Link) ([]netip.Prefix, error) {
	m.state.mu.Lock()
	own, listed := m.state.own, m.state.listed
	m.state.mu.Unlock()
	if listed {
		return own, nil
	}
	err := m.eachAddr(l.Attrs().Index, func() { own = nil }, func(a ifAddr, _ []byte) error {
		if !m.owned(a) {
			own = append(own, netip.PrefixFrom(a.ip, a.ones))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	return own, nil
}

// Host is what the node itself uses on the serviceInterface: addresses
// egressvip did not add, their on-link subnets, and the gateways of routes
// through the interface. None of them may be claimed by a Service.
type Host struct {
	Own      []netip.Addr
	Subnets  []netip.Prefix
	Gateways []netip.Addr
}

// Host returns the interface's own addresses, from the last Sync's
// listing (listed here only before the first Sync), and reads its
// gateways: routes through one interface are few, its addresses may be
// thousands. The kernel sends only the main table's routes through the
// interface when it checks dumps strictly (see gateways).
func (m *Manager) Host() (Host, error) {
	var h Host
	l, err := m.link()
	if err != nil {
		return h, err
	}
	own, err := m.ownPrefixes(l)
	if err != nil {
		return h, err
	}
	for _, p := range own {
		h.Own = append(h.Own, p.Addr())
		h.Subnets = append(h.Subnets, p.Masked())
	}
	if h.Gateways, err = m.gateways(l.Attrs().Index); err != nil {
		return h, fmt.Errorf("list routes of %s: %w", m.cfg.Interface, err)
	}
	slices.SortFunc(h.Gateways, netip.Addr.Compare)
	h.Gateways = slices.Compact(h.Gateways)
	return h, nil
}
