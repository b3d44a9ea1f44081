package sandbox

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Addresses of the nodes, read with one netlink handle per node opened
// inside its namespace: a dump of every address of a node takes tens of
// microseconds (an `ip -j addr show` took about 5 ms), so a sampler can
// look at every node every 10 ms.

// nodeLink is a node's netlink handle; requests on one handle are not
// concurrent.
type nodeLink struct {
	mu sync.Mutex
	h  *netlink.Handle
}

// handle returns n's netlink handle, opening it on first use.
func (n *Node) handle() (*nodeLink, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nl != nil {
		return n.nl, nil
	}
	ns, err := netns.GetFromName(n.NS)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", n.NS, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", n.NS, err)
	}
	if err := h.SetSocketTimeout(2 * time.Second); err != nil {
		h.Close()
		return nil, err
	}
	n.nl = &nodeLink{h: h}
	return n.nl, nil
}

// closeHandle closes n's netlink handle, if open.
func (n *Node) closeHandle() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nl != nil {
		n.nl.mu.Lock()
		n.nl.h.Close()
		n.nl.mu.Unlock()
		n.nl = nil
	}
}

// addrs dumps every address of n (dev "" ) or of interface dev. A dump the
// kernel interrupted (addresses changed meanwhile: thousands of lifetime
// renewals make that likely) is retried, for at most two seconds.
func (n *Node) addrs(dev string) ([]netlink.Addr, error) {
	l, err := n.handle()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	var link netlink.Link
	if dev != "" {
		if link, err = l.h.LinkByName(dev); err != nil {
			return nil, fmt.Errorf("%s: %s: %w", n.Name, dev, err)
		}
	}
	for deadline := time.Now().Add(2 * time.Second); ; {
		var as []netlink.Addr
		as, err = l.h.AddrList(link, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return as, err
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil, fmt.Errorf("%s: address dump: %w", n.Name, err)
}

// addrOf is a netlink address as a netip.Addr with its prefix length.
func addrOf(a netlink.Addr) (netip.Addr, int, bool) {
	if a.IPNet == nil {
		return netip.Addr{}, 0, false
	}
	ip, ok := netip.AddrFromSlice(a.IP)
	if !ok {
		return netip.Addr{}, 0, false
	}
	ones, _ := a.Mask.Size()
	return ip.Unmap(), ones, true
}

// fullLength lists the full-length (/32, /128) addresses of a dump: the
// shape of a LoadBalancer IP, whichever version of egressvip bound it.
func fullLength(as []netlink.Addr, deprecatedOnly bool) []netip.Addr {
	var out []netip.Addr
	for _, a := range as {
		ip, ones, ok := addrOf(a)
		if !ok || ones != ip.BitLen() || ip.IsLoopback() {
			continue
		}
		if deprecatedOnly && a.Flags&unix.IFA_F_DEPRECATED == 0 {
			continue
		}
		out = append(out, ip)
	}
	return out
}

// LBAddresses lists the deprecated (preferred lifetime 0) full-length
// addresses on n's serviceInterface, eth1: the ones egressvip binds.
func (n *Node) LBAddresses() ([]netip.Addr, error) { return n.lbAddresses("eth1") }

func (n *Node) lbAddresses(dev string) ([]netip.Addr, error) {
	as, err := n.addrs(dev)
	if err != nil {
		return nil, err
	}
	return fullLength(as, true), nil
}

// HasAddress reports whether n's serviceInterface holds ip.
func (n *Node) HasAddress(ip netip.Addr) bool {
	addrs, err := n.LBAddresses()
	return err == nil && slices.Contains(addrs, ip)
}

// Holds reports whether n holds ip as a full-length address on any
// interface (any version of egressvip, any serviceInterface).
func (n *Node) Holds(ip netip.Addr) (bool, error) {
	as, err := n.addrs("")
	if err != nil {
		return false, err
	}
	return slices.Contains(fullLength(as, false), ip), nil
}

// Holders lists, in node order, the nodes that hold ip as a full-length
// address on any interface. A node whose addresses cannot be read counts
// as not holding it.
func (c *Cluster) Holders(ip netip.Addr) []string {
	var out []string
	for _, n := range c.Nodes {
		if ok, _ := n.Holds(ip); ok {
			out = append(out, n.Name)
		}
	}
	return out
}
