package node

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	k8stesting "k8s.io/client-go/testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/metrics"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/plan"
)

// A status write that hangs does not hold up the sync loop: the address of
// a Service whose Lease another node took goes at once.
func TestHangingStatusWriteDoesNotBlockTheDatapath(t *testing.T) {
	h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", false)...)
	entered := make(chan struct{})
	unblock := make(chan struct{})
	var once sync.Once
	h.client.PrependReactor("patch", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
		once.Do(func() { close(entered) })
		<-unblock
		return true, nil, errors.New("API server unreachable")
	})
	h.elections.grantAll()
	stop := h.run()
	defer stop()
	defer close(unblock)

	eventually(t, "the address bound", func() bool { return h.addrs.has("203.0.113.10") })
	select {
	case <-entered:
	case <-time.After(waitFor):
		t.Fatal("the reporter never wrote")
	}
	// Node B took the address over (this node was cut off, say).
	h.elections.peer("node-b", "192.0.2.2")
	h.elections.hold("node-b", []string{"web"}, "203.0.113.10")
	h.ctrl.Poke()
	eventually(t, "the address removed while the status write hangs", func() bool { return !h.addrs.has("203.0.113.10") })
	eventually(t, "the pod steered to the new holder", func() bool {
		st := h.snat.datapath().Steer
		return len(st) == 1 && st[0].Holder == "node-b"
	})
}

// A restart keeps the addresses it finds bound while it takes their Leases
// back (no gap, no Event), and removes owned addresses no Service claims,
// then releases and deletes their Leases.
func TestRestartKeepsBoundAddressesWhileTakingTheLeasesBack(t *testing.T) {
	for _, tc := range []struct {
		name  string
		local bool
		// leases are the holdings the new process finds.
		leases func(f *fakeElections)
	}{
		{name: "Leases held from before a heartbeat gap", local: false, leases: func(f *fakeElections) {
			f.hold(nodeName, []string{"web"}, "203.0.113.10")
			f.set(func(v *model.ElectionView) {
				for k, l := range v.Leases {
					l.Current = false
					v.Leases[k] = l
				}
			})
		}},
		{name: "Leases gone, pinned egress", local: true, leases: func(*fakeElections) {}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", tc.local)...)
			h.addrs.set(func(f *fakeAddrs) { f.bound[addr("203.0.113.10")], f.bound[addr("203.0.113.99")] = true, true })
			tc.leases(h.elections)
			h.elections.set(func(v *model.ElectionView) {
				v.Leases[addrLease("203.0.113.99")] = model.Lease{Kind: model.AddressLease, Holder: nodeName, Writer: model.Current, ClaimedBy: "default"}
			})
			h.run()

			eventually(t, "the Leases taken back", func() bool {
				c := h.elections.claimed()
				return slices.Contains(c, addrLease("203.0.113.10")) && slices.Contains(c, svcLease("web"))
			})
			eventually(t, "the stale address's Lease released and deleted", func() bool {
				return h.elections.wasReleased(addrLease("203.0.113.99")) && h.j.has("delete "+addrLease("203.0.113.99").String())
			})
			if h.addrs.has("203.0.113.99") || h.j.index("remove 203.0.113.99") > h.j.index("release "+addrLease("203.0.113.99").String()) {
				t.Errorf("the stale address was not removed before its Lease was released: %s", h.j)
			}
			if !h.addrs.has("203.0.113.10") || len(h.snat.snat("default/web")) != 1 {
				t.Fatalf("the restart removed the datapath while taking the Leases back: %s", h.j)
			}

			h.elections.grantAll()
			eventually(t, "the Service reported again", func() bool {
				return h.service("web").Annotations[annotations.VIPHost] == nodeName
			})
			if h.j.has("remove 203.0.113.10") || !h.addrs.has("203.0.113.10") {
				t.Errorf("the address was removed across the restart: %s", h.j)
			}
			if n := h.count("Normal", plan.EventBound) + h.count("Normal", plan.EventReleased); n != 0 {
				t.Errorf("a restart that changes nothing raised Events: %q", h.collect())
			}
		})
	}
}

// Shutdown: the pinned egress Service keeps address (made to outlive the
// process), rules and Leases; the other Service's address and rules are
// removed first, then its Leases released.
func TestShutdownKeepsPinnedEgressAndReleasesTheRestAfterRemovingIt(t *testing.T) {
	objs := append(egressApp("pinned", "203.0.113.10", "10.244.1.5", true), egressApp("shared", "203.0.113.20", "10.244.1.6", false)...)
	h := newHarness(t, objs...)
	h.elections.grantAll()
	stop := h.run()
	eventually(t, "both Services served", func() bool {
		return h.addrs.has("203.0.113.10") && h.addrs.has("203.0.113.20") &&
			len(h.snat.snat("default/pinned")) == 1 && len(h.snat.snat("default/shared")) == 1
	})
	stop()

	if !h.elections.drained {
		t.Error("the heartbeat was not marked draining")
	}
	if !h.addrs.has("203.0.113.10") || !slices.Equal(h.snat.snat("default/pinned"), []string{"10.244.1.5>203.0.113.10"}) {
		t.Errorf("shutdown removed the pinned egress Service's datapath: %s, SNAT %v", h.j, h.snat.snat("default/pinned"))
	}
	if !slices.Equal(h.addrs.persisted, []netip.Addr{addr("203.0.113.10")}) {
		t.Errorf("persisted %v, want the pinned address only", h.addrs.persisted)
	}
	if h.addrs.has("203.0.113.20") || len(h.snat.snat("default/shared")) != 0 {
		t.Errorf("shutdown kept the datapath of a Service another node can serve: %s", h.j)
	}
	for _, l := range []types.NamespacedName{addrLease("203.0.113.10"), svcLease("pinned")} {
		if h.elections.wasReleased(l) {
			t.Errorf("released %s of the pinned Service", l)
		}
	}
	for _, l := range []types.NamespacedName{addrLease("203.0.113.20"), svcLease("shared")} {
		if r := h.j.index("release " + l.String()); r < 0 || r < h.j.index("remove 203.0.113.20") {
			t.Errorf("%s not released after its address was removed: %s", l, h.j)
		}
	}
}

// The check tick renews the addresses' lifetime; a firewall changed by
// someone else is compared again and rewritten by the next sync.
func TestTamperedFirewallIsRewritten(t *testing.T) {
	// No periodic full resync within the test: only the check may
	// trigger a rewrite.
	m := metrics.New()
	h := newHarnessWith(t, func(o *Options) { o.Resync = 24 * time.Hour; o.Metrics = m }, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
	h.elections.hold(nodeName, []string{"web"}, "203.0.113.10")
	h.run()
	eventually(t, "ready", func() bool { return h.ctrl.Ready() == nil && len(h.snat.snat("default/web")) == 1 })
	rewrites := func() int {
		h.snat.mu.Lock()
		defer h.snat.mu.Unlock()
		return h.snat.rewrites
	}
	// Intact: the check ticks renew the addresses and rewrite nothing.
	base, refreshed := rewrites(), h.addrs.refreshCount()
	eventually(t, "two check ticks", func() bool {
		h.clock.Step(checkInterval)
		return h.addrs.refreshCount() >= refreshed+2
	})
	if n := rewrites(); n != base {
		t.Fatalf("rewrote %d times while the firewall was intact", n-base)
	}

	h.snat.set(func(f *fakeSNAT) { f.tampered = true })
	eventually(t, "the tampered rules rewritten", func() bool {
		h.clock.Step(checkInterval)
		return rewrites() > base
	})
	if h.snat.datapath().SNAT == nil || len(h.snat.snat("default/web")) != 1 {
		t.Errorf("rewritten without the rule: %+v", h.snat.datapath())
	}
	repairs := func() float64 {
		var out dto.Metric
		if err := m.Repairs.WithLabelValues("firewall").Write(&out); err != nil {
			t.Fatal(err)
		}
		return out.GetCounter().GetValue()
	}
	if n := repairs(); n != 1 {
		t.Errorf("firewall repairs = %v after one tampering, want 1", n)
	}

	// Unverified (someone else committed while the rules were written):
	// rewritten to take a reference, without reading the state back
	// (no Recheck) and not counted as a repair.
	base = rewrites()
	h.snat.mu.Lock()
	rechecks := h.snat.rechecks
	h.snat.mu.Unlock()
	h.snat.set(func(f *fakeSNAT) { f.unverified = true })
	eventually(t, "the unverified rules rewritten", func() bool {
		h.clock.Step(checkInterval)
		return rewrites() > base
	})
	if n := repairs(); n != 1 {
		t.Errorf("firewall repairs = %v after an unverified check, want still 1", n)
	}
	h.snat.mu.Lock()
	defer h.snat.mu.Unlock()
	if h.snat.rechecks != rechecks {
		t.Errorf("an unverified check made the next sync read the rules back (%d Rechecks)", h.snat.rechecks-rechecks)
	}
}

// A sync that fails because the daemon is stopping is neither a sync error
// nor retried: shutdown applies the drain plan next. A failure otherwise
// is both.
func TestSyncCutShortByShutdownIsNotAFailure(t *testing.T) {
	m := metrics.New()
	h := newHarnessWith(t, func(o *Options) { o.Metrics = m }, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
	h.snat.set(func(f *fakeSNAT) { f.err = errors.New("nft: signal: killed") })
	syncErrors := func() float64 {
		var out dto.Metric
		if err := m.SyncErrors.Write(&out); err != nil {
			t.Fatal(err)
		}
		return out.GetCounter().GetValue()
	}
	stopping, cancel := context.WithCancel(h.ctx)
	cancel()
	h.ctrl.Poke()
	h.ctrl.processNext(stopping)
	if n, r := syncErrors(), h.ctrl.queue.NumRequeues(syncKey); n != 0 || r != 0 {
		t.Errorf("a sync cut short by the shutdown: %v sync errors, %d retries; want none", n, r)
	}
	h.ctrl.Poke()
	h.ctrl.processNext(h.ctx)
	if n, r := syncErrors(), h.ctrl.queue.NumRequeues(syncKey); n != 1 || r != 1 {
		t.Errorf("a failed sync: %v sync errors, %d retries; want 1 and 1", n, r)
	}
}

// Ready once a sync succeeded, not after a failed one; alive while the
// loop finishes something within three resync periods.
func TestReadyAndAlive(t *testing.T) {
	h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
	if h.ctrl.Ready() == nil {
		t.Fatal("ready before any sync")
	}
	if err := h.ctrl.Alive(); err != nil {
		t.Fatalf("not alive at start: %v", err)
	}
	h.snat.set(func(f *fakeSNAT) { f.err = errors.New("iptables-restore: exit status 1") })
	h.ctrl.Poke()
	h.ctrl.processNext(h.ctx)
	if h.ctrl.Ready() == nil {
		t.Fatal("ready after a failed sync")
	}
	h.snat.set(func(f *fakeSNAT) { f.err = nil })
	h.ctrl.Poke()
	h.ctrl.processNext(h.ctx)
	if err := h.ctrl.Ready(); err != nil {
		t.Fatalf("not ready after a successful sync: %v", err)
	}

	h.clock.Step(3*time.Minute + time.Second)
	err := h.ctrl.Alive()
	if err == nil || !strings.Contains(err.Error(), "has not finished anything") {
		t.Fatalf("alive (%v) although the loop finished nothing for three resync periods", err)
	}
	h.ctrl.Poke()
	h.ctrl.processNext(h.ctx)
	if err := h.ctrl.Alive(); err != nil {
		t.Fatalf("not alive once the loop finished a sync: %v", err)
	}
}
