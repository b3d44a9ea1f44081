//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// withBackend restarts node's egressvip with egress_backend set for the
// test, and restores the cluster's setting after it.
func withBackend(t *testing.T, node *sandbox.Node, backend string) {
	t.Helper()
	restart := func(env map[string]string) {
		if _, err := cluster.StopDaemon(node, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		cluster.SetDaemonEnv(node, env)
		if err := cluster.StartDaemon(node); err != nil {
			t.Fatal(err)
		}
	}
	restart(map[string]string{"egress_backend": backend})
	t.Cleanup(func() { restart(nil) })
}

// disrupt runs a 10 ms flow from a pod of an egress Service on node, does
// something to node at once, and returns how long datagrams left with
// another source than the LoadBalancer IP after it (0: none did).
func disrupt(t *testing.T, name string, lb netip.Addr, node *sandbox.Node, what string, do func() error) time.Duration {
	t.Helper()
	service(t, name, true, egressAnn(lb.String()))
	p := runPod(t, name, node)
	waitServed(t, name, node, true, lb)
	f := startFlow(t, p, 10*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	at := time.Now()
	if err := do(); err != nil {
		f.Stop(lb)
		t.Fatalf("%s: %v", what, err)
	}
	time.Sleep(2500 * time.Millisecond)
	r := f.Stop(lb)
	var last time.Time
	for _, h := range r.Wrong {
		if h.At.After(last) {
			last = h.At
		}
	}
	took := time.Duration(0)
	if !last.IsZero() {
		took = last.Sub(at)
	}
	t.Logf("%s: %s; wrong source for %s after it", what, r, took.Round(time.Millisecond))
	if r.Arrived == 0 || r.SendErr != nil {
		t.Errorf("%s: the flow did not get through: %s", what, r)
	}
	if took > time.Second {
		t.Errorf("%s: datagrams left with another source for %s, want at most 1 s", what, took.Round(time.Millisecond))
	}
	waitServed(t, name, node, true, lb)
	return took
}

// A CNI inserts its MASQUERADE at position 1 of nat POSTROUTING after
// egressvip is running. nftables: egressvip's chain runs before any
// iptables chain, so nothing changes. iptables: egressvip's hook is put
// back first within a second.
func TestCNIMasqueradeInsertedFirst(t *testing.T) {
	masquerade := func(node *sandbox.Node) func() error {
		return func() error {
			_, err := sandbox.InNS(node.NS, "iptables-legacy", "-t", "nat", "-I", "POSTROUTING", "1", "-s", sandbox.PodCIDR4.String(), "-j", "MASQUERADE")
			t.Cleanup(func() {
				_, _ = sandbox.InNS(node.NS, "iptables-legacy", "-t", "nat", "-D", "POSTROUTING", "-s", sandbox.PodCIDR4.String(), "-j", "MASQUERADE")
			})
			return err
		}
	}
	t.Run("nftables", func(t *testing.T) {
		node := cluster.Nodes[0]
		took := disrupt(t, "cni-nft", addr("203.0.113.150"), node, "MASQUERADE inserted first (nftables)", masquerade(node))
		record("CNI MASQUERADE inserted first, nftables: wrong source for", took.Round(time.Millisecond).String())
		if took != 0 {
			t.Errorf("with nftables no datagram may leave with another source, %s did", took)
		}
	})
	t.Run("iptables", func(t *testing.T) {
		node := cluster.Nodes[1]
		withBackend(t, node, "iptables-legacy")
		took := disrupt(t, "cni-ipt", addr("203.0.113.151"), node, "MASQUERADE inserted first (iptables-legacy)", masquerade(node))
		record("CNI MASQUERADE inserted first, iptables: wrong source for", took.Round(time.Millisecond).String())
	})
}

// egressvip's table (nftables) or chain (iptables) deleted by hand comes
// back within a second.
func TestOwnedFirewallDeletedByHand(t *testing.T) {
	t.Run("nftables", func(t *testing.T) {
		node := cluster.Nodes[0]
		took := disrupt(t, "gone-nft", addr("203.0.113.152"), node, "nft table deleted", func() error {
			_, err := sandbox.InNS(node.NS, "nft", "delete", "table", "ip", "egressvip")
			return err
		})
		record("nftables table deleted by hand: wrong source for", took.Round(time.Millisecond).String())
	})
	t.Run("iptables", func(t *testing.T) {
		node := cluster.Nodes[1]
		withBackend(t, node, "iptables-legacy")
		took := disrupt(t, "gone-ipt", addr("203.0.113.153"), node, "iptables hook deleted and chain flushed", func() error {
			if _, err := sandbox.InNS(node.NS, "iptables-legacy", "-t", "nat", "-D", "POSTROUTING",
				"-m", "comment", "--comment", "egressvip: egress SNAT", "-j", "EGRESSVIP-SNAT"); err != nil {
				return err
			}
			_, err := sandbox.InNS(node.NS, "iptables-legacy", "-t", "nat", "-F", "EGRESSVIP-SNAT")
			return err
		})
		record("iptables hook deleted and chain flushed: wrong source for", took.Round(time.Millisecond).String())
	})
}

// An owned address deleted by hand, or lost with a link down/up, is back
// within a second.
func TestOwnedAddressRepaired(t *testing.T) {
	lb4, lb6 := addr("203.0.113.154"), addr("2001:db8:1::154")
	service(t, "addr-repair", false, map[string]string{annotations.LoadBalancerIPs: lb4.String() + "," + lb6.String()})
	var holder *sandbox.Node
	eventually(t, 60*time.Second, "addr-repair served", func() (bool, string) {
		h4, h6 := holders(lb4), holders(lb6)
		if len(h4) != 1 || len(h6) != 1 || h4[0] != h6[0] {
			return false, fmt.Sprint(h4, h6)
		}
		holder = cluster.Node(h4[0])
		return true, ""
	})
	back := func(what string, ips ...netip.Addr) time.Duration {
		start := time.Now()
		for time.Since(start) < 10*time.Second {
			ok := true
			for _, ip := range ips {
				ok = ok && holder.HasAddress(ip)
			}
			if ok {
				took := time.Since(start)
				t.Logf("%s: back after %s", what, took.Round(time.Millisecond))
				if took > time.Second {
					t.Errorf("%s: back after %s, want within 1 s", what, took.Round(time.Millisecond))
				}
				return took
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("%s: not back within 10 s", what)
		return 0
	}
	if _, err := sandbox.InNS(holder.NS, "ip", "addr", "del", lb4.String()+"/32", "dev", "eth1"); err != nil {
		t.Fatal(err)
	}
	record("owned address deleted by hand: back after", back("address deleted by hand", lb4).Round(time.Millisecond).String())

	if err := cluster.BounceLink(holder); err != nil {
		t.Fatal(err)
	}
	record("link down/up: addresses back after", back("link down and up", lb4, lb6).Round(time.Millisecond).String())
	if h := holders(lb6); len(h) != 1 {
		t.Errorf("after the link came back the address is on %v", h)
	}
}

// On a serviceInterface whose name is too long for an IPv4 label
// (enp1s0f0.100), addresses are still recognised as owned and removed when
// the Service goes.
func TestLongInterfaceName(t *testing.T) {
	node := cluster.Nodes[2]
	const dev = "enp1s0f0.100"
	remove, err := cluster.AddExternalLink(node, dev, addr("203.0.113.33"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(remove)
	if _, err := cluster.StopDaemon(node, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	cluster.SetDaemonEnv(node, map[string]string{"vip_servicesinterface": dev})
	if err := cluster.StartDaemon(node); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = cluster.StopDaemon(node, syscall.SIGTERM)
		cluster.SetDaemonEnv(node, nil)
		if err := cluster.StartDaemon(node); err != nil {
			t.Error(err)
		}
	})
	lb := addr("203.0.113.155")
	service(t, "long-name", true, egressAnn(lb.String()))
	runPod(t, "long-name", node)
	eventually(t, 60*time.Second, "address bound on "+dev, func() (bool, string) {
		a, err := node.AddressesOn(dev)
		return err == nil && len(a) == 1 && a[0] == lb, fmt.Sprint(a, err)
	})
	if err := cluster.Admin.CoreV1().Services(ns).Delete(ctx(t), "long-name", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "address removed from "+dev, func() (bool, string) {
		a, err := node.AddressesOn(dev)
		return err == nil && len(a) == 0, fmt.Sprint(a, err)
	})
}
