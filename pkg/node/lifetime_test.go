package node

import (
	"testing"
	"time"
)

// The lifetime grows with the cost of a round of renewals, after the
// heartbeat announced it; it shrinks a minute after the cost went, the
// heartbeat following once the longer lifetime has run out.
func TestAdaptLifetime(t *testing.T) {
	s := &lifetimeState{base: 2 * time.Second, margin: 3 * time.Second}
	t0 := time.Unix(1000, 0)

	// Cheap: nothing to do.
	if step := s.adapt(t0, 20*time.Microsecond, 2000, 2000, 2*time.Second, 5*time.Second); step != (lifetimeStep{}) {
		t.Fatalf("cheap renewals: %+v", step)
	}
	// 2,000 IPv6 addresses at 500 µs each: a 1 s round wants 8 s. The
	// heartbeat first; the lifetime only once a renewal wrote it.
	step := s.adapt(t0, 500*time.Microsecond, 2000, 2000, 2*time.Second, 5*time.Second)
	if step.heartbeat != 11*time.Second || step.lifetime != 0 {
		t.Fatalf("expensive, heartbeat not written yet: %+v, want heartbeat 11s and no lifetime", step)
	}
	step = s.adapt(t0.Add(time.Second), 500*time.Microsecond, 2000, 2000, 2*time.Second, 11*time.Second)
	if step.lifetime != 8*time.Second {
		t.Fatalf("expensive, heartbeat written: %+v, want lifetime 8s", step)
	}
	// Bounded.
	if step := s.adapt(t0, 50*time.Millisecond, 2000, 2000, 8*time.Second, 11*time.Second); step.heartbeat != maxLifetime+3*time.Second {
		t.Fatalf("very expensive: %+v, want the heartbeat for %v", step, maxLifetime)
	}
	// Addresses still being added: the cost measured with 1,000 is scaled
	// to 2,000 (an IPv6 write costs as many addresses as there are).
	if step := s.adapt(t0, 250*time.Microsecond, 1000, 2000, 2*time.Second, 5*time.Second); step.heartbeat != 11*time.Second {
		t.Fatalf("measured with half the addresses: %+v, want the heartbeat for 8s", step)
	}
	// The cost goes: after a minute the lifetime shortens, the heartbeat
	// once the 8 s lifetime has run out.
	cheap := func(at time.Time) lifetimeStep {
		return s.adapt(at, 20*time.Microsecond, 2000, 2000, 8*time.Second, 11*time.Second)
	}
	if step := cheap(t0.Add(10 * time.Second)); step != (lifetimeStep{}) {
		t.Fatalf("cost gone a moment ago: %+v", step)
	}
	if step := cheap(t0.Add(30 * time.Second)); step != (lifetimeStep{}) {
		t.Fatalf("cost gone 20 s ago: %+v", step)
	}
	step = cheap(t0.Add(71 * time.Second))
	if step.lifetime != 2*time.Second || step.heartbeat != 0 {
		t.Fatalf("cost gone a minute ago: %+v, want lifetime 2s first", step)
	}
	if step := s.adapt(t0.Add(75*time.Second), 20*time.Microsecond, 2000, 2000, 2*time.Second, 11*time.Second); step.heartbeat != 0 {
		t.Fatalf("before the longer lifetime ran out: %+v", step)
	}
	if step := s.adapt(t0.Add(80*time.Second), 20*time.Microsecond, 2000, 2000, 2*time.Second, 11*time.Second); step.heartbeat != 5*time.Second {
		t.Fatalf("after the longer lifetime ran out: %+v, want heartbeat 5s", step)
	}
}
