package netif

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Raw rtnetlink for what vishvananda/netlink v1.3.1 cannot express: adding
// an address with IFA_PROTO, and reading IFA_PROTO back in a dump.

func (m *Manager) request(typ, flags int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(typ, flags)
	req.Sockets = m.sockets
	return req
}

// addOwned binds ip to the interface with index as an owned address: full
// length, preferred lifetime 0 so the kernel never picks it as source for
// the node's own traffic, valid forever, for IPv6 without duplicate address
// detection so it is usable at once, marked with AddrProto (when the kernel
// has it) and, for IPv4, the label when it fits.
func (m *Manager) addOwned(index int, ip netip.Addr) error {
	family := unix.AF_INET6
	if ip.Is4() {
		family = unix.AF_INET
	}
	msg := nl.NewIfAddrmsg(family)
	msg.Prefixlen = uint8(ip.BitLen())
	msg.Index = uint32(index)
	if ip.Is6() {
		msg.Flags = unix.IFA_F_NODAD
	}
	req := m.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	req.AddData(msg)
	raw := ip.AsSlice()
	req.AddData(nl.NewRtAttr(unix.IFA_LOCAL, raw))
	req.AddData(nl.NewRtAttr(unix.IFA_ADDRESS, raw))
	if l := label(m.cfg.Interface); ip.Is4() && l != "" {
		req.AddData(nl.NewRtAttr(unix.IFA_LABEL, nl.ZeroTerminated(l)))
	}
	ci := nl.IfaCacheInfo{IfaCacheinfo: unix.IfaCacheinfo{Prefered: 0, Valid: infinity}}
	req.AddData(nl.NewRtAttr(unix.IFA_CACHEINFO, ci.Serialize()))
	if m.proto {
		req.AddData(nl.NewRtAttr(ifaProto, []byte{AddrProto}))
	}
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// dumpAddrs lists the addresses of the interface with index, protocol
// included, retrying only interrupted dumps.
func (m *Manager) dumpAddrs(index int) ([]Addr, error) {
	var err error
	for range 5 {
		var (
			out  []Addr
			perr error
		)
		req := m.request(unix.RTM_GETADDR, unix.NLM_F_DUMP)
		req.AddData(nl.NewIfAddrmsg(unix.AF_UNSPEC))
		err = req.ExecuteIter(unix.NETLINK_ROUTE, unix.RTM_NEWADDR, func(b []byte) bool {
			a, err := parseAddr(b)
			if err != nil {
				perr = err
				return false
			}
			if a.LinkIndex == index {
				out = append(out, a)
			}
			return true
		})
		if perr != nil {
			return nil, perr
		}
		if !errors.Is(err, nl.ErrDumpInterrupted) {
			if err != nil {
				return nil, err
			}
			return out, nil
		}
	}
	return nil, err
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
