package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// SecondAddr is the external host's second address of a family.
func (e *External) SecondAddr(ipv6 bool) netip.Addr {
	if ipv6 {
		return netip.MustParseAddr(ExternalSecond6)
	}
	return netip.MustParseAddr(ExternalSecond4)
}

// SignalDaemon sends sig to n's egressvip without waiting for it to exit
// (SIGSTOP freezes it, SIGCONT continues it).
func (c *Cluster) SignalDaemon(n *Node, sig syscall.Signal) error {
	n.mu.Lock()
	cmd := n.daemon
	n.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return fmt.Errorf("no daemon running on %s", n.Name)
	}
	return cmd.Process.Signal(sig)
}

// SendSpoofed makes pod p send a UDP datagram to dst with src as its
// source address (another pod's: p adds src to its interface for the
// moment, as a pod with CAP_NET_ADMIN or a raw socket could) and returns
// the source the external host saw, or an error when nothing arrived
// within timeout.
func (c *Cluster) SendSpoofed(p *Pod, src netip.Addr, dst netip.AddrPort, payload string, timeout time.Duration) (netip.Addr, error) {
	bits := "/32"
	if src.Is6() {
		bits = "/128"
	}
	if _, err := InNS(p.NS, "ip", "addr", "add", src.String()+bits, "dev", "eth0", "nodad"); err != nil {
		return netip.Addr{}, err
	}
	defer func() { _, _ = InNS(p.NS, "ip", "addr", "del", src.String()+bits, "dev", "eth0") }()
	err := Do(p.NS, func() error {
		conn, err := net.DialUDP("udp", &net.UDPAddr{IP: src.AsSlice()}, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = conn.Write([]byte(payload))
		return err
	})
	if err != nil {
		return netip.Addr{}, err
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if hits := c.External.Hits(payload); len(hits) > 0 {
			return hits[0].Source, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return netip.Addr{}, errors.New("the datagram did not arrive")
}

// ListenOnNode runs a UDP server on port in n's namespace (on every
// address of the node) until the cluster stops, and returns a function
// that lists the sources it heard.
func (c *Cluster) ListenOnNode(n *Node, port int) (func() []netip.Addr, error) {
	var pc net.PacketConn
	if err := Do(n.NS, func() error {
		var err error
		pc, err = net.ListenPacket("udp", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		return nil, err
	}
	var mu sync.Mutex
	var seen []netip.Addr
	go func() {
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			ap, err := netip.ParseAddrPort(from.String())
			if err != nil {
				continue
			}
			mu.Lock()
			if !slices.Contains(seen, ap.Addr().Unmap()) {
				seen = append(seen, ap.Addr().Unmap())
			}
			mu.Unlock()
		}
	}()
	c.mu.Lock()
	c.closers = append(c.closers, pc.Close)
	c.mu.Unlock()
	return func() []netip.Addr {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(seen)
	}, nil
}

// ClientGoFromPod makes a client-go call from pod p to the API server
// through the kubernetes Service (https://10.96.0.1:443, which kube-proxy
// DNATs to the API server) with the admin's credentials, as an operator or
// sidecar in the pod would, and returns the server's version.
func (c *Cluster) ClientGoFromPod(ctx context.Context, p *Pod) (string, error) {
	cfg := rest.CopyConfig(c.AdminConfig)
	cfg.Host = "https://" + netip.AddrPortFrom(kubernetesServiceIP, 443).String()
	cfg.TLSClientConfig.ServerName = "kubernetes.default.svc"
	cfg.Dial = DialIn(p.NS)
	cfg.Timeout = 10 * time.Second
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return "", err
	}
	v, err := cs.Discovery().ServerVersion()
	if err != nil {
		return "", err
	}
	return v.GitVersion, ctx.Err()
}

// Explain runs `egressvip explain args...` as cluster admin from the
// control-plane namespace (no node: the kernel part is left out), with the
// DaemonSet's namespace.
func (c *Cluster) Explain(args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", controlNS, c.bins.EgressVIP, "explain"}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "KUBECONFIG=" + c.path("admin.kubeconfig"), "POD_NAMESPACE=egressvip"}
	out, err := cmd.CombinedOutput()
	return string(out), err
}
