package steer

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"

	"github.com/egressvip/egressvip/pkg/model"
)

// hop is a next hop, and so one routing table: the holder's address and
// the device that reaches it without a router in between.
type hop struct {
	gw  netip.Addr
	dev int
}

func (h hop) family() int { return family(h.gw) }

// flags are the route flags of the hop: "onlink" tells the kernel that gw
// is on the device's link even though no subnet of the device holds it. A
// link-local gateway (IPv6 through the tunnel) is on-link by definition,
// and IPv6 refuses onlink for it.
func (h hop) flags() int {
	if h.gw.IsLinkLocalUnicast() {
		return 0
	}
	return int(netlink.FLAG_ONLINK)
}

func compareHops(a, b hop) int {
	if c := a.gw.Compare(b.gw); c != 0 {
		return c
	}
	return cmp.Compare(a.dev, b.dev)
}

// wantRule is the rule one steered pod needs: its next hop, and the Service
// that asked first (whose failure a failed write is).
type wantRule struct {
	hop      hop
	services []string
}

// planRules resolves the next hop of every steer rule. A rule whose hop
// cannot be resolved, or whose pod another Service already steers to
// another holder, fails for its Service; the others are planned, one rule
// per pod. Rules are taken in the order of Service and pod, so that the
// same input always keeps the same one of two conflicting rules.
func planRules(steer []model.SteerRule, resolve func(model.SteerRule) (hop, error), fail func(string, error)) map[netip.Addr]*wantRule {
	order := make([]int, len(steer))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		if c := cmp.Compare(steer[a].Service, steer[b].Service); c != 0 {
			return c
		}
		return steer[a].Pod.Compare(steer[b].Pod)
	})
	want := make(map[netip.Addr]*wantRule, len(steer))
	holders := map[netip.Addr]string{}
	for _, i := range order {
		s := steer[i]
		pod := s.Pod.Unmap()
		if !pod.IsValid() || pod.IsUnspecified() {
			fail(s.Service, fmt.Errorf("pod address %q is not valid", s.Pod))
			continue
		}
		h, err := resolve(s)
		if err != nil {
			fail(s.Service, err)
			continue
		}
		if w, ok := want[pod]; ok {
			if w.hop != h {
				fail(s.Service, fmt.Errorf("pod %s is already steered to holder %s (%s) for Service %s; it cannot go to %s (%s) too",
					pod, holders[pod], w.hop.gw, w.services[0], s.Holder, h.gw))
				continue
			}
			if !slices.Contains(w.services, s.Service) {
				w.services = append(w.services, s.Service)
			}
			continue
		}
		want[pod] = &wantRule{hop: h, services: []string{s.Service}}
		holders[pod] = s.Holder
	}
	return want
}

// assignTables gives each wanted hop a table in [min, max]: the table that
// already routes through it (have, by table), or the lowest id that no
// table in use has. Hops left over when the range is full come back in
// full.
func assignTables(want []hop, have map[int]hop, minID, maxID int) (ids map[hop]int, full []hop) {
	ids = make(map[hop]int, len(want))
	existing := make(map[hop]int, len(have))
	for id, h := range have {
		if prev, ok := existing[h]; !ok || id < prev {
			existing[h] = id
		}
	}
	wanted := make(map[hop]bool, len(want))
	for _, h := range want {
		wanted[h] = true
	}
	used := make(map[int]bool, len(have)+len(want))
	for id := range have {
		used[id] = true
	}
	var fresh []hop
	for h := range wanted {
		if id, ok := existing[h]; ok {
			ids[h] = id
			continue
		}
		fresh = append(fresh, h)
	}
	slices.SortFunc(fresh, compareHops)
	next := minID
	for _, h := range fresh {
		for next <= maxID && used[next] {
			next++
		}
		if next > maxID {
			full = append(full, h)
			continue
		}
		ids[h] = next
		used[next] = true
		next++
	}
	return ids, full
}
