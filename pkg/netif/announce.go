package netif

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"time"

	"github.com/mdlayher/packet"
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
		var a announcer
		for _, j := range due {
			log := m.log.WithField("ip", j.ip.String())
			if err := a.send(j.ifi, j.ip); err != nil {
				log.WithError(err).Warn("announcement failed")
			} else {
				log.WithField("n", j.n).Debug("announced")
			}
		}
		a.close()
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

// announcementFrame is the frame that announces ip from mac: a
// gratuitous ARP request, or an unsolicited neighbour advertisement from ip
// to all nodes with the override flag and mac as target link-layer
// address.
func announcementFrame(mac net.HardwareAddr, ip netip.Addr) (frame []byte, dst net.HardwareAddr) {
	if ip.Is4() {
		return appendGARP(nil, mac, ip), broadcast
	}
	return appendUnsolicitedNA(nil, mac, ip), allNodesMAC
}

var (
	broadcast   = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	zeroMAC     = net.HardwareAddr{0, 0, 0, 0, 0, 0}
	allNodesMAC = net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
)

// announcer sends announcement frames through one packet socket per
// interface, opened for a batch of them: a socket that an ARP or NDP
// library opens per address looks the interface's addresses up first,
// which with thousands of IPv6 addresses bound costs a dump of all of them
// for every announcement.
type announcer struct {
	conns map[int]*packet.Conn
}

func (a *announcer) send(ifi *net.Interface, ip netip.Addr) error {
	c, ok := a.conns[ifi.Index]
	if !ok {
		var err error
		// Protocol 0: the socket only sends.
		if c, err = packet.Listen(ifi, packet.Raw, 0, nil); err != nil {
			return fmt.Errorf("open a packet socket on %s: %w", ifi.Name, err)
		}
		if a.conns == nil {
			a.conns = map[int]*packet.Conn{}
		}
		a.conns[ifi.Index] = c
	}
	frame, dst := announcementFrame(ifi.HardwareAddr, ip)
	return sendFrame(c, frame, dst)
}

func (a *announcer) close() {
	for _, c := range a.conns {
		c.Close()
	}
	clear(a.conns)
}

// appendARP appends an ARP frame of op (1 request, 2 reply) from mac.
func appendARP(b []byte, op uint16, mac net.HardwareAddr, sender netip.Addr, targetMAC net.HardwareAddr, target netip.Addr, dst net.HardwareAddr) []byte {
	start := len(b)
	b = append(b, dst...)
	b = append(b, mac...)
	b = binary.BigEndian.AppendUint16(b, etherTypeARP)
	b = append(b, 0, 1, 0x08, 0x00, 6, 4)
	b = binary.BigEndian.AppendUint16(b, op)
	b = append(b, mac...)
	b = append(b, sender.AsSlice()...)
	b = append(b, targetMAC...)
	b = append(b, target.AsSlice()...)
	for len(b)-start < minFrameLen {
		b = append(b, 0)
	}
	return b
}

// appendGARP appends a gratuitous ARP request for ip (sender = target),
// the form arping -U sends, which updates existing neighbour entries.
func appendGARP(b []byte, mac net.HardwareAddr, ip netip.Addr) []byte {
	return appendARP(b, 1, mac, ip, zeroMAC, ip, broadcast)
}

// appendNDP appends an ICMPv6 neighbour discovery message of typ from src
// to dst for target, with a link-layer option of optType (0: none)
// carrying mac.
func appendNDP(b []byte, typ byte, mac net.HardwareAddr, src, dst, target netip.Addr, optType byte, flags byte) []byte {
	dstMAC := net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
	if dst != netip.IPv6LinkLocalAllNodes() {
		_, dstMAC = solicitedNode(target)
	}
	b = append(b, dstMAC...)
	b = append(b, mac...)
	b = binary.BigEndian.AppendUint16(b, etherTypeIPv6)
	icmp := []byte{typ, 0, 0, 0, flags, 0, 0, 0}
	t := target.As16()
	icmp = append(icmp, t[:]...)
	if optType != 0 {
		icmp = append(icmp, optType, 1)
		icmp = append(icmp, mac...)
	}
	s, d := src.As16(), dst.As16()
	binary.BigEndian.PutUint16(icmp[2:], icmpv6Checksum(s, d, icmp))
	b = append(b, 0x60, 0, 0, 0)
	b = binary.BigEndian.AppendUint16(b, uint16(len(icmp)))
	b = append(b, icmpv6, 255)
	b = append(b, s[:]...)
	b = append(b, d[:]...)
	return append(b, icmp...)
}

// appendUnsolicitedNA appends an advertisement of ip to all nodes, with
// the override flag and mac as target link-layer address.
func appendUnsolicitedNA(b []byte, mac net.HardwareAddr, ip netip.Addr) []byte {
	return appendNDP(b, typeNA, mac, ip, netip.IPv6LinkLocalAllNodes(), ip, optTLLA, 0x20)
}
