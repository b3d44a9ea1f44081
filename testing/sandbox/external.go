package sandbox

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// Ports the external host listens on.
const (
	TCPPort      = 8080
	TCPOtherPort = 9090
	UDPPort      = 5060
	UDPOtherPort = 7070
)

// Hit is one connection or datagram the external host saw.
type Hit struct {
	At      time.Time
	Proto   string
	Port    int
	Source  netip.Addr
	Payload string
}

// External is the external host: TCP and UDP servers (IPv4 and IPv6) in
// their own namespace that record the peer address of everything they get.
type External struct {
	ns        string
	mu        sync.Mutex
	hits      []Hit
	listeners []net.Listener
	conns     []net.PacketConn
}

func startExternal(ns string) (*External, error) {
	e := &External{ns: ns}
	err := Do(ns, func() error {
		for _, port := range []int{TCPPort, TCPOtherPort} {
			l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
			if err != nil {
				return err
			}
			e.listeners = append(e.listeners, l)
		}
		for _, port := range []int{UDPPort, UDPOtherPort} {
			c, err := net.ListenPacket("udp", fmt.Sprintf(":%d", port))
			if err != nil {
				return err
			}
			e.conns = append(e.conns, c)
		}
		return nil
	})
	if err != nil {
		e.Close()
		return nil, err
	}
	for _, l := range e.listeners {
		go e.serveTCP(l)
	}
	for _, c := range e.conns {
		go e.serveUDP(c)
	}
	return e, nil
}

func portOf(a net.Addr) int {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return 0
	}
	return int(ap.Port())
}

func (e *External) record(h Hit) {
	e.mu.Lock()
	e.hits = append(e.hits, h)
	e.mu.Unlock()
}

func (e *External) serveTCP(l net.Listener) {
	port := portOf(l.Addr())
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 256)
			n, _ := c.Read(buf)
			src, _ := netip.ParseAddrPort(c.RemoteAddr().String())
			e.record(Hit{At: time.Now(), Proto: "tcp", Port: port, Source: src.Addr().Unmap(), Payload: strings.TrimSpace(string(buf[:n]))})
			_, _ = c.Write([]byte(src.Addr().Unmap().String() + "\n"))
		}()
	}
}

func (e *External) serveUDP(c net.PacketConn) {
	port := portOf(c.LocalAddr())
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		src, _ := netip.ParseAddrPort(from.String())
		e.record(Hit{At: time.Now(), Proto: "udp", Port: port, Source: src.Addr().Unmap(), Payload: string(buf[:n])})
	}
}

// Hits returns what arrived with the given payload.
func (e *External) Hits(payload string) []Hit {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []Hit
	for _, h := range e.hits {
		if h.Payload == payload {
			out = append(out, h)
		}
	}
	return out
}

// HitsWithPrefix returns what arrived with a payload starting with prefix.
func (e *External) HitsWithPrefix(prefix string) []Hit {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []Hit
	for _, h := range e.hits {
		if strings.HasPrefix(h.Payload, prefix) {
			out = append(out, h)
		}
	}
	return out
}

// Close stops the servers.
func (e *External) Close() {
	for _, l := range e.listeners {
		_ = l.Close()
	}
	for _, c := range e.conns {
		_ = c.Close()
	}
}

// ExternalAddr is the external host's address of the family of a.
func ExternalAddr(ipv6 bool) netip.Addr {
	if ipv6 {
		return netip.MustParseAddr(ExternalHost6)
	}
	return netip.MustParseAddr(ExternalHost4)
}

// Send makes pod p send payload to dst over proto ("tcp" or "udp") and
// returns the source address the external host saw (for TCP, as the host
// answered it; for UDP, after it arrived), waiting at most timeout.
func (c *Cluster) Send(p *Pod, proto string, dst netip.AddrPort, payload string, timeout time.Duration) (netip.Addr, error) {
	var conn net.Conn
	err := Do(p.NS, func() error {
		d := net.Dialer{Timeout: timeout}
		var err error
		conn, err = d.Dial(proto, dst.String())
		return err
	})
	if err != nil {
		return netip.Addr{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write([]byte(payload)); err != nil {
		return netip.Addr{}, err
	}
	if proto == "tcp" {
		buf := make([]byte, 64)
		n, err := conn.Read(buf)
		if err != nil {
			return netip.Addr{}, err
		}
		return netip.ParseAddr(strings.TrimSpace(string(buf[:n])))
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if hits := c.External.Hits(payload); len(hits) > 0 {
			return hits[len(hits)-1].Source, nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return netip.Addr{}, errors.New("datagram did not arrive")
}

// OpenUDP opens a UDP socket in pod p towards dst; writes from any thread
// leave from the pod.
func OpenUDP(p *Pod, dst netip.AddrPort) (net.Conn, error) {
	var conn net.Conn
	err := Do(p.NS, func() error {
		var err error
		conn, err = net.Dial("udp", dst.String())
		return err
	})
	return conn, err
}
