package plan

import (
	"net/netip"

	"k8s.io/apimachinery/pkg/types"
)

// GroupView explains one group of Services linked by shared addresses, as
// one node's planner sees it.
type GroupView struct {
	// Addresses and Services of the group, sorted.
	Addresses []netip.Addr
	Services  []types.NamespacedName
	// Decision is this node's decision for the group: the holder, the
	// reason, and the nodes that may hold it in rank order.
	Decision Decision
	// Split is true when the group's Services have ready endpoints on
	// disjoint nodes (one node serves them all anyway).
	Split bool
}

// Explain plans once, from a fresh memory, and returns every group with
// this node's decision: what `egressvip explain` shows per node.
func Explain(in Input) ([]GroupView, Plan) {
	p, _ := Decide(Start(nil), in)
	var out []GroupView
	for _, g := range groups(in.Services) {
		gv := GroupView{Addresses: g.addrs}
		for _, s := range g.services {
			gv.Services = append(gv.Services, s.Key)
		}
		gv.Decision = p.Decisions[g.services[0].Key]
		_, gv.Split = g.eligible(newDecider(in).candidates())
		out = append(out, gv)
	}
	return out, p
}

func newDecider(in Input) *decider {
	return &decider{in: in, ev: in.Election, now: in.Election.Now}
}
