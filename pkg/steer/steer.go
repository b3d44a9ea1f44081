// Package steer writes the policy routing that steers the off-cluster
// traffic of a Service's pods on this node to the node that holds the
// Service's address (the holder), which SNATs and forwards it.
//
// The firewall (pkg/snat) marks the packets to steer with one fwmark bit
// (Config.Mark). For each steered pod this package keeps one ip rule, and
// for each next hop (holder address and device) one routing table:
//
//	31000:	from 10.244.1.5 fwmark 0x1000/0x1000 lookup 59136 proto 231
//	31001:	from all iif lo fwmark 0x1000/0x1000 lookup main proto 231
//	31002:	from all fwmark 0x1000/0x1000 blackhole proto 231
//	default via 198.51.100.12 dev eth0 proto 231 onlink         (table 59136)
//
// The guard rules (both families, always there) drop a marked packet that
// no pod's rule takes, except what this node sends itself (the VXLAN
// device's encapsulated packets keep the mark of the packet inside): the firewall marks a pod's packets in
// one transaction and its rule follows a moment later, or is gone a moment
// before the marks; meanwhile they are dropped, never routed by the main
// table with the pod's address.
//
// The next hop is an address of the holder that is on-link (a directly
// connected subnet, no router in between): a router would forward the
// packet by its destination and never bring it to the holder. Nodes on
// different subnets use VXLAN mode instead: one VXLAN device (Tunnel) with a
// permanent FDB entry per peer (its MAC to its underlay address) and
// permanent neighbour entries (its inner addresses, and the IPv6 link-local
// address of its MAC, to its MAC), so that the tables say
//
//	default via 198.51.100.141 dev egressvip.vx proto 231 onlink
//	default via fe80::64a6:51ff:fedb:f33e dev egressvip.vx proto 231 metric 1024
//
// (IPv6 refuses an onlink gateway that a route of the main table sends
// through another device, which the holder's global addresses always are.)
//
// Ownership is recognisable in the kernel without state: rules and routes
// carry the protocol Proto (0xe7 = 231, like egressvip's addresses), routes
// live in the table range of the Config, and the VXLAN device carries the
// alias DeviceAlias (or, after a crash before the alias was set, the MAC
// egressvip derives). A restarted daemon (or `egressvip cleanup`) finds and
// removes what nobody wants any more; nothing else is ever touched.
package steer

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/egressvip/egressvip/internal/netnsdo"
	"github.com/egressvip/egressvip/pkg/model"
)

// Proto is the rule and route protocol (FRA_PROTOCOL, rtm_protocol: 8 bits)
// egressvip stamps on what it writes, the same value as its address
// protocol (netif.AddrProto). iproute2 prints it as "proto 0xe7", or by name
// after `echo '231 egressvip' >> /etc/iproute2/rt_protos`.
const Proto uint8 = 0xe7

// DeviceAlias is the alias (IFLA_IFALIAS) of egressvip's VXLAN device: what
// marks it as egressvip's whatever its name.
const DeviceAlias = "egressvip steering tunnel"

// Defaults of Config.
const (
	DefaultMark         uint32 = 0x1000
	DefaultRulePriority        = 31000
	DefaultTableMin            = 0xe700 // 59136
	DefaultTableMax            = 0xeeff // 61183: 2,048 tables
	DefaultVXLANPort           = 4789
)

// Config configures a Manager.
type Config struct {
	// Node is this node's name: in messages, and the seed of the VXLAN
	// device's MAC address (see TunnelMAC).
	Node string
	// Mark is the fwmark bit the firewall sets on packets to steer; rules
	// match it as Mark/Mark (default 0x1000).
	Mark uint32
	// RulePriority of the ip rules (default 31000: before the main table's
	// 32766, after the local table's 0); the guard rules take the next
	// two.
	RulePriority int
	// TableMin and TableMax bound the routing tables egressvip owns
	// (default 59136-61183, 0xe700-0xeeff). One table per next hop.
	TableMin, TableMax int
	// Interfaces are the node network interfaces where steered packets
	// from other nodes arrive when this node holds a Service (the interface
	// of the node's InternalIP). Diagnose checks them besides those it
	// knows from Apply (optional).
	Interfaces []string
	// NetNS is the network namespace to work in (tests); zero (or a closed
	// handle) means the process's namespace.
	NetNS netns.NsHandle
	Log   *logrus.Entry
}

// inOtherNS says whether NetNS names a namespace to enter. Descriptor 0 is
// stdin, never a namespace handle, so the zero Config means "here".
func (c Config) inOtherNS() bool { return c.NetNS > 0 }

// Manager keeps egressvip's steering rules, tables and VXLAN device.
type Manager struct {
	cfg Config
	h   *netlink.Handle
	// sockets are the raw requests' (the rule dump) in NetNS; nil: a
	// socket per request in the process's namespace.
	sockets map[int]*nl.SocketHandle
	// dumps has strict checking (NETLINK_GET_STRICT_CHK): the kernel sends
	// only egressvip's routes (by protocol) instead of every route of the
	// node. nil when the kernel refuses it; then h dumps and the library
	// filters.
	dumps *netlink.Handle
	mac   net.HardwareAddr
	log   *logrus.Entry

	mu sync.Mutex
	// scanned: the links were listed since start, so devices holds every
	// owned VXLAN device (a restart may have left one under an old name).
	scanned bool
	devices map[string]bool
	// last is what the last Apply wrote, for Diagnose.
	last applied
	// writes counts netlink changes (tests: an Apply without changes
	// writes nothing).
	writes int
}

// applied is what Diagnose needs to know of the last Apply.
type applied struct {
	// hopDevs are the devices of on-link next hops: steered packets leave
	// and their replies return there.
	hopDevs []string
	// tunnel is the VXLAN device and underlay, when VXLAN mode is on.
	tunnel   string
	underlay string
}

// New returns a Manager; it does not touch the kernel.
func New(cfg Config) (*Manager, error) {
	if cfg.Node == "" {
		return nil, errors.New("steer: no node name configured")
	}
	if cfg.Mark == 0 {
		cfg.Mark = DefaultMark
	}
	if cfg.RulePriority == 0 {
		cfg.RulePriority = DefaultRulePriority
	}
	if cfg.TableMin == 0 && cfg.TableMax == 0 {
		cfg.TableMin, cfg.TableMax = DefaultTableMin, DefaultTableMax
	}
	switch {
	case cfg.RulePriority < 1 || cfg.RulePriority >= 32764:
		return nil, fmt.Errorf("steer: rule priority %d must be between 1 and 32765 (before the main table's rule)", cfg.RulePriority)
	case cfg.TableMin < 1 || cfg.TableMax < cfg.TableMin:
		return nil, fmt.Errorf("steer: table range %d-%d is empty", cfg.TableMin, cfg.TableMax)
	case cfg.TableMin <= unix.RT_TABLE_LOCAL && cfg.TableMax >= unix.RT_TABLE_DEFAULT:
		return nil, fmt.Errorf("steer: table range %d-%d includes the kernel's tables 253-255 (default, main, local)", cfg.TableMin, cfg.TableMax)
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	m := &Manager{cfg: cfg, mac: tunnelMAC(cfg.Node), log: cfg.Log, devices: map[string]bool{}}
	ns := netns.None()
	if cfg.inOtherNS() {
		ns = cfg.NetNS
	}
	var err error
	if m.h, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE); err != nil {
		return nil, fmt.Errorf("steer: netlink handle: %w", err)
	}
	if cfg.inOtherNS() {
		s, err := nl.GetNetlinkSocketAt(cfg.NetNS, netns.None(), unix.NETLINK_ROUTE)
		if err != nil {
			m.h.Close()
			return nil, fmt.Errorf("steer: netlink socket in namespace: %w", err)
		}
		m.sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: s}}
	}
	if d, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE); err == nil {
		if err := d.SetStrictCheck(true); err != nil {
			d.Close()
			m.log.WithError(err).Debug("the kernel does not filter route dumps; filtering them here")
		} else {
			m.dumps = d
		}
	}
	return m, nil
}

// Close releases the netlink sockets; it leaves the kernel as it is.
func (m *Manager) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.h.Close()
	for _, s := range m.sockets {
		s.Close()
	}
	if m.dumps != nil {
		m.dumps.Close()
	}
}

// TunnelMAC is the MAC address of this node's VXLAN device, the value other
// nodes need as TunnelPeer.MAC (its String form). It depends on the node
// name only, so it is the same after every restart of the daemon and known
// before the device exists.
func (m *Manager) TunnelMAC() net.HardwareAddr { return append(net.HardwareAddr(nil), m.mac...) }

// tunnelMAC derives a unicast, locally administered MAC address from the
// node name.
func tunnelMAC(node string) net.HardwareAddr {
	sum := sha256.Sum256([]byte("egressvip/vxlan/" + node))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}

// inNS runs fn on a locked OS thread inside the Manager's namespace: what
// is not a netlink request (/proc/sys) is resolved against the calling
// thread's namespace.
func (m *Manager) inNS(fn func() error) error {
	if !m.cfg.inOtherNS() {
		return fn()
	}
	return netnsdo.Do(m.cfg.NetNS, fn)
}

// family returns the netlink family of ip.
func family(ip netip.Addr) int {
	if ip.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func familyName(f int) string {
	if f == netlink.FAMILY_V4 {
		return "IPv4"
	}
	return "IPv6"
}

// Apply makes the kernel hold exactly what r asks of egressvip's policy
// routing: the VXLAN device (when r.Tunnel is set), one table per next
// hop and one rule per steered pod. Steer rules that cannot be written (the
// holder is not on-link, has no VTEP, a write failed) are reported per
// Service in failed; everything else is still written. err reports what is
// not one Service's (a dump that failed, a stale object that could not be
// removed).
func (m *Manager) Apply(ctx context.Context, r model.Routes) (failed map[string]error, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	failed = map[string]error{}
	// Each distinct reason once per Service: its pods fail alike.
	seen := map[string]map[string]bool{}
	fail := func(svc string, err error) {
		if seen[svc] == nil {
			seen[svc] = map[string]bool{}
		}
		if msg := err.Error(); !seen[svc][msg] {
			seen[svc][msg] = true
			failed[svc] = errors.Join(failed[svc], err)
		}
	}
	var errs []error

	// The device first: the routes through it need its index. A device
	// of another name goes before: two devices of one VNI and port cannot
	// exist together.
	var tun *tunnel
	var tunErr error
	keep := ""
	if r.Tunnel != nil {
		keep = r.Tunnel.Device
	}
	if err := m.removeDevices(keep); err != nil {
		errs = append(errs, err)
	}
	if r.Tunnel != nil {
		tun, tunErr = m.ensureTunnel(r.Tunnel)
		if tunErr != nil {
			errs = append(errs, tunErr)
		}
	}
	if err := ctx.Err(); err != nil {
		return failed, errors.Join(append(errs, err)...)
	}

	res := m.newResolver(r.Tunnel, tun, tunErr)
	want := planRules(r.Steer, res.resolve, fail)

	rt, err := m.syncTables(want, fail)
	if err != nil {
		return failed, errors.Join(append(errs, err)...)
	}
	if err := ctx.Err(); err != nil {
		return failed, errors.Join(append(errs, err)...)
	}
	if err := m.syncRules(want, rt, fail); err != nil {
		errs = append(errs, err)
	}
	if err := m.dropTables(rt); err != nil {
		errs = append(errs, err)
	}

	m.last = applied{hopDevs: res.devices()}
	if tun != nil {
		m.last.tunnel, m.last.underlay = tun.name, tun.underlay
	}
	return failed, errors.Join(errs...)
}

// Cleanup removes every rule, route and VXLAN device egressvip owns.
func (m *Manager) Cleanup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	rules, odd, err := m.ownedRuleKeys()
	if err != nil {
		errs = append(errs, err)
	}
	for k, n := range rules {
		for range n {
			if err := m.delRule(m.ruleOf(k)); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if odd {
		if err := m.removeOdd(); err != nil {
			errs = append(errs, err)
		}
	}
	routes, err := m.ownedRoutes()
	if err != nil {
		errs = append(errs, err)
	}
	for i := range routes {
		if err := m.delRoute(&routes[i]); err != nil {
			errs = append(errs, err)
		}
	}
	if err := ctx.Err(); err != nil {
		return errors.Join(append(errs, err)...)
	}
	m.scanned = false
	if err := m.removeDevices(""); err != nil {
		errs = append(errs, err)
	}
	m.last = applied{}
	return errors.Join(errs...)
}
