package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// kube-proxy modes (Options.KubeProxyMode, SetKubeProxyMode).
const (
	KubeProxyNFTables = "nftables"
	KubeProxyIPTables = "iptables"
	// KubeProxyNone runs no kube-proxy: Service IPs lead nowhere.
	KubeProxyNone = "none"
)

// kubernetesServiceIP is the ClusterIP of the default/kubernetes Service,
// the first address of the IPv4 Service CIDR.
var kubernetesServiceIP = netip.MustParseAddr("10.96.0.1")

func validKubeProxyMode(mode string) error {
	switch mode {
	case KubeProxyNFTables, KubeProxyIPTables, KubeProxyNone:
		return nil
	}
	return fmt.Errorf("kube-proxy mode %q: want %q, %q or %q", mode, KubeProxyNFTables, KubeProxyIPTables, KubeProxyNone)
}

// kubeProxyArgs are kube-proxy's flags on node n in mode. Every flag that
// would make kube-proxy write a setting outside n's network namespace is
// turned off: nf_conntrack_max and the conntrack module's hashsize are
// host-wide (conntrack-max-per-core=0 leaves both as they are). The other
// settings it would write are per network namespace, but are left alone
// too, so that a node namespace differs from a fresh one only by rules:
// the conntrack timeouts (0 leaves them), route_localnet (written only for
// localhost NodePorts, off) and the process's own oom_score_adj (0, the
// value it inherits).
func (c *Cluster) kubeProxyArgs(n *Node, mode string) []string {
	return []string{
		"--kubeconfig=" + c.path("kube-proxy.kubeconfig"),
		"--proxy-mode=" + mode,
		"--hostname-override=" + n.Name,
		"--cluster-cidr=" + clusterCIDR,
		"--detect-local-mode=ClusterCIDR",
		// NodePorts answer on the node's own addresses only (node network
		// and external network), not on LoadBalancer IPs bound next to them.
		"--nodeport-addresses=" + strings.Join([]string{
			n.IP4.String() + "/32", n.IP6.String() + "/128", n.ExtIP4.String() + "/32", n.ExtIP6.String() + "/128"}, ","),
		"--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"--iptables-localhost-nodeports=false",
		"--oom-score-adj=0",
		// The defaults, spelled out: both listen inside n's namespace.
		"--healthz-bind-address=0.0.0.0:10256",
		"--metrics-bind-address=127.0.0.1:10249",
	}
}

// startKubeProxy starts kube-proxy in mode on n, appending to its log.
func (c *Cluster) startKubeProxy(n *Node, mode string) error {
	logPath := c.path("kube-proxy-" + n.Name + ".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(logFile, "=== sandbox: kube-proxy --proxy-mode=%s at %s\n", mode, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.NS, c.bins.KubeProxy}, c.kubeProxyArgs(n, mode)...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + c.Dir}
	exited, err := startLogging(cmd, logFile)
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.proxy, n.proxyExited = cmd, exited
	n.mu.Unlock()
	return nil
}

// stopKubeProxy stops n's kube-proxy (SIGTERM, then SIGKILL after 10 s);
// it leaves its rules in place, as a stopped kube-proxy does.
func (c *Cluster) stopKubeProxy(n *Node) {
	n.mu.Lock()
	cmd, exited := n.proxy, n.proxyExited
	n.proxy = nil
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
	}
}

// cleanupKubeProxy runs `kube-proxy --cleanup` in n's namespace: it removes
// the rules of every mode.
func (c *Cluster) cleanupKubeProxy(n *Node) error {
	out, err := InNS(n.NS, c.bins.KubeProxy, "--cleanup", "--v=0")
	if err != nil {
		return fmt.Errorf("kube-proxy --cleanup on %s: %w\n%s", n.Name, err, tail([]byte(out)))
	}
	return nil
}

// KubeProxyMode is the mode the nodes' kube-proxies run in.
func (c *Cluster) KubeProxyMode() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.proxyMode
}

// SetKubeProxyMode restarts every node's kube-proxy in mode and waits until
// each has programmed the kubernetes Service and none has rules of another
// mode left: kube-proxy removes the other mode's rules when it starts, and
// for KubeProxyNone `kube-proxy --cleanup` removes them all.
func (c *Cluster) SetKubeProxyMode(ctx context.Context, mode string) error {
	if err := validKubeProxyMode(mode); err != nil {
		return err
	}
	// The nodes one after the other would take seconds each: kube-proxy
	// is a large binary to load and start.
	if err := c.eachNode(func(n *Node) error { c.stopKubeProxy(n); return nil }); err != nil {
		return err
	}
	c.mu.Lock()
	c.proxyMode = mode
	c.mu.Unlock()
	if err := c.eachNode(func(n *Node) error {
		if mode == KubeProxyNone {
			return c.cleanupKubeProxy(n)
		}
		return c.startKubeProxy(n, mode)
	}); err != nil {
		return err
	}
	return c.waitKubeProxies(ctx)
}

// eachNode runs fn for every node at once and returns the first error.
func (c *Cluster) eachNode(fn func(n *Node) error) error {
	errs := make([]error, len(c.Nodes))
	var wg sync.WaitGroup
	for i, n := range c.Nodes {
		wg.Go(func() { errs[i] = fn(n) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// waitKubeProxies waits until every node's rules are those of the current
// mode only, with the kubernetes Service programmed (none: no rules).
func (c *Cluster) waitKubeProxies(ctx context.Context) error {
	mode := c.KubeProxyMode()
	deadline := time.Now().Add(60 * time.Second)
	for _, n := range c.Nodes {
		for {
			ok, detail := kubeProxyState(n, mode)
			if ok {
				break
			}
			n.mu.Lock()
			exited := n.proxyExited
			n.mu.Unlock()
			if mode != KubeProxyNone && exited != nil {
				select {
				case <-exited:
					return fmt.Errorf("kube-proxy on %s exited (see %s)", n.Name, c.path("kube-proxy-"+n.Name+".log"))
				default:
				}
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("kube-proxy (%s) on %s not ready within 60 s: %s (see %s)", mode, n.Name, detail, c.path("kube-proxy-"+n.Name+".log"))
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// kubeProxyState reports whether n's kube-proxy rules are those of mode
// alone, with the kubernetes Service programmed; else what is wrong.
func kubeProxyState(n *Node, mode string) (bool, string) {
	nft := hasNFTTable(n, "ip", "kube-proxy") || hasNFTTable(n, "ip6", "kube-proxy")
	ipt := hasKubeChains(n)
	switch mode {
	case KubeProxyNone:
		if nft || ipt {
			return false, fmt.Sprintf("rules left: nftables %v, iptables %v", nft, ipt)
		}
		return true, ""
	case KubeProxyNFTables:
		if ipt {
			return false, "iptables-mode chains (KUBE-*) left"
		}
	case KubeProxyIPTables:
		if nft {
			return false, "nftables-mode table kube-proxy left"
		}
	}
	if !n.proxies(kubernetesServiceIP, "tcp", 443) {
		return false, "the kubernetes Service is not programmed yet"
	}
	return true, ""
}

func hasNFTTable(n *Node, family, name string) bool {
	_, err := InNS(n.NS, "nft", "list", "table", family, name)
	return err == nil
}

// hasKubeChains reports whether iptables (kube-proxy's iptables, the
// system's default variant) holds a chain of kube-proxy's in either
// family's nat, filter or mangle table. KUBE-FIREWALL does not count: it
// is the kubelet's chain, which kube-proxy's iptables mode duplicates and
// its clean-up leaves (empty) for the kubelet.
func hasKubeChains(n *Node) bool {
	for _, bin := range []string{"iptables-save", "ip6tables-save"} {
		for _, table := range []string{"nat", "filter", "mangle"} {
			out, _ := InNS(n.NS, bin, "-t", table)
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, ":KUBE-") && !strings.HasPrefix(l, ":KUBE-FIREWALL ") {
					return true
				}
			}
		}
	}
	return false
}

// proxies reports whether n's kube-proxy has programmed ip:port/proto as a
// Service with endpoints (in whichever mode runs).
func (n *Node) proxies(ip netip.Addr, proto string, port int) bool {
	family, save := "ip", "iptables-save"
	if ip.Is6() {
		family, save = "ip6", "ip6tables-save"
	}
	if out, err := InNS(n.NS, "nft", "list", "map", family, "kube-proxy", "service-ips"); err == nil {
		return strings.Contains(out, fmt.Sprintf("%s . %s . %d ", ip, proto, port))
	}
	out, err := InNS(n.NS, save, "-t", "nat")
	if err != nil {
		return false
	}
	bits := 32
	if ip.Is6() {
		bits = 128
	}
	// -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "..." -m tcp --dport 443 -j KUBE-SVC-...
	// (KUBE-EXT-... for a LoadBalancer IP, KUBE-FW-... with source ranges)
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) < 2 || f[0] != "-A" || f[1] != "KUBE-SERVICES" {
			continue
		}
		if hasArg(f, "-d", fmt.Sprintf("%s/%d", ip, bits)) && hasArg(f, "-p", proto) && hasArg(f, "--dport", strconv.Itoa(port)) &&
			slices.ContainsFunc(f, func(s string) bool {
				return strings.HasPrefix(s, "KUBE-SVC-") || strings.HasPrefix(s, "KUBE-EXT-") || strings.HasPrefix(s, "KUBE-FW-")
			}) {
			return true
		}
	}
	return false
}

// hasArg reports whether flag is followed by value in fields.
func hasArg(fields []string, flag, value string) bool {
	for i := 0; i+1 < len(fields); i++ {
		if fields[i] == flag && fields[i+1] == value {
			return true
		}
	}
	return false
}

// WaitProxied waits until kube-proxy on every node has programmed
// ip:port/proto with endpoints, at most limit.
func (c *Cluster) WaitProxied(ctx context.Context, ip netip.Addr, proto string, port int, limit time.Duration) error {
	if c.KubeProxyMode() == KubeProxyNone {
		return errors.New("no kube-proxy runs (mode none)")
	}
	deadline := time.Now().Add(limit)
	for _, n := range c.Nodes {
		for !n.proxies(ip, proto, port) {
			if time.Now().After(deadline) {
				return fmt.Errorf("kube-proxy on %s has not programmed %s/%s within %s", n.Name, netip.AddrPortFrom(ip, uint16(port)), proto, limit)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}
