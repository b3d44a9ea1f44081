package explain

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// JSON writes the Report as indented JSON.
func JSON(w io.Writer, r Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// MaskVolatile returns a copy of r with everything that changes from run
// to run on an unchanged cluster blanked: the time, heartbeat ages and
// routing table numbers. Rendered, a blanked value prints as "-". Golden
// tests compare masked reports; `egressvip explain --no-age` prints one.
func MaskVolatile(r Report) Report {
	r.Time = time.Time{}
	r.Leases = slices.Clone(r.Leases)
	for i := range r.Leases {
		r.Leases[i].HeartbeatAgeSeconds = nil
	}
	r.Nodes = slices.Clone(r.Nodes)
	for i := range r.Nodes {
		r.Nodes[i].HeartbeatAgeSeconds = nil
	}
	if r.Kernel != nil {
		k := *r.Kernel
		k.Steering = slices.Clone(k.Steering)
		for i := range k.Steering {
			k.Steering[i].Rules = slices.Clone(k.Steering[i].Rules)
			for j := range k.Steering[i].Rules {
				k.Steering[i].Rules[j].Table = 0
			}
		}
		r.Kernel = &k
	}
	return r
}

// Render writes the Report for people: sections in a fixed order, aligned
// columns, one row per address, Lease, node, pod; "-" for an empty or
// masked value.
func Render(w io.Writer, r Report) error {
	p := &printer{w: w}
	p.header(r)
	s := r.Service
	if !s.Found {
		p.line("Service %s/%s not found.", s.Namespace, s.Name)
		return p.err
	}
	p.serviceSection(r)
	if s.Ignored != "" {
		return p.err
	}
	p.addressSection(s)
	p.problemSection(s)
	p.leaseSection(r)
	p.nodeSection(r)
	p.endpointSection(r)
	p.egressSection(r)
	p.kernelSection(r)
	return p.err
}

// printer writes sections and keeps the first error.
type printer struct {
	w   io.Writer
	err error
}

func (p *printer) line(format string, args ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintf(p.w, format+"\n", args...)
	}
}

// table writes rows aligned; the first row is the heading. Each table is
// aligned on its own.
func (p *printer) table(rows [][]string) {
	if p.err != nil {
		return
	}
	tw := tabwriter.NewWriter(p.w, 0, 0, 2, ' ', 0)
	for _, row := range rows {
		cells := make([]string, len(row))
		for i, c := range row {
			cells[i] = dash(c)
		}
		if _, err := fmt.Fprintln(tw, "  "+strings.Join(cells, "\t")); err != nil {
			p.err = err
			return
		}
	}
	p.err = tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yes(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func list(s []string) string { return strings.Join(s, ", ") }

func seconds(f *float64) string {
	if f == nil {
		return ""
	}
	return strconv.FormatFloat(*f, 'f', 1, 64) + "s"
}

func duration(f float64) string {
	if f == 0 {
		return ""
	}
	return strconv.FormatFloat(f, 'f', -1, 64) + "s"
}

func (p *printer) header(r Report) {
	at := "-"
	if !r.Time.IsZero() {
		at = r.Time.UTC().Format(time.RFC3339)
	}
	p.line("egressvip explain %s/%s", r.Service.Namespace, r.Service.Name)
	p.table([][]string{
		{"time", at},
		{"observer", r.Observer},
		{"daemon namespace", r.Settings.DaemonNamespace},
		{"lease duration", duration(r.Settings.LeaseDurationSeconds) + " (renew deadline " + dash(duration(r.Settings.RenewDeadlineSeconds)) + ")"},
		{"election", map[bool]string{true: "per address", false: "global (svc_election=false)"}[r.Settings.ServiceElection]},
		{"pod CIDRs", list(r.Settings.PodCIDRs) + " (" + dash(r.Settings.PodSource) + ")"},
		{"Service CIDRs", list(r.Settings.ServiceCIDRs) + " (" + dash(r.Settings.ServiceSource) + ")"},
	})
}

func (p *printer) serviceSection(r Report) {
	s := r.Service
	p.line("")
	p.line("SERVICE")
	var addrs []string
	for _, a := range s.Addresses {
		addrs = append(addrs, a.IP)
	}
	rows := [][]string{{"addresses", list(addrs)}}
	if s.Ignored != "" {
		rows = append(rows, []string{"served", "no: " + s.Ignored})
		p.table(rows)
		return
	}
	eg := "off"
	if s.Egress.Enabled {
		parts := []string{strings.Join(s.Egress.Families, "+")}
		if len(s.Egress.Ports) > 0 {
			parts = append(parts, "ports "+list(s.Egress.Ports))
		}
		if len(s.Egress.Allow) > 0 {
			parts = append(parts, "allow "+list(s.Egress.Allow))
		}
		if len(s.Egress.Deny) > 0 {
			parts = append(parts, "deny "+list(s.Egress.Deny))
		}
		parts = append(parts, "strict "+yes(s.Egress.Strict))
		eg = strings.Join(parts, "; ")
	}
	var eligible []string
	for i, n := range s.Eligible {
		eligible = append(eligible, fmt.Sprintf("%s (%d)", n, i+1))
	}
	served := "yes"
	if s.Invalid != "" {
		served = "no: " + s.Invalid
	}
	holder := s.Holder
	switch {
	case holder != "" && s.Decision != "":
		holder += " (" + s.Decision + ")"
	case len(s.Eligible) > 0 && s.Decision != "":
		holder = "none (" + s.Eligible[0] + ", first in rank: " + s.Decision + ")"
	default:
		holder = "none"
	}
	var st []string
	if len(s.Status.Ingress) > 0 {
		st = append(st, "ingress "+list(s.Status.Ingress))
	}
	if s.Status.VIPHost != "" {
		st = append(st, "vipHost "+s.Status.VIPHost)
	}
	if s.Status.ActiveEndpoint != "" {
		st = append(st, "active-endpoint "+s.Status.ActiveEndpoint)
	}
	if s.Status.ActiveEndpointIPv6 != "" {
		st = append(st, "active-endpoint-ipv6 "+s.Status.ActiveEndpointIPv6)
	}
	rows = append(rows,
		[]string{"served", served},
		[]string{"traffic policy", s.TrafficPolicy},
		[]string{"egress", eg},
		[]string{"group", list(s.Group)},
		[]string{"ready on", list(s.ReadyNodes)},
		[]string{"eligible", list(eligible)},
		[]string{"holder", holder},
		[]string{"events from", s.ReportedBy},
		[]string{"status", strings.Join(st, "; ")},
	)
	p.table(rows)
}

func (p *printer) addressSection(s Service) {
	p.line("")
	p.line("ADDRESSES")
	rows := [][]string{{"ADDRESS", "FAMILY", "ADMITTED", "WHY"}}
	for _, a := range s.Addresses {
		why := ""
		if a.Refused != nil {
			why = a.Refused.Reason + ": " + a.Refused.Message
		}
		rows = append(rows, []string{a.IP, a.Family, yes(a.Admitted), why})
	}
	p.table(rows)
}

func (p *printer) problemSection(s Service) {
	p.line("")
	p.line("PROBLEMS (Warning Events)")
	if len(s.Problems) == 0 {
		p.line("  none")
		return
	}
	rows := [][]string{{"REASON", "KIND", "MESSAGE"}}
	for _, pr := range s.Problems {
		kind := "warning"
		switch {
		case pr.Fatal:
			kind = "fatal"
		case pr.Transient:
			kind = "transient"
		}
		rows = append(rows, []string{pr.Reason, kind, pr.Message})
	}
	p.table(rows)
}

func (p *printer) leaseSection(r Report) {
	p.line("")
	p.line("LEASES")
	rows := [][]string{{"LEASE", "KIND", "HOLDER", "WRITER", "VALID", "HEARTBEAT", "DURATION", "CLAIMED-BY"}}
	for _, l := range r.Leases {
		holder := l.Holder
		if !l.Exists {
			holder = "(no Lease)"
		}
		rows = append(rows, []string{l.Namespace + "/" + l.Name, l.Kind, holder, l.Writer, yes(l.Valid),
			seconds(l.HeartbeatAgeSeconds), duration(l.LeaseDurationSeconds), l.ClaimedBy})
	}
	p.table(rows)
}

func (p *printer) nodeSection(r Report) {
	p.line("")
	p.line("NODES")
	rows := [][]string{{"NODE", "LIVE", "HEARTBEAT", "DURATION", "VERSION", "STANDING", "ELIGIBLE", "RANK", "DECISION", "SEES-HOLDER", "WHY-NOT"}}
	for _, n := range r.Nodes {
		version, standing, rank := "", "", ""
		if n.Heartbeat {
			version, standing = strconv.Itoa(n.Version), yes(n.Standing)
			if n.Draining {
				standing += " (draining)"
			}
		}
		if n.Rank > 0 {
			rank = strconv.Itoa(n.Rank)
		}
		rows = append(rows, []string{n.Name, yes(n.Live), seconds(n.HeartbeatAgeSeconds), duration(n.LeaseDurationSeconds),
			version, standing, yes(n.Eligible), rank, n.Decision, n.Holder, n.WhyNot})
	}
	p.table(rows)
}

func (p *printer) endpointSection(r Report) {
	p.line("")
	p.line("ENDPOINTS")
	if len(r.Endpoints) == 0 {
		p.line("  none")
		return
	}
	rows := [][]string{{"POD", "NODE", "IPV4", "IPV6", "READY", "SERVING", "TERMINATING", "TRUST"}}
	for _, e := range r.Endpoints {
		trust := "trusted"
		if !e.Trusted {
			trust = "skipped: " + e.Skipped
		}
		rows = append(rows, []string{e.Name, e.Node, e.IPv4, e.IPv6, yes(e.Ready), yes(e.Serving), yes(e.Terminating), trust})
	}
	p.table(rows)
}

// pathText says in words how one address of a pod leaves.
func pathText(x Path) string {
	switch x.Mode {
	case PathSNAT:
		if x.Why != "" {
			return "leaves with " + x.Source + " (SNAT on " + x.Holder + "); but " + x.Why
		}
		return "leaves with " + x.Source + " (SNAT on " + x.Holder + ", the holder)"
	case PathSteered:
		via := list(x.Via)
		if x.Tunnel {
			via = "VXLAN"
		}
		s := "steered to " + x.Holder + " via " + dash(via) + ", leaves with " + x.Source
		if x.Why != "" {
			s += "; but " + x.Why
		}
		return s
	case PathHeld:
		return "held: " + x.Why
	}
	return "leaves with its node's address: " + x.Why
}

func (p *printer) egressSection(r Report) {
	if !r.Service.Egress.Enabled {
		return
	}
	p.line("")
	p.line("EGRESS")
	rows := [][]string{{"POD", "FAMILY", "ADDRESS", "PATH"}}
	for _, e := range r.Endpoints {
		for _, x := range e.Egress {
			rows = append(rows, []string{e.Name, x.Family, x.Pod, pathText(x)})
		}
	}
	if len(rows) == 1 {
		p.line("  no pods")
		return
	}
	p.table(rows)
}

func (p *printer) kernelSection(r Report) {
	k := r.Kernel
	if k == nil {
		return
	}
	p.line("")
	p.line("KERNEL of %s (serviceInterface %s)", k.Node, dash(k.Interface))
	if k.InterfaceError != "" {
		p.line("  interface: %s", k.InterfaceError)
	}
	if k.AddressesError != "" {
		p.line("  addresses: %s", k.AddressesError)
	} else {
		rows := [][]string{{"ADDRESS", "BOUND", "WANT"}}
		for _, a := range k.Addresses {
			rows = append(rows, []string{a.IP, yes(a.Bound), yes(a.Want)})
		}
		p.table(rows)
	}
	fw := k.Firewall
	if fw.Error != "" {
		p.line("  firewall (%s): %s", dash(fw.Backend), fw.Error)
	} else {
		p.line("  firewall (%s): rules for the Service %s, want %s", dash(fw.Backend), yes(fw.Rules), yes(fw.Want))
	}
	if k.SteeringError != "" {
		p.line("  steering: %s", k.SteeringError)
		return
	}
	if len(k.Steering) == 0 {
		p.line("  steering: no pods of the Service on this node")
		return
	}
	rows := [][]string{{"POD", "STEER-TO", "WANT", "IP RULES", "ROUTES"}}
	for _, s := range k.Steering {
		var rules []string
		for _, x := range s.Rules {
			table := "-"
			if x.Table != 0 {
				table = strconv.Itoa(x.Table)
			}
			rules = append(rules, fmt.Sprintf("%d: from %s fwmark %#x/%#x lookup %s proto 231", x.Priority, x.From, x.Mark, x.Mask, table))
		}
		if len(rules) == 0 {
			rules = []string{"none"}
		}
		rows = append(rows, []string{s.Pod, s.Holder, yes(s.Want), strings.Join(rules, "; "), strings.Join(s.Routes, "; ")})
	}
	p.table(rows)
}
