package netif

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// pending is an address still to be announced.
type pending struct {
	ifi  *net.Interface
	left int
	next time.Time
}

// announce schedules AnnounceCount announcements of ip, AnnounceInterval
// apart, starting now; a later announce of ip starts over, its removal
// cancels them. One goroutine sends every announcement due, so binding
// thousands of addresses at once costs one goroutine, not one each.
// Failures are logged, never fatal: the address works without them,
// neighbours just learn it later.
func (m *Manager) announce(_ context.Context, l netlink.Link, ip netip.Addr) {
	attrs := l.Attrs()
	ifi := &net.Interface{Index: attrs.Index, MTU: attrs.MTU, Name: attrs.Name, HardwareAddr: attrs.HardwareAddr, Flags: attrs.Flags}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.announcing[ip] = &pending{ifi: ifi, left: m.cfg.AnnounceCount, next: time.Now()}
	if m.announcer {
		select {
		case m.wake <- struct{}{}:
		default:
		}
		return
	}
	m.announcer = true
	m.wg.Add(1)
	go m.announceLoop()
}

// announceLoop sends the announcements that are due until none is left.
func (m *Manager) announceLoop() {
	defer m.wg.Done()
	if m.cfg.inOtherNS() {
		// Packet and ICMPv6 sockets belong to the namespace of the thread
		// that opens them.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			m.log.WithError(err).Warn("announce: cannot read the current namespace")
			m.stopLoop()
			return
		}
		defer orig.Close()
		if err := netns.Set(m.cfg.NetNS); err != nil {
			m.log.WithError(err).Warn("announce: cannot enter the namespace")
			m.stopLoop()
			return
		}
		defer func() {
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
		}()
	}
	for {
		now := time.Now()
		type job struct {
			ip  netip.Addr
			ifi *net.Interface
			n   int
		}
		var due []job
		var next time.Time
		m.mu.Lock()
		for ip, p := range m.announcing {
			if !p.next.After(now) {
				due = append(due, job{ip, p.ifi, m.cfg.AnnounceCount - p.left + 1})
				p.left--
				p.next = now.Add(m.cfg.AnnounceInterval)
				if p.left <= 0 {
					delete(m.announcing, ip)
					continue
				}
			}
			if next.IsZero() || p.next.Before(next) {
				next = p.next
			}
		}
		if len(due) == 0 && len(m.announcing) == 0 {
			m.announcer = false
			m.mu.Unlock()
			return
		}
		m.mu.Unlock()
		for _, j := range due {
			log := m.log.WithField("ip", j.ip.String())
			if err := send(j.ifi, j.ip); err != nil {
				log.WithError(err).Warn("announcement failed")
			} else {
				log.WithField("n", j.n).Debug("announced")
			}
		}
		if next.IsZero() {
			continue
		}
		select {
		case <-time.After(time.Until(next)):
		case <-m.wake:
		}
	}
}

func (m *Manager) stopLoop() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.announcer = false
	clear(m.announcing)
}

func (m *Manager) stopAnnouncing(ip netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.announcing, ip)
}

func send(ifi *net.Interface, ip netip.Addr) error {
	if ip.Is4() {
		return gratuitousARP(ifi, ip)
	}
	return unsolicitedNA(ifi, ip)
}

// gratuitousARP broadcasts an ARP request for ip from ip (sender = target),
// the form arping -U sends, which updates existing neighbour entries.
func gratuitousARP(ifi *net.Interface, ip netip.Addr) error {
	c, err := arp.Dial(ifi)
	if err != nil {
		return fmt.Errorf("open ARP socket on %s: %w", ifi.Name, err)
	}
	defer c.Close()
	p, err := arp.NewPacket(arp.OperationRequest, ifi.HardwareAddr, ip, ethernet.Broadcast, ip)
	if err != nil {
		return err
	}
	return c.WriteTo(p, ethernet.Broadcast)
}

// unsolicitedNA sends a neighbour advertisement for ip to all nodes, with
// the override flag and our link-layer address, from ip itself.
//
// The interface is given to ndp by index only: with its name, the
// destination's zone would be resolved through the net package's cache of
// names (refreshed once a minute), which after the interface was re-created
// still holds the old index, and the kernel refuses a send whose zone and
// packet-info index differ (EINVAL).
func unsolicitedNA(ifi *net.Interface, ip netip.Addr) error {
	byIndex := *ifi
	byIndex.Name = ""
	c, _, err := ndp.Listen(&byIndex, ndp.Addr(ip.String()))
	if err != nil {
		return fmt.Errorf("open ICMPv6 socket on %s: %w", ifi.Name, err)
	}
	defer c.Close()
	na := &ndp.NeighborAdvertisement{
		Override:      true,
		TargetAddress: ip,
		Options:       []ndp.Option{&ndp.LinkLayerAddress{Direction: ndp.Target, Addr: ifi.HardwareAddr}},
	}
	return c.WriteTo(na, nil, netip.IPv6LinkLocalAllNodes())
}
