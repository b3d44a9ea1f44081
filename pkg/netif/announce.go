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

// announce sends AnnounceCount announcements of ip, AnnounceInterval apart,
// in the background. A later removal of ip, or ctx, cancels them. Failures
// are logged, never fatal: the address works without them, neighbours just
// learn it later.
func (m *Manager) announce(ctx context.Context, l netlink.Link, ip netip.Addr) {
	m.mu.Lock()
	if cancel, ok := m.announcing[ip]; ok {
		cancel()
	}
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	m.announcing[ip] = cancel
	m.mu.Unlock()

	attrs := l.Attrs()
	ifi := &net.Interface{Index: attrs.Index, MTU: attrs.MTU, Name: attrs.Name, HardwareAddr: attrs.HardwareAddr, Flags: attrs.Flags}
	log := m.log.WithField("ip", ip.String())
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer m.stopAnnouncing(ip)
		if m.cfg.inOtherNS() {
			// Packet and ICMPv6 sockets belong to the namespace of the
			// thread that opens them.
			runtime.LockOSThread()
			orig, err := netns.Get()
			if err != nil {
				log.WithError(err).Warn("announce: cannot read the current namespace")
				return
			}
			defer orig.Close()
			if err := netns.Set(m.cfg.NetNS); err != nil {
				log.WithError(err).Warn("announce: cannot enter the namespace")
				return
			}
			defer func() {
				if netns.Set(orig) == nil {
					runtime.UnlockOSThread()
				}
			}()
		}
		for i := range m.cfg.AnnounceCount {
			if err := send(ifi, ip); err != nil {
				log.WithError(err).Warn("announcement failed")
			} else {
				log.WithField("n", i+1).Debug("announced")
			}
			if i+1 == m.cfg.AnnounceCount {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(m.cfg.AnnounceInterval):
			}
		}
	}()
}

func (m *Manager) stopAnnouncing(ip netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cancel, ok := m.announcing[ip]; ok {
		cancel()
		delete(m.announcing, ip)
	}
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
