package snat

import (
	"crypto/sha256"
	"encoding/hex"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egressvip/egressvip/pkg/annotations"
)

// action is what happens to a packet: its kind and, for SNAT, the source
// it gets. The zero action is none: the packet is left to the node's own
// rules.
type action struct {
	kind   kind
	source netip.Addr
}

// entry is an action and the Service whose rule decided it.
type entry struct {
	action
	service string
}

// podPlan is what one pod's clauses do, in the form both backends write
// it. A pod whose clauses have no destination prefix is "simple": per
// (protocol, destination port) and for all other traffic, the first clause
// in order that takes the traffic decides (an all-traffic clause shadows
// every later one). A pod with a prefix in any clause keeps its clauses in
// order in a chain named after their digest, shared by the pods with equal
// clauses (the pods of one Service, usually).
type podPlan struct {
	// all applies to traffic no port entry names.
	all entry
	// ports are kept only where they differ from all.
	ports map[annotations.DestinationPort]entry
	// chain and digest are set for a pod with prefixes; then all and ports
	// are unused.
	chain  []clause
	digest string
}

// planPod plans one pod's clauses, which are in order.
func planPod(cs []clause) *podPlan {
	p := &podPlan{}
	if slices.ContainsFunc(cs, clause.filtered) {
		for _, c := range cs {
			p.chain = append(p.chain, c)
			if c.matchesAll() {
				break // it shadows every later clause
			}
		}
		p.digest = chainDigest(p.chain)
		return p
	}
	for _, c := range cs {
		if p.all.kind != 0 {
			break
		}
		e := entry{action{c.kind, c.source}, c.service}
		if len(c.ports) == 0 {
			p.all = e
			continue
		}
		for _, port := range c.ports {
			if _, seen := p.ports[port]; !seen {
				if p.ports == nil {
					p.ports = map[annotations.DestinationPort]entry{}
				}
				p.ports[port] = e
			}
		}
	}
	p.canonical()
	return p
}

// canonical drops the port entries that do what all does.
func (p *podPlan) canonical() {
	for port, e := range p.ports {
		if e.action == p.all.action {
			delete(p.ports, port)
		}
	}
}

// has says whether any of the pod's traffic gets an action of kind k.
func (p *podPlan) has(k kind) bool {
	if p.digest != "" {
		return slices.ContainsFunc(p.chain, func(c clause) bool { return c.kind == k })
	}
	if p.all.kind == k {
		return true
	}
	for _, e := range p.ports {
		if e.kind == k {
			return true
		}
	}
	return false
}

// sameTreatment says whether two plans treat every packet alike (Services
// named in comments aside, except in digests).
func sameTreatment(a, b *podPlan) bool {
	if a.digest != b.digest || a.all.action != b.all.action || len(a.ports) != len(b.ports) {
		return false
	}
	for port, e := range a.ports {
		if o, ok := b.ports[port]; !ok || o.action != e.action {
			return false
		}
	}
	return true
}

// chainDigest names a clause list: 12 hex digits of the SHA-256 of its
// canonical text (pods left out, Services in), which keeps iptables chain
// names under 29 characters.
func chainDigest(cs []clause) string {
	var b strings.Builder
	for _, c := range cs {
		b.WriteString(c.kind.String())
		b.WriteByte(' ')
		b.WriteString(c.service)
		if c.source.IsValid() {
			b.WriteString(" to " + c.source.String())
		}
		for _, p := range c.ports {
			b.WriteString(" " + string(p.Protocol) + ":" + strconv.Itoa(int(p.Port)))
		}
		for _, p := range c.allow {
			b.WriteString(" +" + p.String())
		}
		for _, p := range c.deny {
			b.WriteString(" -" + p.String())
		}
		b.WriteByte('\n')
	}
	sum := sha256.Sum256([]byte(b.String()))
	return hex.EncodeToString(sum[:6])
}

// compiled is a family's desired state with its pods planned.
type compiled struct {
	*famDesired
	// pods are the pods with clauses, sorted.
	pods  []netip.Addr
	plans map[netip.Addr]*podPlan
}

func compile(d *famDesired) *compiled {
	c := &compiled{famDesired: d, plans: map[netip.Addr]*podPlan{}}
	for i := 0; i < len(d.clauses); {
		j := i + 1
		for j < len(d.clauses) && d.clauses[j].pod == d.clauses[i].pod {
			j++
		}
		pod := d.clauses[i].pod
		c.pods = append(c.pods, pod)
		c.plans[pod] = planPod(d.clauses[i:j])
		i = j
	}
	return c
}

// chains returns the distinct clause chains of pods with prefixes, by
// digest.
func (c *compiled) chains() map[string][]clause {
	out := map[string][]clause{}
	for _, p := range c.plans {
		if p.digest != "" {
			out[p.digest] = p.chain
		}
	}
	return out
}
