package sandbox

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"
)

// Inbound traffic: servers in pods, and the external host as their client.

// Serve starts a server inside the pod's namespace on port (every address,
// both families) for proto "tcp" or "udp". It answers every connection or
// datagram with one line, "<pod name> <source address:port it saw>". It
// stops when the pod is deleted.
func (p *Pod) Serve(proto string, port int) error {
	p.mu.Lock()
	started := p.started
	p.mu.Unlock()
	if !started {
		return fmt.Errorf("pod %s/%s: not started (StartPod first)", p.Namespace, p.Name)
	}
	addr := fmt.Sprintf(":%d", port)
	switch proto {
	case "tcp":
		var l net.Listener
		if err := Do(p.NS, func() error {
			var err error
			l, err = net.Listen("tcp", addr)
			return err
		}); err != nil {
			return fmt.Errorf("pod %s: listen tcp %s: %w", p.Name, addr, err)
		}
		p.addServer(l)
		go serveTCP(l, p.Name)
	case "udp":
		var c net.PacketConn
		if err := Do(p.NS, func() error {
			var err error
			c, err = net.ListenPacket("udp", addr)
			return err
		}); err != nil {
			return fmt.Errorf("pod %s: listen udp %s: %w", p.Name, addr, err)
		}
		p.addServer(c)
		go serveUDP(c, p.Name)
	default:
		return fmt.Errorf("serve %q: want tcp or udp", proto)
	}
	return nil
}

func (p *Pod) addServer(s interface{ Close() error }) {
	p.mu.Lock()
	p.servers = append(p.servers, s)
	p.mu.Unlock()
}

func (p *Pod) closeServers() {
	p.mu.Lock()
	servers := p.servers
	p.servers = nil
	p.mu.Unlock()
	for _, s := range servers {
		_ = s.Close()
	}
}

// answer is a pod server's reply to a peer.
func answer(pod string, peer net.Addr) []byte {
	ap, err := netip.ParseAddrPort(peer.String())
	if err != nil {
		return []byte(pod + " ?\n")
	}
	return []byte(pod + " " + netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String() + "\n")
}

func serveTCP(l net.Listener, pod string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			_, _ = c.Write(answer(pod, c.RemoteAddr()))
		}()
	}
}

func serveUDP(c net.PacketConn, pod string) {
	buf := make([]byte, 1500)
	for {
		_, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = c.WriteTo(answer(pod, from), from)
	}
}

// Reply is what a pod server answered to the external host.
type Reply struct {
	// Pod is the name of the pod that answered.
	Pod string
	// Seen is the source address and port the pod saw.
	Seen netip.AddrPort
	// From is where the answer came from as the external host saw it: for
	// TCP the address it connected to (the socket is connected), for UDP
	// the source address of the answer datagram.
	From netip.AddrPort
}

// Request connects from the external host to dst (a LoadBalancer IP, a
// node address with a NodePort, ...) over proto ("tcp" or "udp") and
// returns the answer of the pod server behind it (see Pod.Serve). UDP
// sends one datagram from an unconnected socket and waits for the answer.
func (e *External) Request(proto string, dst netip.AddrPort, timeout time.Duration) (Reply, error) {
	return request(e.ns, proto, dst, timeout)
}

// Request is External.Request from pod p: to another pod, or to a
// Service in front of pods that serve.
func (p *Pod) Request(proto string, dst netip.AddrPort, timeout time.Duration) (Reply, error) {
	return request(p.NS, proto, dst, timeout)
}

// request connects from namespace ns to dst and reads a pod server's
// answer.
func request(ns, proto string, dst netip.AddrPort, timeout time.Duration) (Reply, error) {
	var r Reply
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 512)
	var n int
	switch proto {
	case "tcp":
		var conn net.Conn
		if err := Do(ns, func() error {
			var err error
			conn, err = net.DialTimeout("tcp", dst.String(), timeout)
			return err
		}); err != nil {
			return r, err
		}
		defer conn.Close()
		_ = conn.SetDeadline(deadline)
		var err error
		if n, err = conn.Read(buf); err != nil {
			return r, fmt.Errorf("read the answer from %s: %w", dst, err)
		}
		r.From = netip.MustParseAddrPort(conn.RemoteAddr().String())
	case "udp":
		var conn net.PacketConn
		if err := Do(ns, func() error {
			var err error
			conn, err = net.ListenPacket("udp", ":0")
			return err
		}); err != nil {
			return r, err
		}
		defer conn.Close()
		_ = conn.SetDeadline(deadline)
		if _, err := conn.WriteTo([]byte("hello"), net.UDPAddrFromAddrPort(dst)); err != nil {
			return r, err
		}
		var from net.Addr
		var err error
		if n, from, err = conn.ReadFrom(buf); err != nil {
			return r, fmt.Errorf("read the answer from %s: %w", dst, err)
		}
		r.From = netip.MustParseAddrPort(from.String())
	default:
		return r, fmt.Errorf("request %q: want tcp or udp", proto)
	}
	r.From = netip.AddrPortFrom(r.From.Addr().Unmap(), r.From.Port())
	return r, parseAnswer(string(buf[:n]), &r)
}

// parseAnswer fills r from a pod server's answer line.
func parseAnswer(line string, r *Reply) error {
	pod, seen, ok := strings.Cut(strings.TrimSpace(line), " ")
	if !ok || pod == "" {
		return fmt.Errorf("not a pod server's answer: %q", line)
	}
	ap, err := netip.ParseAddrPort(seen)
	if err != nil {
		return errors.Join(fmt.Errorf("not a pod server's answer: %q", line), err)
	}
	r.Pod, r.Seen = pod, ap
	return nil
}
