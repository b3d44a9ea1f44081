package netif

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/mdlayher/packet"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/egressvip/egressvip/internal/netnsdo"
)

// Address conflict detection (ACD) on the serviceInterface, for both
// families: Probe asks the wire whether another host still answers for an
// address before the daemon binds it, and Conflicts reports any other host
// that claims or probes an address egressvip holds. An egress address is
// an identity a firewall trusts; two hosts answering for it split its
// traffic, and only the wire can tell.
//
// Both read ARP and ICMPv6 neighbour discovery frames from one AF_PACKET
// socket whose classic BPF filter lets only those through (and nothing the
// node sends itself, nothing VLAN-tagged), whatever the number of
// addresses.
//
// What Linux answers (measured by the privileged tests): a host that holds
// an address as egressvip binds it (a /32 or /128, preferred lifetime 0,
// IPv6 with NODAD, a finite valid lifetime or not) answers an ARP probe with
// a unicast ARP reply, and a DAD neighbour solicitation with a neighbour
// advertisement to all nodes: deprecated and NODAD addresses are answered
// like any other. (Its arp_ignore or a firewall can keep it silent.)

const (
	etherTypeARP  = 0x0806
	etherTypeIPv6 = 0x86dd
	ethHeaderLen  = 14
	arpLen        = 28
	ipv6HeaderLen = 40
	// ndpLen is an NS or NA without options: type, code, checksum,
	// flags or reserved, target.
	ndpLen  = 24
	icmpv6  = 58
	typeNS  = 135
	typeNA  = 136
	optSLLA = 1
	optTLLA = 2
	// minFrameLen is Ethernet's minimum frame without its checksum; shorter
	// frames are padded (not every driver pads them itself).
	minFrameLen = 60
	// snapLen is how much of a frame the filter passes on: an ARP frame,
	// or an NS/NA with its first options.
	snapLen = 256
)

// acdFilter passes ARP frames and ICMPv6 neighbour solicitations and
// advertisements (without extension headers, as neighbour discovery sends
// them) that the interface received untagged. Frames the node sends are
// left out as well (PACKET_OUTGOING), for kernels before 4.20 that ignore
// PACKET_IGNORE_OUTGOING.
var acdFilter = func() []bpf.RawInstruction {
	// Jumps skip the instructions between: to reach instruction t from
	// instruction i, skip t-i-1.
	const (
		checkType = 8
		accept    = 12
		drop      = 13
	)
	prog, err := bpf.Assemble([]bpf.Instruction{
		/* 0 */ bpf.LoadAbsolute{Off: 12, Size: 2}, // EtherType
		/* 1 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: etherTypeARP, SkipTrue: checkType - 2},
		/* 2 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: etherTypeIPv6, SkipFalse: drop - 3},
		/* 3 */ bpf.LoadAbsolute{Off: ethHeaderLen + 6, Size: 1}, // next header
		/* 4 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: icmpv6, SkipFalse: drop - 5},
		/* 5 */ bpf.LoadAbsolute{Off: ethHeaderLen + ipv6HeaderLen, Size: 1}, // ICMPv6 type
		/* 6 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: typeNS, SkipTrue: checkType - 7},
		/* 7 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: typeNA, SkipFalse: drop - 8},
		/* 8 */ bpf.LoadExtension{Num: bpf.ExtType},
		/* 9 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.PACKET_OUTGOING, SkipTrue: drop - 10},
		/* 10 */ bpf.LoadExtension{Num: bpf.ExtVLANTagPresent},
		/* 11 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0, SkipFalse: drop - 12},
		/* 12 */ bpf.RetConstant{Val: snapLen},
		/* 13 */ bpf.RetConstant{Val: 0},
	})
	if err != nil {
		panic(fmt.Sprintf("ACD filter: %v", err))
	}
	if len(prog) != accept+2 {
		panic("ACD filter: jump targets out of date")
	}
	return prog
}()

// claim is what one frame says about one address: the host with MAC
// claims it (ARP with it as sender, a neighbour advertisement for it, a
// solicitation from it), or probes it (ARP probe, DAD solicitation).
type claim struct {
	ip    netip.Addr
	mac   net.HardwareAddr
	probe bool
	// src is the frame's Ethernet source.
	src net.HardwareAddr
}

// parseClaim reads the claim of an Ethernet frame, if it makes one. The
// MACs alias frame.
//
// ARP: a request or reply (gratuitous or not) claims its sender address;
// a probe (sender 0.0.0.0) probes its target. ICMPv6 (hop limit 255, as
// neighbour discovery requires): an advertisement claims its target, with
// the target link-layer address when it has one; a solicitation from :: (a
// DAD probe) probes its target, and one from an address claims that
// address (its sender uses it).
func parseClaim(frame []byte) (claim, bool) {
	var c claim
	if len(frame) < ethHeaderLen {
		return c, false
	}
	c.src = net.HardwareAddr(frame[6:12])
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case etherTypeARP:
		return parseARP(c, frame[ethHeaderLen:])
	case etherTypeIPv6:
		return parseNDP(c, frame[ethHeaderLen:])
	}
	return c, false
}

func parseARP(c claim, p []byte) (claim, bool) {
	// Ethernet and IPv4: hardware type 1, protocol 0x0800, lengths 6, 4.
	if len(p) < arpLen || binary.BigEndian.Uint16(p[0:2]) != 1 || binary.BigEndian.Uint16(p[2:4]) != 0x0800 || p[4] != 6 || p[5] != 4 {
		return c, false
	}
	op := binary.BigEndian.Uint16(p[6:8])
	if op != 1 && op != 2 {
		return c, false
	}
	c.mac = net.HardwareAddr(p[8:14])
	sender := netip.AddrFrom4([4]byte(p[14:18]))
	target := netip.AddrFrom4([4]byte(p[24:28]))
	switch {
	case !sender.IsUnspecified():
		c.ip = sender
	case op == 1:
		c.ip, c.probe = target, true
	default:
		return c, false
	}
	return c, true
}

func parseNDP(c claim, p []byte) (claim, bool) {
	if len(p) < ipv6HeaderLen+ndpLen || p[0]>>4 != 6 || p[6] != icmpv6 || p[7] != 255 {
		return c, false
	}
	payload := int(binary.BigEndian.Uint16(p[4:6]))
	icmp := p[ipv6HeaderLen:]
	if payload < ndpLen || icmp[1] != 0 {
		return c, false
	}
	// Options beyond the snapshot are not read.
	icmp = icmp[:min(payload, len(icmp))]
	src := netip.AddrFrom16([16]byte(p[8:24]))
	target := netip.AddrFrom16([16]byte(icmp[8:24]))
	lla := func(want byte) net.HardwareAddr {
		for opts := icmp[ndpLen:]; len(opts) >= 8; {
			n := int(opts[1]) * 8
			if n == 0 || n > len(opts) {
				break
			}
			if opts[0] == want && n >= 8 {
				return net.HardwareAddr(opts[2:8])
			}
			opts = opts[n:]
		}
		return c.src
	}
	switch icmp[0] {
	case typeNA:
		c.ip, c.mac = target, lla(optTLLA)
	case typeNS:
		if src.IsUnspecified() {
			c.ip, c.mac, c.probe = target, c.src, true
		} else {
			c.ip, c.mac = src, lla(optSLLA)
		}
	default:
		return c, false
	}
	if c.ip.IsMulticast() || c.ip.IsUnspecified() {
		return c, false
	}
	return c, true
}

// appendARPProbe appends an RFC 5227 ARP probe for ip from mac: a
// broadcast request with sender 0.0.0.0, so that no neighbour learns
// anything from it, and ip as target.
func appendARPProbe(b []byte, mac net.HardwareAddr, ip netip.Addr) []byte {
	start := len(b)
	b = append(b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	b = append(b, mac...)
	b = binary.BigEndian.AppendUint16(b, etherTypeARP)
	b = append(b, 0, 1, 0x08, 0x00, 6, 4, 0, 1) // Ethernet, IPv4, request
	b = append(b, mac...)
	b = append(b, 0, 0, 0, 0)       // sender 0.0.0.0
	b = append(b, 0, 0, 0, 0, 0, 0) // target MAC unknown
	b = append(b, ip.AsSlice()...)  // target
	for len(b)-start < minFrameLen {
		b = append(b, 0)
	}
	return b
}

// solicitedNode is the solicited-node multicast group of ip and its
// Ethernet address.
func solicitedNode(ip netip.Addr) (netip.Addr, net.HardwareAddr) {
	a := ip.As16()
	g := [16]byte{0xff, 0x02, 10: 0, 11: 0x01, 12: 0xff, 13: a[13], 14: a[14], 15: a[15]}
	return netip.AddrFrom16(g), net.HardwareAddr{0x33, 0x33, 0xff, a[13], a[14], a[15]}
}

// appendDADSolicitation appends a duplicate address detection probe for
// ip from mac (RFC 4862): a neighbour solicitation from :: to ip's
// solicited-node group, without a source link-layer option (a DAD probe
// must not have one), which a host holding ip answers with an
// advertisement to all nodes.
func appendDADSolicitation(b []byte, mac net.HardwareAddr, ip netip.Addr) []byte {
	group, groupMAC := solicitedNode(ip)
	b = append(b, groupMAC...)
	b = append(b, mac...)
	b = binary.BigEndian.AppendUint16(b, etherTypeIPv6)
	b = append(b, 0x60, 0, 0, 0)
	b = binary.BigEndian.AppendUint16(b, ndpLen)
	b = append(b, icmpv6, 255)
	var unspecified [16]byte
	b = append(b, unspecified[:]...)
	g := group.As16()
	b = append(b, g[:]...)
	icmp := len(b)
	b = append(b, typeNS, 0, 0, 0, 0, 0, 0, 0)
	t := ip.As16()
	b = append(b, t[:]...)
	binary.BigEndian.PutUint16(b[icmp+2:], icmpv6Checksum(unspecified, g, b[icmp:]))
	return b
}

// icmpv6Checksum is the ICMPv6 checksum of msg (its checksum field zero)
// from src to dst (RFC 4443, with the pseudo-header of RFC 8200).
func icmpv6Checksum(src, dst [16]byte, msg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for len(b) >= 2 {
			sum += uint32(b[0])<<8 | uint32(b[1])
			b = b[2:]
		}
		if len(b) == 1 {
			sum += uint32(b[0]) << 8
		}
	}
	add(src[:])
	add(dst[:])
	sum += uint32(len(msg)) + icmpv6
	add(msg)
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// inNetNS runs fn on a thread in Config.NetNS (or directly without one):
// sockets belong to the namespace of the thread that opens them, and keep
// it wherever they are used from.
func (m *Manager) inNetNS(fn func() error) error {
	if !m.cfg.inOtherNS() {
		return fn()
	}
	return netnsdo.Do(m.cfg.NetNS, fn)
}

// ethernet is the interface as ACD needs it: its index and its Ethernet
// address.
func (m *Manager) ethernet() (*net.Interface, error) {
	l, err := m.link()
	if err != nil {
		return nil, err
	}
	a := l.Attrs()
	if len(a.HardwareAddr) != 6 {
		return nil, fmt.Errorf("interface %q has no Ethernet address (%q): no ARP or neighbour discovery", m.cfg.Interface, a.HardwareAddr)
	}
	return &net.Interface{Index: a.Index, MTU: a.MTU, Name: a.Name, HardwareAddr: a.HardwareAddr, Flags: a.Flags}, nil
}

// listenACD opens the ACD socket on ifi, in Config.NetNS, with a receive
// buffer of rcvbuf bytes: a frame costs the buffer about a kilobyte
// however short it is. Raising the buffer beyond net.core.rmem_max takes
// CAP_NET_ADMIN, which binding addresses needs anyway.
func (m *Manager) listenACD(ifi *net.Interface, rcvbuf int) (*packet.Conn, error) {
	var c *packet.Conn
	err := m.inNetNS(func() (err error) {
		c, err = packet.Listen(ifi, packet.Raw, unix.ETH_P_ALL, &packet.Config{Filter: acdFilter})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open a packet socket on %s: %w", ifi.Name, err)
	}
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("packet socket on %s: %w", ifi.Name, err)
	}
	var sockErr error
	err = rc.Control(func(fd uintptr) {
		// The node's own frames would cost a copy each (all its traffic
		// on the interface) only to be dropped by the filter.
		if err := unix.SetsockoptInt(int(fd), unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
			m.log.WithError(err).Debug("the kernel cannot leave outgoing frames out of packet sockets; the filter drops them")
		}
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcvbuf) != nil {
			sockErr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, rcvbuf)
		}
	})
	if err == nil {
		err = sockErr
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("receive buffer of the packet socket on %s: %w", ifi.Name, err)
	}
	return c, nil
}

// probeSendRetries bounds the retries of a probe the interface's queue
// refused (ENOBUFS), 1 ms apart.
const probeSendRetries = 50

// Probe asks the wire whether another host answers for addrs, before the
// daemon binds an address it has just acquired: a host that still holds it
// (the previous holder, frozen or cut off, or a misconfigured one) would
// otherwise share its traffic. It sends one probe per address at once, an
// ARP probe (RFC 5227: sender 0.0.0.0) for IPv4, a DAD neighbour
// solicitation (from ::, to the solicited-node group) for IPv6, then
// listens for wait, and returns the addresses for which a host with
// another MAC than the interface's answered (an ARP reply or a neighbour
// advertisement), or was seen probing or announcing them itself meanwhile,
// with that host's MAC. It returns as soon as every address was answered.
//
// Addresses the interface itself holds (owned or not) are never probed: the
// kernel would answer nobody, but the daemon must not take its own
// address for a stranger's. One socket and one goroutine serve any number
// of addresses (2,000 in one call: see the privileged tests).
//
// On the veth and bridge of the tests a Linux host's answer is read 10–15
// µs after the probe left (a Probe call of two addresses takes 0.5–2 ms,
// opening the socket included), and 2,000 addresses are all answered
// within 150 ms. wait must cover the slowest host and switch that matter,
// and it adds to every takeover: 200 ms is a good choice on a LAN. No answer is no proof that nobody holds the address (a host that
// filters ARP, a link that lost the frame); an error (probes that could
// not be sent, answers the kernel dropped) means the result is incomplete.
func (m *Manager) Probe(ctx context.Context, addrs []netip.Addr, wait time.Duration) (map[netip.Addr]net.HardwareAddr, error) {
	found := map[netip.Addr]net.HardwareAddr{}
	ifi, err := m.ethernet()
	if err != nil {
		return nil, err
	}
	if ifi.Flags&net.FlagUp == 0 || ifi.Flags&net.FlagRunning == 0 {
		return nil, fmt.Errorf("interface %q is not up: %w", m.cfg.Interface, ErrInterfaceDown)
	}
	held := map[netip.Addr]bool{}
	err = m.eachAddr(ifi.Index, func() { clear(held) }, func(a ifAddr, _ []byte) error {
		held[a.ip] = true
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	probing := make(map[netip.Addr]bool, len(addrs))
	var order []netip.Addr
	for _, ip := range addrs {
		ip = ip.Unmap()
		if !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() || ip.IsLoopback() || held[ip] || probing[ip] ||
			ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			continue
		}
		probing[ip] = true
		order = append(order, ip)
	}
	if len(order) == 0 {
		return found, nil
	}

	conn, err := m.listenACD(ifi, 256<<10+2<<10*len(order))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	// The reader runs while the probes go out, so that the answers to the
	// first ones do not wait in the socket's buffer.
	answers := make(chan map[netip.Addr]net.HardwareAddr, 1)
	go func() {
		got := map[netip.Addr]net.HardwareAddr{}
		buf := make([]byte, snapLen)
		for len(got) < len(probing) {
			n, _, err := conn.ReadFrom(buf)
			if err != nil {
				break
			}
			c, ok := parseClaim(buf[:n])
			if !ok || !probing[c.ip] || got[c.ip] != nil || sameMAC(c.mac, ifi.HardwareAddr) || sameMAC(c.src, ifi.HardwareAddr) {
				continue
			}
			got[c.ip] = append(net.HardwareAddr(nil), c.mac...)
		}
		answers <- got
	}()

	_ = conn.SetWriteDeadline(time.Now().Add(wait + time.Second))
	var (
		sendErrs []error
		frame    []byte
	)
	for _, ip := range order {
		if ctx.Err() != nil {
			break
		}
		dst := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
		if ip.Is4() {
			frame = appendARPProbe(frame[:0], ifi.HardwareAddr, ip)
		} else {
			frame = appendDADSolicitation(frame[:0], ifi.HardwareAddr, ip)
			dst = net.HardwareAddr(frame[0:6])
		}
		if err := sendFrame(conn, frame, dst); err != nil {
			sendErrs = append(sendErrs, fmt.Errorf("probe %s: %w", ip, err))
		}
	}
	_ = conn.SetReadDeadline(time.Now().Add(wait))
	if ctx.Err() != nil {
		_ = conn.SetReadDeadline(time.Unix(1, 0))
	}
	found = <-answers
	if st, err := conn.Stats(); err == nil && st.Drops > 0 {
		sendErrs = append(sendErrs, fmt.Errorf("the kernel dropped %d frames on the packet socket: answers may be missing", st.Drops))
	}
	return found, errors.Join(append(sendErrs, ctx.Err())...)
}

// sendFrame writes frame to dst, retrying while the interface's queue is
// full.
func sendFrame(conn *packet.Conn, frame []byte, dst net.HardwareAddr) error {
	var err error
	for range probeSendRetries {
		if _, err = conn.WriteTo(frame, &packet.Addr{HardwareAddr: dst}); !errors.Is(err, unix.ENOBUFS) {
			return err
		}
		time.Sleep(time.Millisecond)
	}
	return err
}

func sameMAC(a, b net.HardwareAddr) bool { return string(a) == string(b) }
