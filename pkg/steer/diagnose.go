package steer

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Finding is a host setting that drops steered traffic, and what to change.
// egressvip only reports them: it changes no setting of an interface it
// does not own.
type Finding struct {
	// Setting is the sysctl as sysctl(8) names it ("net.ipv4.ip_forward").
	Setting string
	// Value is its current value.
	Value string
	// Problem says what gets dropped.
	Problem string
	// Fix says what to set.
	Fix string
}

func (f Finding) String() string {
	return fmt.Sprintf("%s = %s: %s; %s", f.Setting, f.Value, f.Problem, f.Fix)
}

// sysctlName is the sysctl(8) name of a /proc/sys/net path: dots of an
// interface name become slashes.
func sysctlName(parts ...string) string {
	for i := range parts {
		parts[i] = strings.ReplaceAll(parts[i], ".", "/")
	}
	return "net." + strings.Join(parts, ".")
}

// Diagnose reports host settings that drop steered traffic on this node,
// as a source node (its pods steered elsewhere) and as a holder (steered
// packets of other nodes' pods arrive here):
//   - IPv4 or IPv6 forwarding off (also per arrival interface for IPv4,
//     which decides by the interface a packet arrives on);
//   - strict reverse-path filtering (rp_filter 1; the kernel applies the
//     maximum of "all" and the interface) where replies to steered pods
//     come back to this node (the devices of its steering routes, the
//     VXLAN underlay): they arrive from the holder while the route to their
//     source, the external peer, leaves by another interface; and where
//     steered packets arrive (the VXLAN device, Config.Interfaces) while
//     the route back to the pod leaves by another one. Loose mode (2) is
//     fine. IPv6 has no rp_filter sysctl (its equivalent is a firewall
//     rule).
//
// It reads the interfaces of the last Apply.
func (m *Manager) Diagnose() []Finding {
	m.mu.Lock()
	last := m.last
	m.mu.Unlock()

	var out []Finding
	read := func(parts ...string) (string, bool) {
		b, err := os.ReadFile(filepath.Join(append([]string{"/proc/sys/net"}, parts...)...))
		if err != nil {
			return "", false
		}
		return strings.TrimSpace(string(b)), true
	}
	err := m.inNS(func() error {
		if v, ok := read("ipv4", "ip_forward"); ok && v != "1" {
			out = append(out, Finding{Setting: "net.ipv4.ip_forward", Value: v,
				Problem: "IPv4 packets are not forwarded: steered packets of this node's pods never reach the holder, and a holder drops those of other nodes and their replies",
				Fix:     "set net.ipv4.ip_forward=1"})
		}
		if v, ok := read("ipv6", "conf", "all", "forwarding"); ok && v != "1" {
			out = append(out, Finding{Setting: "net.ipv6.conf.all.forwarding", Value: v,
				Problem: "IPv6 packets are not forwarded: steered IPv6 packets of this node's pods never reach the holder, and a holder drops those of other nodes",
				Fix:     "set net.ipv6.conf.all.forwarding=1"})
		}

		// Where replies to this node's steered pods come back, and where
		// steered packets of other nodes' pods arrive.
		type role struct{ replies, arrivals bool }
		roles := map[string]*role{}
		add := func(dev string, replies bool) {
			if dev == "" {
				return
			}
			r := roles[dev]
			if r == nil {
				r = &role{}
				roles[dev] = r
			}
			if replies {
				r.replies = true
			} else {
				r.arrivals = true
			}
		}
		for _, d := range last.hopDevs {
			add(d, true)
			add(d, false) // the same node network brings steered packets here
		}
		add(last.underlay, true)
		add(last.tunnel, false)
		for _, d := range m.cfg.Interfaces {
			add(d, false)
		}
		devs := make([]string, 0, len(roles))
		for d := range roles {
			devs = append(devs, d)
		}
		slices.Sort(devs)

		all, _ := read("ipv4", "conf", "all", "rp_filter")
		allN, _ := strconv.Atoi(all)
		for _, d := range devs {
			r := roles[d]
			if r.arrivals && d != last.tunnel {
				if v, ok := read("ipv4", "conf", d, "forwarding"); ok && v != "1" {
					out = append(out, Finding{Setting: sysctlName("ipv4", "conf", d, "forwarding"), Value: v,
						Problem: fmt.Sprintf("IPv4 packets arriving on %s are not forwarded: a holder drops the steered packets of other nodes' pods", d),
						Fix:     fmt.Sprintf("set %s=1", sysctlName("ipv4", "conf", d, "forwarding"))})
				}
			}
			v, ok := read("ipv4", "conf", d, "rp_filter")
			if !ok {
				continue
			}
			n, _ := strconv.Atoi(v)
			if max(n, allN) != 1 {
				continue
			}
			var what []string
			if r.replies {
				what = append(what, fmt.Sprintf("replies to this node's steered pods come back from the holder on %s while the route to their source (the external peer) may leave by another interface", d))
			}
			if r.arrivals {
				what = append(what, fmt.Sprintf("steered packets of other nodes' pods arrive on %s while the route back to the pod may leave by another interface (the pod network, an overlay)", d))
			}
			problem := strings.Join(what, "; ") + ": strict reverse-path filtering drops them"
			if n != 1 {
				fix := fmt.Sprintf("set net.ipv4.conf.all.rp_filter=2 (loose) or 0, and %s to 2 or 0", sysctlName("ipv4", "conf", d, "rp_filter"))
				if d == last.tunnel {
					fix = "set net.ipv4.conf.all.rp_filter=2 (loose) or 0 (egressvip keeps its own device at 0)"
				}
				out = append(out, Finding{Setting: "net.ipv4.conf.all.rp_filter", Value: all,
					Problem: fmt.Sprintf("%s (the kernel applies the maximum of all and %s, which is %s)", problem, d, v), Fix: fix})
				continue
			}
			out = append(out, Finding{Setting: sysctlName("ipv4", "conf", d, "rp_filter"), Value: v, Problem: problem,
				Fix: fmt.Sprintf("set %s=2 (loose)%s", sysctlName("ipv4", "conf", d, "rp_filter"),
					map[bool]string{true: " and net.ipv4.conf.all.rp_filter to 2 or 0", false: ""}[allN == 1])})
		}
		return nil
	})
	if err != nil {
		out = append(out, Finding{Setting: "(none)", Value: "?", Problem: "cannot read the host settings: " + err.Error(), Fix: "check that egressvip can read /proc/sys/net"})
	}
	return out
}
