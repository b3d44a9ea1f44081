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
// version bound without it get it in place (see Sync).
//
// Watch notices within milliseconds when the kernel lost something egressvip
// keeps (an owned address deleted, the interface down, up, deleted or
// re-created); the next Sync restores the addresses and announces them
// again.
//
// An egress address is an identity a firewall trusts, so it must be on one
// node only, also when the daemon dies, is frozen or loses the API server.
// Config.Lifetime fences it in the kernel: owned addresses get a finite
// valid lifetime that Refresh renews, so a daemon that stops running loses
// them by itself (see lifetime.go). Before binding an address it has just
// acquired the daemon can Probe the wire for a host that still answers for
// it, and Conflicts reports any other host that claims one of its
// addresses (see acd.go).
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

	"github.com/egressvip/egressvip/pkg/model"
)

// ErrInterfaceNotFound says the serviceInterface does not exist.
var ErrInterfaceNotFound = errors.New("interface not found")

// ErrInterfaceDown says the serviceInterface exists but cannot carry
// traffic: administratively down, or without carrier (see linkUp). Sync
// then adds nothing: an address bound there would not be reachable, and
// the daemon should rather let another node serve it.
var ErrInterfaceDown = errors.New("interface down")

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
	// Lifetime is the valid lifetime of the owned addresses egressvip
	// binds; 0 means forever. With a lifetime, the kernel removes an
	// address by itself once nobody renewed it for that long, so a daemon
	// that is killed, frozen or cut off stops holding its addresses
	// without having to run; Refresh (every 500 ms) and Sync renew them.
	// The kernel counts lifetimes in whole seconds: Lifetime is rounded up
	// to one, and must be at least 2 s so that renewals have a margin
	// (see Refresh). The kernel removes an expired address up to about a
	// second late (see the package's lifetime tests for the bound).
	Lifetime time.Duration
}

// minLifetime is the shortest Config.Lifetime: an address is renewed once
// at most two thirds of its lifetime are left, as the kernel reports it in
// whole seconds, which for one second would be never.
const minLifetime = 2 * time.Second

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

	// lifetime is Config.Lifetime in the kernel's unit: whole seconds, or
	// infinity.
	lifetime uint32
	// syncMu serialises Sync, Refresh and Persist, which write lifetimes
	// and share the fields below.
	syncMu sync.Mutex
	// persisted are addresses Persist made permanent: Sync and Refresh
	// keep them forever too, so that a renewal running after Persist at
	// shutdown cannot give them a finite lifetime again.
	persisted map[netip.Addr]bool
	// renewedAt is when each owned address was last written with a
	// lifetime (the time before the request): it proves how long the
	// address is certainly still bound (see renewable).
	renewedAt map[netip.Addr]time.Time
	// refreshAt is when Refresh has to list the interface again (zero:
	// at once); see planRefresh.
	refreshAt time.Time
	// finite is true when Config.Lifetime is set (lifetime is then never
	// infinity; SetLifetime changes it). prevLifetime is the shortest
	// lifetime used before the last change, at changedAt: what an
	// address written before then may count on.
	finite       bool
	prevLifetime uint32
	changedAt    time.Time
	// renewCost is the cost of one renewal in the last round that wrote
	// any (a write costs more the more IPv6 addresses the node has), when
	// renewHeld addresses were wanted.
	renewCost time.Duration
	renewHeld int

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
	// wanted is the last Sync's want: Watch pokes when one of its
	// addresses is deleted, Refresh renews those the kernel holds. Sync's
	// own removals are never in it. Never modified once set: Syncs with
	// the same want share it.
	wanted *wantSet
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
	lifetime, err := lifetimeSeconds(cfg.Lifetime)
	if err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, h: &netlink.Handle{}, proto: kernelHasAddrProto(), label: label(cfg.Interface),
		log: cfg.Log.WithField("interface", cfg.Interface), announcing: map[netip.Addr]*pending{}, wake: make(chan struct{}, 1),
		lifetime: lifetime, finite: lifetime != infinity, persisted: map[netip.Addr]bool{}, renewedAt: map[netip.Addr]time.Time{}}
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

// Result is what one Sync did, address by address. After it, each wanted
// address is bound and owned (kept, or Added), Absent, in Failed because
// it could not be added, or held by the interface without being
// egressvip's (left alone, reported nowhere).
type Result struct {
	// Added were bound by this Sync (and are being announced, with
	// Config.Announce).
	Added []netip.Addr
	// Removed were owned and not wanted; this Sync unbound them.
	Removed []netip.Addr
	// Absent are wanted addresses the interface lacks that Sync did not
	// try to add: KeepOnly ones (expired or deleted since they were
	// bound), and every missing one while the interface is down.
	Absent []netip.Addr
	// Failed are the addresses whose addition, removal or lifetime
	// renewal the kernel refused, with its error; the other addresses
	// were done all the same. An address whose renewal failed is still
	// bound, until its lifetime runs out.
	Failed map[netip.Addr]error
}

func (r *Result) fail(ip netip.Addr, err error) {
	if r.Failed == nil {
		r.Failed = map[netip.Addr]error{}
	}
	r.Failed[ip] = err
}

// Sync makes the owned addresses exactly want: missing ones are added and
// announced (KeepOnly ones excepted: they are only kept, see
// model.Binding), owned ones not wanted are removed, and the lifetime of
// every wanted owned address is renewed where it needs it (see Refresh),
// or reset when it is not what Config.Lifetime says (a previous process
// may have bound it forever). Addresses egressvip does not own are never
// touched, even when wanted.
//
// One address the kernel refuses does not stop the others: it is reported
// in Result.Failed and the error stays nil. The error says the interface as
// a whole is unusable: ErrInterfaceNotFound (nothing done), ErrInterfaceDown
// (nothing added, but unwanted owned addresses are removed and wanted ones
// renewed), or a failed listing.
//
// When the interface came back up or was re-created since the previous
// Sync (or Watch saw it happen in between), every wanted owned address is
// announced again, also those the kernel kept: the neighbours and switches
// may have forgotten them.
func (m *Manager) Sync(ctx context.Context, want []model.Binding) (Result, error) {
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	var res Result
	wanted := m.wantedSet(want)
	// Before any removal, so that Watch never takes one of ours for a loss.
	m.state.mu.Lock()
	m.state.wanted = wanted
	m.state.mu.Unlock()
	m.forgetUnwanted(wanted)

	l, err := m.link()
	if err != nil {
		return res, err
	}
	index := l.Attrs().Index
	up := linkUp(l.Attrs())
	// What the interface has of each wanted address, by its index in
	// wanted.
	const (
		absent = iota
		foreign
		ours
	)
	seen := make([]uint8, len(wanted.index))
	var (
		drop  []Addr    // owned, not wanted
		renew []renewal // owned, wanted, with a lifetime or flags to rewrite
		own   []netip.Prefix
	)
	upgradable := kernelHasNoPrefixRoute()
	listed := time.Now()
	err = m.eachAddr(index, func() {
		clear(seen)
		drop, renew, own = drop[:0], renew[:0], nil
		listed = time.Now()
	}, func(a ifAddr, msg []byte) error {
		i, isWanted := wanted.index[a.ip]
		switch {
		case !m.owned(a):
			if isWanted {
				seen[i] = max(seen[i], foreign)
			}
			own = append(own, netip.PrefixFrom(a.ip, a.ones))
		case isWanted:
			seen[i] = ours
			stale := m.needsRenewal(a)
			// IPv6 addresses an earlier version bound without
			// IFA_F_NOPREFIXROUTE get it in place (they stay bound
			// throughout), which removes their /128 routes from the
			// main table; once flagged they are left alone.
			upgrade := upgradable && a.ip.Is6() && a.flags&unix.IFA_F_NOPREFIXROUTE == 0
			if stale || upgrade {
				renew = append(renew, renewal{addr: a, upgradeOnly: !stale})
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
		return res, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	for i := range drop {
		ip := ipOf(drop[i])
		if err := m.h.AddrDel(l, &drop[i].Addr); err != nil {
			res.fail(ip, fmt.Errorf("remove %s from %s: %w", ip, m.cfg.Interface, err))
			continue
		}
		m.stopAnnouncing(ip)
		delete(m.renewedAt, ip)
		res.Removed = append(res.Removed, ip)
	}
	for ip, i := range wanted.index {
		if seen[i] != ours {
			// Expired, deleted or not ours: nothing to renew.
			delete(m.renewedAt, ip)
		}
		if seen[i] != absent {
			continue
		}
		if wanted.keepOnly[i] || !up {
			res.Absent = append(res.Absent, ip)
			continue
		}
		at := time.Now()
		if err := m.addOwned(index, ip, false, m.validFor(ip)); err != nil {
			res.fail(ip, fmt.Errorf("bind %s to %s: %w", ip, m.cfg.Interface, err))
			continue
		}
		m.renewedAt[ip] = at
		res.Added = append(res.Added, ip)
	}
	sortRenewals(renew)
	_, complete, _ := m.renewAll(ctx, index, listed, renew, &res, time.Now().Add(refreshSlice))
	m.planRefresh(wanted, complete)
	slices.SortFunc(res.Added, netip.Addr.Compare)
	slices.SortFunc(res.Removed, netip.Addr.Compare)
	slices.SortFunc(res.Absent, netip.Addr.Compare)
	m.state.mu.Lock()
	m.state.own, m.state.listed = own, true
	m.state.mu.Unlock()

	all := m.observe(index, up)
	if !up {
		return res, fmt.Errorf("interface %q is not up: %w", m.cfg.Interface, ErrInterfaceDown)
	}
	if m.cfg.Announce {
		announce := res.Added
		if all {
			var kept []netip.Addr
			for ip, i := range wanted.index {
				if seen[i] == ours {
					kept = append(kept, ip)
				}
			}
			slices.SortFunc(kept, netip.Addr.Compare)
			announce = append(kept, res.Added...)
			m.log.WithField("addresses", len(announce)).Info("interface came back: announcing every address again")
		}
		for _, ip := range announce {
			m.announce(ctx, l, ip)
		}
	}
	return res, nil
}

// wantSet is the distinct addresses of a Sync's want, each with its index
// into keepOnly.
type wantSet struct {
	index map[netip.Addr]int
	// keepOnly: every binding of the address is KeepOnly. An address two
	// Services share is added when either may add it.
	keepOnly []bool
}

// wantedSet indexes the distinct addresses of want. When they are those
// of the previous Sync, the usual case, it returns that Sync's set (Watch
// only reads it), so that a Sync that changes nothing builds no map.
func (m *Manager) wantedSet(want []model.Binding) *wantSet {
	m.state.mu.Lock()
	prev := m.state.wanted
	m.state.mu.Unlock()
	if prev != nil && len(want) >= len(prev.index) {
		const (
			hit     = 1
			addable = 2
		)
		marks := make([]uint8, len(prev.index))
		n := 0
		for _, b := range want {
			i, ok := prev.index[b.Addr.Unmap()]
			if !ok {
				n = -1
				break
			}
			if marks[i]&hit == 0 {
				n++
			}
			marks[i] |= hit
			if !b.KeepOnly {
				marks[i] |= addable
			}
		}
		same := n == len(prev.index)
		for i := 0; same && i < len(marks); i++ {
			same = prev.keepOnly[i] == (marks[i]&addable == 0)
		}
		if same {
			return prev
		}
	}
	ws := &wantSet{index: make(map[netip.Addr]int, len(want))}
	for _, b := range want {
		a := b.Addr.Unmap()
		i, ok := ws.index[a]
		if !ok {
			i = len(ws.keepOnly)
			ws.index[a] = i
			ws.keepOnly = append(ws.keepOnly, true)
		}
		ws.keepOnly[i] = ws.keepOnly[i] && b.KeepOnly
	}
	return ws
}

// forgetUnwanted drops what the Manager remembers of addresses no longer
// wanted. Called with syncMu held.
func (m *Manager) forgetUnwanted(wanted *wantSet) {
	for ip := range m.renewedAt {
		if _, ok := wanted.index[ip]; !ok {
			delete(m.renewedAt, ip)
		}
	}
	for ip := range m.persisted {
		if _, ok := wanted.index[ip]; !ok {
			delete(m.persisted, ip)
		}
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

// Cleanup removes every owned address (for `egressvip cleanup`). An
// interface that is down is cleaned all the same; an address the kernel
// refuses to remove makes it fail.
func (m *Manager) Cleanup() error {
	res, err := m.Sync(context.Background(), nil)
	m.Wait()
	if errors.Is(err, ErrInterfaceDown) {
		err = nil
	}
	errs := []error{err}
	for _, e := range res.Failed {
		errs = append(errs, e)
	}
	return errors.Join(errs...)
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
	// Up says the interface can carry traffic (administratively up and
	// running): a node whose serviceInterface is down should not stand
	// for addresses, which Sync would not bind (ErrInterfaceDown).
	Up bool
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
	h.Up = linkUp(l.Attrs())
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
