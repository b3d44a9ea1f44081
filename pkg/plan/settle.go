package plan

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
)

// Result is what applying a plan did.
type Result struct {
	// Kernel are the owned addresses the kernel holds after the apply;
	// KernelKnown is false when they could not be read (then the plan's
	// bindings and the previous state count as held).
	Kernel      []netip.Addr
	KernelKnown bool
	// Busy are addresses another host answered for when probed, with its
	// MAC: they were not bound.
	Busy map[netip.Addr]string
	// FailedAddrs are addresses that could not be bound or removed.
	FailedAddrs map[netip.Addr]error
	// FailedServices are Services ("namespace/name") whose firewall rules
	// or routes could not be written.
	FailedServices map[string]error
	// Err is a failure of everything (the firewall could not be written
	// at all): every Service's rules may be left as they were.
	Err error
}

// Backoff bounds for a group whose apply fails.
const (
	backoffFirst = time.Second
	backoffMax   = 5 * time.Minute
)

// Settle records what the kernel holds after the plan was applied and
// returns the Leases to release: those this node holds but no longer
// wants, once the kernel holds none of the addresses they guard. A failure
// of one group's addresses or rules affects that group alone: it is marked
// failing (no longer stood for, so its Leases are released once its
// addresses are gone and another node may try), retried with back-off, and
// reported; every other group is released, reported and served as usual.
func Settle(mem Memory, p Plan, now time.Time, retry, grace time.Duration, r Result) (Memory, []types.NamespacedName, []Event) {
	kernel := map[netip.Addr]bool{}
	if r.KernelKnown {
		for _, a := range r.Kernel {
			kernel[a] = true
		}
	} else {
		for a := range mem.Kernel {
			kernel[a] = true
		}
		for _, b := range p.Bind {
			kernel[b.Addr] = true
		}
	}
	mem.Kernel = kernel

	programmed := map[types.NamespacedName]bool{}
	if r.Err != nil {
		for k := range mem.Programmed {
			programmed[k] = true
		}
	}
	for k := range p.owned {
		programmed[k] = true
	}
	mem.Programmed = programmed

	if mem.Busy == nil {
		mem.Busy = map[netip.Addr]time.Time{}
	}
	var events []Event
	for a, mac := range r.Busy {
		mem.Busy[a] = now.Add(retry)
		g := p.groupOf[a.String()]
		for k, gk := range p.groupOf {
			if gk == g && strings.Contains(k, "/") {
				events = append(events, Event{Service: parseKey(k), Warning: true, Reason: EventInUse,
					Message: fmt.Sprintf("host %s still answers for %s: not bound until it stops (probed again in %s)", mac, a, retry)})
			}
		}
	}

	failed := map[string]string{}
	for a, err := range r.FailedAddrs {
		if g, ok := p.groupOf[a.String()]; ok {
			failed[g] = fmt.Sprintf("address %s: %v", a, err)
		}
	}
	for svc, err := range r.FailedServices {
		if g, ok := p.groupOf[svc]; ok {
			failed[g] = fmt.Sprintf("rules of %s: %v", svc, err)
		}
	}
	if mem.Failing == nil {
		mem.Failing = map[string]Failure{}
	}
	for g, f := range mem.Failing {
		if _, again := failed[g]; !again && !now.Before(f.Until) {
			delete(mem.Failing, g)
		}
	}
	for g, msg := range failed {
		f := mem.Failing[g]
		f.Attempts++
		wait := backoffFirst << min(f.Attempts-1, 16)
		f.Until = now.Add(min(wait, backoffMax))
		f.Message = msg + fmt.Sprintf("; this node gives the address up and retries in %s", min(wait, backoffMax).Round(time.Second))
		mem.Failing[g] = f
	}

	if mem.Drained == nil {
		mem.Drained = map[netip.Addr]Drained{}
	}
	for a, rules := range p.drained {
		if !kernel[a] {
			mem.Drained[a] = Drained{Until: now.Add(grace), Rules: rules}
		}
	}

	var release []types.NamespacedName
	for lease, addrs := range p.releasable {
		if !slices.ContainsFunc(addrs, func(a netip.Addr) bool { return kernel[a] }) {
			release = append(release, lease)
		}
	}
	slices.SortFunc(release, func(a, b types.NamespacedName) int { return strings.Compare(a.String(), b.String()) })
	return mem, release, events
}

func parseKey(k string) types.NamespacedName {
	ns, name, _ := strings.Cut(k, "/")
	return types.NamespacedName{Namespace: ns, Name: name}
}

// Drain plans shutdown (SIGTERM). Groups no other node could hold (every
// Service of it has externalTrafficPolicy Local with all ready endpoints
// here) that egress keep their Leases, addresses and rules, so the next
// process resumes them without a gap (their addresses' lifetime is made
// unlimited by the caller: a graceful stop hands them over, a crash fences
// them). Everything else is removed first, then Settle releases its Leases,
// so another node takes over at once.
func Drain(mem Memory, in Input) Plan {
	d := decider{in: in, mem: mem, ev: in.Election, now: in.Election.Now}
	d.next = mem
	d.p = Plan{
		Decisions:  map[types.NamespacedName]Decision{},
		Reports:    map[types.NamespacedName]Report{},
		releasable: map[types.NamespacedName][]netip.Addr{},
		groupOf:    map[string]string{},
		owned:      map[types.NamespacedName]bool{},
		drained:    map[netip.Addr][]model.SNATRule{},
	}
	self := in.Election.Self
	covered := map[types.NamespacedName]bool{}
	for _, g := range groups(in.Services) {
		st := d.leases(g)
		keep := st.selfAll && g.pinned(self) && g.egress() && slices.ContainsFunc(g.addrs, func(a netip.Addr) bool { return mem.Kernel[a] })
		if !keep {
			continue
		}
		for _, a := range g.addrs {
			covered[addressLease(in.DaemonNamespace, a)] = true
			if mem.Kernel[a] {
				d.p.Bind = append(d.p.Bind, model.Binding{Addr: a, KeepOnly: true})
			}
		}
		for _, s := range g.services {
			covered[election.ServiceLeaseKey(s.Key)] = true
		}
		dec := Decision{Holder: self, Own: true, Reason: ReasonKept}
		d.datapath(g, dec, true)
	}
	// Every other Lease this node holds goes once the kernel let go of
	// the addresses it guards (a Service Lease: its Service's).
	guards := map[types.NamespacedName][]netip.Addr{}
	for i := range in.Services {
		s := &in.Services[i]
		guards[election.ServiceLeaseKey(s.Key)] = s.Addresses()
	}
	for key, lv := range in.Election.Leases {
		if covered[key] || lv.Holder != self {
			continue
		}
		addrs := guards[key]
		if a, ok := election.AddressOfLease(key.Name); ok {
			addrs = []netip.Addr{a}
		}
		d.p.releasable[key] = addrs
	}
	d.finish()
	d.p.Routes = model.Routes{}
	return d.p
}
