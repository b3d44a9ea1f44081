package sandbox

import (
	"fmt"
	"net/netip"
)

// AddExternalLink gives node n a second interface on the external network,
// named name inside n (a long name such as enp1s0f0.100 tests what depends
// on the interface name), with address ip/24. It returns a function that
// removes it.
func (c *Cluster) AddExternalLink(n *Node, name string, ip netip.Addr) (func(), error) {
	c.mu.Lock()
	c.linkSeq++
	outside := fmt.Sprintf("x%d", c.linkSeq)
	c.mu.Unlock()
	if err := veth(fabricNS, outside, n.NS, name); err != nil {
		return nil, err
	}
	remove := func() { _, _ = sh("ip", "-n", fabricNS, "link", "del", outside) }
	if err := shAll(
		[]string{"ip", "-n", fabricNS, "link", "set", outside, "master", "br-ext"},
		[]string{"ip", "-n", n.NS, "addr", "add", ip.String() + "/24", "dev", name},
	); err != nil {
		remove()
		return nil, err
	}
	return remove, nil
}

// AddressesOn lists the deprecated full-length addresses (the ones
// egressvip binds) on interface dev of n.
func (n *Node) AddressesOn(dev string) ([]netip.Addr, error) {
	return n.lbAddresses(dev)
}

// BounceLink sets n's external interface (eth1) down and up, as an admin
// or a flapping switch port would. Down drops its IPv6 addresses and the
// routes through it; the node's own are put back (what the host's network
// configuration would do), egressvip's are egressvip's to restore.
func (c *Cluster) BounceLink(n *Node) error {
	if err := shAll(
		[]string{"ip", "-n", n.NS, "link", "set", "eth1", "down"},
		[]string{"ip", "-n", n.NS, "link", "set", "eth1", "up"},
	); err != nil {
		return err
	}
	return c.RestoreNodeAddresses(n)
}

// RestoreNodeAddresses puts n's own addresses on its external interface
// (eth1) back, as the host's network configuration would after a link went
// down or IPv6 was disabled and enabled again on it (which drops every
// IPv6 address of the interface); egressvip's are egressvip's to restore.
func (c *Cluster) RestoreNodeAddresses(n *Node) error {
	_, err := sh("ip", "-n", n.NS, "addr", "replace", n.ExtIP6.String()+"/64", "dev", "eth1", "nodad")
	return err
}
