package node

import (
	"time"
)

// Address lifetimes that grow with their cost.
//
// The kernel drops an address whose lifetime nobody renews: that is what
// keeps a dead or frozen daemon's addresses off the wire before another
// node takes them over (lifetime = lease duration - retry period - 2 s).
// Renewing costs one netlink write per address, and an IPv6 address write
// walks every IPv6 address of the node, so at thousands of IPv6 addresses
// a round of renewals takes a good part of a second and, on a busy node,
// no longer keeps up with a 2 s lifetime. The controller then lengthens the
// lifetime, after it has announced a heartbeat leaseDurationSeconds as
// much longer (other nodes wait that long after the last renewal they saw
// before taking over), and shortens it again, heartbeat last, once the
// cost has gone.

// Lifetimes is what netif.Manager offers for that.
type Lifetimes interface {
	Lifetime() time.Duration
	SetLifetime(time.Duration) error
	RenewCost() (perAddress time.Duration, measuredAt, held int)
}

// HeartbeatDurations is what election.Manager offers for that.
type HeartbeatDurations interface {
	SetHeartbeatDuration(time.Duration)
	HeartbeatDuration() time.Duration
}

const (
	// renewRounds: a round of renewals must take at most this fraction
	// of the lifetime (renewals start at a third of it).
	renewRounds = 8
	// maxLifetime bounds the lifetime (and so the failover time of the
	// node's addresses).
	maxLifetime = 60 * time.Second
	// shortenAfter is how long the cost must stay low before the
	// lifetime is shortened again.
	shortenAfter = time.Minute
)

// lifetimeState is what the adaptation remembers.
type lifetimeState struct {
	// base is the configured lifetime and margin the heartbeat duration
	// minus the lifetime (retry period + 2 s).
	base, margin time.Duration
	// lowSince is since when a shorter lifetime would do; heartbeatAt is
	// when the heartbeat duration may follow a shortened lifetime, to
	// heartbeat.
	lowSince    time.Time
	heartbeatAt time.Time
	heartbeat   time.Duration
}

// lifetimeStep is what to do now: set the heartbeat duration and/or the
// address lifetime (zero: leave it).
type lifetimeStep struct {
	heartbeat, lifetime time.Duration
}

// adapt decides the next step from the renewal cost (per address, with
// measuredAt addresses; an IPv6 write costs in proportion to the
// addresses there are, so for held addresses it is scaled up), the
// lifetime in use and the heartbeat duration the last renewal wrote.
func (s *lifetimeState) adapt(now time.Time, perAddress time.Duration, measuredAt, held int, current, written time.Duration) lifetimeStep {
	var step lifetimeStep
	if !s.heartbeatAt.IsZero() && !now.Before(s.heartbeatAt) {
		step.heartbeat, s.heartbeatAt = s.heartbeat, time.Time{}
	}
	want := s.base
	if measuredAt > 0 && held > measuredAt {
		perAddress = perAddress * time.Duration(held) / time.Duration(measuredAt)
	}
	if need := (renewRounds*perAddress*time.Duration(held) + time.Second - 1).Truncate(time.Second); need > want {
		want = min(need, maxLifetime)
	}
	switch {
	case want > current:
		// Longer: the heartbeat says so first.
		s.lowSince, s.heartbeatAt = time.Time{}, time.Time{}
		step.heartbeat = want + s.margin
		if written >= want+s.margin {
			step.lifetime = want
		}
	case want <= current/2 || want == s.base && current > s.base:
		// Shorter, once the cost stayed low: the lifetime first, the
		// heartbeat once every address written with the longer one has
		// been renewed or has expired.
		if s.lowSince.IsZero() {
			s.lowSince = now
		}
		if now.Sub(s.lowSince) >= shortenAfter {
			step.lifetime = want
			s.lowSince = time.Time{}
			s.heartbeatAt, s.heartbeat = now.Add(current+time.Second), want+s.margin
		}
	default:
		s.lowSince = time.Time{}
	}
	return step
}
