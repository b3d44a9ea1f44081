package netif

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Raw rtnetlink for what vishvananda/netlink v1.3.1 cannot express, or
// only at a cost that grows with every owned address: adding an address
// with IFA_PROTO and IFA_F_NOPREFIXROUTE, and dumps (addresses with their
// IFA_PROTO, the gateways of the interface's routes) decoded in place,
// with the kernel filtering them where it can.

func (m *Manager) request(typ, flags int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(typ, flags)
	req.Sockets = m.sockets
	return req
}

// addOwned binds ip to the interface with index as an owned address: full
// length, preferred lifetime 0 so the kernel never picks it as source for
// the node's own traffic, valid for valid seconds (infinity: forever; see
// Config.Lifetime), for IPv6 without duplicate address detection so it is
// usable at once, marked with AddrProto (when the kernel has it) and, for
// IPv4, the label when it fits.
//
// IPv6 addresses also get IFA_F_NOPREFIXROUTE: without it the kernel adds
// a /128 route for each one to the main table ("2001:db8::1 dev eth1 proto
// kernel"), thousands of routes that only flood `ip -6 route` and every
// route dump. The local-table route, through which the node accepts the
// address, does not depend on it. (An IPv4 /32 never gets a prefix route,
// and egressvip binds nothing shorter.) A kernel before 3.14, which lacks
// the flag, ignores it and adds the route as before.
//
// replace modifies an existing address in place (NLM_F_REPLACE) instead of
// failing with EEXIST: the kernel keeps the address bound, renews its
// lifetimes, and removes its prefix route when the flag is new. (IPv4 keeps
// the label and flags it has; IPv6 takes the flags written here.) Beware:
// both families create the address when it is missing, NLM_F_CREATE or
// not, so a replacement must only be sent for an address known to be still
// bound (see Manager.renewable).
func (m *Manager) addOwned(index int, ip netip.Addr, replace bool, valid uint32) error {
	family := unix.AF_INET6
	if ip.Is4() {
		family = unix.AF_INET
	}
	msg := nl.NewIfAddrmsg(family)
	msg.Prefixlen = uint8(ip.BitLen())
	msg.Index = uint32(index)
	if ip.Is6() {
		// ifa_flags has 8 bits; IFA_FLAGS (Linux 3.14) carries the rest and
		// takes precedence.
		msg.Flags = unix.IFA_F_NODAD
	}
	flags := unix.NLM_F_CREATE | unix.NLM_F_EXCL | unix.NLM_F_ACK
	if replace {
		flags = unix.NLM_F_CREATE | unix.NLM_F_REPLACE | unix.NLM_F_ACK
	}
	req := m.request(unix.RTM_NEWADDR, flags)
	req.AddData(msg)
	raw := ip.AsSlice()
	req.AddData(nl.NewRtAttr(unix.IFA_LOCAL, raw))
	req.AddData(nl.NewRtAttr(unix.IFA_ADDRESS, raw))
	if ip.Is6() {
		req.AddData(nl.NewRtAttr(unix.IFA_FLAGS, nl.Uint32Attr(unix.IFA_F_NODAD|unix.IFA_F_NOPREFIXROUTE)))
	}
	if l := label(m.cfg.Interface); ip.Is4() && l != "" {
		req.AddData(nl.NewRtAttr(unix.IFA_LABEL, nl.ZeroTerminated(l)))
	}
	ci := nl.IfaCacheInfo{IfaCacheinfo: unix.IfaCacheinfo{Prefered: 0, Valid: valid}}
	req.AddData(nl.NewRtAttr(unix.IFA_CACHEINFO, ci.Serialize()))
	if m.proto {
		req.AddData(nl.NewRtAttr(ifaProto, []byte{AddrProto}))
	}
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// openDumpSocket opens the socket of the dumps with strict checking
// (NETLINK_GET_STRICT_CHK, Linux 4.20): the kernel then applies the
// filters of a dump request itself, the interface for addresses, the
// interface and the main table for routes, instead of sending every
// address and route of the node. When the kernel refuses the option (or
// the socket cannot be opened), dumps go through the request sockets as
// before: the kernel ignores the filters and the decoders below apply them.
func (m *Manager) openDumpSocket() {
	ns := netns.None()
	if m.cfg.inOtherNS() {
		ns = m.cfg.NetNS
	}
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		m.log.WithError(err).Debug("no socket for filtered dumps; filtering them here")
		return
	}
	if err := unix.SetsockoptInt(s.GetFd(), unix.SOL_NETLINK, unix.NETLINK_GET_STRICT_CHK, 1); err != nil {
		s.Close()
		m.log.WithError(err).Debug("the kernel does not filter dumps; filtering them here")
		return
	}
	// The timeouts of the library's own per-request sockets.
	_ = s.SetSendTimeout(&nl.SocketTimeoutTv)
	_ = s.SetReceiveTimeout(&nl.SocketTimeoutTv)
	m.dumps = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: s}}
	m.strict.Store(true)
}

// dump sends the dump request of type typ that build fills in, and passes
// each answer of type resp to visit. Requests go through the strict socket
// while the kernel accepts their filters there; a kernel that refuses them
// (EINVAL: some family's dumper that does not know a filter) gets
// unfiltered dumps from then on. An interrupted dump (the listing changed
// meanwhile) starts over, after reset, at most 5 times in all.
func (m *Manager) dump(typ int, resp uint16, build func(*nl.NetlinkRequest), reset func(), visit func([]byte) error) error {
	var err error
	for range 5 {
		strict := m.strict.Load()
		req := nl.NewNetlinkRequest(typ, unix.NLM_F_DUMP)
		req.Sockets = m.sockets
		if strict {
			req.Sockets = m.dumps
		}
		build(req)
		reset()
		var verr error
		err = req.ExecuteIter(unix.NETLINK_ROUTE, resp, func(b []byte) bool {
			verr = visit(b)
			return verr == nil
		})
		switch {
		case verr != nil:
			return verr
		case strict && errors.Is(err, unix.EINVAL):
			m.strict.Store(false)
			m.log.WithError(err).Debug("the kernel refuses filtered dumps; filtering them here")
		case !errors.Is(err, nl.ErrDumpInterrupted):
			return err
		}
	}
	return err
}

// ifAddr is an address of a dump as Sync, Owned and Host need it, decoded
// in place without allocating. label aliases the message: it is valid
// only while the message is visited.
type ifAddr struct {
	index int
	// ip is IFA_LOCAL or, without it, IFA_ADDRESS; unmapped.
	ip netip.Addr
	// ones is the prefix length as netlink.Addr's mask has it (full
	// length for an address with a peer, 0 when out of range).
	ones int
	// full: full length (/32, /128) of its family, without a peer.
	full  bool
	flags uint32
	proto uint8
	label []byte
	// cacheinfo says whether IFA_CACHEINFO came; valid is then the
	// remaining valid lifetime in whole seconds as the kernel rounds it
	// down (infinity: forever). Its preferred lifetime is not read: for
	// an IPv4 address valid forever the kernel reports it as forever
	// whatever it is; IFA_F_DEPRECATED says whether it is over.
	cacheinfo bool
	valid     uint32
}

// eachAddr passes each address of the interface with index to visit,
// together with its message (for parseAddr), from one consistent dump:
// reset is called before every attempt.
func (m *Manager) eachAddr(index int, reset func(), visit func(a ifAddr, msg []byte) error) error {
	return m.dump(unix.RTM_GETADDR, unix.RTM_NEWADDR, func(req *nl.NetlinkRequest) {
		msg := nl.NewIfAddrmsg(unix.AF_UNSPEC)
		msg.Index = uint32(index) // honoured with strict checking
		req.AddData(msg)
	}, reset, func(b []byte) error {
		a, ok, err := decodeAddr(b)
		if err != nil || !ok || a.index != index {
			return err
		}
		return visit(a, b)
	})
}

// decodeAddr decodes an RTM_NEWADDR payload as parseAddr does, but only
// what ifAddr holds, and without allocating; ok is false for an address
// that is neither IPv4 nor IPv6.
func decodeAddr(b []byte) (a ifAddr, ok bool, err error) {
	if len(b) < unix.SizeofIfAddrmsg {
		return a, false, fmt.Errorf("short address message: %d bytes", len(b))
	}
	native := nl.NativeEndian()
	prefixLen := int(b[1])
	a.flags = uint32(b[2])
	a.index = int(native.Uint32(b[4:8]))
	var local, dst []byte
	err = eachAttr(b[unix.SizeofIfAddrmsg:], func(typ uint16, v []byte) {
		switch typ {
		case unix.IFA_ADDRESS:
			dst = v
		case unix.IFA_LOCAL:
			local = v
		case unix.IFA_LABEL:
			if i := bytes.IndexByte(v, 0); i >= 0 {
				v = v[:i]
			}
			a.label = v
		case unix.IFA_FLAGS:
			if len(v) >= 4 {
				a.flags = native.Uint32(v)
			}
		case ifaProto:
			if len(v) >= 1 {
				a.proto = v[0]
			}
		case unix.IFA_CACHEINFO:
			if len(v) >= unix.SizeofIfaCacheinfo {
				a.cacheinfo, a.valid = true, native.Uint32(v[4:8])
			}
		}
	})
	if err != nil {
		return a, false, fmt.Errorf("address attributes: %w", err)
	}
	// IPv4 sends IFA_LOCAL and IFA_ADDRESS (the peer when they differ);
	// IPv6 sends IFA_ADDRESS, and IFA_LOCAL only with a peer.
	raw, peer := local, false
	switch {
	case local != nil && dst != nil:
		peer = !bytes.Equal(local, dst)
	case local == nil:
		raw = dst
	}
	ip, ok := netip.AddrFromSlice(raw)
	if !ok {
		return a, false, nil
	}
	a.ip = ip.Unmap()
	bits := 8 * len(raw)
	switch {
	case peer:
		a.ones = bits
	case prefixLen <= bits:
		a.ones = prefixLen
	}
	a.full = !peer && prefixLen == bits && bits == a.ip.BitLen()
	return a, true, nil
}

// eachAttr calls f with the type and value of each route attribute in b.
func eachAttr(b []byte, f func(typ uint16, v []byte)) error {
	native := nl.NativeEndian()
	for len(b) >= unix.SizeofRtAttr {
		l := int(native.Uint16(b[0:2]))
		if l < unix.SizeofRtAttr || l > len(b) {
			return fmt.Errorf("attribute of length %d in %d bytes: %w", l, len(b), unix.EINVAL)
		}
		f(native.Uint16(b[2:4]), b[unix.SizeofRtAttr:l])
		l = (l + unix.RTA_ALIGNTO - 1) &^ (unix.RTA_ALIGNTO - 1)
		if l >= len(b) {
			break
		}
		b = b[l:]
	}
	return nil
}

// gateways returns the gateways of the main table's routes through the
// interface with index: a route's own gateway when it leaves through the
// interface, and for a multipath route the gateway of each next hop
// through the interface. With strict checking the kernel sends only the
// routes through the interface in the main table, and routeGateways reads
// them in place: the /128 prefix routes that owned addresses bound without
// IFA_F_NOPREFIXROUTE may have (thousands) cost no allocation either.
func (m *Manager) gateways(index int) ([]netip.Addr, error) {
	var gws []netip.Addr
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		start := len(gws)
		err := m.dump(unix.RTM_GETROUTE, unix.RTM_NEWROUTE, func(req *nl.NetlinkRequest) {
			req.AddData(&nl.RtMsg{RtMsg: unix.RtMsg{Family: family, Table: unix.RT_TABLE_MAIN}})
			req.AddData(nl.NewRtAttr(unix.RTA_OIF, nl.Uint32Attr(uint32(index))))
		}, func() { gws = gws[:start] }, func(b []byte) (err error) {
			gws, err = routeGateways(gws, b, family, index)
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	return gws, nil
}

// routeGateways appends to gws the gateways through the interface with
// index of an RTM_NEWROUTE payload, when it is a route of family in the
// main table. Cloned routes (cached exceptions) do not count.
func routeGateways(gws []netip.Addr, b []byte, family uint8, index int) ([]netip.Addr, error) {
	if len(b) < unix.SizeofRtMsg {
		return gws, fmt.Errorf("short route message: %d bytes", len(b))
	}
	native := nl.NativeEndian()
	if b[0] != family || native.Uint32(b[8:12])&unix.RTM_F_CLONED != 0 {
		return gws, nil
	}
	table := uint32(b[4])
	oif := -1
	var gw, multipath []byte
	err := eachAttr(b[unix.SizeofRtMsg:], func(typ uint16, v []byte) {
		switch {
		case typ == unix.RTA_TABLE && len(v) >= 4:
			table = native.Uint32(v)
		case typ == unix.RTA_OIF && len(v) >= 4:
			oif = int(int32(native.Uint32(v)))
		case typ == unix.RTA_GATEWAY:
			gw = v
		case typ == unix.RTA_MULTIPATH:
			multipath = v
		}
	})
	if err != nil || table != unix.RT_TABLE_MAIN {
		return gws, err
	}
	if oif == index {
		gws = appendIP(gws, gw)
	}
	// struct rtnexthop: length, flags, hops, ifindex; its attributes follow.
	for len(multipath) >= unix.SizeofRtNexthop {
		l := int(native.Uint16(multipath[0:2]))
		if l < unix.SizeofRtNexthop || l > len(multipath) {
			return gws, fmt.Errorf("next hop of length %d in %d bytes: %w", l, len(multipath), unix.EINVAL)
		}
		if int(int32(native.Uint32(multipath[4:8]))) == index {
			var hop []byte
			if err := eachAttr(multipath[unix.SizeofRtNexthop:l], func(typ uint16, v []byte) {
				if typ == unix.RTA_GATEWAY {
					hop = v
				}
			}); err != nil {
				return gws, err
			}
			gws = appendIP(gws, hop)
		}
		l = (l + unix.RTNH_ALIGNTO - 1) &^ (unix.RTNH_ALIGNTO - 1)
		if l >= len(multipath) {
			break
		}
		multipath = multipath[l:]
	}
	return gws, nil
}

func appendIP(ips []netip.Addr, raw []byte) []netip.Addr {
	if ip, ok := netip.AddrFromSlice(raw); ok {
		ips = append(ips, ip.Unmap())
	}
	return ips
}

// parseAddr decodes an RTM_NEWADDR / RTM_DELADDR payload the way
// vishvananda/netlink does, plus IFA_PROTO.
func parseAddr(b []byte) (Addr, error) {
	var a Addr
	if len(b) < unix.SizeofIfAddrmsg {
		return a, fmt.Errorf("short address message: %d bytes", len(b))
	}
	msg := nl.DeserializeIfAddrmsg(b)
	attrs, err := nl.ParseRouteAttr(b[unix.SizeofIfAddrmsg:])
	if err != nil {
		return a, fmt.Errorf("address attributes: %w", err)
	}
	a.LinkIndex = int(msg.Index)
	a.Scope = int(msg.Scope)
	a.Flags = int(msg.Flags)
	var local, dst net.IP
	native := nl.NativeEndian()
	for _, at := range attrs {
		v := at.Value
		switch at.Attr.Type {
		case unix.IFA_ADDRESS:
			dst = bytes.Clone(v)
		case unix.IFA_LOCAL:
			local = bytes.Clone(v)
		case unix.IFA_BROADCAST:
			a.Broadcast = bytes.Clone(v)
		case unix.IFA_LABEL:
			a.Label = unix.ByteSliceToString(v)
		case unix.IFA_FLAGS:
			if len(v) >= 4 {
				a.Flags = int(native.Uint32(v))
			}
		case unix.IFA_CACHEINFO:
			if len(v) >= unix.SizeofIfaCacheinfo {
				ci := nl.DeserializeIfaCacheInfo(v)
				a.PreferedLft, a.ValidLft = int(ci.Prefered), int(ci.Valid)
			}
		case ifaProto:
			if len(v) >= 1 {
				a.Protocol = v[0]
			}
		}
	}
	// IPv4 sends IFA_LOCAL and IFA_ADDRESS (the peer when they differ);
	// IPv6 sends IFA_ADDRESS, and IFA_LOCAL only with a peer.
	switch {
	case local != nil && (dst == nil || local.Equal(dst)):
		a.IPNet = &net.IPNet{IP: local, Mask: net.CIDRMask(int(msg.Prefixlen), 8*len(local))}
	case local != nil:
		a.IPNet = &net.IPNet{IP: local, Mask: net.CIDRMask(8*len(local), 8*len(local))}
		a.Peer = &net.IPNet{IP: dst, Mask: net.CIDRMask(int(msg.Prefixlen), 8*len(dst))}
	case dst != nil:
		a.IPNet = &net.IPNet{IP: dst, Mask: net.CIDRMask(int(msg.Prefixlen), 8*len(dst))}
	}
	return a, nil
}
